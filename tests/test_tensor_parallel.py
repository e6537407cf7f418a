"""Chapter 12: tensor parallelism. In-process tests (a gloo world of one, fake collectives, the checkers), then real
gloo runs at world sizes 1 and 3 (SmolLM2) and 2 and 4 (random configs), each bounded, leaving no process behind."""
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import course_lib.cli as cli
import course_lib.parallel.tensor as tp
from course_lib import ModelArgs, PRESETS, Transformer, fetch_smollm2, generate, load_gguf_model, load_smollm2
from course_lib.checks.tensor_parallel import check_gqa_head_split, check_ring_all_reduce, check_row_parallel_linear
from course_lib.parallel.launch import random_model, run_tensor_parallel, tensor_parallel_logits
from course_lib.parallel.tensor import (gqa_head_split, load_gguf_shard, shard_model, shard_spec,
                                        tp_bytes_per_token)
from shortcuts import refused, source_copy

TINY = ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=256, hidden_dim=256, max_seq_len=64)


def _children() -> set:
    "Live or unreaped processes whose parent is this one (multiprocessing's resource tracker excepted)."
    me, found = os.getpid(), set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == me and b"resource_tracker" not in cmdline:
            found.add(int(entry.name))
    return found


@pytest.fixture
def no_leftovers():
    before = _children()
    yield
    assert _children() - before == set(), "a tensor-parallel process outlived its call"


@pytest.fixture
def world_of_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def smollm2_path():
    return fetch_smollm2(progress=False)


# ---- in process -----------------------------------------------------------------------------------------------

def test_head_split_keeps_gqa_groups_whole():
    assert [tuple(map(list, gqa_head_split(9, 3, 3, r))) for r in range(3)] == \
        [([0, 1, 2], [0]), ([3, 4, 5], [1]), ([6, 7, 8], [2])]
    assert tuple(map(list, gqa_head_split(8, 4, 2, 1))) == ([4, 5, 6, 7], [2, 3])


@pytest.mark.parametrize("world_size, what", [(2, "n_kv_heads=3"), (4, "n_kv_heads=3"), (9, "n_kv_heads=3")])
def test_bad_splits_of_smollm2_name_what_does_not_divide(world_size, what):
    with pytest.raises(ValueError, match=what):
        shard_spec(PRESETS["smollm2-135m"], 0, world_size)


@pytest.mark.parametrize("args, what", [
    (ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=256, hidden_dim=90), "hidden_dim=90"),
    (ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=250, hidden_dim=96), "vocab_size=250"),
    (ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=96), "n_kv_heads=2")])
def test_bad_splits_of_random_configs(args, what):
    with pytest.raises(ValueError, match=what):
        shard_spec(args, 0, 4)


@pytest.mark.parametrize("rank, world_size, error", [(3, 3, ValueError), (0, 0, ValueError), (-1, 2, ValueError),
                                                     (0, 2.0, TypeError), (True, 2, TypeError)])
def test_bad_rank_or_world_size(rank, world_size, error):
    with pytest.raises(error):
        shard_spec(TINY, rank, world_size)


def test_shard_model_refuses_what_is_not_a_transformer():
    with pytest.raises(TypeError, match="Transformer"):
        shard_model(torch.nn.Linear(2, 2), 0, 1)


def test_shard_model_refuses_a_shard_or_a_fused_model():
    from course_lib import fuse_model
    shard = shard_model(random_model(TINY, 0), 0, 2)
    with pytest.raises(TypeError, match="already sharded"):
        shard_model(shard, 0, 2)
    with pytest.raises(TypeError, match="fused"):
        shard_model(fuse_model(random_model(TINY, 0)), 0, 2)


def test_shard_spec_slices_tile_every_split_weight():
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(TINY).state_dict().items()}
    specs = [shard_spec(TINY, r, 4) for r in range(4)]
    for name, (dim, _, _) in specs[0].items():
        pieces = sorted((s[name][1], s[name][2]) for s in specs)
        assert pieces[0][0] == 0 and pieces[-1][1] == shapes[name][dim]
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))


def test_world_of_one_equals_the_model_full_and_cached(world_of_one):
    ref = random_model(TINY, 0)
    shard = shard_model(random_model(TINY, 0), 0, 1)
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = ref(tokens)
        got = torch.cat([shard(tokens[:, :5])] + [shard(tokens[:, i:i + 1], start_pos=i) for i in range(5, 9)], 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert isinstance(shard.layers[1].feed_forward.w2, tp.RowParallelLinear)
    assert shard.collectives.bytes_reduced == 2 * 9 * (2 * TINY.n_layers + 1) * TINY.dim * 4   # (batch × tokens) rows


def test_gguf_shard_holds_only_its_slice(smollm2_path):
    full = load_gguf_model(smollm2_path)
    shard = load_gguf_shard(smollm2_path, 2, 3)
    sd, spec = full.state_dict(), shard_spec(full.args, 2, 3)
    for name, t in shard.state_dict().items():
        if name in spec:
            dim, start, stop = spec[name]
            assert torch.equal(t, sd[name].narrow(dim, start, stop - start)), name
        else:
            assert torch.equal(t, sd[name]), name
    assert shard.layers[0].attention.n_heads == 3 and shard.layers[0].attention.n_kv_heads == 1
    assert shard.output.weight is shard.tok_embeddings.weight          # tied, as in the file


def test_bytes_per_token_formula():
    b = tp_bytes_per_token(PRESETS["smollm2-135m"], 3)
    assert b["all_reduce"] == 61 * 576 * 4 and b["all_gather"] == 49152 // 3 * 4
    assert tp_bytes_per_token(PRESETS["smollm2-135m"], 1)["sent_per_rank"] == 0


# ---- checkers -------------------------------------------------------------------------------------------------

def _ring_answer(parts):
    "A ring all-reduce simulated in one process: reduce-scatter, then all-gather; bytes each rank sent."
    p, n = len(parts), parts[0].numel()
    chunks = [list(x.clone().chunk(p)) for x in parts]          # chunks[rank][c]
    sent = 0
    for step in range(p - 1):                                    # reduce-scatter
        msgs = [(r, (r - step) % p, chunks[r][(r - step) % p].clone()) for r in range(p)]
        for r, c, data in msgs:
            chunks[(r + 1) % p][c] += data
        sent += n // p * parts[0].element_size()
    for step in range(p - 1):                                    # all-gather: rank r owns chunk (r + 1) % p
        msgs = [(r, (r + 1 - step) % p, chunks[r][(r + 1 - step) % p].clone()) for r in range(p)]
        for r, c, data in msgs:
            chunks[(r + 1) % p][c] = data
        sent += n // p * parts[0].element_size()
    return [torch.cat(c) for c in chunks], sent


def test_checkers_pass_copies_of_the_reference():
    _check, _per, split = source_copy(tp, "_check_rank", "_per_rank", "gqa_head_split")
    assert check_gqa_head_split(split)
    assert check_row_parallel_linear(source_copy(tp, "row_parallel_linear"))
    assert check_ring_all_reduce(_ring_answer)


def test_checkers_refuse_the_library():
    assert refused(check_row_parallel_linear(tp.row_parallel_linear), "row_parallel_linear")
    assert refused(check_gqa_head_split(gqa_head_split), "gqa_head_split")
    assert refused(check_gqa_head_split(lambda n, k, w, r: gqa_head_split(n, k, w, r)), "gqa_head_split")


def test_checkers_name_the_usual_mistakes():
    no_reduce = lambda xs, ws, all_reduce: [x @ w.T for x, w in zip(xs, ws)]
    assert "called all_reduce 0 times" in str(check_row_parallel_linear(no_reduce))
    concat = lambda xs, ws, all_reduce: all_reduce([torch.cat([x @ w.T for x, w in zip(xs, ws)], -1)] * len(xs))
    assert not check_row_parallel_linear(concat)
    cut_kv = lambda n, k, w, r: (range(r * n // w, (r + 1) * n // w), range(r * -(-k // w), min(k, (r + 1) * -(-k // w))))
    assert not check_gqa_head_split(cut_kv)
    def naive(parts):
        total = torch.stack(parts).sum(0)
        return [total.clone() for _ in parts], (len(parts) - 1) * parts[0].numel() * 8
    assert "sending the whole vector" in str(check_ring_all_reduce(naive))


def test_stubs_fail_with_one_line():
    def stub(*args):
        raise NotImplementedError
    for checker in (check_row_parallel_linear, check_gqa_head_split, check_ring_all_reduce):
        assert "NotImplementedError" in str(checker(stub))


# ---- real gloo processes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [2, 4])
def test_random_configs_match_one_process(world_size, no_leftovers):
    tokens = torch.randint(0, TINY.vocab_size, (2, 10), generator=torch.Generator().manual_seed(world_size))
    with torch.inference_mode():
        want = random_model(TINY, 7)(tokens)
    got = tensor_parallel_logits((TINY, 7), tokens, world_size, prefill=6, timeout=120)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("world_size", [1, 3])
def test_smollm2_logits_match_one_process(world_size, smollm2_path, no_leftovers):
    tokens = torch.tensor([[1, 504, 3458, 282, 4649, 314, 8892, 30]])
    with torch.inference_mode():
        want = load_gguf_model(smollm2_path, max_seq_len=64)(tokens)
    got = tensor_parallel_logits("smollm2", tokens, world_size, prefill=5 if world_size == 3 else None,
                                 max_seq_len=64, timeout=120)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_cli_tensor_parallel_text_equals_one_process(capsys, no_leftovers):
    model, tokenizer = load_smollm2(max_seq_len=64)
    expected = generate(model, tokenizer, "The capital of France is", max_new_tokens=8)
    assert cli.main(["generate", "The capital of France is", "--max-new-tokens", "8", "--max-seq-len", "64",
                     "--no-stats", "--tensor-parallel", "3"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_cli_tensor_parallel_refuses_what_it_cannot_do(capsys):
    assert cli.main(["generate", "Hi", "--tensor-parallel", "2"]) == 1       # SmolLM2 has 3 K/V heads
    assert "n_kv_heads=3" in capsys.readouterr().err
    assert cli.main(["generate", "Hi", "--tensor-parallel", "3", "--quant", "q8_0"]) == 1
    assert "--tensor-parallel" in capsys.readouterr().err


def test_bad_split_fails_before_any_process_starts(no_leftovers):
    with pytest.raises(ValueError, match="n_kv_heads=4"):
        tensor_parallel_logits((TINY, 0), torch.zeros(1, 3, dtype=torch.long), 3)


def test_a_failing_rank_is_reported_and_every_process_ends(no_leftovers):
    bad = torch.full((1, 3), 10_000)                             # ids beyond the vocabulary: every rank raises
    with pytest.raises(RuntimeError, match="rank . failed"):
        run_tensor_parallel((TINY, 0), 2, "logits", timeout=120, tokens=bad)


def test_a_timeout_kills_every_process(no_leftovers):
    with pytest.raises(TimeoutError):
        run_tensor_parallel((TINY, 0), 2, "logits", timeout=0.5, tokens=torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("bad, error", [("no/such/file.gguf", ValueError), (42, TypeError), ((TINY, "seed"), TypeError)])
def test_bad_model_sources(bad, error):
    with pytest.raises(error):
        tensor_parallel_logits(bad, torch.zeros(1, 3, dtype=torch.long), 1)

"""Chapter 12b: the Mixture-of-Experts feed-forward, its loading from MixtralForCausalLM, the load-balancing loss,
expert parallelism over gloo, and the chapter's checkers."""
import os
import types

import pytest
import torch
import torch.nn.functional as F

import course_lib.moe as module
from course_lib.checks.moe import (_capacity_reference, check_keep_within_capacity, check_load_balancing_loss,
                                   check_top_k_routing)
from course_lib.model import ModelArgs, Transformer, count_parameters, from_hf
from course_lib.moe import MoEFeedForward, active_parameters, expert_counts, load_balancing_loss, top_k_routing
from course_lib.parallel.experts import ExpertParallelMoE, expert_parallel_forward, experts_of_rank, run_gloo
from shortcuts import refused, source_copy

transformers = pytest.importorskip("transformers")


def _mixtral(seed=0, **overrides):
    torch.manual_seed(seed)
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    kw.update(overrides)
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(**kw)).eval()


# --- routing and the layer ---------------------------------------------------------------------------------------

def test_routing_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 3.5, 0.0]])
    w, e = top_k_routing(logits, 2)
    assert e.tolist() == [[0, 1], [2, 1]]
    assert torch.allclose(w[0], F.softmax(torch.tensor([2.0, 1.0]), -1))     # softmax over the kept logits
    w, _ = top_k_routing(logits, 2, normalize=False)
    assert torch.allclose(w[0], F.softmax(logits[0], -1)[:2]) and w[0].sum() < 1


def test_moe_equals_a_loop_over_tokens_and_transformers_block():
    hf = _mixtral()
    moe = from_hf(hf).layers[0].feed_forward
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        flat = x.reshape(-1, 32)
        w, e = top_k_routing(moe.gate(flat), 2)
        loop = torch.stack([sum(w[t, s] * moe.experts[int(e[t, s])](flat[t]) for s in range(2)) for t in range(10)])
        assert torch.allclose(moe(x).reshape(-1, 32), loop, atol=1e-6)
        assert torch.allclose(moe(x), hf.model.layers[0].mlp(x), atol=1e-6)


def test_only_chosen_experts_run():
    moe = MoEFeedForward(8, 16, n_experts=4, k=1)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[2, 0] = 1.0                  # every token with x[0] > 0 prefers expert 2
    calls = []
    for i, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, inp, out, i=i: calls.append((i, inp[0].shape[0])))
    x = torch.randn(6, 8)
    x[:, 0] = 5.0
    moe(x)
    assert calls == [(2, 6)]


@pytest.mark.parametrize("bad, error", [
    (dict(n_experts=0), "n_experts"), (dict(n_experts=True), "n_experts"), (dict(n_experts=2.0), "n_experts"),
    (dict(n_experts=4, n_experts_per_tok=5), "exceeds"), (dict(n_experts=4, n_experts_per_tok=0), "n_experts_per_tok"),
    (dict(n_experts=4, norm_topk_prob="yes"), "norm_topk_prob")])
def test_bad_configs(bad, error):
    with pytest.raises(ValueError, match=error):
        ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=64, **bad)


def test_bad_inputs():
    with pytest.raises(ValueError, match="k must be between 1 and 4"):
        MoEFeedForward(8, 16, n_experts=4, k=5)
    with pytest.raises(TypeError, match="router_logits"):
        top_k_routing(torch.ones(3, 4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="tokens, n_experts"):
        top_k_routing(torch.ones(4), 2)
    with pytest.raises(ValueError, match="last dimension"):
        MoEFeedForward(8, 16, 4)(torch.ones(2, 7))
    with pytest.raises(ValueError, match="empty"):
        load_balancing_loss((), 2)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        expert_counts(torch.tensor([[0, 4]]), 4)


def test_parameter_counts():
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=40, n_experts=4)
    assert count_parameters(args) == sum(p.numel() for p in Transformer(args).parameters())
    c = active_parameters(args)
    assert c["total"] - c["active"] == 2 * 2 * 3 * 32 * 40          # two idle experts in each of two layers
    mixtral = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=32000, hidden_dim=14336,
                        n_experts=8, n_experts_per_tok=2)
    c = active_parameters(mixtral)
    assert round(c["total"] / 1e9, 1) == 46.7 and round(c["active"] / 1e9, 1) == 12.9   # Mixtral's paper
    dense = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=10, hidden_dim=8)
    assert active_parameters(dense)["total"] == active_parameters(dense)["active"] == count_parameters(dense)


# --- from_hf ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed, overrides", [(0, {}), (1, dict(num_local_experts=8, num_experts_per_tok=3)),
                                             (2, dict(num_experts_per_tok=1, tie_word_embeddings=True))])
def test_from_hf_full_and_cached(seed, overrides):
    hf = _mixtral(seed, **overrides)
    ours = from_hf(hf)
    tokens = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max() < 1e-4
        ours(tokens[:, :6])
        for t in range(6, 10):
            step = ours(tokens[:, t:t + 1], start_pos=t)[:, -1]
            assert (step - hf(tokens[:, :t + 1]).logits[:, -1]).abs().max() < 1e-4


def test_from_hf_reads_the_per_expert_layout_of_older_transformers():
    hf = _mixtral()
    sd = {}
    for name, t in hf.state_dict().items():        # rename to transformers 4.x's block_sparse_moe.experts.N.w1/w2/w3
        p, _, rest = name.partition("mlp.")
        if rest == "gate.weight":
            sd[p + "block_sparse_moe.gate.weight"] = t
        elif rest == "experts.gate_up_proj":
            for e in range(4):
                sd[f"{p}block_sparse_moe.experts.{e}.w1.weight"], sd[f"{p}block_sparse_moe.experts.{e}.w3.weight"] = \
                    t[e, :40], t[e, 40:]
        elif rest == "experts.down_proj":
            for e in range(4):
                sd[f"{p}block_sparse_moe.experts.{e}.w2.weight"] = t[e]
        else:
            sd[name] = t
    old = types.SimpleNamespace(config=hf.config, state_dict=lambda: sd)
    tokens = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert (from_hf(old)(tokens) - hf(tokens).logits).abs().max() < 1e-4


def test_from_hf_refuses_what_it_cannot_do():
    hf = _mixtral(sliding_window=8)
    with pytest.raises(ValueError, match="sliding_window"):
        from_hf(hf)
    extra = _mixtral()
    sd = dict(extra.state_dict(), **{"model.layers.0.mlp.shared_expert.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="shared_expert"):
        from_hf(types.SimpleNamespace(config=extra.config, state_dict=lambda: sd))
    with pytest.raises(ValueError, match="Llama or Mixtral"):
        from_hf(types.SimpleNamespace(config=types.SimpleNamespace(model_type="qwen3_moe"), state_dict=dict))


# --- load balance ----------------------------------------------------------------------------------------------

def test_load_balancing_loss_matches_transformers_and_its_bounds():
    hf_loss = pytest.importorskip("transformers.models.mixtral.modeling_mixtral").load_balancing_loss_func
    g = torch.Generator().manual_seed(3)
    layers = tuple(torch.randn(20, 8, generator=g) for _ in range(3))
    assert torch.allclose(load_balancing_loss(layers, 2), hf_loss(layers, 8, 2), atol=1e-6)
    assert torch.allclose(load_balancing_loss(layers[0], 3), hf_loss(layers[:1], 8, 3), atol=1e-6)
    balanced = torch.eye(4).repeat(5, 1) * 1e-4                     # each expert chosen by a quarter of the tokens
    assert torch.isclose(load_balancing_loss(balanced, 1), torch.tensor(1.0), atol=1e-3)
    collapsed = torch.zeros(10, 4)
    collapsed[:, 0] = 20.0
    assert torch.isclose(load_balancing_loss(collapsed, 1), torch.tensor(4.0), atol=1e-3)   # n_experts: the worst
    counts = expert_counts(top_k_routing(layers[0], 2)[1], 8)
    assert counts.sum() == 40


# --- expert parallelism ----------------------------------------------------------------------------------------

def _children():
    """Ids of this process's live child processes (Linux /proc), but multiprocessing's resource tracker: one per
    parent, started by the first spawn, that lives as long as the parent does (it is not ours to stop)."""
    me, kids = os.getpid(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z" and not _is_resource_tracker(pid):
            kids.append(int(pid))
    return kids


def _is_resource_tracker(pid) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"resource_tracker" in f.read()
    except OSError:
        return False


def _sleep(rank, world_size):
    import time
    time.sleep(60)


def _fail_on_rank_1(rank, world_size):
    if rank == 1:
        raise KeyError("rank 1 broke")
    torch.distributed.barrier()                     # rank 0 waits here for a rank that never comes


def test_expert_parallel_equals_one_process_at_world_sizes_2_and_4():
    if not os.path.isdir("/proc"):
        pytest.skip("counting child processes reads Linux's /proc")
    before = set(_children())
    moe = MoEFeedForward(16, 24, n_experts=8, k=2).eval()
    x = torch.randn(30, 16)
    with torch.no_grad():
        single = moe(x)
    for world_size in (2, 4):
        assert torch.allclose(expert_parallel_forward(moe, x, world_size, timeout=60), single, atol=1e-5)
    assert set(_children()) <= before


def test_run_gloo_reports_a_failing_rank_and_leaves_nothing_behind():
    if not os.path.isdir("/proc"):
        pytest.skip("counting child processes reads Linux's /proc")
    before = set(_children())
    with pytest.raises(RuntimeError, match="(?s)rank 1 failed.*rank 1 broke"):
        run_gloo(_fail_on_rank_1, 2, timeout=60)
    with pytest.raises(RuntimeError, match="no result from ranks"):
        run_gloo(_sleep, 2, timeout=3)          # a hung rank: the timeout stops it
    assert set(_children()) <= before


def test_expert_split_errors():
    assert list(experts_of_rank(8, 1, 4)) == [2, 3]
    with pytest.raises(ValueError, match="must divide n_experts"):
        experts_of_rank(6, 0, 4)
    with pytest.raises(ValueError, match="must divide"):
        expert_parallel_forward(MoEFeedForward(8, 8, 6), torch.ones(3, 8), 4)
    with pytest.raises(ValueError, match="world_size"):
        run_gloo(_fail_on_rank_1, 0)
    with pytest.raises(TypeError, match="MoEFeedForward"):
        ExpertParallelMoE(torch.nn.Linear(2, 2), 0, 1)


# --- checkers --------------------------------------------------------------------------------------------------

def test_checkers_pass_copies_of_the_reference():
    routing, loss = source_copy(module, "_check_int", "_check_logits", "top_k_routing", "load_balancing_loss")[2:]
    assert check_top_k_routing(routing)
    assert check_load_balancing_loss(loss)
    import course_lib.checks.moe as checks
    assert check_keep_within_capacity(source_copy(checks, "_capacity_reference"))


def test_checkers_refuse_the_library():
    assert refused(check_top_k_routing(top_k_routing), "course_lib.moe.top_k_routing itself")
    assert refused(check_top_k_routing(lambda l, k, n: top_k_routing(l, k, n)), "course_lib.moe.top_k_routing")
    assert refused(check_load_balancing_loss(load_balancing_loss), "course_lib.moe.load_balancing_loss itself")
    assert refused(check_load_balancing_loss(lambda l, k: load_balancing_loss(l, k)), "load_balancing_loss")
    assert refused(check_keep_within_capacity(_capacity_reference), "_capacity_reference")


def test_checkers_catch_typical_mistakes():
    def unnormalised(logits, k, normalize=True):
        return torch.topk(F.softmax(logits.float(), -1), k, dim=-1)
    result = check_top_k_routing(lambda l, k, n: tuple(unnormalised(l, k)))
    assert not result and "without renormalising" in str(result)

    def probs_of_chosen_only(logits, k):            # P_i averaged over the chosen experts only
        probs = F.softmax(logits.float(), -1)
        chosen = torch.topk(probs, k, -1).indices
        mask = F.one_hot(chosen, logits.shape[1]).sum(1).float()
        return logits.shape[1] * (mask.mean(0) * (probs * mask).mean(0)).sum()
    assert not check_load_balancing_loss(probs_of_chosen_only)

    def token_major(experts, n_experts, capacity):
        one_hot = F.one_hot(experts.reshape(-1), n_experts)
        return ((one_hot.cumsum(0) * one_hot).sum(-1) - 1 < capacity).reshape(experts.shape)
    result = check_keep_within_capacity(token_major)
    assert not result and "token-major" in str(result)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_norm_topk_prob_matches_qwen3_moe_block(norm_topk_prob):
    qwen = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    config = transformers.Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                                         norm_topk_prob=norm_topk_prob, num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(4)
    block = qwen.Qwen3MoeSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_()                                  # the router starts at zeros: give it something to choose
    ours = MoEFeedForward(16, 24, 6, 2, norm_topk_prob=norm_topk_prob)
    gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
    state = {"gate.weight": block.gate.weight.detach()}
    for e in range(6):
        state.update({f"experts.{e}.w1.weight": gate_up[e, :24], f"experts.{e}.w3.weight": gate_up[e, 24:],
                      f"experts.{e}.w2.weight": down[e]})
    ours.load_state_dict(state)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.allclose(ours(x), block(x), atol=1e-5)


def test_quantized_files_written_before_the_moe_fields_still_load(tmp_path):
    "A chapter 08 file saved before ModelArgs had n_experts & co. means a dense model: it loads as one."
    import dataclasses
    import json
    from safetensors import safe_open
    from safetensors.torch import save_file
    from course_lib import PRESETS, Transformer, load_quantized, quantize_model, save_quantized
    torch.manual_seed(0)
    model = quantize_model(Transformer(dataclasses.replace(PRESETS["tiny"], hidden_dim=192)), "q8_0")
    path = save_quantized(model, tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    args = json.loads(meta["model_args"])
    for name in ("n_experts", "n_experts_per_tok", "norm_topk_prob"):
        del args[name]
    meta["model_args"] = json.dumps(args)
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    old = load_quantized(tmp_path / "old.safetensors")
    assert old.args.n_experts is None
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(old(x), load_quantized(path)(x))
    del args["dim"]                                      # any other field missing is still refused
    meta["model_args"] = json.dumps(args)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="lacks dim"):
        load_quantized(tmp_path / "bad.safetensors")

"""Chapter 11, static batching: generate_batch (left padding, padding+causal mask, per-row positions) equals
each prompt decoded alone, and its batched forward pass equals transformers' LlamaForCausalLM on padded input."""
import copy
import dataclasses
import functools

import pytest
import torch

from course_lib import (PRESETS, Transformer, fetch_smollm2, from_hf, generate_tokens, load_gguf_model,
                        quantize_model, read_gguf, GGUFTokenizer, fuse_model)
from course_lib import check
from course_lib.serving import batch
from course_lib.serving.batch import (batch_logits, generate_batch, left_pad, padding_causal_mask,
                                      position_ids)
from shortcuts import refused, source_copy

PROMPTS = [[5, 17, 3], [9, 1, 2, 8, 44, 61, 7], [100], [33, 33, 33, 33], [250, 4]]


@pytest.fixture(scope="module")
def tiny():
    "A random tiny model in float64: batched and one-at-a-time decoding differ by ~1e-15, never by a token."
    torch.manual_seed(0)
    return Transformer(PRESETS["tiny"]).double().eval()


def alone(model, prompts, n, **kw):
    return [list(generate_tokens(model, p, n, **kw)) for p in prompts]


def test_left_pad_positions_and_mask_by_hand():
    tokens, valid = left_pad([[7, 8], [1, 2, 3]], pad_id=0)
    assert tokens.tolist() == [[0, 7, 8], [1, 2, 3]]
    assert valid.tolist() == [[False, True, True], [True, True, True]]
    assert position_ids(valid).tolist() == [[0, 0, 1], [0, 1, 2]]
    m = padding_causal_mask(valid, 3)
    inf = float("-inf")
    assert m.shape == (2, 1, 3, 3)
    assert m[0, 0].tolist() == [[0, inf, inf], [inf, 0, inf], [inf, 0, 0]]   # the pad query sees itself only
    assert m[1, 0].tolist() == [[0, inf, inf], [0, 0, inf], [0, 0, 0]]
    assert padding_causal_mask(valid, 1)[:, 0, 0].tolist() == [[inf, 0, 0], [0, 0, 0]]   # a decode step


def test_greedy_batch_equals_each_prompt_alone(tiny):
    assert generate_batch(tiny, PROMPTS, 12) == alone(tiny, PROMPTS, 12)


def test_rows_stop_at_eos_and_the_others_go_on(tiny):
    ref = alone(tiny, PROMPTS, 12)
    eos = ref[1][3]                                     # row 1 produces it at step 3
    out = generate_batch(tiny, PROMPTS, 12, eos_id=eos)
    for got, want in zip(out, ref):
        cut = want.index(eos) + 1 if eos in want else len(want)
        assert got == want[:cut]
    assert len(out[1]) == 4 and out[1][-1] == eos


def test_seeded_sampling_repeats_and_equals_generate_tokens(tiny):
    kw = dict(method="top_p", top_p=0.9, temperature=1.3, seed=11)
    first = generate_batch(tiny, PROMPTS, 10, **kw)
    assert first == generate_batch(tiny, PROMPTS, 10, **kw)
    assert first == alone(tiny, PROMPTS, 10, **kw)      # each row's generator is seeded like generate_tokens'
    assert first != generate_batch(tiny, PROMPTS, 10, **{**kw, "seed": 12})


def test_zero_new_tokens_and_one_prompt(tiny):
    assert generate_batch(tiny, PROMPTS, 0) == [[] for _ in PROMPTS]
    assert generate_batch(tiny, [PROMPTS[1]], 5) == alone(tiny, [PROMPTS[1]], 5)


def test_the_model_is_usable_alone_afterwards(tiny):
    generate_batch(tiny, PROMPTS, 4)
    with pytest.raises(ValueError, match="gap"):          # the batch's caches are not one sequence to continue
        tiny(torch.tensor([[1]]), start_pos=3)
    assert list(generate_tokens(tiny, PROMPTS[0], 4)) == alone(tiny, PROMPTS[:1], 4)[0]


def test_fused_and_quantized_models(tiny):
    fused = fuse_model(copy.deepcopy(tiny))
    assert generate_batch(fused, PROMPTS, 8) == alone(tiny, PROMPTS, 8)
    torch.manual_seed(2)
    q = quantize_model(Transformer(dataclasses.replace(PRESETS["tiny"], hidden_dim=192)).eval(), "q8_0",
                       matmul="dequant")             # float32 arithmetic on dequantized weights
    assert generate_batch(q, PROMPTS, 8) == alone(q, PROMPTS, 8)


@pytest.mark.parametrize("call, error, match", [
    (lambda m: generate_batch(m, [], 3), ValueError, "prompts is empty"),
    (lambda m: generate_batch(m, [1, 2], 3), TypeError, r"prompts\[0\]"),
    (lambda m: generate_batch(m, [[1], []], 3), ValueError, r"prompts\[1\]: prompt_ids is empty"),
    (lambda m: generate_batch(m, [[1], [999]], 3), ValueError, r"prompts\[1\].*outside the vocabulary"),
    (lambda m: generate_batch(m, "hello", 3), TypeError, "list of token-id lists"),
    (lambda m: generate_batch(m, [[1]], -1), ValueError, "max_new_tokens"),
    (lambda m: generate_batch(m, [[1] * 100], 100), ValueError, "max_seq_len"),
    (lambda m: generate_batch(m, [[1]], 3, method="beam"), ValueError, "method"),
    (lambda m: generate_batch(m, [[1]], 3, eos_id=10_000), ValueError, "eos_id"),
    (lambda m: generate_batch(object(), [[1]], 3), TypeError, "Transformer"),
])
def test_bad_inputs(tiny, call, error, match):
    with pytest.raises(error, match=match):
        call(tiny)


def test_batched_forward_equals_transformers_on_left_padded_input():
    "The independent reference: transformers' LlamaForCausalLM with attention_mask and position_ids."
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    ours = from_hf(hf).eval()
    prompts = [[3, 4, 5], [10, 11, 12, 13, 14, 15], [7]]
    tokens, valid = left_pad(prompts)
    with torch.inference_mode():
        theirs = hf(input_ids=tokens, attention_mask=valid.long(), position_ids=position_ids(valid)).logits[:, -1]
        mine = batch_logits(ours, tokens, 0, position_ids(valid), padding_causal_mask(valid, tokens.shape[1]))
    assert (mine - theirs).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(1)
    gf = read_gguf(fetch_smollm2())
    return load_gguf_model(gf, max_seq_len=256).eval(), GGUFTokenizer(gf)


TEXTS = ["The capital of France is", "Once upon a time, a robot", "def fibonacci(n):",
         "List three colors:", "Water boils at", "The best way to learn a language is"]


@pytest.mark.slow
def test_smollm2_batch_equals_alone_and_agrees_with_transformers(smollm2):
    model, tok = smollm2
    prompts = [tok.encode(t) for t in TEXTS]
    ours = generate_batch(model, prompts, 16)
    assert ours == alone(model, prompts, 16)
    transformers = pytest.importorskip("transformers")
    import gguf
    path = fetch_smollm2()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    tokens, valid = left_pad(prompts, pad_id=0)      # padding_side="left", as transformers' docs ask for generate
    with torch.inference_mode():
        out = hf.generate(input_ids=tokens, attention_mask=valid.long(), max_new_tokens=16, min_new_tokens=16,
                          do_sample=False, pad_token_id=0)[:, tokens.shape[1]:].tolist()
    agree = sum(a == b for o, t in zip(ours, out) for a, b in zip(o, t)) / (16 * len(prompts))
    print(f"course_lib generate_batch and transformers' generate(padding_side='left'): {agree:.0%} of tokens agree")
    assert agree >= 0.9


@pytest.mark.slow
def test_smollm2_fast_quantized_path_agrees_mostly(smollm2):
    "bfloat16 products over 6 rows may sum in another order than over 1: near-ties can flip (batch invariance)."
    model, tok = smollm2
    prompts = [tok.encode(t) for t in TEXTS]
    q = quantize_model(copy.deepcopy(model), "q4_0")   # matmul="fast": int4 weights, bfloat16 activations
    ours, ref = generate_batch(q, prompts, 8), alone(q, prompts, 8)
    assert [o[0] for o in ours] == [r[0] for r in ref]   # the first token of each: the prompt's own logits
    assert sum(a == b for o, r in zip(ours, ref) for a, b in zip(o, r)) >= 0.75 * 8 * len(prompts)


def test_checker_accepts_a_copy_and_refuses_the_library():
    mine = source_copy(batch, "padding_causal_mask")
    assert check.padding_causal_mask(mine)
    assert refused(check.padding_causal_mask(padding_causal_mask), "padding_causal_mask")


def test_checker_names_the_usual_mistakes():
    def no_self(valid, seq):          # forgets the padding query: rows of -inf
        slots = valid.shape[1]
        q, k = torch.arange(slots - seq, slots)[:, None], torch.arange(slots)[None]
        allowed = (k <= q) & valid[:, None, :]
        return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[:, None]

    def first_slots(valid, seq):      # queries in the first seq slots instead of the last
        slots = valid.shape[1]
        q, k = torch.arange(seq)[:, None], torch.arange(slots)[None]
        allowed = ((k <= q) & valid[:, None, :]) | (k == q)
        return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[:, None]

    r = check.padding_causal_mask(no_self)
    assert not r and "softmax gives NaN" in str(r)
    assert not check.padding_causal_mask(first_slots)

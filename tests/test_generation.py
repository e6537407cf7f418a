"""course_lib.generation against independent references: each sampler's distribution worked out by hand
(or in numpy, from its definition), transformers' logits processors, transformers' `generate` on the
same SmolLM2 GGUF (greedy, repetition penalty, seeded sampling), plus the decode loop's contract
(one prefill pass, eos, seeds, bad arguments), the speed paths of chapters 04 and 06, and the checkers."""
import functools
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from course_lib.attention import causal_mask, repeat_kv, scaled_dot_product, scaled_dot_product_gqa
from course_lib.checks.generation import (check_apply_repetition_penalty,
                                          check_apply_temperature, check_min_p_filter, check_top_k_filter,
                                          check_top_n_sigma_filter, check_top_p_filter)
from course_lib.generation import (METHODS, GenerationStats, SamplingTable, _stream_text, apply_repetition_penalty,
                                   apply_temperature, generate,
                                   generate_stream, generate_tokens, greedy, min_p_filter, next_token_probs,
                                   sample_next_token, sampling_settings, sampling_table, top_k_filter, top_p_filter)
from course_lib.fused import fuse_model
from course_lib.model import PRESETS, ModelArgs, Transformer
from shortcuts import refused, source_copy

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    "Decode steps are tiny matrix-vector products: on a shared 2-core machine one thread avoids OpenMP stalls."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def probs_of(*ps, dtype=torch.float32):
    return torch.tensor(ps, dtype=dtype)


def expected(*ps):
    "A hand-computed distribution (float64 numbers, compared in float32)."
    return torch.tensor(ps, dtype=torch.float64)


def assert_probs(actual, want, atol=1e-6):
    assert actual.shape == want.shape
    np.testing.assert_allclose(actual.double().numpy(), want.numpy(), atol=atol, rtol=0)


# ------------------------------------------------------------------ samplers, by their definitions

def np_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_distribution(temperature):
    logits = [2.0, 1.0, 0.0, -1.0, 0.5]
    want = np_softmax(np.array(logits) / temperature)               # p_i ∝ exp(l_i / T)
    got = next_token_probs(torch.tensor(logits), temperature=temperature)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    assert torch.equal(apply_temperature(torch.tensor(logits), temperature), torch.tensor(logits) / temperature)


def test_temperature_by_hand():
    # logits ln 4, ln 2, 0 -> p ∝ 4, 2, 1 at T=1; at T=0.5 squared: 16, 4, 1; at T=2 square roots: 2, √2, 1
    logits = torch.tensor([math.log(4), math.log(2), 0.0], dtype=torch.float64)
    assert_probs(next_token_probs(logits), expected(4 / 7, 2 / 7, 1 / 7), atol=1e-12)
    assert_probs(next_token_probs(logits, 0.5), expected(16 / 21, 4 / 21, 1 / 21), atol=1e-12)
    s = 2 + math.sqrt(2) + 1
    assert_probs(next_token_probs(logits, 2.0), expected(2 / s, math.sqrt(2) / s, 1 / s), atol=1e-12)


def test_top_k_by_hand():
    p = probs_of(0.1, 0.4, 0.2, 0.3)
    assert_probs(top_k_filter(p, 2), expected(0, 0.4 / 0.7, 0, 0.3 / 0.7))
    assert_probs(top_k_filter(p, 1), expected(0, 1, 0, 0))
    assert_probs(top_k_filter(p, 4), expected(0.1, 0.4, 0.2, 0.3))
    assert_probs(top_k_filter(p, 1000), expected(0.1, 0.4, 0.2, 0.3))     # k > vocab keeps everything


def test_top_k_ties_keep_lower_ids():
    p = probs_of(0.3, 0.2, 0.3, 0.2)
    assert_probs(top_k_filter(p, 3), expected(0.375, 0.25, 0.375, 0))   # the first 0.2 (id 1) wins the tie
    assert_probs(top_k_filter(p, 1), expected(1, 0, 0, 0))
    assert_probs(top_k_filter(probs_of(0.25, 0.25, 0.25, 0.25), 2), expected(0.5, 0.5, 0, 0))


# dyadic probabilities: their sums are exact in binary, so a boundary is exactly a boundary
DYADIC = probs_of(0.125, 0.5, 0.0625, 0.25, 0.0625)                     # ids not in order of probability


@pytest.mark.parametrize("top_p, kept", [
    (0.5, [1]),               # the top token alone reaches 0.5 exactly: nothing more
    (0.50001, [1, 3]),
    (0.75, [1, 3]),           # 0.5 + 0.25 = 0.75 exactly: boundary, stop
    (0.8, [1, 3, 0]),
    (0.875, [1, 3, 0]),       # exactly 0.875
    (0.9, [1, 3, 0, 2]),      # the two 0.0625 tie: the lower id (2) first
    (0.9375, [1, 3, 0, 2]),   # exactly
    (0.95, [1, 3, 0, 2, 4]),
    (1.0, [1, 3, 0, 2, 4]),
    (1e-9, [1]),              # the most likely token is always kept
])
def test_top_p_by_hand(top_p, kept):
    mass = sum(DYADIC[i].item() for i in kept)
    want = expected(*[DYADIC[i].item() / mass if i in kept else 0.0 for i in range(5)])
    assert_probs(top_p_filter(DYADIC, top_p), want)


def test_top_p_boundary_from_float_logits():
    # p = 0.7, 0.2, 0.1 from float32 logits: the sums are 0.9 and 1.0 only up to rounding, which
    # TOP_P_TOLERANCE absorbs: top_p=0.9 is reached by the first two tokens
    logits = torch.log(torch.tensor([0.2, 0.7, 0.1]))
    assert_probs(next_token_probs(logits, top_p=0.9), expected(2 / 9, 7 / 9, 0), atol=1e-6)
    assert_probs(next_token_probs(logits, top_p=0.7), expected(0, 1, 0), atol=1e-6)
    assert_probs(next_token_probs(logits, top_p=0.9001), expected(0.2, 0.7, 0.1), atol=1e-6)


def test_top_p_ties_follow_id_order():
    assert_probs(top_p_filter(probs_of(0.4, 0.2, 0.2, 0.2), 0.5), expected(2 / 3, 1 / 3, 0, 0))
    assert_probs(top_p_filter(probs_of(0.2, 0.2, 0.2, 0.4), 0.5), expected(1 / 3, 0, 0, 2 / 3))
    assert_probs(top_p_filter(probs_of(0.25, 0.25, 0.25, 0.25), 0.5), expected(0.5, 0.5, 0, 0))


@pytest.mark.parametrize("min_p, kept", [
    (0.0, [0, 1, 2, 3, 4]),   # keeps everything
    (0.1, [0, 1, 2, 3, 4]),
    (0.125, [0, 1, 2, 3, 4]),  # 0.0625 >= 0.125 × 0.5 exactly: kept
    (0.2, [0, 1, 3]),
    (0.25, [0, 1, 3]),        # 0.125 >= 0.25 × 0.5 exactly
    (0.5, [1, 3]),
    (1.0, [1]),               # only the most likely
])
def test_min_p_by_hand(min_p, kept):
    mass = sum(DYADIC[i].item() for i in kept)
    want = expected(*[DYADIC[i].item() / mass if i in kept else 0.0 for i in range(5)])
    assert_probs(min_p_filter(DYADIC, min_p), want)


def test_min_p_one_keeps_all_tied_maxima():
    assert_probs(min_p_filter(probs_of(0.4, 0.2, 0.4), 1.0), expected(0.5, 0, 0.5))


def reference_probs(logits, temperature=1.0, top_k=None, top_p=None, min_p=None):
    "The definitions, in plain Python over (probability, id) pairs: temperature, top-k, top-p, min-p."
    p = np_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    alive = list(range(len(p)))

    def renorm(keep):
        total = sum(p[i] for i in keep)
        return {i: p[i] / total for i in keep}

    q = {i: p[i] for i in alive}
    if top_k is not None:
        keep = sorted(q, key=lambda i: (-q[i], i))[:top_k]
        q = {i: q[i] for i in keep}; q = {i: v / sum(q.values()) for i, v in q.items()}
    if top_p is not None and top_p < 1:
        keep, mass = [], 0.0
        for i in sorted(q, key=lambda i: (-q[i], i)):
            if mass >= top_p - 1e-6:
                break
            keep.append(i); mass += q[i]
        q = {i: q[i] for i in keep}; q = {i: v / sum(q.values()) for i, v in q.items()}
    if min_p is not None:
        m = max(q.values())
        q = {i: v for i, v in q.items() if v >= min_p * m}; q = {i: v / sum(q.values()) for i, v in q.items()}
    out = np.zeros(len(p))
    for i, v in q.items():
        out[i] = v
    return out


@pytest.mark.parametrize("settings", [dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8),
                                      dict(temperature=0.9, min_p=0.1), dict(top_k=10, top_p=0.7, min_p=0.05),
                                      dict(temperature=2.0, top_k=20, top_p=0.95)])
def test_composition_matches_definitions(settings):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 40, generator=g, dtype=torch.float64) * 2
    got = next_token_probs(logits, **settings)
    for row in range(2):
        np.testing.assert_allclose(got[row].numpy(), reference_probs(logits[row].numpy(), **settings), atol=1e-9)


def test_batch_rows_are_independent():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 30, generator=g)
    batched = next_token_probs(logits, temperature=0.8, top_p=0.7)
    for row in range(3):
        assert torch.allclose(batched[row], next_token_probs(logits[row], temperature=0.8, top_p=0.7), atol=1e-7)


def test_greedy_is_argmax_lowest_id_on_ties():
    assert greedy(torch.tensor([0.1, 3.0, -1.0, 3.0])).item() == 1
    assert greedy(torch.tensor([[0.0, 1.0], [2.0, 1.0]])).tolist() == [1, 0]
    assert sample_next_token(torch.tensor([0.1, 3.0, -1.0, 3.0])).item() == 1


def test_minus_inf_logits_get_zero_probability():
    p = next_token_probs(torch.tensor([0.0, float("-inf"), 0.0]), top_p=1.0)
    assert p.tolist() == [0.5, 0.0, 0.5]


# ------------------------------------------------------------------ against transformers' logits processors

@pytest.mark.parametrize("settings", [dict(temperature=0.6), dict(temperature=1.0, top_k=7),
                                      dict(temperature=0.8, top_p=0.9), dict(temperature=1.2, min_p=0.05),
                                      dict(temperature=0.7, top_k=50, top_p=0.95, min_p=0.02)])
def test_matches_transformers_logits_processors(settings):
    gen = pytest.importorskip("transformers.generation.logits_process")
    warpers = [gen.TemperatureLogitsWarper(settings.get("temperature", 1.0))]
    if "top_k" in settings:
        warpers.append(gen.TopKLogitsWarper(settings["top_k"]))
    if "top_p" in settings:
        warpers.append(gen.TopPLogitsWarper(settings["top_p"]))
    if "min_p" in settings:
        warpers.append(gen.MinPLogitsWarper(settings["min_p"]))
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 1000, generator=g) * 3                     # (batch, vocab), no ties
    scores = logits.clone()
    for w in warpers:
        scores = w(None, scores)
    theirs = torch.softmax(scores, dim=-1)
    ours = next_token_probs(logits, **settings)
    assert torch.equal(ours > 0, theirs > 0)                           # the same tokens survive
    assert (ours - theirs).abs().max() < 1e-6


def test_repetition_penalty_by_hand_and_against_transformers():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, 0.0, -1.0])
    got = apply_repetition_penalty(logits, [0, 1, 1, 4], 2.0)
    assert got.tolist() == [1.0, -4.0, 1.0, 0.5, 0.0, -1.0]
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5, 0.0, -1.0]         # not modified in place
    gen = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(6)
    batch = torch.randn(2, 100, generator=g) * 3
    ids = torch.randint(0, 100, (2, 12), generator=g)
    theirs = gen.RepetitionPenaltyLogitsProcessor(1.3)(ids, batch.clone())
    assert torch.allclose(apply_repetition_penalty(batch, ids, 1.3), theirs, atol=0, rtol=0)
    assert torch.equal(apply_repetition_penalty(batch[0], [], 1.3), batch[0])


# ------------------------------------------------------------------ seeded sampling

@pytest.mark.parametrize("method, extra", [("temperature", {}), ("top_k", {"top_k": 4}),
                                           ("top_p", {"top_p": 0.8}), ("min_p", {"min_p": 0.2})])
def test_empirical_frequencies_match_the_distribution(method, extra):
    logits = torch.tensor([1.5, 0.3, -0.5, 1.0, 0.0, -2.0, 0.7, 0.2])
    want = next_token_probs(logits, temperature=0.9, **extra)
    g = torch.Generator().manual_seed(7)
    n = 20000
    draws = sample_next_token(logits.expand(n, 8), method, 0.9, generator=g, **extra)    # (n,): n rows, one draw each
    freq = torch.bincount(draws, minlength=8).double() / n
    assert (freq - want.double()).abs().max() < 0.015                # ~4 standard errors at n = 20000
    assert (freq[want == 0] == 0).all()                                # filtered tokens are never drawn


def test_seeded_sampling_repeats():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(8))
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(123)
        runs.append([sample_next_token(logits, "top_p", 1.0, top_p=0.9, generator=g).tolist() for _ in range(20)])
    assert runs[0] == runs[1]
    assert sample_next_token(logits, "temperature", generator=g).shape == (3,)


# ------------------------------------------------------------------ argument checking

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="nucleus"), ValueError, "'greedy', 'temperature', 'top_k', 'top_p', 'min_p'.*'nucleus'"),
    (dict(method="temperature", temperature=0), ValueError, "temperature must be > 0, got 0"),
    (dict(method="top_k", top_k=5, temperature=-1.0), ValueError, "temperature must be > 0, got -1.0"),
    (dict(method="temperature", temperature=float("nan")), TypeError, "temperature must be a finite"),
    (dict(method="top_k", top_k=0), ValueError, "top_k must be >= 1, got 0"),
    (dict(method="top_k", top_k=2.5), TypeError, "top_k must be an int >= 1, got 2.5"),
    (dict(method="top_k", top_k=True), TypeError, "top_k must be an int"),
    (dict(method="top_k"), ValueError, "method='top_k' needs top_k"),
    (dict(method="top_p", top_p=0.0), ValueError, r"top_p must be in \(0, 1\], got 0.0"),
    (dict(method="top_p", top_p=1.5), ValueError, r"top_p must be in \(0, 1\], got 1.5"),
    (dict(method="min_p", min_p=-0.1), ValueError, r"min_p must be in \[0, 1\], got -0.1"),
    (dict(method="min_p", min_p=1.1), ValueError, r"min_p must be in \[0, 1\], got 1.1"),
    (dict(method="top_p", top_p=0.9, top_k=40), ValueError, "top_k=40 is not used by method='top_p'"),
    (dict(method="greedy", min_p=0.1), ValueError, "min_p=0.1 is not used by method='greedy'"),
    (dict(method="greedy", temperature=-1), ValueError, "temperature must be > 0"),
])
def test_bad_sampling_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        sampling_settings(**kwargs)
    with pytest.raises(error, match=match):
        sample_next_token(torch.zeros(5), **kwargs)


def test_sampling_settings_by_method():
    assert sampling_settings("greedy", temperature=0) is None           # greedy ignores the temperature
    assert sampling_settings("temperature", 0.7) == {"temperature": 0.7}
    assert sampling_settings("top_p", 0.8, top_p=0.9) == {"temperature": 0.8, "top_p": 0.9}
    assert sampling_settings("min_p", min_p=0.05) == {"temperature": 1.0, "min_p": 0.05}
    assert set(METHODS) == {"greedy", "temperature", "top_k", "top_p", "min_p"}


@pytest.mark.parametrize("call, error, match", [
    (lambda: next_token_probs(torch.tensor([1, 2])), TypeError, "floating-point"),
    (lambda: next_token_probs(torch.zeros(2, 3, 4)), ValueError, r"\(vocab,\) or \(batch, vocab\)"),
    (lambda: next_token_probs(torch.tensor([0.0, float("nan")])), ValueError, "NaN"),
    (lambda: next_token_probs(torch.full((3,), float("-inf"))), ValueError, "every entry is -inf"),
    (lambda: next_token_probs([0.0, 1.0]), TypeError, "torch.Tensor"),
    (lambda: top_p_filter(probs_of(0.5, 0.7), 0.9), ValueError, "sum to 1.*1.2"),
    (lambda: top_k_filter(probs_of(-0.5, 1.5), 1), ValueError, "non-negative"),
    (lambda: apply_repetition_penalty(torch.zeros(4), [1], 0.0), ValueError, "penalty must be > 0"),
    (lambda: apply_repetition_penalty(torch.zeros(4), [4], 1.2), ValueError, "previous_ids contains 4"),
    (lambda: apply_repetition_penalty(torch.zeros(2, 4), [1], 1.2), ValueError, r"previous_ids must be \(n,\)"),
])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------ the decode loop on a tiny model

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Transformer(PRESETS["tiny"]).eval()                          # vocab 256, max_seq_len 128


def recompute_greedy(model, prompt, n):
    "Greedy decoding the slow, cache-free way: a full forward over the whole sequence at every step."
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_equals_full_recompute(tiny):
    prompt = [5, 17, 200, 3, 99, 42]
    assert list(generate_tokens(tiny, prompt, 20)) == recompute_greedy(tiny, prompt, 20)
    assert list(generate_tokens(tiny, torch.tensor(prompt), 5)) == recompute_greedy(tiny, prompt, 5)


def test_model_still_usable_without_inference_mode_after_generating():
    torch.manual_seed(2)
    model = Transformer(PRESETS["tiny"]).eval()                          # its KV cache is made during generation
    list(generate_tokens(model, [1, 2, 3], 4))
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
        model(torch.tensor([[4]]), start_pos=3)
    assert not model.layers[0].attention.cache.cache_k.is_inference()


def test_prefill_is_one_pass_then_one_token_per_step(tiny, monkeypatch):
    calls = []
    forward = Transformer.forward

    def spy(self, tokens, start_pos=0, last_only=False):
        calls.append((tuple(tokens.shape), start_pos, last_only))
        return forward(self, tokens, start_pos, last_only)

    monkeypatch.setattr(Transformer, "forward", spy)
    new = list(generate_tokens(tiny, [1, 2, 3, 4, 5, 6, 7], 6))
    assert len(new) == 6
    assert calls == [((1, 7), 0, True)] + [((1, 1), 7 + i, True) for i in range(5)]  # the last token is not fed back


def test_eos_is_yielded_and_stops(tiny):
    prompt = [9, 8, 7]
    full = list(generate_tokens(tiny, prompt, 12))
    eos = full[4]
    first = full.index(eos)                                              # it may appear earlier
    assert list(generate_tokens(tiny, prompt, 12, eos_id=eos)) == full[:first + 1]
    assert list(generate_tokens(tiny, prompt, 12, eos_id=None)) == full  # None: never stops early
    unused = next(i for i in range(256) if i not in full)
    assert list(generate_tokens(tiny, prompt, 12, eos_id=unused)) == full


def test_seeded_generation_repeats_and_seeds_differ(tiny):
    kw = dict(method="top_p", temperature=1.5, top_p=0.95)
    a = list(generate_tokens(tiny, [3, 4], 30, seed=11, **kw))
    torch.manual_seed(999)                                               # the global RNG does not matter
    torch.rand(10)
    assert list(generate_tokens(tiny, [3, 4], 30, seed=11, **kw)) == a
    assert list(generate_tokens(tiny, [3, 4], 30, seed=12, **kw)) != a
    torch.manual_seed(5)
    b = list(generate_tokens(tiny, [3, 4], 30, **kw))                    # seed=None: drawn from torch's RNG
    torch.manual_seed(5)
    assert list(generate_tokens(tiny, [3, 4], 30, **kw)) == b


def test_every_method_runs_and_stays_in_vocab(tiny):
    for method, extra in [("greedy", {}), ("temperature", {}), ("top_k", {"top_k": 5}), ("top_p", {"top_p": 0.5}),
                          ("min_p", {"min_p": 0.3})]:
        ids = list(generate_tokens(tiny, [1, 2, 3], 10, method=method, seed=0, **extra))
        assert len(ids) == 10 and all(0 <= i < 256 for i in ids)
    # top_k=1 and min_p=1 are greedy in disguise
    greedy_ids = list(generate_tokens(tiny, [1, 2, 3], 10))
    assert list(generate_tokens(tiny, [1, 2, 3], 10, method="top_k", top_k=1, seed=3)) == greedy_ids
    assert list(generate_tokens(tiny, [1, 2, 3], 10, method="min_p", min_p=1.0, seed=4)) == greedy_ids


def test_repetition_penalty_in_the_loop(tiny):
    prompt, n, penalty = [7, 7, 30], 12, 1.5
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = tiny(torch.tensor([seq]))[0, -1]
            seen = sorted(set(seq))
            logits[seen] = torch.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
            seq.append(int(logits.argmax()))
    assert list(generate_tokens(tiny, prompt, n, repetition_penalty=penalty)) == seq[len(prompt):]


def test_stats_and_no_inference_mode_leak(tiny):
    stats = GenerationStats()
    seen_modes = []
    for _ in generate_tokens(tiny, [1, 2, 3, 4], 8, stats=stats):
        seen_modes.append(torch.is_inference_mode_enabled())
    assert not any(seen_modes)                                           # the caller's code runs normally
    assert (stats.prompt_tokens, stats.new_tokens, len(stats.step_seconds)) == (4, 8, 7)
    assert stats.prefill_seconds > 0 and stats.prefill_tokens_per_s > 0 and stats.decode_tokens_per_s > 0
    assert str(stats).startswith("prefill: 4 tokens in ")
    assert list(generate_tokens(tiny, [1], 0, stats=stats)) == [] and stats.new_tokens == 0


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(prompt_ids=[1] * 100, max_new_tokens=29), ValueError,
     r"prompt \(100 tokens\) \+ max_new_tokens \(29\) = 129 exceeds the model's max_seq_len=128"),
    (dict(prompt_ids=[], max_new_tokens=3), ValueError, "prompt_ids is empty"),
    (dict(prompt_ids=[1, 256], max_new_tokens=3), ValueError, r"prompt_ids\[1\] = 256 is outside"),
    (dict(prompt_ids=[1, -1], max_new_tokens=3), ValueError, r"prompt_ids\[1\] = -1"),
    (dict(prompt_ids=[1, 2.0], max_new_tokens=3), TypeError, r"prompt_ids\[1\] is 2.0"),
    (dict(prompt_ids="hello", max_new_tokens=3), TypeError, "encode text with the tokenizer"),
    (dict(prompt_ids=torch.ones(1, 3, dtype=torch.long), max_new_tokens=3), TypeError, "1-D integer tensor"),
    (dict(prompt_ids=[1], max_new_tokens=-1), ValueError, "max_new_tokens must be an int >= 0, got -1"),
    (dict(prompt_ids=[1], max_new_tokens=3, eos_id=300), ValueError, "eos_id=300 is outside"),
    (dict(prompt_ids=[1], max_new_tokens=3, method="top_p"), ValueError, "method='top_p' needs top_p"),
    (dict(prompt_ids=[1], max_new_tokens=3, method="temperature", seed=1.5), TypeError, "seed must be an int"),
    (dict(prompt_ids=[1], max_new_tokens=3, repetition_penalty=0), ValueError, "repetition_penalty must be > 0"),
])
def test_generate_tokens_bad_arguments_fail_at_the_call(tiny, kwargs, error, match):
    with pytest.raises(error, match=match):
        generate_tokens(tiny, **kwargs)                                  # raised before any iteration


def test_generate_tokens_needs_a_transformer():
    with pytest.raises(TypeError, match="model must be a course_lib Transformer, or a decoder .*got Linear"):
        generate_tokens(torch.nn.Linear(2, 2), [1], 1)


# ------------------------------------------------------------------ text: generate with a toy tokenizer

class ByteTokenizer:
    "A toy tokenizer: one token per UTF-8 byte (vocab 256); id 10 ('\\n') plays eos."
    eos_id = 10

    def encode(self, text, bos=False, eos=False):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_generate_returns_the_completion_text(tiny):
    tok = ByteTokenizer()
    ids = list(generate_tokens(tiny, tok.encode("hi"), 30, eos_id=10))
    text = generate(tiny, tok, "hi", max_new_tokens=30)
    want = ids[:-1] if ids and ids[-1] == 10 else ids
    assert text == tok.decode(want)
    assert text == "".join(generate_stream(tiny, tok, "hi", max_new_tokens=30))
    no_eos = list(generate_tokens(tiny, tok.encode("hi"), 30))
    assert generate(tiny, tok, "hi", max_new_tokens=30, stop_at_eos=False) == tok.decode(no_eos)
    seeded = generate(tiny, tok, "hi", 20, method="min_p", min_p=0.1, seed=4)
    assert seeded == generate(tiny, tok, "hi", 20, method="min_p", min_p=0.1, seed=4)
    with pytest.raises(TypeError, match="prompt must be a str"):
        generate(tiny, tok, [104, 105])
    with pytest.raises(TypeError, match="stop_at_eos=False"):
        generate(tiny, tok, "hi", eos_id=3)


def test_stream_text_holds_back_split_characters():
    tok = ByteTokenizer()
    text = "né 🙂 ok €"
    pieces = list(_stream_text(tok, iter(tok.encode(text) + [10, 65]), eos_id=10))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert len(pieces) == len(text)                                      # one piece per character here
    assert "".join(_stream_text(tok, iter([104, 0xF0, 0x9F]), eos_id=None)) == "h\ufffd"   # cut short: shown as �


def test_sampling_table(tiny):
    logits = torch.log(torch.tensor([0.05, 0.5, 0.25, 0.125, 0.075]))
    table = sampling_table(logits, ByteTokenizer(), top_p=0.75, n=3)
    assert isinstance(table, SamplingTable) and (table.kept, table.vocab_size) == (2, 5)
    assert [r["id"] for r in table.rows] == [1, 2, 3]
    assert [r["rank"] for r in table.rows] == [1, 2, 3] and table.rows[0]["token"] == repr("\x01")
    np.testing.assert_allclose([r["p"] for r in table.rows], [0.5, 0.25, 0.125], atol=1e-6)
    np.testing.assert_allclose([r["p_final"] for r in table.rows], [2 / 3, 1 / 3, 0], atol=1e-6)
    assert abs(table.kept_mass - 0.75) < 1e-6 and table.settings == {"temperature": 1.0, "top_p": 0.75}
    text = str(table)
    assert text.startswith("temperature=1.0, top_p=0.75: 2 of 5 tokens can be drawn, 75.0%") and "66.67%" in text
    hot = sampling_table(logits, ByteTokenizer(), temperature=2.0, n=5)
    np.testing.assert_allclose(sum(r["p_final"] for r in hot.rows), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        sampling_table(logits, ByteTokenizer(), n=0)
    with pytest.raises(ValueError, match="one position's"):
        sampling_table(logits[None], ByteTokenizer())


# ------------------------------------------------------------------ the speed paths of chapters 04 and 06

@pytest.mark.parametrize("n_heads, n_kv_heads, seq, kv_len", [(9, 3, 1, 12), (9, 3, 5, 5), (8, 2, 3, 7),
                                                               (4, 1, 4, 6), (4, 4, 2, 6), (1, 1, 3, 3)])
def test_scaled_dot_product_gqa_matches_torch_enable_gqa(n_heads, n_kv_heads, seq, kv_len):
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, n_heads, seq, 16, generator=g)
    k, v = torch.randn(2, 2, n_kv_heads, kv_len, 16, generator=g)
    mask = causal_mask(seq, kv_len - seq) if seq > 1 else None
    allowed = None if mask is None else mask == 0
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    ours = scaled_dot_product_gqa(q, k, v, mask)
    assert (ours - theirs).abs().max() < 1e-5
    rep = lambda t: repeat_kv(t.transpose(1, 2), n_heads // n_kv_heads).transpose(1, 2)
    assert (ours - scaled_dot_product(q, rep(k), rep(v), mask)).abs().max() < 1e-6
    # a per-head mask (batch, n_heads, seq, kv_len) is grouped like the heads
    head_mask = torch.where(torch.rand(2, n_heads, seq, kv_len, generator=g) < 0.3, float("-inf"), 0.0)
    head_mask[..., 0] = 0.0
    assert (scaled_dot_product_gqa(q, k, v, head_mask) - scaled_dot_product(q, rep(k), rep(v), head_mask)).abs().max() < 1e-6


def test_scaled_dot_product_gqa_bad_input():
    with pytest.raises(ValueError, match="q has 9 heads, not a multiple of the 2 K/V heads"):
        scaled_dot_product_gqa(torch.zeros(1, 9, 2, 8), torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8))
    with pytest.raises(ValueError, match="does not broadcast"):
        scaled_dot_product_gqa(torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8),
                               causal_mask(2))


def test_last_only_is_the_last_row():
    torch.manual_seed(1)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=96,
                                  max_seq_len=32, tie_embeddings=True)).eval()
    x = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        full = model(x)
        last = model(x, last_only=True)
    assert last.shape == (2, 1, 300) and (last[:, 0] - full[:, -1]).abs().max() < 1e-5


# ------------------------------------------------------------------ checkers

def buggy_top_p(kind):
    def f(probs, top_p):
        s, idx = torch.sort(probs, dim=-1, descending=(kind != "ascending"), stable=True)
        before = torch.cumsum(s, -1) - s
        keep = before <= top_p if kind == "one_too_many" else before < top_p
        if kind == "inclusive":
            keep = torch.cumsum(s, -1) <= top_p
        mask = torch.zeros_like(keep).scatter(-1, idx, keep)
        kept = probs * mask
        return kept if kind == "no_renorm" else kept / kept.sum(-1, keepdim=True)
    return f


def independent_top_p(probs, top_p):
    "top-p from the definition, row by row in Python."
    out = torch.zeros_like(probs)
    for row_in, row_out in zip(probs.view(-1, probs.shape[-1]), out.view(-1, probs.shape[-1])):
        order = sorted(range(len(row_in)), key=lambda i: (-row_in[i].item(), i))
        mass, keep = 0.0, []
        for i in order:
            if keep and mass >= top_p - 1e-6:
                break
            keep.append(i); mass += row_in[i].item()
        for i in keep:
            row_out[i] = row_in[i] / mass
    return out


def library_copies():
    "Fresh copies of the library's samplers (what a student who retyped them hands in), helpers first."
    import course_lib.generation as module
    copies = source_copy(module, "_renormalize", "_ranked", "_keep_first", "apply_temperature", "top_k_filter",
                         "top_p_filter", "min_p_filter", "apply_repetition_penalty")
    return dict(zip(["apply_temperature", "top_k_filter", "top_p_filter", "min_p_filter",
                     "apply_repetition_penalty"], copies[3:]))


def test_check_top_p_filter():
    assert check_top_p_filter(library_copies()["top_p_filter"])
    assert check_top_p_filter(independent_top_p)
    for kind, message in [("one_too_many", "keeps one token too many"), ("no_renorm", "does not renormalize"),
                          ("ascending", "sorts in ascending order"), ("inclusive", "keeps one token too few")]:
        result = check_top_p_filter(buggy_top_p(kind))
        assert not result and message in str(result), (kind, str(result))

    def stub(probs, top_p):
        raise NotImplementedError
    result = check_top_p_filter(stub)
    assert not result and len(result.failures) == 1 and "NotImplementedError" in str(result)
    assert "the other 6 cases were not run" in str(result)

    def in_place(probs, top_p):
        probs[probs < 0.1] = 0
        return probs / probs.sum(-1, keepdim=True)
    assert "modified its input" in str(check_top_p_filter(in_place))
    with pytest.raises(TypeError):
        check_top_p_filter(42)


def test_check_apply_repetition_penalty():
    assert check_apply_repetition_penalty(library_copies()["apply_repetition_penalty"])

    def independent(logits, ids, penalty):
        out = logits.clone()
        for i in set(ids):
            out[i] = out[i] / penalty if out[i] > 0 else out[i] * penalty
        return out
    assert check_apply_repetition_penalty(independent)

    def divide_all(logits, ids, penalty):
        out = logits.clone()
        out[list(set(ids))] /= penalty
        return out

    def compounding(logits, ids, penalty):
        out = logits.clone()
        for i in ids:
            out[i] = out[i] / penalty if out[i] > 0 else out[i] * penalty
        return out

    def everywhere(logits, ids, penalty):
        return torch.where(logits > 0, logits / penalty, logits * penalty)

    def in_place(logits, ids, penalty):
        for i in set(ids):
            logits[i] = logits[i] / penalty if logits[i] > 0 else logits[i] * penalty
        return logits
    for wrong, message in [(divide_all, "negative ones too"), (compounding, "once per occurrence"),
                           (everywhere, "penalizes every token"), (in_place, "modified the logits")]:
        result = check_apply_repetition_penalty(wrong)
        assert not result and message in str(result), (wrong.__name__, str(result))
    with pytest.raises(TypeError):
        check_apply_repetition_penalty("apply")


def test_check_apply_temperature():
    assert check_apply_temperature(library_copies()["apply_temperature"])

    def independent(logits, temperature):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        return logits * (1 / temperature)
    assert check_apply_temperature(independent)

    def unchecked(logits, temperature):  # right where temperature > 0, silently divides by zero at 0
        return logits / temperature

    def in_place(logits, temperature):
        if temperature <= 0:
            raise ValueError("temperature")
        return logits.div_(temperature)

    def probabilities(logits, temperature):
        if temperature <= 0:
            raise ValueError("temperature")
        return torch.softmax(logits / temperature, dim=-1)
    for wrong, message in [(lambda logits, t: logits * t, "multiplies by the temperature"),
                           (probabilities, "returns probabilities"),
                           (in_place, "modified the logits passed in"),
                           (unchecked, r"returned \[inf, -inf, inf\] for temperature=0.0; raise ValueError")]:
        result = check_apply_temperature(wrong)
        assert not result and re.search(message, str(result)), str(result)
    assert len(check_apply_temperature(unchecked).failures) == 2       # only the two bad temperatures
    with pytest.raises(TypeError):
        check_apply_temperature(1.0)


def buggy_top_k(kind):
    def f(probs, top_k):
        if kind == "topk":  # torch.topk: right except where probabilities tie
            top = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1)
            kept = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
            return kept / kept.sum(-1, keepdim=True)
        if kind == "threshold":  # keeps every token tied with the k-th
            k = min(top_k, probs.shape[-1])
            kth = probs.sort(dim=-1, descending=True).values[..., k - 1:k]
            kept = torch.where(probs >= kth, probs, torch.zeros_like(probs))
            return kept / kept.sum(-1, keepdim=True)
        s, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
        rank = torch.arange(probs.shape[-1])
        keep = rank <= top_k if kind == "one_too_many" else rank < top_k
        kept = torch.zeros_like(probs).scatter(-1, idx, s * keep)
        return kept if kind == "no_renorm" else kept / kept.sum(-1, keepdim=True)
    return f


def test_check_top_k_filter():
    assert check_top_k_filter(library_copies()["top_k_filter"])
    assert check_top_k_filter(buggy_top_k("right"))
    for kind, message in [("one_too_many", "keeps k \\+ 1 tokens"), ("no_renorm", "does not renormalize"),
                          ("threshold", "keeps every token tied with the k-th"),
                          ("topk", "keeps the right probabilities at other ids.*torch.sort")]:
        result = check_top_k_filter(buggy_top_k(kind))
        assert not result and re.search(message, str(result)), (kind, str(result))
    assert "it keeps 4 token(s) per row, expected 3" in str(check_top_k_filter(buggy_top_k("one_too_many")))

    def stub(probs, top_k):
        raise NotImplementedError
    result = check_top_k_filter(stub)
    assert not result and len(result.failures) == 1 and "NotImplementedError" in str(result)

    def in_place(probs, top_k):
        probs[probs < probs.sort(dim=-1, descending=True).values[..., min(top_k, probs.shape[-1]) - 1:][..., :1]] = 0
        return probs / probs.sum(-1, keepdim=True)
    assert "modified its input" in str(check_top_k_filter(in_place))
    with pytest.raises(TypeError):
        check_top_k_filter(None)


def test_check_min_p_filter():
    assert check_min_p_filter(library_copies()["min_p_filter"])

    def independent(probs, min_p):
        keep = probs / probs.max(-1, keepdim=True).values >= min_p
        return torch.where(keep, probs, 0.0) / torch.where(keep, probs, 0.0).sum(-1, keepdim=True)
    assert check_min_p_filter(independent)

    def strict(probs, min_p):
        keep = probs > min_p * probs.max(-1, keepdim=True).values
        kept = torch.where(keep, probs, 0.0)
        return kept / kept.sum(-1, keepdim=True)

    def absolute(probs, min_p):
        kept = torch.where(probs >= min_p, probs, 0.0)
        return kept / kept.sum(-1, keepdim=True)

    def no_renorm(probs, min_p):
        return torch.where(probs >= min_p * probs.max(-1, keepdim=True).values, probs, 0.0)

    def batch_max(probs, min_p):
        kept = torch.where(probs >= min_p * probs.max(), probs, 0.0)
        return kept / kept.sum(-1, keepdim=True)
    for wrong, message in [(strict, "a token exactly at the threshold stays"), (absolute, "compares with min_p itself"),
                           (no_renorm, "does not renormalize"), (batch_max, "each row has its own threshold: output has NaN")]:
        result = check_min_p_filter(wrong)
        assert not result and message in str(result), (wrong.__name__, str(result))
    with pytest.raises(TypeError):
        check_min_p_filter(0.1)


def test_sampler_checkers_refuse_the_library_answers():
    "Issue 16: the library's own samplers (and the helpers that do their work) are switched off in the checkers."
    import course_lib.generation as module
    for check, name in [(check_apply_temperature, "apply_temperature"), (check_top_k_filter, "top_k_filter"),
                        (check_top_p_filter, "top_p_filter"), (check_min_p_filter, "min_p_filter"),
                        (check_apply_repetition_penalty, "apply_repetition_penalty")]:
        answer = getattr(module, name)
        assert refused(check(answer), f"is course_lib.generation.{name} itself")
        wrapped = lambda *args, _f=answer: _f(*args)                     # noqa: E731
        assert refused(check(wrapped), f"course_lib.generation.{name}")
    # the private helpers do the work of the filters: calling them is refused too
    def with_helpers(probs, top_k):
        sorted_p, ids = module._ranked(probs)
        rank = torch.arange(probs.shape[-1])
        return module._renormalize(probs, module._keep_first(ids, (rank < min(top_k, probs.shape[-1])).expand_as(sorted_p)))
    assert refused(check_top_k_filter(with_helpers), "course_lib.generation._ranked")
    # a wrapper that chains the samplers (next_token_probs) reaches them all the same
    assert refused(check_top_p_filter(lambda p, top_p: module.next_token_probs(p.log(), top_p=top_p)),
                   "course_lib.generation.top_p_filter")


def test_check_top_n_sigma_filter():
    "Exercise 4, which the reading edition does not show: top-nσ sampling (Tang et al., 2024)."
    def answer(logits, n):
        kept = torch.where(logits >= logits.max() - n * logits.std(), logits, torch.full_like(logits, float("-inf")))
        return torch.softmax(kept, dim=-1)

    def population_sigma(logits, n):                   # σ dividing by V: the cases do not depend on it
        threshold = logits.max() - n * logits.std(unbiased=False)
        return torch.softmax(torch.where(logits >= threshold, logits, torch.full_like(logits, float("-inf"))), -1)
    assert check_top_n_sigma_filter(answer) and check_top_n_sigma_filter(population_sigma)

    def in_probs(logits, n):
        p = torch.softmax(logits, -1)
        kept = torch.where(p >= p.max() - n * p.std(), p, torch.zeros_like(p))
        return kept / kept.sum()

    def not_renormalized(logits, n):
        p = torch.softmax(logits, -1)
        return torch.where(logits >= logits.max() - n * logits.std(), p, torch.zeros_like(p))

    def below(logits, n):
        p = torch.softmax(logits, -1)
        kept = torch.where(logits < logits.max() - n * logits.std(), p, torch.zeros_like(p))
        return kept / kept.sum()
    for wrong, message in [(in_probs, "cuts in probability space"), (not_renormalized, "does not renormalize"),
                           (below, "keeps the tokens below the threshold"),
                           (lambda z, n: torch.softmax(z, -1), "differs")]:
        result = check_top_n_sigma_filter(wrong)
        assert not result and message in str(result), (message, str(result))
    from course_lib.checks.generation import _top_n_sigma_reference
    assert refused(check_top_n_sigma_filter(lambda z, n: _top_n_sigma_reference(z, n)), "_top_n_sigma_reference")
    import course_lib.generation as module
    assert refused(check_top_n_sigma_filter(lambda z, n: module.min_p_filter(torch.softmax(z, -1), 0.5)),
                   "course_lib.generation.min_p_filter")


# ------------------------------------------------------------------ SmolLM2 against transformers' generate

PROMPTS = [[504, 3575, 282, 4649, 314],                     # "The capital of France is"
           [1604, 3987, 46477, 24, 94, 727],                # "def fibonacci(n):"
           [6403, 1980, 253, 655, 28, 665, 436, 253]]       # "Once upon a time, there was a"


@pytest.fixture(scope="module")
def smollm2_path():
    from course_lib.weights import fetch_smollm2
    return fetch_smollm2(progress=False)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from course_lib.weights import load_gguf_model
    return load_gguf_model(smollm2_path, max_seq_len=64)


@pytest.fixture(scope="module")
def hf_model(smollm2_path):
    transformers = pytest.importorskip("transformers")
    import gguf
    transformers.logging.set_verbosity_error()
    with pytest.MonkeyPatch.context() as mp:   # transformers rebuilds gguf's (pure) name map per tensor: memoize
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32)
    return model.eval()


def hf_generate(hf, ids, **kwargs):
    x = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, pad_token_id=2, **kwargs)
    return out[0, len(ids):].tolist()


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_generate(smollm2, hf_model):
    eos = 2                                                              # <|im_end|>, the GGUF's eos
    for ids in PROMPTS:
        theirs = hf_generate(hf_model, ids, do_sample=False)
        assert list(generate_tokens(smollm2, ids, 32, eos_id=eos)) == theirs
    # chapter 07c's fused layers (faster decoding) choose the same tokens
    fuse_model(smollm2)
    try:
        assert list(generate_tokens(smollm2, PROMPTS[2], 32, eos_id=eos)) == theirs
    finally:
        fuse_model(smollm2, fuse=False)


@pytest.mark.slow
def test_smollm2_repetition_penalty_and_seeded_sampling_equal_transformers(smollm2, hf_model):
    ids = PROMPTS[2]
    theirs = hf_generate(hf_model, ids, do_sample=False, repetition_penalty=1.3)
    assert list(generate_tokens(smollm2, ids, 32, eos_id=2, repetition_penalty=1.3)) == theirs
    # same seed, same distribution, same torch.multinomial: the same draws as transformers' sampling
    torch.manual_seed(42)
    theirs = hf_generate(hf_model, ids, do_sample=True, temperature=0.8, top_k=None, top_p=0.9)
    assert list(generate_tokens(smollm2, ids, 32, method="top_p", temperature=0.8, top_p=0.9, seed=42, eos_id=2)) \
        == theirs

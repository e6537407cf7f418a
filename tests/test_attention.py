"""Chapter 04 (course_lib.attention) against independent references: PyTorch's
scaled_dot_product_attention and repeat_interleave, transformers' LlamaAttention, published sizes."""
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import course_lib.attention as attention_module
from course_lib.attention import (Attention, KVCache, _grouped_attention, causal_mask, kv_cache_bytes, repeat_kv,
                                  scaled_dot_product, scaled_dot_product_gqa)
from course_lib.fused import FusedAttention
from course_lib.checks.attention import (check_causal_mask, check_KVCache, check_repeat_kv, check_scaled_dot_product,
                                         check_merge_attention, check_scaled_dot_product_gqa)
from course_lib.rope import permute_meta_to_hf, precompute_freqs_cis
from shortcuts import refused, source_copy


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------- causal_mask

@pytest.mark.parametrize("seq_len,start_pos", [(1, 0), (4, 0), (3, 5), (1, 7), (6, 2)])
def test_causal_mask_matches_tril(seq_len, start_pos):
    allowed = torch.ones(seq_len, start_pos + seq_len, dtype=torch.bool).tril(diagonal=start_pos)
    expected = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    mask = causal_mask(seq_len, start_pos)
    assert mask.dtype == torch.float32
    assert torch.equal(mask, expected)


def test_causal_mask_accepts_integer_like():
    assert torch.equal(causal_mask(np.int64(3), torch.tensor(2)), causal_mask(3, 2))


def test_causal_mask_bad_input():
    with pytest.raises(ValueError, match="seq_len must be >= 1, got 0"):
        causal_mask(0)
    with pytest.raises(ValueError, match="start_pos must be >= 0, got -1"):
        causal_mask(2, -1)
    with pytest.raises(TypeError, match="seq_len must be an int, got float"):
        causal_mask(2.0)
    with pytest.raises(TypeError, match="start_pos must be an int, got bool"):
        causal_mask(2, True)


# ---------------------------------------------------------------- scaled_dot_product

def test_sdp_prompt_matches_torch_is_causal():
    q, k, v = randn(2, 4, 7, 32, seed=1), randn(2, 4, 7, 32, seed=2), randn(2, 4, 7, 32, seed=3)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(scaled_dot_product(q, k, v, causal_mask(7)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seq,start_pos", [(3, 4), (1, 6), (5, 1)])
def test_sdp_after_cached_tokens_matches_torch_attn_mask(seq, start_pos):
    kv_len = start_pos + seq
    q, k, v = randn(2, 3, seq, 16, seed=4), randn(2, 3, kv_len, 16, seed=5), randn(2, 3, kv_len, 16, seed=6)
    allowed = torch.ones(seq, kv_len, dtype=torch.bool).tril(diagonal=start_pos)  # True = may attend
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(scaled_dot_product(q, k, v, causal_mask(seq, start_pos)), expected,
                               atol=1e-5, rtol=1e-5)


def test_sdp_decode_step_needs_no_mask():
    q, k, v = randn(1, 2, 1, 8, seed=7), randn(1, 2, 9, 8, seed=8), randn(1, 2, 9, 8, seed=9)
    torch.testing.assert_close(scaled_dot_product(q, k, v), F.scaled_dot_product_attention(q, k, v),
                               atol=1e-6, rtol=1e-5)


def test_sdp_keeps_dtype_and_precision():
    q, k, v = (randn(1, 2, 5, 16, seed=s, dtype=torch.float64) for s in (10, 11, 12))
    out = scaled_dot_product(q, k, v, causal_mask(5))
    assert out.dtype == torch.float64  # softmax is not squeezed through float32
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-12, rtol=0)
    qh, kh, vh = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out = scaled_dot_product(qh, kh, vh, causal_mask(5))
    assert out.dtype == torch.bfloat16
    expected = F.scaled_dot_product_attention(qh.float(), kh.float(), vh.float(), is_causal=True)
    assert (out.float() - expected).abs().max().item() < 3e-2


def test_sdp_bad_input():
    q, k = randn(1, 6, 4, 8), randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="q has 6 heads but k and v have 2.*repeat_kv"):
        scaled_dot_product(q, k, k)
    with pytest.raises(ValueError, match=r"q must be 4-D .* got shape \(6, 4, 8\)"):
        scaled_dot_product(q[0], k, k)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        scaled_dot_product(q, q, q[:, :, :3])
    with pytest.raises(TypeError, match="mask must be an additive float tensor.*torch.bool"):
        scaled_dot_product(q, q, q, causal_mask(4) == 0)
    with pytest.raises(ValueError, match=r"mask of shape \(4, 5\) does not broadcast .*\(1, 6, 4, 4\)"):
        scaled_dot_product(q, q, q, causal_mask(4, 1))


# ---------------------------------------------------------------- repeat_kv

@pytest.mark.parametrize("n_kv_heads,n_rep", [(2, 3), (3, 3), (1, 4), (4, 1), (8, 8)])
def test_repeat_kv_matches_repeat_interleave(n_kv_heads, n_rep):
    x = randn(2, 5, n_kv_heads, 8, seed=13)
    assert torch.equal(repeat_kv(x, n_rep), x.repeat_interleave(n_rep, dim=2))


def test_repeat_kv_with_attention_matches_torch_enable_gqa():
    q = randn(2, 9, 6, 64, seed=14)                             # SmolLM2: 9 query heads
    k, v = randn(2, 3, 6, 64, seed=15), randn(2, 3, 6, 64, seed=16)  # 3 K/V heads
    expand = lambda t: repeat_kv(t.transpose(1, 2), 3).transpose(1, 2)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(scaled_dot_product(q, expand(k), expand(v), causal_mask(6)), expected,
                               atol=1e-5, rtol=1e-5)


def test_repeat_kv_n_rep_1_is_identity():
    x = randn(1, 3, 4, 8)
    assert repeat_kv(x, 1) is x


def test_repeat_kv_bad_input():
    with pytest.raises(ValueError, match="n_rep must be >= 1, got 0"):
        repeat_kv(randn(1, 2, 2, 4), 0)
    with pytest.raises(TypeError, match="n_rep must be an int, got float"):
        repeat_kv(randn(1, 2, 2, 4), 1.5)
    with pytest.raises(ValueError, match=r"x must be \(batch, seq, n_kv_heads, head_dim\), got shape \(2, 2, 4\)"):
        repeat_kv(randn(2, 2, 4), 2)


# ---------------------------------------------------------------- KVCache

def test_kv_cache_prefill_then_decode_returns_everything():
    cache = KVCache(max_batch_size=2, max_seq_len=10, n_kv_heads=2, head_dim=4)
    xk, xv = randn(2, 6, 2, 4, seed=17), randn(2, 6, 2, 4, seed=18)
    cache.update(0, xk[:, :4], xv[:, :4])
    for pos in (4, 5):
        keys, values = cache.update(pos, xk[:, pos:pos + 1], xv[:, pos:pos + 1])
    assert torch.equal(keys, xk) and torch.equal(values, xv)
    assert cache.length == 6 and cache.cache_k.shape == (2, 10, 2, 4)
    assert "cache_k" not in cache.state_dict()  # generation state, not weights


def test_kv_cache_bad_input():
    cache = KVCache(max_batch_size=2, max_seq_len=8, n_kv_heads=2, head_dim=4)
    one = torch.zeros(1, 1, 2, 4)
    cache.update(0, torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2, 4))
    with pytest.raises(ValueError, match="start_pos=5 but only 3 positions are cached"):
        cache.update(5, one, one)
    with pytest.raises(ValueError, match=r"start_pos \+ seq = 3 \+ 6 = 9 exceeds max_seq_len=8"):
        cache.update(3, torch.zeros(1, 6, 2, 4), torch.zeros(1, 6, 2, 4))
    with pytest.raises(ValueError, match="batch size 3 exceeds the cache's max_batch_size=2"):
        cache.update(0, torch.zeros(3, 1, 2, 4), torch.zeros(3, 1, 2, 4))
    with pytest.raises(ValueError, match="batch size 2 differs from the cached sequence's 1"):
        cache.update(3, torch.zeros(2, 1, 2, 4), torch.zeros(2, 1, 2, 4))
    with pytest.raises(ValueError, match=r"xk must be \(batch, seq, n_kv_heads=2, head_dim=4\), got \(1, 1, 8, 4\)"):
        cache.update(3, torch.zeros(1, 1, 8, 4), one)
    with pytest.raises(ValueError, match="xk and xv must have the same shape"):
        cache.update(3, one, torch.zeros(1, 2, 2, 4))
    with pytest.raises(ValueError, match="max_seq_len must be >= 1, got 0"):
        KVCache(1, 0, 2, 4)
    with pytest.raises(TypeError, match="start_pos must be an int, got bool"):
        cache.update(True, one, one)
    with pytest.raises(TypeError, match="start_pos must be an int, got float"):
        cache.update(3.0, one, one)
    with pytest.raises(ValueError, match="start_pos must be >= 0, got -1"):
        cache.update(-1, one, one)
    with pytest.raises(ValueError, match=r"xk must be \(batch, seq, n_kv_heads=2, head_dim=4\), got list"):
        cache.update(3, [0.0], one)


def test_kv_cache_update_takes_any_integer_position_and_tensor_subclass():
    # update's quick test covers plain ints and tensors; anything else goes through the full checks
    cache = KVCache(max_batch_size=1, max_seq_len=8, n_kv_heads=2, head_dim=4)
    xk, xv = randn(1, 4, 2, 4, seed=21), randn(1, 4, 2, 4, seed=22)
    cache.update(0, xk[:, :2], xv[:, :2])
    cache.update(np.int64(2), xk[:, 2:3], xv[:, 2:3])                            # NumPy int
    keys, values = cache.update(torch.tensor(3), torch.nn.Parameter(xk[:, 3:4], requires_grad=False),
                                xv[:, 3:4])                                     # 0-d tensor, a Parameter
    assert torch.equal(keys, xk) and torch.equal(values, xv) and cache.length == 4


# ---------------------------------------------------------------- Attention vs transformers' LlamaAttention

def make_pair(n_heads, n_kv_heads, dim=64, max_seq_len=32, seed=0):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=dim, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                                      max_position_embeddings=max_seq_len, rope_theta=10000.0,
                                      attn_implementation="eager")
    hf = LlamaAttention(config, layer_idx=0).eval()
    ours = Attention(dim, n_heads, n_kv_heads, max_seq_len=max_seq_len).eval()
    with torch.no_grad():  # HF's q/k rows are in rotate_half order
        hf.q_proj.weight.copy_(permute_meta_to_hf(ours.wq.weight, n_heads))
        hf.k_proj.weight.copy_(permute_meta_to_hf(ours.wk.weight, n_kv_heads))
        hf.v_proj.weight.copy_(ours.wv.weight)
        hf.o_proj.weight.copy_(ours.wo.weight)
    rotary = LlamaRotaryEmbedding(config)

    def hf_forward(x):  # one full causal pass, no cache
        seq = x.shape[1]
        cos_sin = rotary(x, torch.arange(seq)[None].expand(x.shape[0], seq))
        return hf(x, cos_sin, attention_mask=causal_mask(seq)[None, None])[0]
    return ours, hf_forward, precompute_freqs_cis(dim // n_heads, max_seq_len)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (8, 2), (8, 1)], ids=["mha", "gqa", "mqa"])
def test_attention_matches_hf_llama_attention(n_heads, n_kv_heads):
    ours, hf_forward, freqs_cis = make_pair(n_heads, n_kv_heads)
    x = randn(2, 11, 64, seed=19)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 0, freqs_cis[:11], causal_mask(11)), hf_forward(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused_qkv"])
@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_attention_cached_decode_matches_hf_full_pass(n_heads, n_kv_heads, fused):
    ours, hf_forward, freqs_cis = make_pair(n_heads, n_kv_heads, seed=1)
    if fused:
        ours = FusedAttention(ours)                                                 # chapter 07c's module swap
    x = randn(2, 12, 64, seed=20)
    with torch.no_grad():
        expected = hf_forward(x)
        pieces = [ours(x[:, :3], 0, freqs_cis[:3], causal_mask(3)),                 # prefill 3
                  ours(x[:, 3:6], 3, freqs_cis[3:6], causal_mask(3, start_pos=3))]  # a chunk of 3
        for pos in range(6, 12):                                                    # then one at a time
            pieces.append(ours(x[:, pos:pos + 1], pos, freqs_cis[pos:pos + 1]))
        torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=1e-5, rtol=1e-4)


def test_attention_bad_input():
    with pytest.raises(ValueError, match="n_heads=6 must divide dim=64"):
        Attention(64, 6)
    with pytest.raises(ValueError, match="n_heads=8 must be a multiple of n_kv_heads=3"):
        Attention(64, 8, 3)
    attention = Attention(64, 8, 2, max_seq_len=16)
    freqs_cis = precompute_freqs_cis(8, 16)
    with pytest.raises(ValueError, match=r"x must be \(batch, seq, dim=64\), got \(1, 3, 32\)"):
        attention(torch.zeros(1, 3, 32), 0, freqs_cis[:3])
    with pytest.raises(ValueError, match="start_pos=2 but no sequence is cached"):
        attention(torch.zeros(1, 1, 64), 2, freqs_cis[2:3])
    for attention in (attention, FusedAttention(attention)):         # both check the rotation table
        with pytest.raises(ValueError, match=r"freqs_cis must be \(seq=3, head_dim/2=4\).*got \(2, 4\)"):
            attention(torch.zeros(1, 3, 64), 0, freqs_cis[:2])
        with pytest.raises(ValueError, match=r"freqs_cis must be \(seq=1, head_dim/2=4\).*got \(1, 8\)"):
            attention(torch.zeros(1, 1, 64), 0, precompute_freqs_cis(16, 16)[:1])
        with pytest.raises(TypeError, match="freqs_cis must be the complex table from precompute_freqs_cis, got torch.float32"):
            attention(torch.zeros(1, 3, 64), 0, torch.zeros(3, 4))
        with pytest.raises(TypeError, match="freqs_cis must be the complex table .* got NoneType"):
            attention(torch.zeros(1, 3, 64), 0, None)


# ---------------------------------------------------------------- kv_cache_bytes

def test_kv_cache_bytes_published_sizes():
    GiB = 2**30
    assert kv_cache_bytes(32, 32, 128, seq_len=4096) == 2 * GiB              # Llama-2-7B: 0.5 MiB per token
    assert kv_cache_bytes(80, 8, 128, seq_len=4096) == 1.25 * GiB            # Llama-2-70B with GQA
    assert kv_cache_bytes(80, 64, 128, seq_len=4096) == 8 * kv_cache_bytes(80, 8, 128, seq_len=4096)
    assert kv_cache_bytes(30, 3, 64, seq_len=1) == 23040                     # SmolLM2-135M per token
    assert kv_cache_bytes(32, 32, 128, seq_len=4096, batch_size=8) == 16 * GiB
    assert kv_cache_bytes(32, 32, 128, seq_len=4096, bytes_per_value=0.5) == GiB // 2  # int4


def test_kv_cache_bytes_equals_allocated_buffers():
    n_layers, n_kv_heads, head_dim, seq_len, batch = 3, 2, 16, 20, 4
    caches = [KVCache(batch, seq_len, n_kv_heads, head_dim, dtype=torch.float16) for _ in range(n_layers)]
    allocated = sum(c.cache_k.nbytes + c.cache_v.nbytes for c in caches)
    assert kv_cache_bytes(n_layers, n_kv_heads, head_dim, seq_len, batch_size=batch) == allocated


def test_kv_cache_bytes_bad_input():
    with pytest.raises(ValueError, match="n_layers must be >= 1, got 0"):
        kv_cache_bytes(0, 8, 128, 4096)
    with pytest.raises(ValueError, match="bytes_per_value must be a positive number.*got 0"):
        kv_cache_bytes(32, 8, 128, 4096, bytes_per_value=0)
    with pytest.raises(TypeError, match="seq_len must be an int, got float"):
        kv_cache_bytes(32, 8, 128, 4096.0)


# ---------------------------------------------------------------- checkers

def _copy(*names):
    "A fresh copy of course_lib.attention's `names` (helpers first): what a student who retyped them hands in."
    return source_copy(attention_module, *names) if len(names) == 1 else source_copy(attention_module, *names)[-1]


def _mask_from_allowed(allowed, blocked=float("-inf")):
    return torch.zeros(allowed.shape).masked_fill(~allowed, blocked)


def _allowed(s, p):
    return torch.ones(s, p + s, dtype=torch.bool).tril(p)


def test_check_causal_mask_passes_a_copy_and_independent_versions():
    assert check_causal_mask(_copy("_as_int", "causal_mask"))
    assert check_causal_mask(lambda s, p=0, device=None: _mask_from_allowed(_allowed(s, p)))


@pytest.mark.parametrize("blocked", [torch.finfo(torch.float32).min, -1e9, -1e4])
def test_check_causal_mask_accepts_large_finite_negatives(blocked):
    # Hugging Face fills blocked entries with torch.finfo(dtype).min: exactly zero weight after the softmax
    assert check_causal_mask(lambda s, p=0, device=None: _mask_from_allowed(_allowed(s, p), blocked))


def test_a_large_finite_negative_blocks_like_minus_inf():
    scores = randn(3, 8, seed=1) * 30
    for blocked in (torch.finfo(torch.float32).min, -1e9, -1e4):
        mask = _mask_from_allowed(_allowed(3, 5), blocked)
        assert torch.equal(torch.softmax(scores + mask, -1), torch.softmax(scores + causal_mask(3, 5), -1))


def test_check_causal_mask_refuses_the_library_and_pytorch():
    assert refused(check_causal_mask(causal_mask), "course_lib.attention.causal_mask")
    assert refused(check_causal_mask(lambda s, p=0, device=None: causal_mask(s, p)), "course_lib.attention.causal_mask")
    square = lambda s, p=0, device=None: torch.nn.Transformer.generate_square_subsequent_mask(s)
    assert refused(check_causal_mask(square), "generate_square_subsequent_mask")


@pytest.mark.parametrize("wrong,message", [
    # ignores start_pos: square mask
    (lambda s, p=0, device=None: torch.triu(torch.full((s, s), float("-inf")), diagonal=1),
     "leaves out the start_pos cached keys"),
    # off by one: blocks the diagonal
    (lambda s, p=0, device=None: torch.triu(torch.full((s, p + s), float("-inf")), diagonal=p),
     r"query 0 \(absolute position 0\) is blocked from itself"),
    # off by one the other way: lets each query see the next key
    (lambda s, p=0, device=None: torch.triu(torch.full((s, p + s), float("-inf")), diagonal=p + 2),
     r"query 0 \(absolute position 0\) may see key 1, which is in its future"),
    # keeps the diagonal offset at 1 whatever start_pos is
    (lambda s, p=0, device=None: torch.triu(torch.full((s, p + s), float("-inf")), diagonal=1),
     r"query 0 \(absolute position 5\) is blocked from key 1, which comes before it"),
    # transposed: keys as rows
    (lambda s, p=0, device=None: _mask_from_allowed(_allowed(s, p)).T, "it is transposed"),
    # the HF mask with the wrong orientation inside: lower triangle blocked
    (lambda s, p=0, device=None: _mask_from_allowed(~_allowed(s, p) | (torch.arange(p + s) == torch.arange(s)[:, None] + p),
                                                   torch.finfo(torch.float32).min),
     r"is blocked from key 0, which comes before it|may see key 1, which is in its future"),
    # boolean mask
    (lambda s, p=0, device=None: torch.ones(s, p + s, dtype=torch.bool).tril(p),
     "dtype torch.bool.*0 where a query may look and -inf"),
    # 0/1 float mask
    (lambda s, p=0, device=None: 1.0 - torch.ones(s, p + s).tril(p),
     "0/1 mask only nudges the scores"),
    # positive "blocked" values
    (lambda s, p=0, device=None: _mask_from_allowed(_allowed(s, p), torch.finfo(torch.float32).max),
     r"mask holds 3.40282e\+38"),
    # a negative that is not large enough to hide the future: -100 leaves weight on a key whose score is 100 higher
    (lambda s, p=0, device=None: _mask_from_allowed(_allowed(s, p), -100.0), "mask holds -100 at"),
    # float16 HF mask: values fine, dtype not
    (lambda s, p=0, device=None: _mask_from_allowed(_allowed(s, p), torch.finfo(torch.float16).min).half(),
     "dtype torch.float16, expected torch.float32"),
])
def test_check_causal_mask_catches_mistakes(wrong, message):
    result = check_causal_mask(wrong)
    assert not result
    assert any(re.search(message, problem) for _, problem, _ in result.failures), str(result)


def test_check_repeat_kv_passes_a_copy_and_independent_versions():
    assert check_repeat_kv(_copy("repeat_kv"))
    assert check_repeat_kv(lambda x, n_rep: x.index_select(2, torch.arange(x.shape[2] * n_rep) // n_rep))


def test_check_repeat_kv_refuses_the_library_and_repeat_interleave():
    assert refused(check_repeat_kv(repeat_kv), "course_lib.attention.repeat_kv")
    assert refused(check_repeat_kv(lambda x, n_rep: repeat_kv(x, n_rep)), "course_lib.attention.repeat_kv")
    assert refused(check_repeat_kv(lambda x, n_rep: torch.repeat_interleave(x, n_rep, dim=2)), "torch.repeat_interleave")
    # the same built-in called as a tensor method (a bound C method: NoShortcuts matches it by name on a Tensor)
    assert refused(check_repeat_kv(lambda x, n_rep: x.repeat_interleave(n_rep, dim=2)), "torch.Tensor.repeat_interleave")


@pytest.mark.parametrize("wrong,message", [
    (lambda x, n_rep: x.repeat(1, 1, n_rep, 1),
     r"output head 1 holds K/V head 1, expected K/V head 0 \(= h // n_rep\)"),
    # written with expand, not repeat_interleave (which the checker refuses): the mistakes, not the shortcut
    (lambda x, n_rep: x[:, :, None].expand(-1, -1, n_rep, -1, -1).flatten(1, 2),
     r"repeats along seq \(axis 1\) instead of the head axis"),
    (lambda x, n_rep: x.float()[:, :, :, None].expand(-1, -1, -1, n_rep, -1).flatten(2, 3),
     "dtype torch.float32, expected torch.bfloat16"),
    (lambda x, n_rep: x[:, :, :, None].expand(-1, -1, -1, n_rep, -1).flatten(2, 3) if n_rep > 1 else None,
     "should be a torch.Tensor, got NoneType"),
])
def test_check_repeat_kv_catches_mistakes(wrong, message):
    result = check_repeat_kv(wrong)
    assert not result
    assert any(re.search(message, problem) for _, problem, _ in result.failures), str(result)


def _own_attention(q, k, v, mask=None):
    "An independent scaled dot-product attention, from the formula."
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return torch.softmax(scores if mask is None else scores + mask, dim=-1) @ v


def test_check_scaled_dot_product_passes_a_copy_and_an_independent_version():
    assert check_scaled_dot_product(_copy("_check_sdp_inputs", "scaled_dot_product"))
    assert check_scaled_dot_product(_own_attention)


def _via_multi_head_attention_forward(q, k, v, mask=None):
    b, h, s, d = q.shape
    flat = lambda t: t.permute(2, 0, 1, 3).reshape(t.shape[2], b * h, d)          # (seq, batch*heads, d)
    eye = torch.eye(d)
    out, _ = F.multi_head_attention_forward(
        flat(q), flat(k), flat(v), d, 1, torch.cat([eye, eye, eye]), None, None, None, False, 0.0,
        eye, None, attn_mask=mask, need_weights=False)
    return out.reshape(s, b, h, d).permute(1, 2, 0, 3)


def _via_module(q, k, v, mask=None):
    return torch.nn.MultiheadAttention(q.shape[-1], 1, bias=False)(q[0, 0], k[0, 0], v[0, 0])[0]


@pytest.mark.parametrize("shortcut,name", [
    (lambda q, k, v, mask=None: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
     "torch.nn.functional.scaled_dot_product_attention"),
    (_via_multi_head_attention_forward, "torch.nn.functional.multi_head_attention_forward"),
    (_via_module, "torch.nn.modules.activation.MultiheadAttention"),
    (lambda q, k, v, mask=None: torch._scaled_dot_product_attention_math(q, k, v, attn_mask=mask)[0],
     "_scaled_dot_product_attention_math"),
    (lambda q, k, v, mask=None: scaled_dot_product(q, k, v, mask), "course_lib.attention.scaled_dot_product"),
    (lambda q, k, v, mask=None: scaled_dot_product_gqa(q, k, v, mask), "course_lib.attention.scaled_dot_product_gqa"),
])
def test_check_scaled_dot_product_refuses_the_library_and_pytorch(shortcut, name):
    assert refused(check_scaled_dot_product(shortcut), name), str(check_scaled_dot_product(shortcut))


def test_check_scaled_dot_product_refuses_the_library_itself():
    assert refused(check_scaled_dot_product(scaled_dot_product), "course_lib.attention.scaled_dot_product")


def test_multi_head_attention_forward_shortcut_would_solve_it():
    "The shortcut refused above is a real answer, not a strawman: outside the checker it matches the reference."
    q, k, v = randn(2, 3, 5, 8, seed=1), randn(2, 3, 7, 8, seed=2), randn(2, 3, 7, 8, seed=3)
    torch.testing.assert_close(_via_multi_head_attention_forward(q, k, v, causal_mask(5, 2)),
                               scaled_dot_product(q, k, v, causal_mask(5, 2)))


@pytest.mark.parametrize("wrong,message", [
    (lambda q, k, v, mask=None: _attend(q, k, v, mask, 1.0), "the 1/√head_dim scale is missing"),
    (lambda q, k, v, mask=None: _attend(q, k, v, mask, 1 / q.shape[-1]), "divides by head_dim instead of √head_dim"),
    (lambda q, k, v, mask=None: _attend(q, k, v, mask, q.shape[-1] ** -0.5, dim=-2), r"softmax over the queries"),
    (lambda q, k, v, mask=None: _attend(q, k, v, mask, q.shape[-1] ** -0.5, use_mask=False), "the mask is ignored"),
    # exp without subtracting the maximum overflows on large scores
    (lambda q, k, v, mask=None: (lambda e: e / e.sum(-1, keepdim=True))(
        torch.exp(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5 + (0 if mask is None else mask))) @ v,
     "has NaN"),
])
def test_check_scaled_dot_product_catches_mistakes(wrong, message):
    result = check_scaled_dot_product(wrong)
    assert not result
    assert any(re.search(message, problem) for _, problem, _ in result.failures), str(result)


def _attend(q, k, v, mask, scale, dim=-1, use_mask=True):
    scores = q @ k.transpose(-2, -1) * scale
    if mask is not None and use_mask:
        scores = scores + mask
    return torch.softmax(scores, dim=dim) @ v


# ---------------------------------------------------------------- check_scaled_dot_product_gqa

def _gqa_by_index(q, k, v, mask=None):
    "An independent GQA: pick K/V head h // n_rep for query head h (a copy, allowed), then attend."
    heads = torch.arange(q.shape[1]) // (q.shape[1] // k.shape[1])
    return _own_attention(q, k.index_select(1, heads), v.index_select(1, heads), mask)


def test_check_scaled_dot_product_gqa_passes_a_copy_and_an_independent_version():
    assert check_scaled_dot_product_gqa(_copy("_check_sdp_inputs", "_grouped_attention", "scaled_dot_product_gqa"))
    assert check_scaled_dot_product_gqa(_gqa_by_index)


@pytest.mark.parametrize("shortcut,name", [
    (lambda q, k, v, mask=None: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
     "torch.nn.functional.scaled_dot_product_attention"),
    (lambda q, k, v, mask=None: scaled_dot_product_gqa(q, k, v, mask), "course_lib.attention.scaled_dot_product_gqa"),
    (lambda q, k, v, mask=None: _grouped_attention(q, k, v, mask), "course_lib.attention._grouped_attention"),
    (lambda q, k, v, mask=None: _own_attention(q, *(repeat_kv(t.transpose(1, 2), q.shape[1] // k.shape[1]).transpose(1, 2)
                                                   for t in (k, v)), mask), "course_lib.attention.repeat_kv"),
    (lambda q, k, v, mask=None: _own_attention(q, *(torch.repeat_interleave(t, q.shape[1] // k.shape[1], dim=1)
                                                   for t in (k, v)), mask), "torch.repeat_interleave"),
])
def test_check_scaled_dot_product_gqa_refuses_the_library_and_pytorch(shortcut, name):
    assert refused(check_scaled_dot_product_gqa(shortcut), name)


def test_check_scaled_dot_product_gqa_refuses_the_library_itself():
    assert refused(check_scaled_dot_product_gqa(scaled_dot_product_gqa), "course_lib.attention.scaled_dot_product_gqa")


@pytest.mark.parametrize("wrong,message", [
    # K/V heads tiled: query head h reads K/V head h % n_kv_heads
    (lambda q, k, v, mask=None: _own_attention(q, *(t.repeat(1, q.shape[1] // k.shape[1], 1, 1) for t in (k, v)), mask),
     r"query head h reading K/V head h % n_kv_heads"),
    (lambda q, k, v, mask=None: _gqa_by_index(q * q.shape[-1] ** 0.5, k, v, mask), "the 1/√head_dim scale is missing"),
    (lambda q, k, v, mask=None: _gqa_by_index(q, k, v), "the mask is ignored"),
])
def test_check_scaled_dot_product_gqa_catches_mistakes(wrong, message):
    result = check_scaled_dot_product_gqa(wrong)
    assert not result
    assert any(re.search(message, problem) for _, problem, _ in result.failures), str(result)


# ---------------------------------------------------------------- check_KVCache

class _Buffers:
    "An independent, preallocated KVCache: what the exercise asks for, written without course_lib."
    def __init__(self, max_batch_size, max_seq_len, n_kv_heads, head_dim, dtype=torch.float32, device=None):
        shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        self.cache_k = torch.zeros(shape, dtype=dtype, device=device)
        self.cache_v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq_len = max_seq_len

    def _check(self, start_pos, seq):
        if start_pos + seq > self.max_seq_len:
            raise ValueError(f"start_pos + seq = {start_pos + seq} exceeds max_seq_len={self.max_seq_len}")

    def update(self, start_pos, xk, xv):
        bsz, seq = xk.shape[:2]
        self._check(start_pos, seq)
        self.cache_k[:bsz, start_pos:start_pos + seq], self.cache_v[:bsz, start_pos:start_pos + seq] = xk, xv
        return self.cache_k[:bsz, :start_pos + seq], self.cache_v[:bsz, :start_pos + seq]


def test_check_KVCache_passes_a_copy_and_an_independent_version():
    assert check_KVCache(_copy("KVCache"))
    assert check_KVCache(_Buffers)


def test_check_KVCache_refuses_the_library():
    assert refused(check_KVCache(KVCache), "course_lib.attention.KVCache")

    class Derived(KVCache):
        pass
    assert refused(check_KVCache(Derived), "derives from course_lib.attention.KVCache")

    class Delegating(_Buffers):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.inner = KVCache(*args, **kwargs)
    assert refused(check_KVCache(Delegating), "course_lib.attention.KVCache")


class _ConcatCache:
    "Right keys and values, but it grows with torch.cat instead of writing into preallocated buffers."
    def __init__(self, max_batch_size, max_seq_len, n_kv_heads, head_dim, dtype=torch.float32, device=None):
        self.max_seq_len, self.cache_k, self.cache_v = max_seq_len, None, None

    def update(self, start_pos, xk, xv):
        if start_pos + xk.shape[1] > self.max_seq_len:
            raise ValueError(f"start_pos + seq = {start_pos + xk.shape[1]} exceeds max_seq_len={self.max_seq_len}")
        keep = lambda t: t[:, :start_pos] if start_pos else t[:, :0]
        self.cache_k = xk if start_pos == 0 else torch.cat([keep(self.cache_k), xk], 1)
        self.cache_v = xv if start_pos == 0 else torch.cat([keep(self.cache_v), xv], 1)
        return self.cache_k, self.cache_v


class _StackCache(_ConcatCache):  # the same with torch.stack of the positions
    def update(self, start_pos, xk, xv):
        old = [] if start_pos == 0 else list(self.cache_k[:, :start_pos].unbind(1)), \
            [] if start_pos == 0 else list(self.cache_v[:, :start_pos].unbind(1))
        self.cache_k = torch.stack(old[0] + list(xk.unbind(1)), 1)
        self.cache_v = torch.stack(old[1] + list(xv.unbind(1)), 1)
        return self.cache_k, self.cache_v


def test_concat_cache_gives_the_right_values():
    "The cat-based cache is refused for how it works, not for wrong values: its returns match the reference."
    ours, ref = _ConcatCache(1, 8, 2, 4), KVCache(1, 8, 2, 4)
    for start_pos, seq in ((0, 3), (3, 2), (5, 1)):
        xk, xv = randn(1, seq, 2, 4, seed=start_pos), randn(1, seq, 2, 4, seed=start_pos + 10)
        for got, want in zip(ours.update(start_pos, xk, xv), ref.update(start_pos, xk, xv)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("grower,name", [(_ConcatCache, "torch.cat"), (_StackCache, "torch.stack")])
def test_check_KVCache_refuses_a_growing_cache(grower, name):
    assert refused(check_KVCache(grower), name)


class _Reallocating(_Buffers):  # no torch.cat, but a new full-size buffer at every update
    def update(self, start_pos, xk, xv):
        self.cache_k, self.cache_v = self.cache_k.clone(), self.cache_v.clone()
        return super().update(start_pos, xk, xv)


class _LazyBuffers(_Buffers):  # allocates on the first update, at the first batch's size
    def __init__(self, max_batch_size, max_seq_len, n_kv_heads, head_dim, dtype=torch.float32, device=None):
        self.max_seq_len, self.dtype, self.cache_k = max_seq_len, dtype, None

    def update(self, start_pos, xk, xv):
        if self.cache_k is None:
            shape = (xk.shape[0], self.max_seq_len) + tuple(xk.shape[2:])
            self.cache_k, self.cache_v = torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)
        return super().update(start_pos, xk, xv)


class _Copies(_Buffers):  # returns copies of what it holds
    def update(self, start_pos, xk, xv):
        return tuple(t.clone() for t in super().update(start_pos, xk, xv))


class _NoOffset(_Buffers):  # writes at position 0 whatever start_pos is
    def update(self, start_pos, xk, xv):
        bsz, seq = xk.shape[:2]
        self._check(start_pos, seq)
        self.cache_k[:bsz, :seq], self.cache_v[:bsz, :seq] = xk, xv
        return self.cache_k[:bsz, :start_pos + seq], self.cache_v[:bsz, :start_pos + seq]


class _OnlyNew(_Buffers):  # returns the new keys and values only
    def update(self, start_pos, xk, xv):
        super().update(start_pos, xk, xv)
        return xk, xv


class _WholeCache(_Buffers):  # returns the whole preallocated buffers
    def update(self, start_pos, xk, xv):
        super().update(start_pos, xk, xv)
        return self.cache_k, self.cache_v


class _Swapped(_Buffers):
    def update(self, start_pos, xk, xv):
        return super().update(start_pos, xk, xv)[::-1]


class _NoBoundsCheck(_Buffers):  # plain slicing: a shape error instead of a ValueError past max_seq_len
    def _check(self, start_pos, seq):
        pass


@pytest.mark.parametrize("wrong,message", [
    (_NoOffset, "it writes at position 0 instead of at start_pos=5, overwriting the start of the sequence"),
    (_OnlyNew, r"keys have shape \(1, 1, 2, 4\), expected \(1, 6, 2, 4\).*returns only the 1 new position"),
    (_WholeCache, "returns the whole preallocated cache"),
    (_Swapped, "keys and values are swapped"),
    (_NoBoundsCheck, "raised RuntimeError.*expected a ValueError"),
    (_Reallocating, r"cache_k is a new tensor: write into the preallocated one in place"),
    (_LazyBuffers, r"after KVCache\(2, 8, 2, 4\) there is no tensor cache_k"),
    (_Copies, r"the keys returned by update\(start_pos=0, xk \(1, 3, 2, 4\)\) are a new tensor, not a view of cache_k"),
])
def test_check_KVCache_catches_mistakes(wrong, message):
    result = check_KVCache(wrong)
    assert not result
    assert any(re.search(message, problem) for _, problem, _ in result.failures), str(result)


def test_check_KVCache_names_a_buffer_of_the_wrong_size():
    class Short(_Buffers):
        def __init__(self, max_batch_size, max_seq_len, *args, **kwargs):
            super().__init__(max_batch_size, max_seq_len // 2, *args, **kwargs)
            self.max_seq_len = max_seq_len
    result = check_KVCache(Short)
    assert not result and "after construction cache_k is (2, 4, 2, 4) torch.float32, expected the full (2, 8, 2, 4)" \
        in str(result)


# ---------------------------------------------------------------- check_merge_attention (exercise 5)

def merge_attention(out_a, lse_a, out_b, lse_b):
    "The answer to exercise 5: each block's output weighed by its share of the softmax's mass."
    lse = torch.logaddexp(lse_a, lse_b)[..., None]     # (batch, n_heads, seq, 1) log of the total mass
    return (lse_a[..., None] - lse).exp() * out_a + (lse_b[..., None] - lse).exp() * out_b


def test_check_merge_attention_passes_the_answer():
    assert check_merge_attention(merge_attention)


def test_merge_attention_answer_equals_attention_over_all_keys():
    "Independent of the checker: split PyTorch's attention by hand and merge it back."
    q, k, v = randn(1, 2, 3, 8, seed=1), randn(1, 2, 7, 8, seed=2), randn(1, 2, 7, 8, seed=3)
    parts = []
    for part in (slice(None, 4), slice(4, None)):
        scores = q @ k[:, :, part].transpose(-2, -1) / 8 ** 0.5
        parts += [F.scaled_dot_product_attention(q, k[:, :, part], v[:, :, part]), scores.logsumexp(-1)]
    torch.testing.assert_close(merge_attention(*parts), F.scaled_dot_product_attention(q, k, v))


def _naive_merge(out_a, lse_a, out_b, lse_b):  # exp(lse) overflows for large scores
    wa, wb = lse_a.double().exp()[..., None], lse_b.double().exp()[..., None]
    return ((wa * out_a + wb * out_b) / (wa + wb)).float()


def _nan_for_empty_blocks(out_a, lse_a, out_b, lse_b):  # block a's share as r / (1 + r), r = exp(lse_a - lse_b)
    r = (lse_a - lse_b).exp()[..., None]                # inf when block b is empty: inf / inf = NaN
    return (r * out_a + out_b) / (1 + r)


@pytest.mark.parametrize("wrong,message", [
    (lambda oa, la, ob, lb: (oa + ob) / 2, "averages the two outputs"),
    (lambda oa, la, ob, lb: merge_attention(oa, lb, ob, la), "gives each block the other's weight"),
    (_naive_merge, r"large scores.*has NaN"),
    (lambda oa, la, ob, lb: torch.cat([oa, ob], -1), r"merged output has shape \(2, 3, 4, 32\), expected \(2, 3, 4, 16\)"),
])
def test_check_merge_attention_catches_mistakes(wrong, message):
    result = check_merge_attention(wrong)
    assert not result
    assert any(re.search(message, f"{d}: {p}") for d, p, _ in result.failures), str(result)


def test_check_merge_attention_catches_nan_for_a_block_that_sees_no_key():
    result = check_merge_attention(_nan_for_empty_blocks)
    assert not result and "query 0 sees no key of block b: merged output has NaN" in str(result), str(result)


def test_check_merge_attention_refuses_the_attention_shortcuts():
    "A candidate cannot recompute the attention (it gets no q, k, v), but the library's answers stay switched off."
    def via_library(out_a, lse_a, out_b, lse_b):
        scaled_dot_product(out_a, out_a, out_a)
        return merge_attention(out_a, lse_a, out_b, lse_b)
    assert refused(check_merge_attention(via_library), "course_lib.attention.scaled_dot_product")


def test_check_KVCache_stub_gives_one_line():
    class Stub:
        def __init__(self, *args, **kwargs):
            raise NotImplementedError
    result = check_KVCache(Stub)
    assert len(result.failures) == 1 and "NotImplementedError" in str(result)


def test_checkers_reject_non_callables():
    with pytest.raises(TypeError, match="candidate should be a function or class"):
        check_causal_mask(None)

"""RoPE (course_lib.rope) against independent references: Hugging Face's Llama rotary code, the
permutation of transformers' convert_llama_weights_to_hf.py, and the rotation written out by hand."""
import math
import sys
from pathlib import Path

import pytest
import torch

import course_lib.rope as rope_module
from course_lib.checks.rope import (check_apply_rotary_emb, check_permute_hf_to_meta, check_precompute_freqs_cis,
                                   check_rope_shift)
from course_lib.rope import (apply_rotary_emb, apply_rotary_emb_hf, permute_hf_to_meta, permute_meta_to_hf,
                             precompute_cos_sin, precompute_freqs_cis, rotate_half)
from course_lib.validation import trusted_inputs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shortcuts import refused, source_copy  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_rotary_pos_emb
from transformers.models.llama.modeling_llama import rotate_half as hf_rotate_half

# (head_dim, theta): Llama 2, SmolLM2, an odd base
SIZES = [(128, 10000.0), (64, 100000.0), (16, 500.0)]


def hf_cos_sin(head_dim, theta, positions, dtype=torch.float32):
    "cos, sin of shape (1, seq, head_dim) from transformers' LlamaRotaryEmbedding."
    n_heads = 4
    cfg = LlamaConfig(hidden_size=head_dim * n_heads, num_attention_heads=n_heads, head_dim=head_dim,
                      rope_theta=theta, max_position_embeddings=4096)
    assert cfg.rope_parameters["rope_theta"] == theta  # transformers 5.x keeps the base here
    return LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=dtype), positions[None])


def convert_script_permute(w, n_heads, dim1, dim2):
    "`permute` of transformers/models/llama/convert_llama_weights_to_hf.py (Meta -> HF)."
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def meta_to_hf_vectors(x):
    "(..., head_dim) Meta order -> HF order, by index: HF slot a·d/2 + j holds Meta slot 2j + a."
    d = x.shape[-1]
    return x[..., [2 * j + a for a in (0, 1) for j in range(d // 2)]]


def rotate_by_hand(x, positions, theta):
    "Meta's rotation written out with 2x2 matrices in float64: pair (x_2j, x_2j+1) turned by m·θ_j."
    d = x.shape[-1]
    out = x.double().clone()
    for j in range(d // 2):
        th = theta ** (-2 * j / d)
        for s, m in enumerate(positions):
            c, sn = math.cos(m * th), math.sin(m * th)
            a, b = x[:, s, :, 2 * j].double(), x[:, s, :, 2 * j + 1].double()
            out[:, s, :, 2 * j], out[:, s, :, 2 * j + 1] = c * a - sn * b, sn * a + c * b
    return out


# ---------------------------------------------------------------- tables

@pytest.mark.parametrize("head_dim,theta", SIZES)
def test_tables_match_hf(head_dim, theta):
    positions = torch.arange(0, 300)
    cos_hf, sin_hf = hf_cos_sin(head_dim, theta, positions)
    cos, sin = precompute_cos_sin(head_dim, 300, theta)
    torch.testing.assert_close(cos, cos_hf[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, sin_hf[0], atol=1e-6, rtol=0)
    freqs_cis = precompute_freqs_cis(head_dim, 300, theta)
    assert freqs_cis.shape == (300, head_dim // 2) and freqs_cis.dtype == torch.complex64
    torch.testing.assert_close(freqs_cis.real, cos_hf[0, :, :head_dim // 2], atol=1e-6, rtol=0)
    torch.testing.assert_close(freqs_cis.imag, sin_hf[0, :, :head_dim // 2], atol=1e-6, rtol=0)


def test_frequencies_published_numbers():
    # θ_0 = 1 rad/token; slowest pair of Llama 2: 10000^(-126/128); of SmolLM2: 100000^(-62/64)
    llama = precompute_freqs_cis(128, 2, 10000.0)[1].angle()
    smol = precompute_freqs_cis(64, 2, 100000.0)[1].angle()
    assert llama[0].item() == 1.0 and smol[0].item() == 1.0
    assert llama[-1].item() == pytest.approx(10000.0 ** (-126 / 128), rel=1e-5)
    assert smol[-1].item() == pytest.approx(100000.0 ** (-62 / 64), rel=1e-5)
    assert 2 * math.pi / llama[-1].item() == pytest.approx(54410, rel=1e-3)


def test_freqs_cis_unit_modulus_and_position_zero():
    f = precompute_freqs_cis(32, 50)
    torch.testing.assert_close(f.abs(), torch.ones(50, 16), atol=1e-6, rtol=0)
    assert torch.equal(f[0], torch.ones(16, dtype=torch.complex64))


# ---------------------------------------------------------------- applying the rotation

def test_apply_rotary_emb_matches_hand_written_rotation():
    torch.manual_seed(0)
    xq, xk = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 1, 8)
    start_pos = 11
    f = precompute_freqs_cis(8, 32, 500.0)[start_pos:start_pos + 5]
    rq, rk = apply_rotary_emb(xq, xk, f)
    positions = list(range(start_pos, start_pos + 5))
    torch.testing.assert_close(rq.double(), rotate_by_hand(xq, positions, 500.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(rk.double(), rotate_by_hand(xk, positions, 500.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("head_dim,theta", SIZES)
def test_hf_layout_matches_hf(head_dim, theta):
    torch.manual_seed(1)
    bsz, seq, n_heads, n_kv_heads, start_pos = 2, 7, 4, 2, 33
    positions = torch.arange(start_pos, start_pos + seq)
    cos_hf, sin_hf = hf_cos_sin(head_dim, theta, positions)
    q, k = torch.randn(bsz, seq, n_heads, head_dim), torch.randn(bsz, seq, n_kv_heads, head_dim)
    ref_q, ref_k = hf_apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos_hf, sin_hf)
    cos, sin = precompute_cos_sin(head_dim, start_pos + seq, theta)
    ours_q, ours_k = apply_rotary_emb_hf(q, k, cos[start_pos:], sin[start_pos:])
    torch.testing.assert_close(ours_q, ref_q.transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_k, ref_k.transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim,theta", SIZES)
def test_meta_layout_matches_hf_after_permutation(head_dim, theta):
    torch.manual_seed(2)
    bsz, seq, n_heads, n_kv_heads, dim, start_pos = 2, 6, 4, 2, 48, 5
    positions = torch.arange(start_pos, start_pos + seq)
    cos_hf, sin_hf = hf_cos_sin(head_dim, theta, positions)
    x = torch.randn(bsz, seq, dim)
    wq_hf, wk_hf = torch.randn(n_heads * head_dim, dim), torch.randn(n_kv_heads * head_dim, dim)
    ref_q, ref_k = hf_apply_rotary_pos_emb((x @ wq_hf.T).view(bsz, seq, n_heads, head_dim).transpose(1, 2),
                                           (x @ wk_hf.T).view(bsz, seq, n_kv_heads, head_dim).transpose(1, 2),
                                           cos_hf, sin_hf)
    f = precompute_freqs_cis(head_dim, start_pos + seq, theta)[start_pos:]
    q, k = apply_rotary_emb((x @ permute_hf_to_meta(wq_hf, n_heads).T).view(bsz, seq, n_heads, head_dim),
                            (x @ permute_hf_to_meta(wk_hf, n_kv_heads).T).view(bsz, seq, n_kv_heads, head_dim), f)
    torch.testing.assert_close(meta_to_hf_vectors(q), ref_q.transpose(1, 2), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(meta_to_hf_vectors(k), ref_k.transpose(1, 2), atol=1e-4, rtol=1e-5)


def test_unpermuted_weights_give_different_scores():
    # the classic port bug: HF rows used in Meta's layout without permute_hf_to_meta
    torch.manual_seed(3)
    head_dim, seq = 16, 8
    q, k = torch.randn(1, seq, 1, head_dim), torch.randn(1, seq, 1, head_dim)
    cos, sin = precompute_cos_sin(head_dim, seq)
    hq, hk = apply_rotary_emb_hf(q, k, cos, sin)
    mq, mk = apply_rotary_emb(q, k, precompute_freqs_cis(head_dim, seq))   # same numbers, wrong pairs
    ref = torch.einsum("bqhd,bkhd->bqk", hq, hk)
    assert (torch.einsum("bqhd,bkhd->bqk", mq, mk) - ref).abs().max() > 0.1


def test_relative_position_property():
    torch.manual_seed(4)
    q, k = torch.randn(1, 1, 2, 64), torch.randn(1, 1, 2, 64)
    f = precompute_freqs_cis(64, 1200, 100000.0)

    def score(m, n):
        return (apply_rotary_emb(q, q, f[m:m + 1])[0] * apply_rotary_emb(k, k, f[n:n + 1])[0]).sum(-1)

    for m, n in [(9, 2), (40, 33), (1107, 1100)]:
        torch.testing.assert_close(score(m, n), score(7, 0), atol=2e-3, rtol=1e-4)
    assert (score(7, 0) - score(0, 7)).abs().max() > 1e-2  # direction matters


def test_rotation_preserves_pair_norms_and_position_zero():
    torch.manual_seed(5)
    xq = torch.randn(3, 4, 2, 16)
    rq, _ = apply_rotary_emb(xq, xq, precompute_freqs_cis(16, 4))
    pair_norm = lambda x: x.reshape(*x.shape[:-1], 8, 2).norm(dim=-1)
    torch.testing.assert_close(pair_norm(rq), pair_norm(xq), atol=1e-5, rtol=1e-5)
    assert torch.equal(rq[:, 0], xq[:, 0])


def test_decode_step_equals_full_pass_row():
    torch.manual_seed(6)
    xq, xk = torch.randn(2, 9, 4, 8), torch.randn(2, 9, 2, 8)
    f = precompute_freqs_cis(8, 16)
    full_q, full_k = apply_rotary_emb(xq, xk, f[:9])
    for pos in (0, 4, 8):
        q1, k1 = apply_rotary_emb(xq[:, pos:pos + 1], xk[:, pos:pos + 1], f[pos:pos + 1])
        torch.testing.assert_close(q1, full_q[:, pos:pos + 1])
        torch.testing.assert_close(k1, full_k[:, pos:pos + 1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dtypes(dtype):
    torch.manual_seed(7)
    xq, xk = torch.randn(1, 5, 2, 16), torch.randn(1, 5, 1, 16)
    f = precompute_freqs_cis(16, 5)
    rq, rk = apply_rotary_emb(xq.to(dtype), xk.to(dtype), f)
    assert rq.dtype == dtype and rk.dtype == dtype
    ref_q, _ = apply_rotary_emb(xq.to(dtype).float(), xk.to(dtype).float(), f)
    torch.testing.assert_close(rq, ref_q.to(dtype))  # float32 math, one rounding at the end
    cos, sin = precompute_cos_sin(16, 5)
    hq, hk = apply_rotary_emb_hf(xq.to(dtype), xk.to(dtype), cos, sin)
    assert hq.dtype == dtype and hk.dtype == dtype
    # HF rounds cos/sin to the low-precision dtype first; allow a few ulps
    cos_hf, sin_hf = hf_cos_sin(16, 10000.0, torch.arange(5), dtype=dtype)
    ref_hq, _ = hf_apply_rotary_pos_emb(xq.to(dtype).transpose(1, 2), xk.to(dtype).transpose(1, 2), cos_hf, sin_hf)
    torch.testing.assert_close(hq, ref_hq.transpose(1, 2), atol=3e-2, rtol=2e-2)


def test_rotate_half_matches_hf():
    x = torch.randn(3, 2, 10)
    assert torch.equal(rotate_half(x), hf_rotate_half(x))


# ---------------------------------------------------------------- the permutation

@pytest.mark.parametrize("n_heads,head_dim,dim", [(4, 8, 16), (9, 64, 576), (3, 64, 576), (1, 2, 5), (2, 16, 7)])
def test_permutation_is_convert_script_and_round_trips(n_heads, head_dim, dim):
    w = torch.randn(n_heads * head_dim, dim)
    rows = n_heads * head_dim
    assert torch.equal(permute_meta_to_hf(w, n_heads), convert_script_permute(w, n_heads, rows, dim))
    assert torch.equal(permute_hf_to_meta(permute_meta_to_hf(w, n_heads), n_heads), w)
    assert torch.equal(permute_meta_to_hf(permute_hf_to_meta(w, n_heads), n_heads), w)
    # by index, per head: HF row a·d/2 + j holds Meta row 2j + a
    idx = [h * head_dim + 2 * j + a for h in range(n_heads) for a in (0, 1) for j in range(head_dim // 2)]
    assert torch.equal(permute_meta_to_hf(w, n_heads), w[idx])


def test_permutation_directions_differ_from_head_dim_8():
    w = torch.arange(8.0)[:, None]
    assert not torch.equal(permute_meta_to_hf(w, 1), permute_hf_to_meta(w, 1))
    w4 = torch.arange(4.0)[:, None]  # head_dim 4: the permutation is its own inverse
    assert torch.equal(permute_meta_to_hf(w4, 1), permute_hf_to_meta(w4, 1))


# ---------------------------------------------------------------- bad input

def test_precompute_bad_input():
    with pytest.raises(ValueError, match=r"head_dim must be a positive even int, got 7"):
        precompute_freqs_cis(7, 10)
    with pytest.raises(ValueError, match=r"head_dim must be a positive even int, got 0"):
        precompute_cos_sin(0, 10)
    with pytest.raises(ValueError, match=r"end .* must be a positive int, got 0"):
        precompute_freqs_cis(8, 0)
    with pytest.raises(ValueError, match=r"theta must be positive, got -1"):
        precompute_freqs_cis(8, 4, theta=-1.0)


def test_apply_bad_input():
    xq, xk = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 1, 8)
    f = precompute_freqs_cis(8, 16)
    with pytest.raises(ValueError, match=r"freqs_cis has 16 positions .* seq=5.*start_pos"):
        apply_rotary_emb(xq, xk, f)                          # table not sliced
    with pytest.raises(ValueError, match=r"freqs_cis has 3 positions .* seq=5"):
        apply_rotary_emb(xq, xk, f[:3])                      # too short
    with pytest.raises(TypeError, match=r"freqs_cis must be the complex table.*float32"):
        apply_rotary_emb(xq, xk, f[:5].real)
    with pytest.raises(ValueError, match=r"freqs_cis must be \(seq, head_dim // 2\), got shape \(1, 5, 1, 4\)"):
        apply_rotary_emb(xq, xk, f[None, :5, None])
    with pytest.raises(ValueError, match=r"freqs_cis is built for head_dim=16 but xq has head_dim=8"):
        apply_rotary_emb(xq, xk, precompute_freqs_cis(16, 5))
    with pytest.raises(ValueError, match=r"xq must be \(batch, seq, n_heads, head_dim\), got shape \(5, 2, 8\)"):
        apply_rotary_emb(xq[0], xk, f[:5])
    with pytest.raises(ValueError, match=r"must share batch, seq and head_dim"):
        apply_rotary_emb(xq, xk[:, :4], f[:5])
    with pytest.raises(TypeError, match=r"xk must be a floating-point tensor, got torch.int64"):
        apply_rotary_emb(xq, xk.long(), f[:5])
    cos, sin = precompute_cos_sin(8, 16)
    with pytest.raises(ValueError, match=r"cos/sin has 16 positions .* seq=5"):
        apply_rotary_emb_hf(xq, xk, cos, sin)
    with pytest.raises(TypeError, match=r"cos must be a real floating-point table.*complex64"):
        apply_rotary_emb_hf(xq, xk, f[:5], sin[:5])
    with pytest.raises(ValueError, match=r"cos and sin must both be \(seq, head_dim\)"):
        apply_rotary_emb_hf(xq, xk, cos[:5], sin[:4])


def test_apply_checks_inside_trusted_inputs_only_when_called_directly(monkeypatch):
    xq, xk = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 1, 8)
    f, (cos, sin) = precompute_freqs_cis(8, 5), precompute_cos_sin(8, 5)
    expected, expected_hf = apply_rotary_emb(xq, xk, f), apply_rotary_emb_hf(xq, xk, cos, sin)

    def refuse(*args):
        raise AssertionError("checked inside trusted_inputs()")
    monkeypatch.setattr(rope_module, "_check_rope_inputs", refuse)
    with trusted_inputs():
        for got, want in zip(apply_rotary_emb(xq, xk, f) + apply_rotary_emb_hf(xq, xk, cos, sin),
                             expected + expected_hf):
            assert torch.equal(got, want)
    with pytest.raises(AssertionError, match="checked"):
        apply_rotary_emb(xq, xk, f)                             # called directly: checked
    with pytest.raises(AssertionError, match="checked"):
        apply_rotary_emb_hf(xq, xk, cos, sin)


def test_a_block_inside_trusted_inputs_skips_the_rmsnorm_and_rope_checks(monkeypatch):
    "What the Transformer does: its layers run inside trusted_inputs(), where RMSNorm and RoPE check nothing."
    import course_lib.rmsnorm as rmsnorm_module
    from course_lib.model import ModelArgs, TransformerBlock
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16)
    block, x = TransformerBlock(0, args).eval(), torch.randn(2, 5, 32)
    freqs_cis = precompute_freqs_cis(args.head_dim, 5)
    with torch.no_grad():
        expected = block(x, 0, freqs_cis, None)

    def refuse(*args):
        raise AssertionError("a layer checked its input inside trusted_inputs()")
    for module, name in [(rmsnorm_module, "_check_layer_input"), (rmsnorm_module, "_check_rms_norm_args"),
                         (rope_module, "_check_rotary_args"), (rope_module, "_check_rope_inputs")]:
        monkeypatch.setattr(module, name, refuse)
    with torch.no_grad(), trusted_inputs():
        assert torch.equal(block(x, 0, freqs_cis, None), expected)
    with torch.no_grad(), pytest.raises(AssertionError, match="checked its input"):
        block(x, 0, freqs_cis, None)                            # called directly, the norms check


def test_apply_checks_never_read_tensor_values():
    "Meta tensors have shapes and dtypes but no values: a check that reads one (.item(), bool(), int()) fails."
    xq, xk = torch.empty(1, 5, 2, 8, device="meta"), torch.empty(1, 5, 1, 8, device="meta")
    f = torch.empty(5, 4, dtype=torch.complex64, device="meta")
    cos = sin = torch.empty(5, 8, device="meta")
    rope_module._check_rotary_args(xq, xk, f)
    rope_module._check_rotary_hf_args(xq, xk, cos, sin)
    assert apply_rotary_emb_hf(xq, xk, cos, sin)[0].shape == (1, 5, 2, 8)
    with pytest.raises(ValueError, match="freqs_cis has 4 positions"):
        apply_rotary_emb(xq, xk, f[:4])


def test_permute_bad_input():
    with pytest.raises(ValueError, match=r"got shape \(30, 4\) and n_heads=4"):
        permute_meta_to_hf(torch.randn(30, 4), 4)              # 30 rows: not n_heads × even head_dim
    with pytest.raises(ValueError, match=r"got shape \(12,\) and n_heads=2"):
        permute_hf_to_meta(torch.randn(12), 2)
    with pytest.raises(ValueError, match=r"n_heads must be a positive int, got 0"):
        permute_hf_to_meta(torch.randn(8, 4), 0)


# ---------------------------------------------------------------- exercise checkers
# The checkers switch the library's RoPE off while a candidate runs, so the right and wrong versions below
# build on retyped copies of it (source_copy), as a student's would; the private helpers are copied first.
_, own_freqs_cis = source_copy(rope_module, "_rope_frequencies", "precompute_freqs_cis")
_, own_apply = source_copy(rope_module, "_rotate_pairs", "apply_rotary_emb")
_, own_apply_hf = source_copy(rope_module, "rotate_half", "apply_rotary_emb_hf")
own_hf_to_meta, own_meta_to_hf = source_copy(rope_module, "permute_hf_to_meta", "permute_meta_to_hf")


def test_check_precompute_freqs_cis():
    assert check_precompute_freqs_cis(own_freqs_cis)

    def float64_version(head_dim, end, theta=10000.0):  # a correct solution written differently
        j = torch.arange(head_dim // 2, dtype=torch.float64)
        ang = torch.arange(end, dtype=torch.float64)[:, None] * theta ** (-2 * j / head_dim)
        return torch.complex(ang.cos(), ang.sin()).to(torch.complex64)
    assert check_precompute_freqs_cis(float64_version)

    def step_one(head_dim, end, theta=10000.0):  # arange(0, d) instead of arange(0, d, 2)
        a = torch.outer(torch.arange(end).float(), theta ** (-torch.arange(head_dim).float() / head_dim))
        return torch.polar(torch.ones_like(a), a)
    r = check_precompute_freqs_cis(step_one)
    assert not r and "one per *pair*" in str(r)

    def angles_only(head_dim, end, theta=10000.0):  # forgot torch.polar
        return torch.angle(own_freqs_cis(head_dim, end, theta))
    r = check_precompute_freqs_cis(angles_only)
    assert not r and "dtype torch.float32, expected torch.complex64" in str(r) and "torch.polar" in str(r)

    def fixed_theta(head_dim, end, theta=10000.0):  # ignores theta
        return own_freqs_cis(head_dim, end, 10000.0)
    r = check_precompute_freqs_cis(fixed_theta)
    assert not r and r.failures[0][0].startswith("SmolLM2") and "ignores the theta argument" in str(r)

    def positive_exponent(head_dim, end, theta=10000.0):  # theta^(+2j/d)
        a = torch.outer(torch.arange(end).float(), theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
        return torch.polar(torch.ones_like(a), a)
    assert "frequencies grow with j" in str(check_precompute_freqs_cis(positive_exponent))

    def wrong_sign(head_dim, end, theta=10000.0):  # e^(-i·m·θ): same real part, imaginary part negated
        return own_freqs_cis(head_dim, end, theta).conj().resolve_conj()
    r = check_precompute_freqs_cis(wrong_sign)
    assert not r and "viewed as (real, imag)" in str(r) and "wrong sign" in str(r)

    def from_position_one(head_dim, end, theta=10000.0):
        return own_freqs_cis(head_dim, end + 1, theta)[1:]
    assert "positions start at 1" in str(check_precompute_freqs_cis(from_position_one))

    def transposed(head_dim, end, theta=10000.0):
        return own_freqs_cis(head_dim, end, theta).T
    assert "transposed" in str(check_precompute_freqs_cis(transposed))


def test_check_apply_rotary_emb():
    assert check_apply_rotary_emb(own_apply)

    def hf_style(xq, xk, freqs_cis):  # a correct solution in another style: HF math on Meta's pairs
        cos, sin = freqs_cis.real[None, :, None, :], freqs_cis.imag[None, :, None, :]
        def rot(x):
            a, b = x.float()[..., 0::2], x.float()[..., 1::2]
            return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2).type_as(x)
        return rot(xq), rot(xk)
    assert check_apply_rotary_emb(hf_style)

    def halves(xq, xk, freqs_cis):  # HF's pairing on Meta's layout
        cos = torch.cat([freqs_cis.real] * 2, -1)
        sin = torch.cat([freqs_cis.imag] * 2, -1)
        return own_apply_hf(xq, xk, cos, sin)
    r = check_apply_rotary_emb(halves)
    assert not r and "rotates the halves" in str(r)

    def conjugate(xq, xk, freqs_cis):  # rotates the wrong way
        return own_apply(xq, xk, freqs_cis.conj())
    r = check_apply_rotary_emb(conjugate)
    assert not r and "rotates the wrong way" in str(r)

    def swapped_pair_order(xq, xk, freqs_cis):  # z = x_2j+1 + i·x_2j: also the wrong direction
        flip = lambda x: x.reshape(*x.shape[:-1], -1, 2).flip(-1).flatten(-2)
        q, k = own_apply(flip(xq), flip(xk), freqs_cis)
        return flip(q), flip(k)
    assert "rotates the wrong way" in str(check_apply_rotary_emb(swapped_pair_order))

    def q_only(xq, xk, freqs_cis):  # forgot k
        return own_apply(xq, xk, freqs_cis)[0], xk
    r = check_apply_rotary_emb(q_only)
    assert not r and "xk_out differs" in str(r) and "unrotated" in str(r)

    def no_cast_back(xq, xk, freqs_cis):  # float32 result for bfloat16 input
        q, k = own_apply(xq.float(), xk.float(), freqs_cis)
        return q, k
    r = check_apply_rotary_emb(no_cast_back)
    assert not r and len(r.failures) == 1 and "dtype torch.float32, expected torch.bfloat16" in str(r)

    def from_position_zero(xq, xk, freqs_cis):  # ignores the slice it was given
        return own_apply(xq, xk, own_freqs_cis(xq.shape[-1], xq.shape[1]))
    r = check_apply_rotary_emb(from_position_zero)
    assert not r and "start_pos=7" in str(r) and "start_pos=20" in str(r)
    assert all("start_pos" in problem for _, problem, _ in r.failures)

    def in_place(xq, xk, freqs_cis):
        q, k = own_apply(xq, xk, freqs_cis)
        xq.zero_()
        return q, k
    assert "in place" in str(check_apply_rotary_emb(in_place))


def test_check_permute_hf_to_meta():
    assert check_permute_hf_to_meta(own_hf_to_meta)

    def by_index(w, n_heads):  # a correct solution by fancy indexing
        d = w.shape[0] // n_heads
        idx = [h * d + a * (d // 2) + j for h in range(n_heads) for j in range(d // 2) for a in (0, 1)]
        return w[idx]
    assert check_permute_hf_to_meta(by_index)

    r = check_permute_hf_to_meta(own_meta_to_hf)  # wrong direction
    assert not r and "Meta → HF direction" in str(r)

    r = check_permute_hf_to_meta(lambda w, n_heads: own_hf_to_meta(w, 1))  # ignores heads
    assert not r and "within each" in str(r)
    assert check_permute_hf_to_meta(lambda w, n_heads: w.clone()).failures[0][1].endswith("unchanged")


def test_checkers_refuse_the_library_answers():
    "Issue 16: the library's RoPE passed its own checkers; its HF-layout variants and helpers are loopholes too."
    assert refused(check_precompute_freqs_cis(precompute_freqs_cis), "is course_lib.rope.precompute_freqs_cis itself")
    assert refused(check_apply_rotary_emb(apply_rotary_emb), "is course_lib.rope.apply_rotary_emb itself")
    assert refused(check_permute_hf_to_meta(permute_hf_to_meta), "is course_lib.rope.permute_hf_to_meta itself")
    assert refused(check_precompute_freqs_cis(lambda d, end, theta=10000.0: precompute_freqs_cis(d, end, theta)),
                   "course_lib.rope.precompute_freqs_cis")

    def from_cos_sin(head_dim, end, theta=10000.0):  # HF's tables hold the same angles, halves repeated
        cos, sin = precompute_cos_sin(head_dim, end, theta)
        return torch.complex(cos[:, :head_dim // 2], sin[:, :head_dim // 2])
    assert refused(check_precompute_freqs_cis(from_cos_sin), "course_lib.rope.precompute_cos_sin")

    def from_frequencies(head_dim, end, theta=10000.0):  # the private helper that computes θ_j
        angles = torch.outer(torch.arange(end).float(), rope_module._rope_frequencies(head_dim, end, theta))
        return torch.polar(torch.ones_like(angles), angles)
    assert refused(check_precompute_freqs_cis(from_frequencies), "course_lib.rope._rope_frequencies")

    def with_rotate_half(xq, xk, freqs_cis):  # HF's helper on halves, with the pairs permuted around it
        to_halves = lambda x: x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
        to_pairs = lambda x: x.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)
        cos, sin = (torch.cat([t, t], -1)[None, :, None, :] for t in (freqs_cis.real, freqs_cis.imag))
        def rot(x):
            h = to_halves(x.float())
            return to_pairs(h * cos + rope_module.rotate_half(h) * sin).type_as(x)
        return rot(xq), rot(xk)
    assert refused(check_apply_rotary_emb(with_rotate_half), "course_lib.rope.rotate_half")

    def unchecked(xq, xk, freqs_cis):  # the private helper that does apply_rotary_emb's work
        return rope_module._rotate_pairs(xq, freqs_cis), rope_module._rotate_pairs(xk, freqs_cis)
    assert refused(check_apply_rotary_emb(unchecked), "course_lib.rope._rotate_pairs")

    def through_hf_layout(xq, xk, freqs_cis):  # permute the pairs into halves, rotate HF's way, permute back
        to_halves = lambda x: x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
        to_pairs = lambda x: x.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)
        cos, sin = (torch.cat([t, t], -1) for t in (freqs_cis.real, freqs_cis.imag))
        q, k = apply_rotary_emb_hf(to_halves(xq), to_halves(xk), cos, sin)
        return to_pairs(q), to_pairs(k)
    assert refused(check_apply_rotary_emb(through_hf_layout), "course_lib.rope.apply_rotary_emb_hf")

    def caught(xq, xk, freqs_cis):  # catching the refusal does not help
        try:
            return apply_rotary_emb(xq, xk, freqs_cis)
        except RuntimeError:
            return own_apply(xq, xk, freqs_cis)
    assert refused(check_apply_rotary_emb(caught), "course_lib.rope.apply_rotary_emb")


# ---------------------------------------------------------------- Exercise 4: rope_shift

def shift_keys(xk, delta, theta=10000.0):
    "A right answer: every pair j times e^(i·delta·θ_j), the angles in float64."
    head_dim = xk.shape[-1]
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)   # (head_dim/2,) θ_j
    turn = torch.polar(torch.ones_like(freqs), delta * freqs).to(torch.complex64)       # (head_dim/2,)
    z = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))               # (..., head_dim/2)
    return torch.view_as_real(z * turn).flatten(-2).type_as(xk)


def test_check_rope_shift_passes_right_versions():
    assert check_rope_shift(shift_keys)

    def by_table(xk, delta, theta=10000.0):  # also right: one row of a table, through the student's own apply
        table = own_freqs_cis(xk.shape[-1], abs(delta) + 1, theta)[abs(delta)]         # (head_dim/2,)
        turn = table if delta >= 0 else table.conj()
        return own_apply(xk, xk, turn.expand(xk.shape[1], -1))[1]
    assert check_rope_shift(by_table)


def test_check_rope_shift_catches_wrong_versions():
    r = check_rope_shift(lambda xk, delta, theta=10000.0: shift_keys(xk, -delta, theta))
    assert not r and "moves the keys by −delta" in str(r)
    r = check_rope_shift(lambda xk, delta, theta=10000.0: xk.clone())
    assert not r and "unchanged" in str(r) and len(r.failures) == 5          # delta=0 is right
    r = check_rope_shift(lambda xk, delta, theta=10000.0: shift_keys(xk, delta))
    assert not r and len(r.failures) == 1 and "ignores the theta argument" in str(r)

    def turned(xk, angles):  # each pair j of row s times e^(i·angles[s, j])
        z = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))          # (batch, seq, heads, head_dim/2)
        return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[:, None]).flatten(-2).type_as(xk)

    def freqs(xk, theta):
        return theta ** (-torch.arange(0, xk.shape[-1], 2).float() / xk.shape[-1])     # (head_dim/2,)

    def as_start_position(xk, delta, theta=10000.0):  # row s turned by (delta + s)·θ_j
        return turned(xk, (torch.arange(xk.shape[1])[:, None] + delta) * freqs(xk, theta))
    assert "as if delta were a start position" in str(check_rope_shift(as_start_position))

    def halves(xk, delta, theta=10000.0):  # HF's pairing (x_j, x_{j+head_dim/2})
        angle = (delta * freqs(xk, theta)).repeat(2)                                   # (head_dim,)
        x1, x2 = xk.float().chunk(2, dim=-1)
        return (xk.float() * angle.cos() + torch.cat([-x2, x1], -1) * angle.sin()).type_as(xk)
    assert "Hugging Face's pairing" in str(check_rope_shift(halves))

    r = check_rope_shift(lambda xk, delta, theta=10000.0: shift_keys(xk.float(), delta, theta))
    assert not r and len(r.failures) == 1 and "dtype torch.float32, expected torch.bfloat16" in str(r)

    def in_place(xk, delta, theta=10000.0):
        out = shift_keys(xk, delta, theta)
        xk.zero_()
        return out
    assert "in place" in str(check_rope_shift(in_place))


def test_check_rope_shift_refuses_the_library():
    def library(xk, delta, theta=10000.0):
        table = precompute_freqs_cis(xk.shape[-1], abs(delta) + 1, theta)[abs(delta)]
        turn = table if delta >= 0 else table.conj()
        return apply_rotary_emb(xk, xk, turn.expand(xk.shape[1], -1))[1]
    assert refused(check_rope_shift(library), "course_lib.rope.precompute_freqs_cis")

"""Chapter 09's CUDA kernels and CudaQuantModel against chapter 08's CPU reference and PyTorch ops.

Every kernel test runs on the CPU emulator (course_lib/cuda/emulator) here and in CI, and on CuPy where a GPU is
present (the `gpu` marker; skipped otherwise). Tolerances: products and attention are float32 sums in another
order than PyTorch's, so results agree to ~1e-6 of their size; we allow 1e-5 relative (1e-4 for whole models).
"""
import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import course_lib.cuda as cuda
import course_lib.checks.cuda as checks_cuda
from course_lib.checks.gpu_decoder import check_add_rms_norm, check_softmax_temperature
from course_lib.cuda import (CudaQuantModel, KERNEL_SOURCES, QuantMatrix, check_qmatvec_q4_1, check_qmatvec_swiglu,
                             compile_ptx, cuda_add, cuda_argmax, cuda_attention, cuda_embedding, cuda_qmatvec,
                             cuda_qmatvec_plain, cuda_rms_norm, cuda_rope_kv_cache, cuda_swiglu, decode_bytes_per_token,
                             empty, get_backend, gpu_available, nvcc_path, peak_bandwidth, ptx_entries, repack_blocks,
                             to_device, to_host, tokens_per_second_bound, unpack_blocks, upload_matrix)
from course_lib.generation import generate_tokens
from course_lib.model import PRESETS, ModelArgs, Transformer
from course_lib.quant_formats import block_bytes, dequantize, quantize
from course_lib.quant_model import quantize_model
from course_lib.fast_cpu import FastQuantModel
from course_lib.c_step import CCompilerError
from course_lib.rope import precompute_freqs_cis

from conftest import EMU_OK, EMU_WHY, GPU_OK, GPU_WHY, needs_gpu  # noqa: E402 (tests/conftest.py)
from shortcuts import refused  # noqa: E402 (tests/shortcuts.py)

SCHEMES = ("q8_0", "q4_0", "q4_1")


def host(backend, a) -> torch.Tensor:
    return torch.from_numpy(to_host(backend, a))


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def random_blocks(rows, cols, scheme, seed):
    g = torch.Generator().manual_seed(seed)
    blocks = quantize(torch.randn(rows, cols, generator=g) + 0.1, scheme)
    return blocks, dequantize(blocks, scheme, (rows, cols))


# ---------------------------------------------------------------- repacking (CPU only)

def decode_repacked(quants, scales, scheme):
    "An independent decode of the repacked layout: per row, the quants in order, times the scales."
    rows = quants.shape[0]
    if scheme == "q8_0":
        return (quants.float().reshape(rows, -1, 32) * scales.float()[..., None]).reshape(rows, -1)
    nib = quants.reshape(rows, -1, 16)
    q = torch.cat([nib & 0x0F, nib >> 4], dim=2).float()                      # (rows, n_blocks, 32)
    if scheme == "q4_0":
        return ((q - 8) * scales.float()[..., None]).reshape(rows, -1)
    return (q * scales[..., 0].float()[..., None] + scales[..., 1].float()[..., None]).reshape(rows, -1)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_repack_round_trip_and_values(scheme):
    blocks, w = random_blocks(13, 160, scheme, 0)
    quants, scales = repack_blocks(blocks, scheme)
    per_row = 160 if scheme == "q8_0" else 80
    assert quants.shape == (13, per_row) and quants.dtype == (torch.int8 if scheme == "q8_0" else torch.uint8)
    assert scales.dtype == torch.float16 and scales.shape == ((13, 5, 2) if scheme == "q4_1" else (13, 5))
    assert quants.numel() * quants.element_size() + scales.numel() * 2 == blocks.numel()    # same bytes
    assert torch.equal(unpack_blocks(quants, scales, scheme), blocks)
    assert torch.equal(decode_repacked(quants, scales, scheme), w)


def test_repack_bad_input():
    with pytest.raises(TypeError, match="blocks must be a 2-D uint8 tensor"):
        repack_blocks(torch.zeros(4, 18), "q4_0")
    with pytest.raises(ValueError, match="not a multiple of 18"):
        repack_blocks(torch.zeros(4, 20, dtype=torch.uint8), "q4_0")
    with pytest.raises(ValueError, match="scheme must be one of"):
        repack_blocks(torch.zeros(4, 18, dtype=torch.uint8), "q5_0")


# ---------------------------------------------------------------- matrix-vector products

@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("rows,cols", [(7, 32), (33, 96), (100, 288)])
def test_qmatvec_plain(backend, scheme, rows, cols):
    blocks, w = random_blocks(rows, cols, scheme, rows * cols)
    x = torch.randn(cols, generator=torch.Generator().manual_seed(1))
    y = empty(backend, (rows,))
    cuda_qmatvec_plain(backend, to_device(backend, blocks), scheme, to_device(backend, x), y)
    assert rel_err(host(backend, y), w @ x) < 1e-5


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("rows,cols", [(7, 32), (33, 96), (100, 288), (3, 1088)])   # 1088: 34 blocks > 32 lanes
@pytest.mark.parametrize("rows_per_warp,warps_per_block", [(1, 4), (2, 1), (3, 2), (4, 8)])
def test_qmatvec_fast(backend, scheme, rows, cols, rows_per_warp, warps_per_block):
    blocks, w = random_blocks(rows, cols, scheme, rows + cols)
    x = torch.randn(cols, generator=torch.Generator().manual_seed(2))
    W = upload_matrix(backend, blocks, scheme)
    y = empty(backend, (rows,))
    cuda_qmatvec(backend, W, to_device(backend, x), y, warps_per_block=warps_per_block, rows_per_warp=rows_per_warp)
    assert rel_err(host(backend, y), w @ x) < 1e-5


@pytest.mark.parametrize("scheme", SCHEMES)
def test_qmatvec_fused_residual_in_place(backend, scheme):
    blocks, w = random_blocks(33, 96, scheme, 5)
    x, r = torch.randn(96), torch.randn(33)
    W = upload_matrix(backend, blocks, scheme)
    y = to_device(backend, r)                                   # y is the residual: x += W a
    cuda_qmatvec(backend, W, to_device(backend, x), y, residual=y, rows_per_warp=2)
    assert rel_err(host(backend, y), r + w @ x) < 1e-5
    other = empty(backend, (33,))                               # and a separate residual
    cuda_qmatvec(backend, W, to_device(backend, x), other, residual=to_device(backend, r))
    assert rel_err(host(backend, other), r + w @ x) < 1e-5


# ---------------------------------------------------------------- the other kernels

@pytest.mark.parametrize("plain", [True, False])
@pytest.mark.parametrize("n_rows,n", [(1, 64), (1, 576), (3, 100)])
def test_rms_norm(backend, plain, n_rows, n):
    g = torch.Generator().manual_seed(n)
    x, w = torch.randn(n_rows, n, generator=g) * 3, torch.randn(n, generator=g)
    x_dev = to_device(backend, x[0] if n_rows == 1 else x)
    out = empty(backend, x_dev.shape)
    cuda_rms_norm(backend, x_dev, to_device(backend, w), out, 1e-5, plain=plain)
    expected = F.rms_norm(x, (n,), w, 1e-5)
    assert rel_err(host(backend, out).reshape(n_rows, n), expected) < 1e-5


@pytest.mark.parametrize("n_heads,n_kv_heads,head_dim", [(4, 4, 64), (6, 2, 64), (8, 2, 128)])
@pytest.mark.parametrize("pos", [0, 4, 76])
def test_rope_writes_rotated_k_and_v_into_the_cache(backend, n_heads, n_kv_heads, head_dim, pos):
    max_seq = 80
    g = torch.Generator().manual_seed(pos)
    qkv = torch.randn((n_heads + 2 * n_kv_heads) * head_dim, generator=g)
    freqs = precompute_freqs_cis(head_dim, max_seq, 10000.0)                     # (max_seq, head_dim/2) complex
    rot = torch.view_as_real(torch.view_as_complex(qkv[:(n_heads + n_kv_heads) * head_dim].reshape(-1, head_dim // 2, 2))
                             * freqs[pos]).reshape(-1)                            # q and k rotated
    cache_k, cache_v = (to_device(backend, torch.zeros(n_kv_heads, max_seq, head_dim)) for _ in range(2))
    qkv_dev = to_device(backend, qkv)
    cuda_rope_kv_cache(backend, qkv_dev, to_device(backend, freqs.real.contiguous()),
                       to_device(backend, freqs.imag.contiguous()), to_device(backend, np.array([pos], np.int32)),
                       cache_k, cache_v, n_heads, n_kv_heads, head_dim)
    got = host(backend, qkv_dev)
    n_qk = (n_heads + n_kv_heads) * head_dim
    assert (got[:n_qk] - rot).abs().max() < 1e-5 and torch.equal(got[n_qk:], qkv[n_qk:])
    k, v = host(backend, cache_k), host(backend, cache_v)
    assert (k[:, pos] - rot[n_heads * head_dim:].reshape(n_kv_heads, head_dim)).abs().max() < 1e-5
    assert torch.equal(v[:, pos], qkv[n_qk:].reshape(n_kv_heads, head_dim))
    others = [p for p in range(max_seq) if p != pos]
    assert not k[:, others].any() and not v[:, others].any()                     # nothing else written


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (6, 2), (8, 2)])         # GQA ratios 1, 3, 4
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("length", [1, 5, 77])
def test_attention_decode(backend, n_heads, n_kv_heads, head_dim, length):
    max_seq = 96
    g = torch.Generator().manual_seed(length + head_dim)
    q = torch.randn(n_heads, head_dim, generator=g)
    k, v = torch.randn(n_kv_heads, max_seq, head_dim, generator=g) * 2, torch.randn(n_kv_heads, max_seq, head_dim, generator=g)
    qkv = torch.cat([q.reshape(-1), torch.zeros(2 * n_kv_heads * head_dim)])
    out = empty(backend, (n_heads * head_dim,))
    cuda_attention(backend, to_device(backend, qkv), to_device(backend, k), to_device(backend, v),
                   to_device(backend, np.array([length - 1], np.int32)), out, n_heads, n_kv_heads, head_dim)
    rep = n_heads // n_kv_heads
    expected = F.scaled_dot_product_attention(q[:, None], k[:, :length].repeat_interleave(rep, 0),
                                              v[:, :length].repeat_interleave(rep, 0))[:, 0]    # (n_heads, head_dim)
    assert (host(backend, out).reshape(n_heads, head_dim) - expected).abs().max() < 1e-5


def test_attention_with_more_warps_than_positions_and_odd_head_dim(backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(4, 16, generator=g), torch.randn(2, 8, 16, generator=g), torch.randn(2, 8, 16, generator=g)
    out = empty(backend, (64,))
    cuda_attention(backend, to_device(backend, q.reshape(-1)), to_device(backend, k), to_device(backend, v),
                   to_device(backend, np.array([2], np.int32)), out, 4, 2, 16, n_warps=8)
    expected = F.scaled_dot_product_attention(q[:, None], k[:, :3].repeat_interleave(2, 0), v[:, :3].repeat_interleave(2, 0))
    assert (host(backend, out).reshape(4, 16) - expected[:, 0]).abs().max() < 1e-5


@pytest.mark.parametrize("hidden", [1, 33, 1536])
def test_swiglu_and_add(backend, hidden):
    h13 = torch.randn(2 * hidden) * 4
    out = empty(backend, (hidden,))
    cuda_swiglu(backend, to_device(backend, h13), out)
    assert (host(backend, out) - F.silu(h13[:hidden]) * h13[hidden:]).abs().max() < 1e-5
    x, y = torch.randn(hidden), torch.randn(hidden)
    x_dev = to_device(backend, x)
    cuda_add(backend, x_dev, to_device(backend, y))
    assert torch.equal(host(backend, x_dev), x + y)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_embedding_dequantizes_one_row(backend, scheme):
    blocks, w = random_blocks(50, 96, scheme, 3)
    E = upload_matrix(backend, blocks, scheme)
    out = empty(backend, (96,))
    for token in (0, 17, 49):
        cuda_embedding(backend, E, to_device(backend, np.array([token], np.int32)), out)
        assert torch.equal(host(backend, out), w[token])


@pytest.mark.parametrize("n", [1, 31, 1000, 49152])
def test_argmax_plain_and_two_pass(backend, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g)
    x[n // 3] = x[n - 1] = 10.0                                   # a tie: the first index wins, as in torch
    x[0] = -float("inf")
    if n == 1:
        x = torch.tensor([-float("inf")])
    x_dev, out = to_device(backend, x), empty(backend, (2,), np.int32)
    expected = [int(torch.argmax(x)), 0 if n > 1 else 1]        # [index, 1 when the max is not finite]
    cuda_argmax(backend, x_dev, out, plain=True)
    assert to_host(backend, out).tolist() == expected
    part_v, part_i = empty(backend, (7,)), empty(backend, (7,), np.int32)
    cuda_argmax(backend, x_dev, out, part_v, part_i)
    assert to_host(backend, out).tolist() == expected


@pytest.mark.parametrize("plain", [True, False])
def test_argmax_of_nan_and_inf_is_a_real_index_and_flagged(backend, plain):
    part_v, part_i = empty(backend, (3,)), empty(backend, (3,), np.int32)
    for values in ([1.0, float("nan"), 5.0, float("nan")], [1.0, float("inf"), 2.0], [float("nan")] * 5,
                   [-float("inf")] * 4, [3.0, -1.0, 3.0]):
        x = torch.tensor(values)
        out = empty(backend, (2,), np.int32)
        cuda_argmax(backend, to_device(backend, x), out, part_v, part_i, plain=plain)
        index, not_finite = to_host(backend, out).tolist()
        assert index == int(torch.argmax(x)), values                # torch: NaN is the largest, first index wins
        assert not_finite == int(not torch.isfinite(x[index])), values


def test_argmax_threads_must_be_whole_warps(backend):
    x, out = empty(backend, (10,)), empty(backend, (2,), np.int32)
    part_v, part_i = empty(backend, (2,)), empty(backend, (2,), np.int32)
    for threads in (48, 0, 2048):
        with pytest.raises(ValueError, match="threads must be a multiple of 32 in 32..1024"):
            cuda_argmax(backend, x, out, part_v, part_i, threads=threads)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_embedding_of_an_id_outside_the_table_is_nan_not_a_wild_read(backend, scheme):
    E = upload_matrix(backend, random_blocks(50, 64, scheme, 4)[0], scheme)
    out = empty(backend, (64,))
    for token in (50, -1, 2**31 - 1):
        cuda_embedding(backend, E, to_device(backend, np.array([token, 0], np.int32)), out)
        assert torch.isnan(host(backend, out)).all(), token


def test_a_block_with_more_registers_than_an_sm_is_refused(backend):
    if backend.name == "emulator" and cuda.emulated_resources(cuda.decode_source()) is None:
        pytest.skip("NVRTC/cuobjdump are not installed: the emulator has no register counts")
    W = upload_matrix(backend, random_blocks(64, 64, "q4_0", 0)[0], "q4_0")
    x, y = to_device(backend, torch.randn(64)), empty(backend, (64,))
    kernel = backend.get_function("qmatvec_q4_0")
    fits = kernel.max_threads_per_block // 32
    if fits >= 32:
        pytest.skip(f"qmatvec_q4_0 uses {kernel.num_regs} registers: every block shape fits")
    cuda_qmatvec(backend, W, x, y, warps_per_block=fits)
    with pytest.raises(ValueError, match=rf"a block of {32 * (fits + 1)} threads does not fit on an SM: "
                                         rf"the kernel uses {kernel.num_regs} registers per thread"):
        cuda_qmatvec(backend, W, x, y, warps_per_block=fits + 1)


# ---------------------------------------------------------------- argument hygiene: refused before any launch

def emulated_xp():
    if not EMU_OK:
        pytest.skip(f"CPU emulator unavailable: {EMU_WHY}")
    return get_backend("emulator").xp


class NoLaunch(cuda.Backend):
    "The emulator's arrays, but a backend that fails the test if anything reaches a kernel."
    def __init__(self):
        super().__init__("no-launch", emulated_xp(), lambda src: pytest.fail("a kernel was compiled: the checks ran too late"))


@pytest.fixture
def no_launch():
    b = NoLaunch()
    blocks, _ = random_blocks(7, 64, "q4_0", 0)
    return b, upload_matrix(b, blocks, "q4_0")


def test_wrong_dtype_is_a_type_error_naming_the_argument(no_launch):
    b, W = no_launch
    with pytest.raises(TypeError, match=r"x must have dtype float32, got float64"):
        cuda_qmatvec(b, W, to_device(b, np.zeros(64)), empty(b, (7,)))
    with pytest.raises(TypeError, match=r"W.scales must have dtype float16"):
        cuda_qmatvec(b, QuantMatrix("q4_0", 7, 64, W.quants, to_device(b, W.scales.astype(np.float32))),
                     empty(b, (64,)), empty(b, (7,)))
    with pytest.raises(TypeError, match=r"x must be a device array \(cupy.ndarray: make it with to_device or empty\), got torch.Tensor"):
        cuda_qmatvec(b, W, torch.zeros(64), empty(b, (7,)))
    with pytest.raises(TypeError, match=r"W must be a QuantMatrix"):
        cuda_qmatvec(b, "weights", empty(b, (64,)), empty(b, (7,)))
    with pytest.raises(TypeError, match=r"pos must have dtype int32, got int64"):
        cuda_attention(b, empty(b, (3 * 2 * 64,)), empty(b, (1, 8, 64)), empty(b, (1, 8, 64)),
                       to_device(b, np.zeros(1, np.int64)), empty(b, (64,)), 1, 1, 64)


def test_wrong_size_and_layout_are_value_errors(no_launch):
    b, W = no_launch
    with pytest.raises(ValueError, match=r"x must have shape \(64\), got \(63,\)"):
        cuda_qmatvec(b, W, empty(b, (63,)), empty(b, (7,)))
    with pytest.raises(ValueError, match=r"y must have shape \(7\), got \(8,\)"):
        cuda_qmatvec(b, W, empty(b, (64,)), empty(b, (8,)))
    with pytest.raises(ValueError, match=r"x must be C-contiguous"):
        cuda_qmatvec(b, W, empty(b, (128,))[::2], empty(b, (7,)))
    with pytest.raises(ValueError, match=r"x must be aligned to 16 bytes"):
        cuda_qmatvec(b, W, empty(b, (65,))[1:], empty(b, (7,)))
    with pytest.raises(ValueError, match=r"rows_per_warp must be in 1..4"):
        cuda_qmatvec(b, W, empty(b, (64,)), empty(b, (7,)), rows_per_warp=5)
    with pytest.raises(TypeError, match=r"warps_per_block must be an int"):
        cuda_qmatvec(b, W, empty(b, (64,)), empty(b, (7,)), warps_per_block=2.0)
    with pytest.raises(ValueError, match=r"n_heads=6 must be a positive multiple of n_kv_heads=4"):
        cuda_attention(b, empty(b, (14 * 64,)), empty(b, (4, 8, 64)), empty(b, (4, 8, 64)),
                       empty(b, (1,), np.int32), empty(b, (6 * 64,)), 6, 4, 64)
    with pytest.raises(ValueError, match=r"cache_v must have shape \(2, 8, 64\), got \(2, 9, 64\)"):
        cuda_rope_kv_cache(b, empty(b, (8 * 64,)), empty(b, (8, 32)), empty(b, (8, 32)), empty(b, (1,), np.int32),
                           empty(b, (2, 8, 64)), empty(b, (2, 9, 64)), 4, 2, 64)
    with pytest.raises(ValueError, match=r"h13 must have shape \(10\)"):
        cuda_swiglu(b, empty(b, (9,)), empty(b, (5,)))
    with pytest.raises(ValueError, match=r"blocks has 20 bytes per row, not a multiple of 18"):
        cuda_qmatvec_plain(b, empty(b, (3, 20), np.uint8), "q4_0", empty(b, (32,)), empty(b, (3,)))
    with pytest.raises(ValueError, match=r"the two-pass argmax needs part_v"):
        cuda_argmax(b, empty(b, (10,)), empty(b, (2,), np.int32))


def test_scalars_reach_the_kernel_as_numpy_int32_and_float32():
    seen = []

    class Recorder(cuda.Backend):
        def __init__(self):
            super().__init__("recorder", emulated_xp(), None)

        def get_function(self, name, source=None):
            return lambda grid, block, args, shared_mem=0: seen.append((name, grid, block, args, shared_mem))

    b = Recorder()
    W = upload_matrix(b, random_blocks(100, 64, "q8_0", 0)[0], "q8_0")
    cuda_qmatvec(b, W, empty(b, (64,)), empty(b, (100,)), warps_per_block=2, rows_per_warp=3)
    name, grid, block, args, _ = seen[-1]
    assert name == "qmatvec_q8_0" and grid == (17,) and block == (64,)       # ceil(ceil(100/3) / 2) = 17
    assert [type(a) for a in args[5:]] == [np.int32] * 4
    cuda_rms_norm(b, empty(b, (64,)), empty(b, (64,)), empty(b, (64,)), 1e-5)
    assert type(seen[-1][3][-1]) is np.float32 and type(seen[-1][3][-2]) is np.int32


# ---------------------------------------------------------------- the whole model, emulated

def tiny_quantized(scheme, seed=0, output_scheme="q8_0"):
    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=128, max_seq_len=32)
    model = Transformer(args).eval()
    with torch.no_grad():
        model.output.weight.mul_(8)                              # confident, varied predictions
    return quantize_model(model, scheme, output_scheme=output_scheme, matmul="dequant")


@pytest.mark.parametrize("scheme,output_scheme,n_tokens,attention", [("q4_0", "q8_0", 16, "split"),
                         ("q8_0", "q8_0", 8, "single"), ("q4_1", "q4_1", 8, "split")])
def test_emulated_decode_matches_chapter_08(backend, scheme, output_scheme, n_tokens, attention):
    "Step 2's float products against chapter 08's dequantized float32 path: the same numbers to float32 rounding."
    reference = tiny_quantized(scheme, output_scheme=output_scheme)
    model = CudaQuantModel(copy.deepcopy(reference), backend=backend, matvec="float", attention=attention,
                           rows_per_warp=2, warps_per_block=2)
    prompt = [5, 17, 42, 8, 91, 3]
    with torch.no_grad():
        expected = reference(torch.tensor([prompt]), 0)
    got = model(torch.tensor([prompt]), 0)
    assert got.shape == (1, 6, 96) and got.dtype == torch.float32
    assert (got.cpu() - expected).abs().max() < 1e-4
    ref_tokens = list(generate_tokens(reference, prompt, n_tokens))
    assert list(generate_tokens(model, prompt, n_tokens)) == ref_tokens
    assert model.cache_len == len(prompt) + n_tokens - 1
    assert model.generate_greedy(prompt, n_tokens) == ref_tokens
    # decode steps after a prefill see the cache the prefill wrote
    with torch.no_grad():
        step_ref = reference(torch.tensor([ref_tokens[:1]]), len(prompt))
    model(torch.tensor([prompt]), 0, last_only=True)
    assert (model(torch.tensor([ref_tokens[:1]]), len(prompt)).cpu() - step_ref).abs().max() < 1e-4


@pytest.mark.parametrize("scheme,output_scheme", [("q4_0", "q8_0"), ("q4_1", "q8_0"), ("q8_0", "q8_0")])
def test_dp4a_decode_matches_chapter_08s_c_step(backend, scheme, output_scheme):
    "Step 3 quantizes x to int8 as chapter 08's C step does: the same greedy tokens, logits to float32 rounding."
    reference = tiny_quantized(scheme, output_scheme=output_scheme)
    try:
        c_step = FastQuantModel(copy.deepcopy(reference), kernel="c")
    except CCompilerError as e:
        pytest.skip(f"chapter 08's C step does not compile here: {e}")
    model = CudaQuantModel(copy.deepcopy(reference), backend=backend)          # defaults: dp4a, split attention
    assert (model.matvec, model.attention) == ("dp4a", "split")
    prompt = [5, 17, 42, 8, 91, 3]
    with torch.no_grad():
        expected = c_step(torch.tensor([prompt]), 0)
    got = model(torch.tensor([prompt]), 0).cpu()
    assert (got - expected).abs().max() < 1e-3 * expected.abs().max()
    assert model.generate_greedy(prompt, 16) == list(generate_tokens(c_step, prompt, 16))


def test_emulated_model_interface_and_errors(backend):
    reference = tiny_quantized("q4_0")
    model = CudaQuantModel(copy.deepcopy(reference), backend=backend, max_seq_len=16)
    assert model.args.max_seq_len == 16 and isinstance(model.device, torch.device)
    # embedding; per layer 2 norms, rope, swiglu, 4 products (quantize x + dp4a) and attention (split + merge);
    # final norm, output product (2); argmax (2) and the position's advance
    assert model.n_launches == 1 + 14 * 2 + 3 + 3
    assert model.weight_bytes() == sum(m.nbytes for L in model.layers for m in (L["wqkv"], L["wo"], L["w13"], L["w2"])) \
        + model.embedding.nbytes + model.output.nbytes + 4 * 64 * 5
    # the one input check of every decoder (course_lib.decoding.validate_decode_input), with its messages
    with pytest.raises(ValueError, match="start_pos=3 leaves a gap"):
        model(torch.tensor([[1]]), 3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[96]]), 0)
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        model(torch.tensor([list(range(17))]), 0)
    with pytest.raises(TypeError, match="tokens must be an integer tensor"):
        model(torch.tensor([[1.0]]), 0)
    with pytest.raises(ValueError, match="decodes one sequence"):
        model(torch.tensor([[1], [2]]), 0)
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        model.generate_greedy([1, 2, 3], 14)


@pytest.mark.parametrize("use_graph", [False, True])
def test_the_gpu_code_path_runs_on_the_emulator(backend, use_graph):
    "Stream, CUDA-graph capture and replay, the device argmax, DLPack: 16 greedy tokens equal chapter 08's."
    reference = tiny_quantized("q4_0")
    model = CudaQuantModel(copy.deepcopy(reference), backend=backend, use_graph=use_graph)
    prompt = [5, 17, 42, 8, 91, 3]
    expected = list(generate_tokens(reference, prompt, 16))
    assert model.generate_greedy(prompt, 16) == expected
    assert (model._graph is not None) == use_graph                 # captured once, then replayed every step
    assert model.generate_greedy(prompt, 16) == expected           # a second run replays the same graph


def test_logits_are_a_snapshot_that_the_next_step_cannot_overwrite(backend):
    model = CudaQuantModel(copy.deepcopy(tiny_quantized("q8_0")), backend=backend)
    first = model(torch.tensor([[5]]), 0)
    kept = first.clone()
    model(torch.tensor([[17]]), 1)
    assert torch.equal(first, kept)


def test_nan_logits_stop_greedy_decoding_with_a_clear_error(backend):
    model = CudaQuantModel(copy.deepcopy(tiny_quantized("q8_0")), backend=backend)
    with backend.stream():
        model.norm.set(np.full(64, np.nan, np.float32))            # the final norm's weight: every logit NaN
    with pytest.raises(FloatingPointError, match="greedy step 0: the largest logit is NaN or infinite"):
        model.generate_greedy([1, 2], 4)


def test_model_construction_errors():
    float_model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=2, vocab_size=64, hidden_dim=64, max_seq_len=8))
    with pytest.raises(ValueError, match="not quantized"):
        CudaQuantModel(float_model, backend=NoLaunch())
    with pytest.raises(TypeError, match="qmodel must be a course_lib Transformer"):
        CudaQuantModel("model", backend=NoLaunch())
    no_output = quantize_model(copy.deepcopy(float_model), "q4_0", output_scheme=None, matmul="dequant")
    with pytest.raises(ValueError, match="tok_embeddings is a Embedding, not a quantized module"):
        CudaQuantModel(no_output, backend=get_backend("emulator") if EMU_OK else NoLaunch())
    quantized = quantize_model(copy.deepcopy(float_model), "q4_0", matmul="dequant")
    with pytest.raises(ValueError, match=r"matvec must be one of \('dp4a', 'float'\), got 'int4'"):
        CudaQuantModel(quantized, backend=NoLaunch(), matvec="int4")
    with pytest.raises(ValueError, match=r"attention must be one of \('split', 'single'\), got 'paged'"):
        CudaQuantModel(quantized, backend=NoLaunch(), attention="paged")
    if not GPU_OK:
        with pytest.raises(RuntimeError, match="needs an NVIDIA GPU with CuPy"):
            CudaQuantModel(quantized)


def test_gpu_available_without_cupy(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "cupy", None)                # import cupy -> ImportError
    ok, why = gpu_available()
    assert not ok and "CuPy is not installed" in why
    with pytest.raises(RuntimeError, match="the CUDA backend needs an NVIDIA GPU with CuPy: CuPy is not installed"):
        get_backend("cupy")
    with pytest.raises(ValueError, match="kind must be 'auto', 'cupy' or 'emulator'"):
        get_backend("opencl")


# ---------------------------------------------------------------- nvcc -ptx, bandwidth arithmetic, reporting

def kernel_names(source: str) -> set:
    import re
    return set(re.findall(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)\(', source))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_compiles_to_ptx(arch):
    if nvcc_path() is None:
        pytest.skip("nvcc is not installed: the PTX compile check needs the CUDA toolkit")
    source = cuda.decode_source()
    assert set(ptx_entries(compile_ptx(source, arch=arch))) == kernel_names(source) and len(kernel_names(source)) >= 19


def test_compile_ptx_reports_errors():
    if nvcc_path() is None:
        pytest.skip("nvcc is not installed")
    with pytest.raises(RuntimeError, match="nvcc -ptx -arch=sm_90 failed"):
        compile_ptx('extern "C" __global__ void broken() { undefined_thing(); }')
    with pytest.raises(ValueError, match="arch must look like 'sm_90'"):
        compile_ptx(arch="90")


def test_bandwidth_arithmetic():
    a = PRESETS["llama-2-7b"]
    per_layer = sum(r * c for r, c in [(3 * 4096, 4096), (4096, 4096), (2 * 11008, 4096), (4096, 11008)]) // 32 * 18
    expected = 32 * (per_layer + 2 * 4096 * 4) + 32000 * 4096 // 32 * 18 + 4096 * 4 + 4096 // 32 * 18
    assert decode_bytes_per_token(a, "q4_0") == expected
    # ~900 tok/s: the "near 880" also counts the embedding table, of which a step reads one row
    assert 895 < tokens_per_second_bound(expected, 3.35e12) < 905
    kv = decode_bytes_per_token(a, "q4_0", kv_len=10) - expected
    assert kv == 32 * 2 * 32 * 128 * 10 * 4
    assert peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12 and peak_bandwidth("NVIDIA H200") == 4.8e12
    assert peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12 and peak_bandwidth("Tesla T4") is None
    with pytest.raises(ValueError, match="must be > 0"):
        tokens_per_second_bound(0, 1e12)


def test_benchmark_report_and_roofline(tmp_path):
    import json
    import matplotlib
    matplotlib.use("Agg")
    result = {"gpu": "NVIDIA H100 80GB HBM3", "peak_bandwidth": 3.35e12,
              "environment": {"driver": "1", "cuda": "13.0", "cupy": "14", "torch": "2"},
              "kernels": [{"name": "qmatvec_q4_0 4096x11008", "intensity": 3.56, "flops_per_s": 9e12}],
              "matvec": [{"shape": "11008 x 4096", "format": "q4_0", "seconds": 1e-5, "bytes_per_s": 2.5e12}],
              "decode": [{"name": "SmolLM2 q4_0 CUDA graph", "tokens_per_s": 1234.5, "bound_tokens_per_s": 30000}]}
    (tmp_path / "x.json").write_text(json.dumps(result))
    assert cuda.load_benchmarks(tmp_path) == [result] and cuda.load_benchmarks(tmp_path / "none") == []
    text = cuda.format_benchmark(result)
    assert "74.6%" in text and "1234.5" in text and "CUDA 13.0" in text
    ax = cuda.plot_roofline([result])
    assert "measured: NVIDIA H100" in ax.get_title()


# ---------------------------------------------------------------- the exercise checkers

SWIGLU_SOLUTION = r"""
extern "C" __global__ void qmatvec_swiglu_q4_0(const unsigned char* quants, const __half* d, const float* x,
                                               float* out, int hidden, int in_features) {
    const int lane = threadIdx.x & 31;
    const long long i = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (i >= hidden) return;
    const int n_blocks = in_features >> 5;
    const size_t row_bytes = (size_t)in_features / 2;
    float gate = 0.0f, up = 0.0f;
    for (int b = lane; b < n_blocks; b += 32) {
        float xv[32];
        load_x(x + (size_t)b * 32, xv, 32);
        float xsum = 0.0f;
        for (int j = 0; j < 32; ++j) xsum += xv[j];
        const long long rows[2] = {i, i + hidden};
        for (int r = 0; r < 2; ++r) {
            const uint4 q = *reinterpret_cast<const uint4*>(quants + rows[r] * row_bytes + (size_t)b * 16);
            const float v = __half2float(d[rows[r] * n_blocks + b]) * (dot_q4(q, xv) - 8.0f * xsum);
            if (r == 0) gate += v; else up += v;
        }
    }
    gate = warp_sum(gate); up = warp_sum(up);
    if (lane == 0) out[i] = gate / (1.0f + expf(-gate)) * up;
}
"""


def emulator_only():
    if not EMU_OK:
        pytest.skip(f"CPU emulator unavailable: {EMU_WHY}")
    return get_backend("emulator")


# a Q4_1 kernel written from Q4_0's like the library's, but the student's own: the checker accepts it
OWN_Q4_1 = KERNEL_SOURCES["qmatvec_q4_1"].replace("acc", "total").replace("xsum", "x_sum")


def test_q4_1_checker_accepts_an_own_kernel_and_names_mistakes():
    b = emulator_only()
    assert check_qmatvec_q4_1(OWN_Q4_1, backend=b)
    assert check_qmatvec_q4_1(lambda: OWN_Q4_1, backend=b)                         # a function returning it too
    minus8 = OWN_Q4_1.replace(
        "__half2float(dm[i]) * dot_q4(q, xv) + __half2float(dm[i + 1]) * x_sum",
        "__half2float(dm[i]) * (dot_q4(q, xv) - 8.0f * x_sum)")
    result = check_qmatvec_q4_1(minus8, backend=b)
    assert not result and "you subtract 8 as in Q4_0" in str(result)
    no_m = OWN_Q4_1.replace(" + __half2float(dm[i + 1]) * x_sum", "")
    assert "m is missing" in str(check_qmatvec_q4_1(no_m, backend=b))
    swapped = OWN_Q4_1.replace("__half2float(dm[i]) * dot_q4", "__half2float(dm[i + 1]) * dot_q4") \
        .replace("__half2float(dm[i + 1]) * x_sum", "__half2float(dm[i]) * x_sum")
    assert "d and m are swapped" in str(check_qmatvec_q4_1(swapped, backend=b))
    stub = 'extern "C" __global__ void qmatvec_q4_1(const unsigned char* q, const __half* dm, const float* x, float* y, ' \
           'const float* r, int rows, int in_features, int rpw, int add) {}'
    result = check_qmatvec_q4_1(stub, backend=b)
    assert not result and "wrote nothing" in str(result)
    result = check_qmatvec_q4_1("this is not C", backend=b)
    assert not result and "compiling your source" in str(result)
    assert KERNEL_SOURCES["qmatvec_q4_1"] not in str(result)                          # never prints the solution


def test_kernel_checkers_refuse_the_library_kernel_and_decode_source():
    b = emulator_only()
    library = KERNEL_SOURCES["qmatvec_q4_1"]
    key = "KERNEL_SOURCES['qmatvec_q4_1']"
    assert refused(check_qmatvec_q4_1(library, backend=b), key)                        # the string itself
    reformatted = "// my kernel\n" + library.replace("    ", "\t").replace(" = ", "=").replace("{\n", "{ /* go */\n")
    assert refused(check_qmatvec_q4_1(reformatted, backend=b), key)                    # whitespace and comments aside
    assert refused(check_qmatvec_q4_1(lambda: "// mine\n" + library, backend=b), key)  # a function returning it
    assert refused(check_qmatvec_q4_1(lambda: cuda.decode_source(), backend=b), "decode_source")
    assert refused(check_add_rms_norm(lambda: cuda.decode_source(), backend=b), "decode_source")
    assert checks_cuda._library_copy("qmatvec_q4_1", OWN_Q4_1) is None


def test_kernel_checkers_report_a_stub_function_and_a_wrong_return_type():
    def stub():
        raise NotImplementedError()
    for checker in (check_qmatvec_q4_1, check_qmatvec_swiglu, check_add_rms_norm, check_softmax_temperature):
        result = checker(stub)
        assert not result and "raised NotImplementedError" in str(result) and "stub" in str(result), str(result)
        result = checker(lambda: 42)
        assert not result and "should be CUDA C source (a str), got int" in str(result)


def test_swiglu_checker():
    b = emulator_only()
    assert check_qmatvec_swiglu(SWIGLU_SOLUTION, backend=b)
    swapped = SWIGLU_SOLUTION.replace("out[i] = gate / (1.0f + expf(-gate)) * up", "out[i] = up / (1.0f + expf(-up)) * gate")
    assert "gate and up are swapped" in str(check_qmatvec_swiglu(swapped, backend=b))
    no_silu = SWIGLU_SOLUTION.replace("out[i] = gate / (1.0f + expf(-gate)) * up", "out[i] = gate * up")
    assert "silu is missing" in str(check_qmatvec_swiglu(no_silu, backend=b))


ADD_RMS_NORM_SOLUTION = r"""
extern "C" __global__ void add_rms_norm(float* x, const float* y, const float* weight, float* out, int n, float eps) {
    __shared__ float scratch[32];
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = x[i] + y[i];
        x[i] = v;
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = x[i] * inv * weight[i];
}
"""


@pytest.mark.parametrize("old, new, named", [
    ("out[i] = x[i] * inv * weight[i]", "out[i] = x[i] * inv", "the weight is missing"),
    ("block_sum(ss, scratch) / n", "block_sum(ss, scratch) / blockDim.x", "divides by the block's 256 threads"),
    ("rsqrtf(block_sum(ss, scratch) / n + eps)", "1.0f / (sqrtf(block_sum(ss, scratch) / n) + eps)",
     "eps is added after the square root"),
    ("const float v = x[i] + y[i];\n        x[i] = v;\n        ss += v * v;",
     "ss += x[i] * x[i];\n        x[i] += y[i];", "the sum of squares is of x before the add"),
    ("        x[i] = v;\n", "", "x is unchanged"),
    ("    __shared__ float scratch[32];", "    return;\n    __shared__ float scratch[32];", "your kernel wrote nothing"),
])
def test_add_rms_norm_checker_passes_a_solution_and_names_mistakes(backend, old, new, named):
    assert check_add_rms_norm(ADD_RMS_NORM_SOLUTION, backend=backend)
    assert check_add_rms_norm(lambda: ADD_RMS_NORM_SOLUTION, backend=backend)        # a function returning it
    assert old in ADD_RMS_NORM_SOLUTION
    result = check_add_rms_norm(ADD_RMS_NORM_SOLUTION.replace(old, new), backend=backend)
    assert not result and named in str(result), str(result)


SOFTMAX_SOLUTION = r"""
__device__ float largest(float v, float* shared) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
    __syncthreads();
    float m = NEG_INF;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) m = fmaxf(m, shared[w]);
    __syncthreads();
    return m;
}

extern "C" __global__ void softmax_temperature(const float* logits, float* probs, int n, float temperature) {
    __shared__ float shared[32];
    float m = NEG_INF;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, logits[i]);
    m = largest(m, shared);
    float total = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        probs[i] = expf((logits[i] - m) / temperature);
        total += probs[i];
    }
    total = block_sum(total, shared);
    for (int i = threadIdx.x; i < n; i += blockDim.x) probs[i] /= total;
}
"""


@pytest.mark.parametrize("old, new, named", [
    ("expf((logits[i] - m) / temperature)", "expf(logits[i] / temperature)", "exp overflowed"),
    ("(logits[i] - m) / temperature", "(logits[i] - m) * temperature", "multiplied by the temperature"),
    ("(logits[i] - m) / temperature", "(logits[i] - m)", "the temperature is missing"),
    ("probs[i] /= total", "probs[i] /= 1.0f", "not divided by their sum"),
    ("total = block_sum(total, shared);", "", "its own partial sum"),
    ("m = largest(m, shared);", "", "its own maximum"),
    ("    for (int i = threadIdx.x; i < n; i += blockDim.x) probs[i] /= total;\n", "", "not divided by their sum"),
])
def test_softmax_checker_passes_a_solution_and_names_mistakes(old, new, named):
    b = emulator_only()
    assert check_softmax_temperature(SOFTMAX_SOLUTION, backend=b)
    assert old in SOFTMAX_SOLUTION
    result = check_softmax_temperature(SOFTMAX_SOLUTION.replace(old, new), backend=b)
    assert not result and named in str(result), str(result)


def test_checkers_explain_themselves_without_a_backend(monkeypatch):
    monkeypatch.setattr(checks_cuda, "get_backend", lambda kind="auto": None)     # where the checkers look
    result = check_qmatvec_q4_1(OWN_Q4_1)
    assert not result and "cannot run CUDA kernels" in str(result) and "on a GPU" in str(result)
    with pytest.raises(TypeError, match="the candidate must be CUDA C source"):
        check_qmatvec_swiglu(42)
    with pytest.raises(TypeError, match="or a function returning it, got bytes"):
        check_softmax_temperature(b"bytes")
    monkeypatch.setattr(checks_cuda, "backend_status", lambda: "no GPU, no emulator")
    assert "cannot run CUDA kernels: no GPU, no emulator" in str(check_add_rms_norm(ADD_RMS_NORM_SOLUTION))


# ---------------------------------------------------------------- on a real GPU only

@pytest.mark.gpu
@pytest.mark.skipif(not GPU_OK, reason=f"needs an NVIDIA GPU with CuPy: {GPU_WHY}")
@pytest.mark.parametrize("use_graph", [False, True])
@pytest.mark.parametrize("matvec", ["float", "dp4a"])
def test_smollm2_greedy_matches_the_cpu_quantized_path(use_graph, matvec):
    "Step 2 follows chapter 08's dequantized path, step 3 its C step (the same int8 activations): 32 greedy tokens."
    from course_lib.gguf_tokenizer import load_smollm2
    model, tokenizer = load_smollm2(max_seq_len=128)
    reference = quantize_model(copy.deepcopy(model), "q4_0", matmul="dequant")
    if matvec == "dp4a":
        reference = FastQuantModel(reference, kernel="c")
    gpu = CudaQuantModel(copy.deepcopy(quantize_model(copy.deepcopy(model), "q4_0", matmul="dequant")), backend="cupy",
                         matvec=matvec, use_graph=use_graph)
    assert gpu.device == torch.device("cuda") or not torch.cuda.is_available()
    for prompt in ("The capital of France is", "Once upon a time,", "def fibonacci(n):"):
        ids = tokenizer.encode(prompt)
        expected = list(generate_tokens(reference, ids, 32))
        assert gpu.generate_greedy(ids, 32) == expected, prompt
        assert list(generate_tokens(gpu, ids, 32)) == expected, prompt


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("COURSE_EMULATE_SMOLLM2") != "1",
                    reason="SmolLM2 on the CPU emulator takes ~15 s a token (too slow for CI): COURSE_EMULATE_SMOLLM2=1")
def test_smollm2_on_the_emulator_follows_the_c_step():
    "The real model through the GPU code path (graph, device argmax) on the emulator: 4 greedy tokens as the C step."
    from course_lib.gguf_tokenizer import load_smollm2
    model, tokenizer = load_smollm2(max_seq_len=64)
    quantized = quantize_model(model, "q4_0", matmul="dequant")
    c_step = FastQuantModel(copy.deepcopy(quantized), kernel="c")
    emulated = CudaQuantModel(quantized, backend="emulator", use_graph=True)
    ids = tokenizer.encode("The capital of France is")
    assert emulated.generate_greedy(ids, 4) == list(generate_tokens(c_step, ids, 4))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_random_weight_model_decodes(backend, scheme):
    "CudaQuantModel.random (the benchmark's 7B-shaped model, here tiny) runs and is deterministic per seed."
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=70, hidden_dim=96, max_seq_len=16)
    a = CudaQuantModel.random(args, scheme, backend=backend, seed=1)
    b = CudaQuantModel.random(args, scheme, backend=backend, seed=1)
    la, lb = a(torch.tensor([[1, 2, 3]]), 0), b(torch.tensor([[1, 2, 3]]), 0)
    assert la.shape == (1, 3, 70) and torch.isfinite(la).all() and torch.equal(la, lb)
    assert a.generate_greedy([1, 2], 4) == b.generate_greedy([1, 2], 4)
    with pytest.raises(TypeError, match="args must be a ModelArgs"):
        CudaQuantModel.random({"dim": 64}, scheme, backend=backend)


def test_benchmark_script_help_and_dry_run():
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cuda_decode.py"
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--quick" in r.stdout and "--dry-run" in r.stdout
    if not EMU_OK:
        pytest.skip(f"CPU emulator unavailable: {EMU_WHY}")
    r = subprocess.run([sys.executable, str(script), "--dry-run"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "dry run ok" in r.stdout, r.stderr

"""Chapter 09's step 3 kernels: quantize_q8_1, the __dp4a matvecs and flash-decoding attention (course_lib.cuda).

As in test_cuda.py, every kernel test runs on the CPU emulator with bounds checking on, and on CuPy where a GPU
is present (the `gpu` marker; skipped otherwise). References:
- quantize_x: chapter 08's quantize_act (its C code, and a NumPy copy of it), bit for bit;
- the matvecs: the exact float64 sum over blocks of d_w d_x (q_w . q_x) (+ the Q4_0 / Q4_1 offset terms), to 1e-5
  of the sum of the terms' sizes (float32 sums in another order), and dequantize(W) @ x loosely (the int8 x);
- flash-decoding: a float64 softmax in PyTorch.
"""
import math

import numpy as np
import pytest
import torch

import course_lib.cuda as cuda
from course_lib.cuda import (DP4A_MAX_THREADS, DP4A_SHAPES, H100_SMS, QuantMatrix, attention_n_splits,
                             cuda_attention_split, cuda_qmatvec_dp4a, cuda_quantize_x, cuobjdump, cuobjdump_path,
                             decode_source, empty, get_backend, gpu_available, kernel_resources, matvec_launch_shape,
                             matvec_unroll, nvrtc_compile, nvrtc_library, repack_blocks, to_device, to_host,
                             upload_matrix)
from course_lib.model import PRESETS
from course_lib import c_step
from course_lib.quant_formats import dequantize, quantize
from course_lib.c_step import repack_rows8

from conftest import EMU_OK, EMU_WHY, GPU_OK, GPU_WHY, needs_gpu  # noqa: E402 (tests/conftest.py)

SCHEMES = ("q4_0", "q4_1", "q8_0")
needs_emulator = pytest.mark.skipif(not EMU_OK, reason=f"CPU emulator unavailable: {EMU_WHY}")


def upload(backend, dst, array):
    "Overwrite the device buffer dst with a NumPy array (as a host -> device copy between graph replays)."
    with backend.stream():
        dst.set(np.ascontiguousarray(array, dtype=dst.dtype))
    backend.synchronize()


# ---------------------------------------------------------------- references

def ref_quantize_act(x: np.ndarray):
    "Chapter 08's quantize_act in NumPy float32: d = absmax/127, q = round-half-even(x * (127/absmax)), s = sum q."
    xb = np.asarray(x, np.float32).reshape(-1, 32)
    amax = np.abs(xb).max(axis=1)
    d = amax / np.float32(127)
    idv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, np.float32(1)), np.float32(0))
    q = np.rint(xb * idv.astype(np.float32)[:, None]).astype(np.int32)        # a float32 product, rounded once
    return q.astype(np.int8).reshape(-1), d.astype(np.float32), q.sum(axis=1).astype(np.int32)


def c_quantize_act(x: np.ndarray):
    "The C decode step's own quantize_act, through course_matvec (which leaves x's int8 blocks in its buffers)."
    try:
        lib = c_step.build_c_step()
    except c_step.CCompilerError as e:
        pytest.skip(str(e))
    x = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    n = x.numel()
    packed = repack_rows8(quantize(torch.zeros(1, n), "q8_0"), "q8_0")
    y = torch.empty(1)
    xq, xd, xs = torch.empty(n, dtype=torch.int8), torch.empty(n // 32), torch.empty(n // 32, dtype=torch.int32)
    lib.course_matvec(c_step._C_TYPES["q8_0"], packed.data_ptr(), 1, n, x.data_ptr(), y.data_ptr(),
                      xq.data_ptr(), xd.data_ptr(), xs.data_ptr(), 1)
    return xq.numpy(), xd.numpy(), xs.numpy()


def special_x() -> np.ndarray:
    "Blocks of halfway ties (x * 127/absmax = k + 0.5 exactly), all zeros, a negative absmax, tiny values, random."
    rng = np.random.default_rng(0)
    ties1 = [127.0] + [k + 0.5 for k in range(-15, 16)]                          # 127/absmax = 1
    ties2 = [63.5, -63.5] + [0.25 * (2 * k + 1) for k in range(-15, 15)]         # 127/absmax = 2
    neg = rng.standard_normal(32)
    neg[7] = -9.0
    tiny = np.full(32, 1e-30)
    tiny[3] = -3e-30
    return np.concatenate([ties1, ties2, np.zeros(32), neg, tiny, rng.standard_normal(32 * 4) * 3]).astype(np.float32)


def quantize_on_device(backend, x: np.ndarray, warps_per_block: int = 8):
    n = x.size
    xq, xd, xs = empty(backend, (n,), np.int8), empty(backend, (n // 32,)), empty(backend, (n // 32,), np.int32)
    launch = cuda_quantize_x(backend, to_device(backend, x), xq, xd, xs, warps_per_block=warps_per_block)
    assert launch.name == "quantize_q8_1" and launch.block == (32 * warps_per_block,)
    return xq, xd, xs


def assert_same_quantization(got, expected):
    q, d, s = got
    rq, rd, rs = expected
    np.testing.assert_array_equal(q, rq)
    np.testing.assert_array_equal(d.view(np.uint32), rd.view(np.uint32))        # the float32 bits
    np.testing.assert_array_equal(s, rs)


def random_matrix(rows: int, in_features: int, scheme: str, seed: int):
    "chapter 08's blocks of a random (rows, in_features) matrix; Q4_1 rows get per-block offsets."
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, in_features, generator=g) * 0.05
    if scheme == "q4_1":
        w += 0.03 * torch.rand(rows, in_features // 32, 1, generator=g).expand(-1, -1, 32).reshape(rows, -1)
    return quantize(w, scheme)


def exact_product(blocks, scheme: str, xq, xd, xs):
    """float64 sum over blocks of d_w d_x q_w.q_x (- 8 d_w d_x s_x for Q4_0, + m_w d_x s_x for Q4_1), per row;
    and the sum of the sizes of those terms (what float32 rounding errors scale with)."""
    quants, scales = (t.numpy() for t in repack_blocks(blocks, scheme))
    rows, nb = quants.shape[0], xd.size
    qx = xq.astype(np.int64).reshape(nb, 32)
    if scheme == "q8_0":
        qw = quants.astype(np.int64).reshape(rows, nb, 32)
    else:
        b = quants.astype(np.int64).reshape(rows, nb, 16)
        qw = np.concatenate([b & 15, b >> 4], axis=2)                            # elements 0..15 low, 16..31 high
    dot = np.einsum("rbj,bj->rb", qw, qx).astype(np.float64)
    dx, sx = xd.astype(np.float64)[None], xs.astype(np.float64)[None]
    dw = (scales[..., 0] if scheme == "q4_1" else scales).astype(np.float64)
    main = dw * dx * dot
    if scheme == "q8_0":
        offset = np.zeros_like(main)
    else:
        offset = (-8 * dw if scheme == "q4_0" else scales[..., 1].astype(np.float64)) * dx * sx
    return (main + offset).sum(axis=1), (np.abs(main) + np.abs(offset)).sum(axis=1)


def kernel_name(scheme, in_features, rows_per_warp):
    return f"qmatvec_dp4a_{scheme}_r{rows_per_warp}_u{matvec_unroll(scheme, in_features, rows_per_warp)}"


# ---------------------------------------------------------------- quantize_q8_1

def test_quantize_reference_is_the_c_step():
    "The NumPy reference is chapter 08's C quantize_act bit for bit (ties, zeros, random blocks)."
    for x in (special_x(), np.random.default_rng(9).standard_normal(32 * 64).astype(np.float32) * 11):
        assert_same_quantization(c_quantize_act(x), ref_quantize_act(x))


@pytest.mark.parametrize("which", ["special", "random"])
def test_quantize_x_bit_exact(backend, which):
    x = special_x() if which == "special" else np.random.default_rng(5).standard_normal(32 * 37).astype(np.float32) * 7
    expected = ref_quantize_act(x)
    for warps_per_block in (8, 3, 1):                            # 9 / 37 blocks: the last CUDA block part empty
        xq, xd, xs = quantize_on_device(backend, x, warps_per_block)
        q, d, s = to_host(backend, xq), to_host(backend, xd), to_host(backend, xs)
        assert_same_quantization((q, d, s), expected)
        np.testing.assert_array_equal(s, q.astype(np.int32).reshape(-1, 32).sum(axis=1))


def test_quantize_x_ties_round_half_to_even_and_zero_blocks(backend):
    xq, xd, xs = (to_host(backend, a) for a in quantize_on_device(backend, special_x()[:96]))
    assert xq[0] == 127 and list(xq[1:5]) == [-14, -14, -12, -12]      # -14.5 -13.5 -12.5 -11.5
    assert list(xq[15:18]) == [0, 0, 2]                                 # -0.5 0.5 1.5
    assert list(xq[32:35]) == [127, -127, -14]                          # 63.5 -63.5 (-7.25 * 2 = -14.5)
    assert xd[0] == 1.0 and xd[1] == 0.5
    assert not xq[64:96].any() and xd[2] == 0.0 and xs[2] == 0          # an all-zero block: q = 0, d = 0


# ---------------------------------------------------------------- the dp4a matvecs

def check_product(backend, scheme, rows, n_blocks, rows_per_warp=None, warps_per_block=None, n_sm=H100_SMS, seed=0):
    """quantize_x, then y = W x, y = r + W x (r untouched) and x += W x (y is the residual), against the exact
    float64 formula (1e-5 of the terms' sizes) and y against dequantize(W) @ x (2 %). Returns the kernel's name."""
    n = 32 * n_blocks
    blocks = random_matrix(rows, n, scheme, seed)
    W = upload_matrix(backend, blocks, scheme)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal(n).astype(np.float32)
    res = rng.standard_normal(rows).astype(np.float32)
    xq, xd, xs = quantize_on_device(backend, x)
    hq, hd, hs = to_host(backend, xq), to_host(backend, xd), to_host(backend, xs)
    assert_same_quantization((hq, hd, hs), ref_quantize_act(x))
    exact, size = exact_product(blocks, scheme, hq, hd, hs)
    shape = dict(rows_per_warp=rows_per_warp, warps_per_block=warps_per_block, n_sm=n_sm)

    y = empty(backend, (rows,))
    launch = cuda_qmatvec_dp4a(backend, W, xq, xd, xs, y, **shape)
    got = to_host(backend, y)
    assert np.all(np.abs(got - exact) <= 1e-5 * size + 1e-30), np.max(np.abs(got - exact) / size)
    y_float = dequantize(blocks, scheme, (rows, n)).double().numpy() @ x.astype(np.float64)
    assert np.linalg.norm(got - y_float) / np.linalg.norm(y_float) < 2e-2        # x's int8 rounding: ~0.5 %

    residual, y2 = to_device(backend, res), empty(backend, (rows,))
    cuda_qmatvec_dp4a(backend, W, xq, xd, xs, y2, residual=residual, **shape)
    assert np.all(np.abs(to_host(backend, y2) - (res + exact)) <= 1e-5 * (size + np.abs(res)) + 1e-30)
    np.testing.assert_array_equal(to_host(backend, residual), res)

    a = to_device(backend, res)                                                     # x += W h
    cuda_qmatvec_dp4a(backend, W, xq, xd, xs, a, residual=a, **shape)
    assert np.all(np.abs(to_host(backend, a) - (res + exact)) <= 1e-5 * (size + np.abs(res)) + 1e-30)

    wpb, rpw = matvec_launch_shape(rows, n_sm)
    rpw = rpw if rows_per_warp is None else rows_per_warp
    wpb = wpb if warps_per_block is None else warps_per_block
    assert launch.name == kernel_name(scheme, n, rpw) and launch.block == (32 * wpb,)
    n_warps = -(-rows // rpw)
    assert launch.grid == (-(-n_warps // wpb),)
    return launch.name


# (rows_per_warp, warps_per_block, rows, n_sm): 11 rows are no multiple of 2 or 4 (the last warp's window is
# moved back) nor of the block's rows; None: the launch-shape rule picks, which with n_sm=1 makes 50 rows
# 13 warps of 4 rows in 2 blocks of 8 warps (the second block mostly idle).
SHAPES = {"r1": (1, 3, 11, H100_SMS), "r2": (2, 3, 11, H100_SMS), "r4": (4, 2, 11, H100_SMS), "rule": (None, None, 50, 1)}
N_BLOCKS = (1, 3, 33)
# rows whose units need several passes (U = 4: > 128 units a row), and Q8_0's (1, 2) kernel (33..64 units)
LONG = [("q4_0", 130, 1), ("q4_1", 130, 1), ("q4_1", 130, 2), ("q8_0", 65, 1), ("q8_0", 24, 1)]


@pytest.mark.parametrize("n_blocks", N_BLOCKS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_dp4a_matvec(backend, scheme, shape, n_blocks):
    rows_per_warp, warps_per_block, rows, n_sm = SHAPES[shape]
    check_product(backend, scheme, rows, n_blocks, rows_per_warp, warps_per_block, n_sm, seed=n_blocks)


@pytest.mark.parametrize("scheme,n_blocks,rows_per_warp", LONG)
def test_dp4a_matvec_long_rows(backend, scheme, n_blocks, rows_per_warp):
    check_product(backend, scheme, 6, n_blocks, rows_per_warp, 2, seed=n_blocks)


def test_the_matvec_tests_reach_every_dp4a_kernel():
    "The parameters above launch every compiled (scheme, R, U) kernel, and only compiled ones."
    reached = {kernel_name(s, 32 * nb, r if r is not None else matvec_launch_shape(rows, n_sm)[1])
               for s in SCHEMES for r, _, rows, n_sm in SHAPES.values() for nb in N_BLOCKS}
    reached |= {kernel_name(s, 32 * nb, r) for s, nb, r in LONG}
    assert reached == {f"qmatvec_dp4a_{s}_r{r}_u{u}" for s in SCHEMES for r, u in DP4A_SHAPES}


# ---------------------------------------------------------------- launch-shape rules (no kernel runs)

def model_products(name: str) -> dict:
    "{product: (rows, in_features)} of one layer and the output of a PRESETS model, as CudaQuantModel fuses them."
    a = PRESETS[name]
    hd, hidden = a.dim // a.n_heads, a.ffn_hidden_dim
    return dict(wqkv=((a.n_heads + 2 * a.n_kv_heads) * hd, a.dim), wo=(a.dim, a.n_heads * hd),
                w13=(2 * hidden, a.dim), w2=(a.dim, hidden), output=(a.vocab_size, a.dim))


def test_launch_shape_rule_for_smollm2_and_llama2_7b():
    smol, llama = model_products("smollm2-135m"), model_products("llama-2-7b")
    assert smol == dict(wqkv=(960, 576), wo=(576, 576), w13=(3072, 576), w2=(576, 1536), output=(49152, 576))
    assert llama == dict(wqkv=(12288, 4096), wo=(4096, 4096), w13=(22016, 4096), w2=(4096, 11008),
                         output=(32000, 4096))
    # (warps_per_block, rows_per_warp) on an H100's 132 SMs: R = 4 / 2 only with >= 12 warps per SM,
    # warps per block as large as still gives >= 2 blocks per SM
    assert {k: matvec_launch_shape(r) for k, (r, _) in smol.items()} == \
        dict(wqkv=(2, 1), wo=(2, 1), w13=(8, 1), w2=(2, 1), output=(8, 4))
    assert {k: matvec_launch_shape(r) for k, (r, _) in llama.items()} == \
        dict(wqkv=(8, 4), wo=(4, 2), w13=(8, 4), w2=(4, 2), output=(8, 4))
    unroll = lambda products, scheme: {k: matvec_unroll(scheme, n, matvec_launch_shape(r)[1])
                                       for k, (r, n) in products.items()}
    assert unroll(smol, "q4_0") == dict(wqkv=1, wo=1, w13=1, w2=2, output=1)      # 576: 18 Q4 units, one slot
    assert unroll(smol, "q8_0") == dict(wqkv=2, wo=2, w13=2, w2=4, output=1)      # 1536: 96 Q8 units, 3 slots
    assert unroll(llama, "q4_0") == dict(wqkv=1, wo=2, w13=1, w2=2, output=1)
    assert unroll(llama, "q8_0") == dict(wqkv=1, wo=2, w13=1, w2=2, output=1)
    assert matvec_launch_shape(1) == (1, 1) and matvec_launch_shape(3) == (1, 1)
    # the thresholds: 1584 = 12 x 132 warps of R rows; 264 = 2 x 132 blocks
    assert matvec_launch_shape(3166) == (8, 1) and matvec_launch_shape(3167) == (4, 2)
    assert matvec_launch_shape(6332) == (8, 2) and matvec_launch_shape(6333) == (4, 4)
    assert matvec_launch_shape(50, n_sm=1) == (8, 4) and matvec_launch_shape(4, n_sm=1) == (2, 1)
    with pytest.raises(ValueError, match="rows must be positive, got 0"):
        matvec_launch_shape(0)
    for rows in (1, 2, 3, 4, 5, 11, 100, 576, 960, 3167, 4096, 11008, 32000, 49152):
        wpb, rpw = matvec_launch_shape(rows)
        assert 1 <= wpb <= DP4A_MAX_THREADS // 32 and rpw in (1, 2, 4) and rpw <= rows
        for scheme in SCHEMES:
            for n in (32, 96, 576, 1536, 2048, 4096, 4160, 11008, 14336):
                assert (rpw, matvec_unroll(scheme, n, rpw)) in DP4A_SHAPES, (rows, scheme, n)


def test_attention_n_splits():
    assert attention_n_splits(8192, 9) == 30 and attention_n_splits(2048, 9) == 30     # SmolLM2: ceil(264 / 9)
    assert attention_n_splits(1024, 9) == 16                                          # >= 64 positions a split
    assert attention_n_splits(4096, 32) == 9                                          # Llama-2-7B: ceil(264 / 32)
    assert attention_n_splits(100, 9) == 1 and attention_n_splits(63, 4) == 1
    assert attention_n_splits(4096, 32, n_sm=1) == 1 and attention_n_splits(4096, 4, n_sm=8, min_chunk=1024) == 4


# ---------------------------------------------------------------- argument checks (before any launch)

class NoLaunch(cuda.Backend):
    "The emulator's arrays, but a backend that fails the test if anything reaches a kernel."
    def __init__(self):
        if not EMU_OK:
            pytest.skip(f"CPU emulator unavailable: {EMU_WHY}")
        super().__init__("no-launch", get_backend("emulator").xp,
                         lambda src: pytest.fail("a kernel was compiled: the checks ran too late"))


def test_bad_arguments_are_refused_before_a_launch():
    b = NoLaunch()
    W = upload_matrix(b, random_matrix(7, 64, "q4_0", 0), "q4_0")
    xq, xd, xs, y = empty(b, (64,), np.int8), empty(b, (2,)), empty(b, (2,), np.int32), empty(b, (7,))
    product = lambda **kw: cuda_qmatvec_dp4a(b, **{**dict(W=W, xq=xq, xd=xd, xs=xs, y=y), **kw})
    with pytest.raises(ValueError, match=r"rows_per_warp must be 1, 2 or 4 and at most the matrix's 7 rows, got 3"):
        product(rows_per_warp=3)
    W3 = upload_matrix(b, random_matrix(3, 64, "q8_0", 0), "q8_0")
    with pytest.raises(ValueError, match=r"at most the matrix's 3 rows, got 4"):
        product(W=W3, y=empty(b, (3,)), rows_per_warp=4)
    with pytest.raises(ValueError, match=r"warps_per_block must be in 1\.\.8 \(__launch_bounds__\), got 9"):
        product(warps_per_block=9)
    with pytest.raises(ValueError, match=r"warps_per_block must be in 1\.\.8"):
        product(warps_per_block=0)
    with pytest.raises(TypeError, match=r"rows_per_warp must be an int, got float"):
        product(rows_per_warp=2.0)
    with pytest.raises(TypeError, match=r"xq must have dtype int8, got uint8"):
        product(xq=empty(b, (64,), np.uint8))
    with pytest.raises(TypeError, match=r"xd must have dtype float32, got float64"):
        product(xd=empty(b, (2,), np.float64))
    with pytest.raises(TypeError, match=r"xs must have dtype int32, got float32"):
        product(xs=empty(b, (2,)))
    with pytest.raises(TypeError, match=r"residual must have dtype float32, got float16"):
        product(residual=empty(b, (7,), np.float16))
    with pytest.raises(ValueError, match=r"xq must have shape \(64\), got \(32,\)"):
        product(xq=empty(b, (32,), np.int8))
    with pytest.raises(ValueError, match=r"xq must be aligned to 16 bytes"):
        product(xq=empty(b, (65,), np.int8)[1:])
    with pytest.raises(TypeError, match=r"W.quants must have dtype uint8, got int8"):
        product(W=QuantMatrix("q4_0", 7, 64, empty(b, (7, 32), np.int8), W.scales))
    with pytest.raises(TypeError, match=r"W must be a QuantMatrix"):
        product(W="weights")
    # quantize_x
    with pytest.raises(TypeError, match=r"x must have dtype float32, got float64"):
        cuda_quantize_x(b, empty(b, (64,), np.float64), xq, xd, xs)
    with pytest.raises(ValueError, match=r"x must have a positive multiple of 32 values, got 40"):
        cuda_quantize_x(b, empty(b, (40,)), xq, xd, xs)
    with pytest.raises(TypeError, match=r"xq must have dtype int8, got uint8"):
        cuda_quantize_x(b, empty(b, (64,)), empty(b, (64,), np.uint8), xd, xs)
    with pytest.raises(ValueError, match=r"xs must have shape \(2\), got \(3,\)"):
        cuda_quantize_x(b, empty(b, (64,)), xq, xd, empty(b, (3,), np.int32))
    with pytest.raises(ValueError, match=r"32 \* warps_per_block must be a multiple of 32 in 32\.\.1024"):
        cuda_quantize_x(b, empty(b, (64,)), xq, xd, xs, warps_per_block=33)
    # attention_split
    qkv, cache, pos, out = empty(b, (8 * 64,)), empty(b, (2, 16, 64)), empty(b, (1,), np.int32), empty(b, (4 * 64,))
    attend = lambda **kw: cuda_attention_split(b, **{**dict(qkv=qkv, cache_k=cache, cache_v=cache, pos=pos,
                                                            partial=empty(b, (4, 3, 66)), out=out, n_heads=4,
                                                            n_kv_heads=2, head_dim=64), **kw})
    with pytest.raises(ValueError, match=r"partial must have shape \(4, any, 66\), got \(4, 3, 64\)"):
        attend(partial=empty(b, (4, 3, 64)))
    with pytest.raises(ValueError, match=r"n_heads=3 must be a positive multiple of n_kv_heads=2"):
        attend(n_heads=3)
    with pytest.raises(TypeError, match=r"pos must have dtype int32, got int64"):
        attend(pos=empty(b, (1,), np.int64))
    with pytest.raises(ValueError, match=r"32 \* n_warps must be a multiple of 32 in 32\.\.1024"):
        attend(n_warps=33)


def test_dp4a_launch_records_and_register_limit():
    "Grid, block and scalar types of a dp4a launch; a block too big for the kernel's registers is refused."
    if not EMU_OK:
        pytest.skip(f"CPU emulator unavailable: {EMU_WHY}")
    seen = []

    class Kernel:
        def __init__(self, name, max_threads):
            self.name, self.max_threads_per_block, self.num_regs = name, max_threads, 65536 // max_threads

        def __call__(self, grid, block, args, shared_mem=0):
            seen.append((self.name, grid, block, args))

    class Recorder(cuda.Backend):
        max_threads = 1024

        def __init__(self):
            super().__init__("recorder", get_backend("emulator").xp, None)

        def get_function(self, name, source=None):
            return Kernel(name, self.max_threads)

    b = Recorder()
    W = upload_matrix(b, random_matrix(50, 1056, "q8_0", 0), "q8_0")
    xq, xd, xs, y = empty(b, (1056,), np.int8), empty(b, (33,)), empty(b, (33,), np.int32), empty(b, (50,))
    cuda_qmatvec_dp4a(b, W, xq, xd, xs, y, n_sm=1)                     # the rule: (8, 4); 66 units: U = 1
    name, grid, block, args = seen[-1]
    assert (name, grid, block) == ("qmatvec_dp4a_q8_0_r4_u1", (2,), (256,))
    assert args[6] is y and [type(a) for a in args[7:]] == [np.int32] * 3 and args[9] == 0   # no residual: y
    cuda_qmatvec_dp4a(b, W, xq, xd, xs, y, residual=y, rows_per_warp=1, warps_per_block=3)
    assert seen[-1][:3] == ("qmatvec_dp4a_q8_0_r1_u4", (17,), (96,)) and seen[-1][3][9] == 1
    b.max_threads = 192                                                # e.g. 80 registers a thread
    cuda_qmatvec_dp4a(b, W, xq, xd, xs, y, warps_per_block=6)
    with pytest.raises(ValueError, match=r"qmatvec_dp4a_q8_0_r1_u4: a block of 224 threads does not fit on an SM"):
        cuda_qmatvec_dp4a(b, W, xq, xd, xs, y, warps_per_block=7, rows_per_warp=1)


# ---------------------------------------------------------------- flash-decoding attention

def attention_reference(qkv, cache_k, cache_v, length, n_heads, n_kv_heads, head_dim):
    "float64 softmax(q K^T / sqrt(head_dim)) V over positions 0..length-1, K/V heads shared by n_heads/n_kv_heads."
    q = torch.from_numpy(qkv[:n_heads * head_dim].astype(np.float64)).view(n_heads, head_dim)
    rep = n_heads // n_kv_heads
    K = torch.from_numpy(cache_k.astype(np.float64))[:, :length].repeat_interleave(rep, 0)
    V = torch.from_numpy(cache_v.astype(np.float64))[:, :length].repeat_interleave(rep, 0)
    p = torch.softmax(torch.einsum("hd,htd->ht", q, K) / math.sqrt(head_dim), dim=-1)
    return torch.einsum("ht,htd->hd", p, V).reshape(-1).numpy()


def check_attention(backend, n_heads, n_kv_heads, head_dim, n_splits, lengths, n_warps=4, max_seq_len=40, seed=0):
    """Build the split and combine launches once; replay them (as a CUDA graph does) with pos changed in between.
    Each replay: out vs the float64 reference; empty splits (chunk * split >= length) wrote l = 0, o = 0."""
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((n_heads + 2 * n_kv_heads) * head_dim).astype(np.float32)
    cache_k = (rng.standard_normal((n_kv_heads, max_seq_len, head_dim)) * 1.5).astype(np.float32)
    cache_v = rng.standard_normal((n_kv_heads, max_seq_len, head_dim)).astype(np.float32)
    pos, partial = empty(backend, (1,), np.int32), empty(backend, (n_heads, n_splits, head_dim + 2))
    out = empty(backend, (n_heads * head_dim,))
    launches = cuda_attention_split(backend, to_device(backend, qkv), to_device(backend, cache_k),
                                    to_device(backend, cache_v), pos, partial, out, n_heads, n_kv_heads, head_dim,
                                    n_warps=n_warps, run=False)
    assert [l.name for l in launches] == ["attention_split", "attention_combine"]
    assert launches[0].grid == (n_heads, n_splits) and launches[0].block == (32 * n_warps,)
    for length in lengths:
        upload(backend, pos, [length - 1])
        upload(backend, partial, np.full(partial.shape, np.nan, np.float32))     # every entry must be written
        with backend.stream():
            for launch in launches:
                launch()
        expected = attention_reference(qkv, cache_k, cache_v, length, n_heads, n_kv_heads, head_dim)
        np.testing.assert_allclose(to_host(backend, out), expected, rtol=1e-5, atol=1e-5, err_msg=f"length {length}")
        part = to_host(backend, partial)
        chunk = -(-length // n_splits)
        empty_splits = [s for s in range(n_splits) if s * chunk >= length]
        full = [s for s in range(n_splits) if s * chunk < length]
        assert not np.isnan(part).any()
        assert np.all(part[:, empty_splits, head_dim + 1] == 0) and np.all(part[:, empty_splits, :head_dim] == 0)
        assert np.all(part[:, full, head_dim + 1] >= 1)                            # the max's own term is 1
    return launches


@pytest.mark.parametrize("head_dim,n_splits", [(64, 3), (64, 8), (48, 4)])
def test_flash_decoding_gqa_and_replays(backend, head_dim, n_splits):
    "6 query heads on 2 K/V heads; lengths 1, 2, 5 (fewer positions than splits or warps), 37, 40 (the whole cache)."
    check_attention(backend, 6, 2, head_dim, n_splits, [1, 2, 5, 37, 40, 3])


def test_flash_decoding_one_warp_and_a_long_split(backend):
    check_attention(backend, 4, 4, 64, 2, [1, 37], n_warps=1, seed=1)


# ---------------------------------------------------------------- other thread schedules and block orders

@needs_emulator
def test_random_schedule_and_reverse_block_order(monkeypatch, bounds_checked):
    "Fresh emulator kernels with threads reshuffled at every barrier and blocks run last to first: same results."
    monkeypatch.setenv("COURSE_CUDA_EMULATOR_SCHEDULE", "random")
    monkeypatch.setenv("COURSE_CUDA_EMULATOR_BLOCK_ORDER", "reverse")
    b = get_backend("emulator")
    kernel = b.get_function("quantize_q8_1").emulated
    assert (kernel.schedule, kernel.block_order, kernel.check_bounds) == ("random", "reverse", True)
    x = special_x()
    for wpb in (3, 8):
        assert_same_quantization([to_host(b, a) for a in quantize_on_device(b, x, wpb)], ref_quantize_act(x))
    check_product(b, "q4_1", 11, 33, rows_per_warp=2, warps_per_block=3, seed=5)
    check_product(b, "q8_0", 50, 3, n_sm=1, seed=6)
    launches = check_attention(b, 6, 3, 48, 5, [1, 4, 33], n_warps=3, seed=3)
    assert launches[0].kernel.emulated.schedule == "random"


# ---------------------------------------------------------------- machine code (NVRTC + cuobjdump, no GPU)

@pytest.fixture(scope="module")
def sm90_cubin():
    if nvrtc_library() is None or cuobjdump_path() is None:
        pytest.skip("NVRTC or cuobjdump is not installed (pip install nvidia-cuda-nvrtc nvidia-cuda-cuobjdump)")
    return nvrtc_compile(decode_source(), "sm_90")


def test_sm90_dp4a_kernels_fit_64_registers_without_spills(sm90_cubin):
    res = kernel_resources(sm90_cubin, "sm_90")
    dp4a = {f"qmatvec_dp4a_{s}_r{r}_u{u}" for s in SCHEMES for r, u in DP4A_SHAPES}
    assert dp4a <= set(res) and {k for k in res if k.startswith("qmatvec_dp4a_")} == dp4a
    for name in sorted(dp4a):          # __launch_bounds__(256, 4): 4 blocks of 256 threads in 65536 registers
        assert res[name].registers <= 64 and res[name].local == 0 and res[name].stack == 0, (name, res[name])
    for name in ("quantize_q8_1", "attention_split", "attention_combine"):
        assert res[name].local == 0 and res[name].stack == 0, (name, res[name])


def test_sm90_quantize_rounds_to_nearest_even(sm90_cubin):
    "One F2I with the default rounding (to nearest, ties to even: cvt.rni), no TRUNC/FLOOR/CEIL; IEEE divisions."
    sass = cuobjdump(sm90_cubin, "-sass", "-fun", "quantize_q8_1")
    f2i = [line for line in sass.splitlines() if "F2I" in line]
    assert len(f2i) == 1 and not any(m in f2i[0] for m in ("TRUNC", "FLOOR", "CEIL")), f2i
    assert "FCHK" in sass and "MUFU.RCP" in sass           # 127/absmax and absmax/127 correctly rounded

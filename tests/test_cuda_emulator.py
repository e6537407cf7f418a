"""Tests of the CPU CUDA emulator in tests/cuda_emulator (used by chapter 09's kernel tests
on machines without a GPU). Each test compares the emulator against numpy or checks that
a bug is reported; each fails if the emulator gets that behaviour wrong."""

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))       # `tests` as a package
from tests.cuda_emulator import EmulatedKernel, EmulatedModule, emulator_available  # noqa: E402

_ok, _why = emulator_available()
pytestmark = pytest.mark.skipif(not _ok, reason=_why)

FULL = 0xFFFFFFFF

# One module for most kernels: each compile costs about a second.
SOURCE = r"""
#include <cuda_fp16.h>
#include <stdint.h>

// Tree sum in dynamic shared memory; works for any blockDim (folds the upper half down).
extern "C" __global__ void block_sum_shared(const float* __restrict__ x, float* __restrict__ out, int n) {
    extern __shared__ float s[];
    unsigned t = threadIdx.x;
    int i = blockIdx.x * blockDim.x + t;
    s[t] = i < n ? x[i] : 0.0f;
    __syncthreads();
    for (unsigned size = blockDim.x; size > 1;) {
        unsigned half = (size + 1) / 2;
        if (t < size - half) s[t] += s[t + half];
        __syncthreads();
        size = half;
    }
    if (t == 0) out[blockIdx.x] = s[0];
}

// Warp sums with xor shuffles (every lane ends with the sum), then warp 0 adds the warp
// partials with down shuffles.
extern "C" __global__ void warp_sum(const float* x, float* out, float* lane_sums, int n) {
    __shared__ float partial[32];
    unsigned t = threadIdx.x, lane = t % 32, warp = t / 32;
    int i = blockIdx.x * blockDim.x + t;
    float a = i < n ? x[i] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffff, a, o);
    lane_sums[i] = a;
    if (lane == 0) partial[warp] = a;
    __syncthreads();
    if (warp == 0) {
        unsigned nw = (blockDim.x + 31) / 32;
        float b = lane < nw ? partial[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) b += __shfl_down_sync(0xffffffff, b, o);
        if (lane == 0) out[blockIdx.x] = b;
    }
}

// Every warp primitive, for checking CUDA's lane rules (also in partial warps).
extern "C" __global__ void shfl_probe(int* out) {
    int t = threadIdx.x, n = blockDim.x;
    int* o = out + blockIdx.x * 0;
    o[0 * n + t] = __shfl_xor_sync(0xffffffff, t, 1);
    o[1 * n + t] = __shfl_down_sync(0xffffffff, t, 3);
    o[2 * n + t] = __shfl_up_sync(0xffffffff, t, 2);
    o[3 * n + t] = __shfl_sync(0xffffffff, t, 5);
    o[4 * n + t] = __shfl_xor_sync(0xffffffff, t, 4, 8);
    o[5 * n + t] = __shfl_down_sync(0xffffffff, t, 3, 8);
    o[6 * n + t] = __shfl_up_sync(0xffffffff, t, 3, 8);
    o[7 * n + t] = __shfl_sync(0xffffffff, t, 11, 8);
    o[8 * n + t] = (int)__ballot_sync(0xffffffff, t % 3 == 0);
    o[9 * n + t] = __any_sync(0xffffffff, t == 5);
    o[10 * n + t] = __all_sync(0xffffffff, t < 36);
    __syncwarp();
    o[11 * n + t] = (int)(__shfl_xor_sync(0xffffffff, 1000000000000LL + t, 1) - 1000000000000LL);
    o[12 * n + t] = (int)__shfl_xor_sync(0xffffffff, t + 0.5, 2);
    o[13 * n + t] = __syncthreads_count(t % 4 == 0);
}

// Grid-stride loops over a 2D grid of 2D blocks; also records which block did each element.
extern "C" __global__ void axpy2d(const float* a, float* b, int* owner, int rows, int cols, float alpha) {
    for (int r = blockIdx.y * blockDim.y + threadIdx.y; r < rows; r += blockDim.y * gridDim.y)
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += blockDim.x * gridDim.x) {
            b[r * cols + c] += alpha * a[r * cols + c];
            owner[r * cols + c] = blockIdx.y * gridDim.x + blockIdx.x;
        }
}

extern "C" __global__ void half_to_float(const unsigned short* h, float* f, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
        f[i] = __half2float(__ushort_as_half(h[i]));
}
extern "C" __global__ void float_to_half(const float* f, unsigned short* h, unsigned short* h_rn, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        h[i] = __half_as_ushort(__float2half(f[i]));
        h_rn[i] = __half_as_ushort(__float2half_rn(f[i]));
    }
}
extern "C" __global__ void half_scale(const __half* x, __half* y, float s, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __float2half(__half2float(x[i]) * s);
}

// 16-byte loads of int8 data and __dp4a, signed and unsigned.
extern "C" __global__ void dot16(const unsigned char* a, const unsigned char* b, int* out_s,
                                 unsigned* out_u, int chunks) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= chunks) return;
    uint4 va = reinterpret_cast<const uint4*>(a)[i];
    uint4 vb = __ldg(reinterpret_cast<const uint4*>(b) + i);
    int s = 0;
    s = __dp4a((int)va.x, (int)vb.x, s);
    s = __dp4a((int)va.y, (int)vb.y, s);
    s = __dp4a((int)va.z, (int)vb.z, s);
    s = __dp4a((int)va.w, (int)vb.w, s);
    out_s[i] = s;
    out_u[i] = __dp4a(va.x, vb.x, __dp4a(va.y, vb.y, __dp4a(va.z, vb.z, __dp4a(va.w, vb.w, 0u))));
}

// Parameters of every checked type; writes the by-value ones back to check they arrive.
extern "C" __global__ void typed(float* f, __half* h, int* i32, unsigned char* u8, signed char* s8,
                                 unsigned int* u32, long long* i64, const int8_t* i8b, uint8_t* u8b,
                                 int n, unsigned int un, long long ln, float x) {
    if (threadIdx.x == 0) { f[0] = x; i32[0] = n; u32[0] = un; i64[0] = ln; u8[0] = i8b[0]; }
}

struct block_q8_0 { __half d; int8_t qs[32]; };
static_assert(sizeof(block_q8_0) == 34, "Q8_0 blocks are 34 bytes");

// y = W x with W in Q8_0 blocks; one warp per row, lane j handles weight j of every block.
extern "C" __global__ void __launch_bounds__(256) qmatvec_q8_0(const unsigned char* __restrict__ w,
        const float* __restrict__ x, float* __restrict__ y, int rows, int cols) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    int nb = cols / 32;
    const block_q8_0* b = reinterpret_cast<const block_q8_0*>(w) + (size_t)row * nb;
    float acc = 0.0f;
    for (int ib = 0; ib < nb; ++ib)
        acc += __half2float(b[ib].d) * (float)b[ib].qs[lane] * x[ib * 32 + lane];
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, o);
    if (lane == 0) y[row] = acc;
}

__device__ __forceinline__ float sq(float v) { return v * v; }

// Compiles the rest of the intrinsics the course uses; values checked against numpy.
extern "C" __global__ void misc(const float4* v4, float* out, int* iout, unsigned* uout) {
    if (threadIdx.x != 0) return;
    float4 v = v4[0];
    float2 p = make_float2(v.x, v.y);
    out[0] = __expf(v.x); out[1] = expf(v.y); out[2] = __fdividef(v.x, v.y); out[3] = rsqrtf(v.z);
    out[4] = sqrtf(v.z); out[5] = fmaxf(v.x, v.w); out[6] = fminf(v.x, v.w); out[7] = fabsf(v.w);
    out[8] = __fmul_rn(v.x, v.y); out[9] = __fadd_rn(v.x, v.y); out[10] = __frcp_rn(v.z);
    out[11] = fmaf(v.x, v.y, v.z); out[12] = __int_as_float(0x3f800000); out[13] = -INFINITY;
    out[14] = __uint_as_float(__float_as_uint(p.y)); out[15] = sq(v.w);
    float4 m = make_float4(1.f, 2.f, 3.f, 4.f); out[16] = m.w;
    iout[0] = min(-3, 7); iout[1] = max(-3, 7); iout[2] = __float_as_int(1.0f);
    uout[0] = min(5u, 9u); uout[1] = __byte_perm(0x33221100u, 0x77665544u, 0x7531u);
    uint4 u = make_uint4(1, 2, 3, 4); uout[2] = u.x + u.y + u.z + u.w;
    uchar4 c = make_uchar4(1, 2, 3, 250); char4 d = {-1, 2, -3, 4};
    uout[3] = c.w; iout[3] = __dp4a(d, d, 0);
}

// Atomics from every thread of several blocks.
extern "C" __global__ void atomics(const int* x, int* hist, float* fsum, int* imax, unsigned* ucount,
                                   int* cas_sum, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    atomicAdd(&hist[x[i] % 16], 1);
    atomicAdd(fsum, 0.5f);
    atomicMax(imax, x[i]);
    atomicAdd(ucount, 1u);
    int old = *cas_sum, assumed;
    do { assumed = old; old = atomicCAS(cas_sum, assumed, assumed + x[i]); } while (old != assumed);
}

// Reads shared memory that nobody wrote: poison must show (NaN for floats).
extern "C" __global__ void read_unwritten(float* out) {
    __shared__ __align__(16) float s[64];
    extern __shared__ __align__(16) float d[];
    if (blockIdx.x == 0 && threadIdx.x == 0) s[0] = 1.0f;
    __syncthreads();
    out[2 * blockIdx.x] = s[0];
    out[2 * blockIdx.x + 1] = d[threadIdx.x];
}

// A race: no __syncthreads between the write and the neighbour's read.
extern "C" __global__ void racy_shift(const float* x, float* out) {
    __shared__ float s[128];
    unsigned t = threadIdx.x;
    s[t] = x[t];
    out[t] = t > 0 ? s[t - 1] : 0.0f;
}

// Half of each warp exits early; the others still synchronise and shuffle.
extern "C" __global__ void early_exit(float* out) {
    if (threadIdx.x % 32 >= 16) return;
    __syncthreads();
    float v = __shfl_xor_sync(0xffffffff, (float)threadIdx.x, 1);
    out[threadIdx.x] = v;
}

template <int N> __global__ void fill(float* o) { o[threadIdx.x] = N; }
"""


@pytest.fixture(scope="module")
def mod():
    return EmulatedModule(SOURCE, name_expressions=["fill<3>"]).compile()


def run_with_timeout(fn, seconds=60):
    """Runs fn in a thread (the launch releases the GIL); fails instead of hanging."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:          # noqa: BLE001 - handed to the test
            box["error"] = e
    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(seconds)
    assert not th.is_alive(), f"launch did not finish within {seconds} s (hang)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ---- reductions ------------------------------------------------------------------------------

@pytest.mark.parametrize("threads", [32, 64, 96, 256])
@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
def test_block_sum_shared_memory(mod, threads, schedule):
    k = mod.get_function("block_sum_shared", schedule=schedule)
    rng = np.random.default_rng(threads)
    blocks = 5
    n = blocks * threads - 7                    # a partial last block
    x = rng.standard_normal(n).astype(np.float32)
    out = np.zeros(blocks, np.float32)
    k((blocks,), (threads,), (x, out, np.int32(n)), shared_mem=threads * 4)
    expect = np.add.reduceat(np.pad(x, (0, 7)).astype(np.float64), np.arange(0, n + 7, threads))
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [32, 64, 96, 256])
def test_warp_shuffle_sum(mod, threads):
    k = mod.get_function("warp_sum")
    blocks = 4
    x = np.random.default_rng(1).standard_normal(blocks * threads).astype(np.float32)
    out = np.zeros(blocks, np.float32)
    lane_sums = np.zeros_like(x)
    k(blocks, threads, (x, out, lane_sums, np.int32(x.size)))
    np.testing.assert_allclose(out, x.reshape(blocks, threads).sum(1), rtol=1e-5, atol=1e-5)
    warp_totals = x.reshape(-1, 32).sum(1)
    np.testing.assert_allclose(lane_sums.reshape(-1, 32), np.repeat(warp_totals[:, None], 32, 1),
                               rtol=1e-5, atol=1e-5)


def _shfl_model(n):
    """numpy model of CUDA's shuffle rules; lanes that do not exist give the caller's value."""
    t = np.arange(n)
    base = t // 32 * 32
    exists = lambda s: s < np.minimum(base + 32, n)   # noqa: E731
    def pick(src, ok):
        ok = ok & exists(src)
        return np.where(ok, src, t)
    def seg(w):
        b = t & ~(w - 1)
        return b
    rows = [pick(t ^ 1, np.ones(n, bool)), pick(t + 3, (t % 32) + 3 < 32), pick(t - 2, t % 32 >= 2),
            pick(base + 5, np.ones(n, bool)),
            pick(t ^ 4, (t ^ 4) < seg(8) + 8), pick(t + 3, (t - seg(8)) + 3 < 8),
            pick(t - 3, (t - seg(8)) >= 3), pick(seg(8) + (11 & 7), np.ones(n, bool))]
    ballot = np.zeros(n, np.int64)
    anyv, allv = np.zeros(n, int), np.zeros(n, int)
    for w0 in range(0, n, 32):
        lanes = t[w0:min(w0 + 32, n)]
        ballot[lanes] = sum(1 << int(j - w0) for j in lanes if j % 3 == 0)
        anyv[lanes] = int(any(lanes == 5))
        allv[lanes] = int(all(lanes < 36))
    ballot = ballot.astype(np.uint32).view(np.int32)
    rows += [ballot, anyv, allv, pick(t ^ 1, np.ones(n, bool)), np.trunc(pick(t ^ 2, np.ones(n, bool)) + 0.5),
             np.full(n, (n + 3) // 4)]
    return np.array(rows).astype(np.int32)


@pytest.mark.parametrize("threads", [32, 64, 40])
def test_warp_primitives_follow_cuda_rules(mod, threads):
    k = mod.get_function("shfl_probe")
    out = np.full(14 * threads, -99, np.int32)
    k(1, threads, (out,))
    np.testing.assert_array_equal(out.reshape(14, threads), _shfl_model(threads))


def test_exited_threads_count_as_arrived(mod):
    k = mod.get_function("early_exit")
    out = np.full(64, -1.0, np.float32)
    run_with_timeout(lambda: k(1, 64, (out,)))
    t = np.arange(64)
    expect = np.where(t % 32 < 16, t ^ 1, -1).astype(np.float32)
    np.testing.assert_array_equal(out, expect)


# ---- grids ----------------------------------------------------------------------------------

def test_grid_stride_2d(mod):
    k = mod.get_function("axpy2d")
    rows, cols = 37, 45
    rng = np.random.default_rng(2)
    a = rng.standard_normal((rows, cols)).astype(np.float32)
    b = rng.standard_normal((rows, cols)).astype(np.float32)
    owner = np.full((rows, cols), -1, np.int32)
    expect = b + np.float32(0.5) * a
    grid, block = (3, 2), (8, 4)
    k(grid, block, (a, b, owner, np.int32(rows), np.int32(cols), np.float32(0.5)))
    np.testing.assert_allclose(b, expect, rtol=1e-6)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    bx, by = (c // block[0]) % grid[0], (r // block[1]) % grid[1]
    np.testing.assert_array_equal(owner, by * grid[0] + bx)


def test_template_kernel_via_name_expressions(mod):
    out = np.zeros(4, np.float32)
    mod.get_function("fill<3>")(1, 4, (out,))
    np.testing.assert_array_equal(out, 3)


# ---- fp16 ---------------------------------------------------------------------------------------

def test_half_to_float_all_bit_patterns(mod):
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    f = np.zeros(65536, np.float32)
    mod.get_function("half_to_float")(64, 256, (h, f, np.int32(h.size)))
    np.testing.assert_array_equal(f.view(np.uint32), h.view(np.float16).astype(np.float32).view(np.uint32))


def test_float_to_half_round_to_nearest_even(mod):
    rng = np.random.default_rng(3)
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)].astype(np.float32)
    finite = np.sort(np.unique(finite))
    mids = (finite[:-1].astype(np.float64) + finite[1:]) / 2          # exact ties
    f = np.concatenate([
        rng.integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        rng.standard_normal(100_000).astype(np.float32) * np.float32(1e3),
        finite, mids.astype(np.float32), np.nextafter(mids.astype(np.float32), np.float32(np.inf)),
        np.nextafter(mids.astype(np.float32), np.float32(-np.inf)),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, 1e-8, 2.98e-8, 5.96e-8,
                  6.1e-5, 6.103515625e-05, 3e38, -3e38], np.float32)])
    h = np.zeros(f.size, np.uint16)
    h_rn = np.zeros(f.size, np.uint16)
    with np.errstate(over="ignore", invalid="ignore"):
        expect = f.astype(np.float16).view(np.uint16)
    mod.get_function("float_to_half")(128, 256, (f, h, h_rn, np.int32(f.size)))
    bad = np.flatnonzero(h != expect)
    assert bad.size == 0, f"{bad.size} mismatches, e.g. {f[bad[:5]]} -> {h[bad[:5]]} vs {expect[bad[:5]]}"
    np.testing.assert_array_equal(h_rn, expect)


def test_half_pointer_params(mod):
    x = np.linspace(-4, 4, 50).astype(np.float16)
    y = np.zeros_like(x)
    mod.get_function("half_scale")(1, 64, (x, y, np.float32(1.5), np.int32(x.size)))
    np.testing.assert_array_equal(y, (x.astype(np.float32) * np.float32(1.5)).astype(np.float16))


# ---- vector loads, dp4a, intrinsics, atomics -----------------------------------------------------

def test_uint4_loads_and_dp4a(mod):
    chunks = 300
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, chunks * 16, dtype=np.uint8)
    b = rng.integers(0, 256, chunks * 16, dtype=np.uint8)
    # uint4 loads need 16-byte alignment on a GPU; numpy allocations are (glibc malloc).
    assert a.ctypes.data % 16 == 0 and b.ctypes.data % 16 == 0
    out_s = np.zeros(chunks, np.int32)
    out_u = np.zeros(chunks, np.uint32)
    mod.get_function("dot16")(3, 128, (a, b, out_s, out_u, np.int32(chunks)))
    sa, sb = a.view(np.int8).astype(np.int64), b.view(np.int8).astype(np.int64)
    np.testing.assert_array_equal(out_s, (sa * sb).reshape(chunks, 16).sum(1))
    np.testing.assert_array_equal(out_u, (a.astype(np.int64) * b).reshape(chunks, 16).sum(1))


def test_misc_intrinsics(mod):
    v = np.array([0.5, -1.25, 2.0, -3.0], np.float32)
    out = np.zeros(17, np.float32)
    iout = np.zeros(4, np.int32)
    uout = np.zeros(4, np.uint32)
    mod.get_function("misc")(1, 32, (v, out, iout, uout))
    x, y, z, w = (float(t) for t in v)
    expect = [np.exp(x), np.exp(y), x / y, z ** -0.5, z ** 0.5, max(x, w), min(x, w), abs(w), x * y, x + y,
              1 / z, x * y + z, 1.0, -np.inf, y, w * w, 4.0]
    np.testing.assert_allclose(out, np.array(expect, np.float32), rtol=1e-6)
    np.testing.assert_array_equal(iout, [-3, 7, 0x3F800000, 1 + 4 + 9 + 16])
    np.testing.assert_array_equal(uout, [5, 0x77553311, 10, 250])


def test_atomics(mod):
    n = 1000
    x = np.random.default_rng(5).integers(0, 10_000, n).astype(np.int32)
    hist = np.zeros(16, np.int32)
    fsum = np.zeros(1, np.float32)
    imax = np.full(1, -1, np.int32)
    ucount = np.zeros(1, np.uint32)
    cas = np.zeros(1, np.int32)
    mod.get_function("atomics")(8, 128, (x, hist, fsum, imax, ucount, cas, np.int32(n)))
    np.testing.assert_array_equal(hist, np.bincount(x % 16, minlength=16))
    assert fsum[0] == n / 2 and imax[0] == x.max() and ucount[0] == n and cas[0] == x.sum()


# ---- the realistic kernel ------------------------------------------------------------------------

def test_qmatvec_q8_0(mod):
    rows, cols = 7, 96
    rng = np.random.default_rng(6)
    nb = cols // 32
    d = (rng.random((rows, nb)) * 0.02 + 0.001).astype(np.float16)
    q = rng.integers(-128, 128, (rows, nb, 32)).astype(np.int8)
    blocks = np.zeros((rows, nb), dtype=[("d", "<f2"), ("qs", "i1", 32)])
    blocks["d"], blocks["qs"] = d, q
    w = blocks.view(np.uint8).reshape(-1)
    assert w.size == rows * nb * 34
    x = rng.standard_normal(cols).astype(np.float32)
    y = np.zeros(rows, np.float32)
    warps_per_block = 2
    k = mod.get_function("qmatvec_q8_0")
    k(((rows + warps_per_block - 1) // warps_per_block,), (32 * warps_per_block,),
      (w, x, y, np.int32(rows), np.int32(cols)))
    wf = (d.astype(np.float64)[:, :, None] * q).reshape(rows, cols)
    np.testing.assert_allclose(y, wf @ x, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="launch_bounds"):
        k(1, 512, (w, x, y, np.int32(rows), np.int32(cols)))


# ---- catching bugs --------------------------------------------------------------------------------

def _typed_args():
    return [np.zeros(1, np.float32), np.zeros(1, np.float16), np.zeros(1, np.int32), np.zeros(1, np.uint8),
            np.zeros(1, np.int8), np.zeros(1, np.uint32), np.zeros(1, np.int64), np.full(1, 7, np.int8),
            np.zeros(1, np.uint8), np.int32(-5), np.uint32(4_000_000_000), np.int64(-2**40), np.float32(2.5)]


def test_correct_arguments_arrive(mod):
    args = _typed_args()
    mod.get_function("typed")(1, 32, tuple(args))
    assert args[0][0] == 2.5 and args[2][0] == -5 and args[5][0] == 4_000_000_000
    assert args[6][0] == -2**40 and args[3][0] == 7


@pytest.mark.parametrize("index, bad, match", [
    (9, 5, "'int n'.*Python int.*np.int32"),
    (12, 2.5, "'float x'.*Python float"),
    (12, np.float64(2.5), "'float x'.*np.float32.*float64"),
    (9, np.int64(5), "'int n'.*np.int32.*int64"),
    (10, np.int32(5), "'unsigned int un'.*np.uint32"),
    (11, np.int32(5), "'long long ln'.*np.int64"),
    (0, np.zeros(1, np.float64), "'float\\* f'.*float32.*float64"),
    (1, np.zeros(1, np.float32), "'__half\\* h'.*float16"),
    (2, np.zeros(1, np.int64), "'int\\* i32'.*int32"),
    (3, np.zeros(1, np.int8), "'unsigned char\\* u8'.*uint8"),
    (4, np.zeros(1, np.uint8), "'signed char\\* s8'.*int8"),
    (5, np.zeros(1, np.int32), "'unsigned int\\* u32'.*uint32"),
    (6, np.zeros(1, np.int32), "'long long\\* i64'.*int64"),
    (7, np.zeros(1, np.uint8), "'const int8_t\\* i8b'.*int8"),
    (8, np.zeros(1, np.int8), "'uint8_t\\* u8b'.*uint8"),
    (0, np.float32(1), "'float\\* f'.*pointer"),
    (9, np.zeros(1, np.int32), "'int n'.*by value"),
])
def test_argument_type_errors(mod, index, bad, match):
    args = _typed_args()
    args[index] = bad
    with pytest.raises(TypeError, match=match):
        mod.get_function("typed")(1, 32, tuple(args))


def test_argument_layout_errors(mod):
    k = mod.get_function("typed")
    args = _typed_args()
    with pytest.raises(TypeError, match="takes 13 arguments"):
        k(1, 32, tuple(args[:-1]))
    args[0] = np.zeros((4, 4), np.float32)[:, 1]
    with pytest.raises(ValueError, match="argument 0 .*contiguous"):
        k(1, 32, tuple(args))
    args = _typed_args()
    args[0] = np.zeros(8, np.uint8)[2:6].view(np.float32)     # float at an odd address
    with pytest.raises(ValueError, match="argument 0 .*aligned"):
        k(1, 32, tuple(args))
    args = _typed_args()
    args[2].flags.writeable = False
    with pytest.raises(ValueError, match="argument 2 .*read-only"):
        k(1, 32, tuple(args))
    with pytest.raises(TypeError, match="tuple"):
        k(1, 32, args[0])
    with pytest.raises(ValueError, match="1024"):
        k(1, 2048, tuple(_typed_args()))
    with pytest.raises(ValueError, match="shared_mem"):
        k(1, 32, tuple(_typed_args()), shared_mem=64 * 1024)


def test_uninitialised_shared_memory_is_poisoned(mod):
    out = np.zeros(6, np.float32)
    mod.get_function("read_unwritten")(3, 32, (out,), shared_mem=32 * 4)
    assert out[0] == 1.0                         # block 0 wrote s[0]
    assert np.isnan(out[1:]).all()               # later blocks and the dynamic buffer: poison


def test_reverse_schedule_exposes_missing_syncthreads(mod):
    x = np.arange(1, 129, dtype=np.float32)
    expect = np.concatenate([[0], x[:-1]])
    out = np.zeros(128, np.float32)
    mod.get_function("racy_shift", schedule="forward")(1, 128, (x, out))
    np.testing.assert_array_equal(out, expect)        # happens to work in thread order
    mod.get_function("racy_shift", schedule="reverse")(1, 128, (x, out))
    assert np.isnan(out[1:]).all()                   # reads the neighbour before it wrote


DEADLOCKS = r"""
extern "C" __global__ void half_skips(float* out) {
    if (threadIdx.x < 32) {
        __syncthreads();
    }
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}
extern "C" __global__ void warp_vs_block(float* out) {
    float v = 1.0f;
    if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffff, v, 1);
    else __syncthreads();
    out[threadIdx.x] = v;
}
extern "C" __global__ void trap(float* out) { if (threadIdx.x == 3) __trap(); out[threadIdx.x] = 1; }
"""


def test_deadlock_is_reported_not_hung():
    m = EmulatedModule(DEADLOCKS)
    out = np.zeros(64, np.float32)
    with pytest.raises(RuntimeError, match=r"deadlock in block \(0,0,0\).*threads 0-31: __syncthreads\(\) at "
                                           r"line 4; threads 32-63: __syncthreads\(\) at line 6"):
        run_with_timeout(lambda: m.get_function("half_skips")(1, 64, (out,)))
    with pytest.raises(RuntimeError, match=r"deadlock.*__shfl_xor_sync\(\) at line 11"):
        run_with_timeout(lambda: m.get_function("warp_vs_block")(2, 32, (out,)))
    with pytest.raises(RuntimeError, match=r"__trap\(\) called in thread \(3,0,0\)"):
        run_with_timeout(lambda: m.get_function("trap")(1, 32, (out,)))
    # the module is still usable after a failed launch
    with pytest.raises(RuntimeError, match="deadlock"):
        run_with_timeout(lambda: m.get_function("half_skips")(1, 64, (out,)))


def test_compile_error_shows_gxx_message():
    k = EmulatedKernel('extern "C" __global__ void broken(float* y) {\n  y[0] = undeclared_thing;\n}\n',
                       "broken")
    with pytest.raises(RuntimeError, match=r"(?s)compile failed.*kernel.cu:2:.*undeclared_thing"):
        k(1, 1, (np.zeros(1, np.float32),))
    with pytest.raises(RuntimeError, match="no kernel named 'nope'"):
        EmulatedModule("extern \"C\" __global__ void k(float* y) {}").get_function("nope")
    with pytest.raises(RuntimeError, match="no kernel named 'nope'.*found: k"):
        EmulatedKernel("extern \"C\" __global__ void k(float* y) {}", "nope")


def test_check_bounds_catches_out_of_bounds_write():
    src = r'''extern "C" __global__ void off_by_one(const float* x, float* y, int n) {
        int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i <= n) y[i] = 2.0f * x[i];      // bug: <= n
    }'''
    x = np.arange(40, dtype=np.float32)
    y = np.zeros(40, np.float32)
    with pytest.raises(RuntimeError, match=r"argument 1 \('y', 160 bytes\): out-of-bounds write to elements "
                                           r"40\.\.40 \(byte offsets 160\.\.163\)"):
        EmulatedKernel(src, "off_by_one", check_bounds=True)(1, 64, (x, y, np.int32(40)))
    np.testing.assert_array_equal(y, 2 * x)          # in-bounds results still copied back


def test_launch_speed(mod):
    k = mod.get_function("warp_sum")
    x = np.ones(64 * 128, np.float32)
    out = np.zeros(64, np.float32)
    lane = np.zeros_like(x)
    k(64, 128, (x, out, lane, np.int32(x.size)))          # warm up
    t0 = time.perf_counter()
    k(64, 128, (x, out, lane, np.int32(x.size)))
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"64 blocks x 128 threads took {elapsed:.2f} s"
    np.testing.assert_array_equal(out, 128)

"""Tests of the CPU CUDA emulator in course_lib/cuda/emulator (used by chapter 09's kernel tests
on machines without a GPU). Each test compares the emulator against numpy or checks that
a bug is reported; each fails if the emulator gets that behaviour wrong."""

import ctypes
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from course_lib.cuda.emulator import EmulatedKernel, EmulatedModule, emulator_available, run_in_every_block_order

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


# ---- misaligned loads and stores fault, as on a GPU ----------------------------------------------

ALIGNMENT = r"""
static_assert(alignof(float4) == 16 && alignof(uint4) == 16 && alignof(int4) == 16 && alignof(double2) == 16, "");
static_assert(alignof(float2) == 8 && alignof(int2) == 8 && alignof(uint2) == 8 && alignof(longlong2) == 16, "");
static_assert(alignof(__half2) == 4 && alignof(char4) == 4 && alignof(short4) == 8 && alignof(float3) == 4, "");
static_assert(sizeof(float3) == 12 && sizeof(__half2) == 4 && sizeof(double4) == 32, "");

// Each kernel loads or stores through a pointer at byte offset `off`; off = 0 is aligned.
extern "C" __global__ void load_uint4(const unsigned char* b, unsigned* out, int off) {
    uint4 v = *reinterpret_cast<const uint4*>(b + off + 16 * threadIdx.x);
    out[threadIdx.x] = v.x ^ v.w;
}
extern "C" __global__ void load_float4(const float* x, float* out, int off) {
    float4 v = reinterpret_cast<const float4*>(x + off)[threadIdx.x];
    out[threadIdx.x] = v.x + v.y + v.z + v.w;
}
extern "C" __global__ void store_float2(float* y, int off) {
    reinterpret_cast<float2*>(y + off)[threadIdx.x] = make_float2(1.0f, 2.0f);
}
extern "C" __global__ void load_int2(const int* x, int* out, int off) {
    int2 v = *reinterpret_cast<const int2*>(x + off + 2 * threadIdx.x);
    out[threadIdx.x] = v.x + v.y;
}
extern "C" __global__ void load_int_bytes(const unsigned char* b, int* out, int off) {
    out[threadIdx.x] = *reinterpret_cast<const int*>(b + off + 4 * threadIdx.x);
}
extern "C" __global__ void ldg_uint4(const unsigned char* b, unsigned* out, int off) {
    uint4 v = __ldg(reinterpret_cast<const uint4*>(b + off) + threadIdx.x);
    out[threadIdx.x] = v.x ^ v.w;
}
"""


@pytest.fixture(scope="module")
def align_mod():
    with pytest.MonkeyPatch.context() as mp:            # on, even where a suite turned it off
        mp.setenv("COURSE_CUDA_EMULATOR_ALIGNMENT", "1")
        return EmulatedModule(ALIGNMENT).compile()


def _alignment_case(name):
    """(args for byte offset `off`, expected output for off = 0) of each ALIGNMENT kernel."""
    b = np.arange(512, dtype=np.uint32).astype(np.uint8)
    f = np.arange(128, dtype=np.float32)
    i = np.arange(128, dtype=np.int32)
    words = b[:16 * 4].view(np.uint32).reshape(4, 4)
    cases = {
        "load_uint4": (lambda off: (b, np.zeros(4, np.uint32), np.int32(off)), words[:, 0] ^ words[:, 3]),
        "ldg_uint4": (lambda off: (b, np.zeros(4, np.uint32), np.int32(off)), words[:, 0] ^ words[:, 3]),
        "load_float4": (lambda off: (f, np.zeros(4, np.float32), np.int32(off)), f[:16].reshape(4, 4).sum(1)),
        "store_float2": (lambda off: (np.zeros(16, np.float32), np.int32(off)), None),
        "load_int2": (lambda off: (i, np.zeros(4, np.int32), np.int32(off)), i[:8].reshape(4, 2).sum(1)),
        "load_int_bytes": (lambda off: (b, np.zeros(4, np.int32), np.int32(off)), b[:16].view(np.int32)),
    }
    return cases[name]


@pytest.mark.parametrize("name, off, match", [
    ("load_uint4", 4, r"misaligned load of 'const uint4' at address 0x[0-9a-f]+: needs 16-byte alignment, "
                      r"a GPU faults here \(line 9, thread \(0,0,0\) of block \(0,0,0\)\)"),
    ("load_uint4", 8, r"misaligned load of 'const uint4'.*16-byte alignment"),
    ("ldg_uint4", 4, r"misaligned __ldg of 'const uint4' at .*16-byte alignment.*\(line 27, thread \(0,0,0\)"),
    ("load_float4", 2, r"misaligned load of 'const float4'.*16-byte alignment.*line 13"),
    ("store_float2", 1, r"misaligned store to 'float2'.*8-byte alignment.*line 17"),
    ("load_int2", 1, r"misaligned load of 'const int2'.*8-byte alignment.*line 20"),
    ("load_int_bytes", 1, r"misaligned load of 'const int'.*4-byte alignment.*line 24"),
    ("load_int_bytes", 2, r"misaligned load of 'const int'.*4-byte alignment"),
])
def test_misaligned_access_faults(align_mod, name, off, match):
    make_args, expect = _alignment_case(name)
    k = align_mod.get_function(name, schedule="forward")
    with pytest.raises(RuntimeError, match=f"{name}<<<.*>>>: {match}"):
        k(1, 4, make_args(off))
    args = make_args(0)                  # the same kernel, aligned: runs and is right
    k(1, 4, args)
    if expect is not None:
        np.testing.assert_array_equal(args[1], expect)
    else:
        np.testing.assert_array_equal(args[0][:8], [1, 2] * 4)


def test_alignment_check_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("COURSE_CUDA_EMULATOR_ALIGNMENT", "0")
    m = EmulatedModule(ALIGNMENT).compile()
    assert not m.check_alignment
    monkeypatch.delenv("COURSE_CUDA_EMULATOR_ALIGNMENT")
    on = EmulatedModule(ALIGNMENT).compile()
    assert on.check_alignment and on.so_path != m.so_path       # part of the build's cache key
    b = np.arange(512, dtype=np.uint32).astype(np.uint8)
    out = np.zeros(4, np.uint32)
    m.get_function("load_uint4")(1, 4, (b, out, np.int32(4)))    # the CPU does not mind
    words = b[4:4 + 64].view(np.uint32).reshape(4, 4)
    np.testing.assert_array_equal(out, words[:, 0] ^ words[:, 3])


# ---- check_bounds: reads past the end and writes outside fault ------------------------------------

BOUNDS = r"""
extern "C" __global__ void scale(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = 2.0f * x[i];
}
extern "C" __global__ void read_next(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i + 1];                    // bug: x[n] for i = n - 1
}
extern "C" __global__ void write_to(float* y, int n, int shift) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i + shift] = 1.0f;                // shift 1: y[n]; shift -1: y[-1]
}
extern "C" __global__ void read_at(const float* x, float* y, int k) {
    if (threadIdx.x == 0) y[0] = x[k];
}
// y = residual + W a, with y and residual the same array when done in place.
extern "C" __global__ void residual_matvec(const float* W, const float* a, const float* residual, float* y,
                                           int rows, int cols) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float acc = 0.0f;
    for (int c = 0; c < cols; ++c) acc += W[r * cols + c] * a[c];
    y[r] = residual[r] + acc;
}
__device__ int deep(int n, volatile char* sink) {
    char buf[512];
    buf[n % 512] = (char)n;
    sink[0] = buf[(n * 7) % 512];
    return n == 0 ? 0 : deep(n - 1, sink) + buf[n % 512];
}
extern "C" __global__ void recurse(int* out, int depth) {
    volatile char sink[1];
    out[threadIdx.x] = deep(depth, sink);
}
"""


@pytest.fixture(scope="module")
def bounds_mod():
    return EmulatedModule(BOUNDS).compile()


def test_check_bounds_passes_a_correct_kernel(bounds_mod):
    k = bounds_mod.get_function("scale", check_bounds=True)
    for n in (40, 64, 3, 1000):                     # with and without slack after the data
        x = np.arange(n, dtype=np.float32)
        y = np.zeros(n, np.float32)
        k(((n + 63) // 64,), (64,), (x, y, np.int32(n)))
        np.testing.assert_array_equal(y, 2 * x)


def test_check_bounds_catches_read_past_the_end(bounds_mod):
    x = np.arange(40, dtype=np.float32)
    y = np.zeros(40, np.float32)
    bounds_mod.get_function("read_next", check_bounds=False)(1, 64, (x, y, np.int32(40)))  # no error
    k = bounds_mod.get_function("read_next", check_bounds=True, schedule="forward")
    with pytest.raises(RuntimeError, match=r"read_next<<<\(1, 1, 1\), \(64, 1, 1\)>>>: out-of-bounds read of "
                                           r"argument 0 \('x', 160 bytes\): the access reached byte offset 160 "
                                           r"\(element 40\), past its end, in thread \(39,0,0\) of block \(0,0,0\)"):
        k(1, 64, (x, y, np.int32(40)))
    np.testing.assert_array_equal(y[:39], x[1:])     # what ran before the fault is copied back
    # the module and the process are fine afterwards
    k2 = bounds_mod.get_function("scale", check_bounds=True)
    k2(1, 64, (x, y, np.int32(40)))
    np.testing.assert_array_equal(y, 2 * x)


def test_check_bounds_catches_out_of_bounds_writes(bounds_mod):
    k = bounds_mod.get_function("write_to", check_bounds=True)
    y = np.zeros(40, np.float32)
    # past the end: the write reaches the protected page at once
    with pytest.raises(RuntimeError, match=r"out-of-bounds write to argument 0 \('y', 160 bytes\): the access "
                                           r"reached byte offset 160 \(element 40\), past its end, in thread "
                                           r"\(39,0,0\) of block \(0,0,0\)"):
        k(1, 64, (y, np.int32(40), np.int32(1)))
    # before the start: found afterwards in the guard bytes
    y = np.zeros(40, np.float32)
    with pytest.raises(RuntimeError, match=r"write_to<<<.*>>>: argument 0 \('y', 160 bytes\): out-of-bounds "
                                           r"write to elements -1\.\.-1 \(byte offsets -4\.\.-1\)"):
        k(1, 64, (y, np.int32(40), np.int32(-1)))
    np.testing.assert_array_equal(y[:39], 1)           # in-bounds results still copied back


def test_check_bounds_limits(bounds_mod):
    """What is not caught, as the README says: reads of the slack after arrays whose size is
    not a multiple of 16 bytes, and reads of the guard bytes before the start."""
    k = bounds_mod.get_function("read_at", check_bounds=True)
    x = np.arange(3, dtype=np.float32)                 # 12 bytes: 4 bytes of slack
    y = np.zeros(1, np.float32)
    k(1, 1, (x, y, np.int32(3)))
    assert y.view(np.uint32)[0] == 0xA5A5A5A5
    with pytest.raises(RuntimeError, match=r"out-of-bounds read of argument 0 \('x', 12 bytes\).*offset 16 "
                                           r"\(element 4\), past its end"):
        k(1, 1, (x, y, np.int32(4)))
    k(1, 1, (x, y, np.int32(-100)))                    # 400 bytes before the start
    assert y.view(np.uint32)[0] == 0xA5A5A5A5
    # past the guard bytes, the protected page in front of them faults
    page = mmap.PAGESIZE
    guard = -(-(4096 + 16) // page) * page - 16        # 0xA5 bytes in front of the 16 (padded) bytes
    with pytest.raises(RuntimeError, match=r"out-of-bounds read of argument 0 \('x', 12 bytes\).*before its start"):
        k(1, 1, (x, y, np.int32(-(guard + page // 2) // 4)))


def test_check_bounds_shares_exactly_aliased_arguments(bounds_mod):
    k = bounds_mod.get_function("residual_matvec", check_bounds=True)
    rng = np.random.default_rng(7)
    rows, cols = 16, 8
    W = rng.standard_normal((rows, cols)).astype(np.float32)
    a = rng.standard_normal(cols).astype(np.float32)
    y = rng.standard_normal(rows).astype(np.float32)
    expect = y + W @ a
    k(1, 32, (W, a, y, y, np.int32(rows), np.int32(cols)))             # in place: y += W a
    np.testing.assert_allclose(y, expect, rtol=1e-5, atol=1e-5)
    # one copy for both, named together when something goes wrong
    W17 = np.concatenate([W, W[:1]])                                  # one row too many
    with pytest.raises(RuntimeError, match=r"out-of-bounds read of arguments 2 \('residual'\) and 3 \('y'\) "
                                           r"\(the same 64 bytes\): the access reached byte offset 64"):
        k(1, 32, (W17, a, y, y, np.int32(rows + 1), np.int32(cols)))
    with pytest.raises(ValueError, match=r"arguments 2 \('residual'\) and 3 \('y'\) overlap partly"):
        k(1, 32, (W, a, y[1:], y[:-1], np.int32(rows - 1), np.int32(cols)))


def test_check_bounds_default_from_environment(bounds_mod, monkeypatch):
    monkeypatch.setenv("COURSE_CUDA_EMULATOR_CHECK_BOUNDS", "1")
    k = bounds_mod.get_function("read_next")
    assert k.check_bounds
    x, y = np.arange(8, dtype=np.float32), np.zeros(8, np.float32)
    with pytest.raises(RuntimeError, match="out-of-bounds read of argument 0"):
        k(1, 8, (x, y, np.int32(8)))
    assert not bounds_mod.get_function("read_next", check_bounds=False).check_bounds
    monkeypatch.setenv("COURSE_CUDA_EMULATOR_CHECK_BOUNDS", "0")
    assert not bounds_mod.get_function("read_next").check_bounds


def _segv_handler() -> int:
    """The address of the process's current SIGSEGV handler (its sa_handler field)."""
    libc = ctypes.CDLL(None)
    act = ctypes.create_string_buffer(256)                  # struct sigaction, handler first
    assert libc.sigaction(signal.SIGSEGV, None, act) == 0
    return ctypes.c_void_p.from_buffer(act).value or 0


def test_fault_handler_only_during_launch(bounds_mod):
    before = _segv_handler()
    x, y = np.arange(8, dtype=np.float32), np.zeros(8, np.float32)
    bounds_mod.get_function("scale")(1, 8, (x, y, np.int32(8)))
    assert _segv_handler() == before
    with pytest.raises(RuntimeError, match="out-of-bounds"):
        bounds_mod.get_function("read_next", check_bounds=True)(1, 8, (x, y, np.int32(8)))
    assert _segv_handler() == before


def test_fiber_stack_overflow_is_reported(bounds_mod):
    k = bounds_mod.get_function("recurse", stack_size=64 * 1024, schedule="forward")
    out = np.zeros(2, np.int32)
    k(1, 2, (out, np.int32(20)))                       # about 11 KiB of stack: fine
    with pytest.raises(RuntimeError, match=r"stack overflow in thread \(0,0,0\) of block \(0,0,0\): it needs "
                                           r"more than stack_size=65536 bytes"):
        k(1, 2, (out, np.int32(1000)))
    k(1, 2, (out, np.int32(20)))                       # and the module still works


def test_other_faults_still_crash_the_process(tmp_path):
    """A fault outside the emulator's guard pages is not turned into an error: the process
    dies of SIGSEGV as it would without the handler."""
    script = tmp_path / "wild.py"
    script.write_text(
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from course_lib.cuda.emulator import EmulatedKernel\n"
        "src = 'extern \"C\" __global__ void wild(float* y) { ((float*)(unsigned long)16)[0] = y[0]; }'\n"
        "EmulatedKernel(src, 'wild', check_bounds=True)(1, 1, (np.zeros(1, np.float32),))\n"
        "print('survived')\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONFAULTHANDLER": ""})
    assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stdout, r.stderr)
    assert "survived" not in r.stdout


# ---- block order -----------------------------------------------------------------------------------

BLOCKS = r"""
// Bug: block b reads what block b - 1 wrote (a running sum across blocks).
extern "C" __global__ void chained(float* x) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (blockIdx.x > 0) x[i] += x[i - blockDim.x];
}
// Correct: every block works on its own elements.
extern "C" __global__ void independent(const float* x, float* y) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    y[i] = 3.0f * x[i] + 1.0f;
}
// Records the position at which each block ran.
extern "C" __global__ void record_order(int* position, int* counter) {
    if (threadIdx.x == 0) {
        int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
        position[b] = atomicAdd(counter, 1);
    }
}
"""


@pytest.fixture(scope="module")
def blocks_mod():
    return EmulatedModule(BLOCKS).compile()


def _block_positions(kernel, grid):
    n = int(np.prod(grid))
    position, counter = np.full(n, -1, np.int32), np.zeros(1, np.int32)
    kernel(grid, 32, (position, counter))
    return position


def test_block_orders(blocks_mod):
    n = 24
    forward = blocks_mod.get_function("record_order", block_order="forward")
    assert (_block_positions(forward, (n,)) == np.arange(n)).all()
    rev = _block_positions(blocks_mod.get_function("record_order", block_order="reverse"), (n,))
    assert (rev == np.arange(n)[::-1]).all()
    k = blocks_mod.get_function("record_order", block_order="random")
    shuffles = [_block_positions(k, (4, 3, 2)) for _ in range(3)]
    for p in shuffles:
        assert sorted(p) == list(range(n))             # every block exactly once
    assert not (shuffles[0] == np.arange(n)).all()
    assert not (shuffles[0] == shuffles[1]).all()      # a new shuffle per launch


def test_block_order_default_from_environment(blocks_mod, monkeypatch):
    monkeypatch.setenv("COURSE_CUDA_EMULATOR_BLOCK_ORDER", "reverse")
    k = blocks_mod.get_function("record_order")
    assert k.block_order == "reverse"
    assert (_block_positions(k, (5,)) == np.arange(5)[::-1]).all()
    monkeypatch.setenv("COURSE_CUDA_EMULATOR_BLOCK_ORDER", "sideways")
    with pytest.raises(ValueError, match=r"block_order must be one of.*'sideways' \(from "
                                         r"\$COURSE_CUDA_EMULATOR_BLOCK_ORDER\)"):
        blocks_mod.get_function("record_order")


def test_block_order_exposes_inter_block_dependence(blocks_mod):
    x0 = np.ones(4 * 32, np.float32)
    results = {}
    for order in ("forward", "reverse"):
        x = x0.copy()
        blocks_mod.get_function("chained", block_order=order)(4, 32, (x,))
        results[order] = x.reshape(4, 32)[:, 0]
    np.testing.assert_array_equal(results["forward"], [1, 2, 3, 4])    # "works" in index order
    np.testing.assert_array_equal(results["reverse"], [1, 2, 2, 2])


def test_run_in_every_block_order(blocks_mod):
    n = 8 * 32
    x = np.random.default_rng(8).standard_normal(n).astype(np.float32)
    y = run_in_every_block_order(blocks_mod.get_function("independent"), 8, 32,
                                 lambda: (x, np.zeros(n, np.float32)), lambda args: args[1])
    np.testing.assert_array_equal(y, 3 * x + 1)
    with pytest.raises(RuntimeError, match=r"chained<<<\(8, 1, 1\), \(32, 1, 1\)>>>: the results depend on the "
                                           r"order in which blocks run \('reverse' differs from 'forward': "
                                           r"192 of 256 elements, first at index \(64,\): 3\.0 vs 2\.0; 'random' differs from 'forward'"):
        run_in_every_block_order(blocks_mod.get_function("chained"), 8, 32,
                                 lambda: (np.ones(n, np.float32),), lambda args: args[0])


# ---- registers and shared memory per launch ----------------------------------------------------------

RESOURCES = r"""
extern "C" __global__ void qmatvec_q4_0(float* y) { y[threadIdx.x] = (float)threadIdx.x; }
extern "C" __global__ void uses_shared(float* y) {
    extern __shared__ float buf[];
    buf[threadIdx.x] = 1.0f;
    __syncthreads();
    y[threadIdx.x] = buf[threadIdx.x];
}
extern "C" __global__ void unknown(float* y) { y[threadIdx.x] = 1.0f; }
"""


def test_register_budget():
    y = np.zeros(1024, np.float32)
    m = EmulatedModule(RESOURCES, resources={"qmatvec_q4_0": {"registers": 80, "shared": 0, "local": 16}})
    k = m.get_function("qmatvec_q4_0")
    assert (k.num_regs, k.shared_size_bytes, k.local_size_bytes, k.max_threads_per_block) == (80, 0, 16, 800)
    k(1, 768, (y,))
    k(1, 800, (y,))
    with pytest.raises(RuntimeError, match=r"qmatvec_q4_0<<<\(1, 1, 1\), \(832, 1, 1\)>>>: too many resources "
                                           r"requested for launch: 80 registers per thread x 832 threads = 66560 "
                                           r"registers \(allocated per warp in units of 256\) > 65536 per block"):
        k(1, 832, (y,))
    # 81 registers: 2592 per warp, rounded up to 2816, so 800 threads need 70400 (not 81 x 800 = 64800)
    k81 = EmulatedModule(RESOURCES, resources={"qmatvec_q4_0": {"registers": 81}}).get_function("qmatvec_q4_0")
    assert k81.max_threads_per_block == 736
    with pytest.raises(RuntimeError, match=r"81 registers per thread x 800 threads = 70400 registers"):
        k81(1, 800, (y,))
    k64 = EmulatedModule(RESOURCES, resources={"qmatvec_q4_0": {"registers": 64}}).get_function("qmatvec_q4_0")
    assert k64.max_threads_per_block == 1024
    k64(1, 1024, (y,))
    np.testing.assert_array_equal(y, np.arange(1024))
    u = m.get_function("unknown")                      # no entry: nothing known, nothing refused
    assert (u.num_regs, u.shared_size_bytes, u.local_size_bytes, u.max_threads_per_block) == (None, 0, 0, 1024)
    u(1, 1024, (y,))
    with pytest.raises(ValueError, match="at most 255"):
        EmulatedModule(RESOURCES, resources={"unknown": {"registers": 300}})


def test_shared_memory_budget():
    y = np.zeros(256, np.float32)
    res = {"uses_shared": {"registers": 16, "shared": 16 * 1024, "local": 0}}
    k = EmulatedModule(RESOURCES, resources=res).get_function("uses_shared")
    assert k.max_dynamic_shared_size_bytes == 32 * 1024          # 48 KiB in all, static included
    k(1, 256, (y,), shared_mem=32 * 1024)
    with pytest.raises(ValueError, match=r"shared_mem=33792 bytes exceeds max_dynamic_shared_size_bytes=32768 "
                                         r"\(static 16384 \+ dynamic 33792 = 50176 bytes\)"):
        k(1, 256, (y,), shared_mem=33 * 1024)
    k.max_dynamic_shared_size_bytes = 211 * 1024                 # opting in, as with CuPy: 227 KiB on sm_90
    k(1, 256, (y,), shared_mem=211 * 1024)
    np.testing.assert_array_equal(y, 1)
    k.max_dynamic_shared_size_bytes = 212 * 1024
    with pytest.raises(ValueError, match=r"max_dynamic_shared_size_bytes=217088 plus 16384 bytes of static "
                                         r"__shared__ exceeds the 232448 bytes .* on sm_90"):
        k(1, 256, (y,), shared_mem=0)
    k80 = EmulatedModule(RESOURCES, options=("-arch=sm_80",), resources=res).get_function("uses_shared")
    k80.max_dynamic_shared_size_bytes = 148 * 1024               # 163 KiB on sm_80
    with pytest.raises(ValueError, match=r"exceeds the 166912 bytes .* on sm_80"):
        k80(1, 256, (y,))

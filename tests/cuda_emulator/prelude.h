// prelude.h -- makes CUDA C kernel source compile as ordinary C++ (g++ -include prelude.h)
// and run on the CPU. Used by tests/cuda_emulator/__init__.py; see README.md there.
//
// Execution model, in one paragraph: a launch runs the blocks of the grid one after
// another on one OS thread. Inside a block every CUDA thread is a cooperative fiber
// (ucontext, own stack). A fiber runs until it reaches a barrier (__syncthreads, a warp
// collective such as __shfl_xor_sync) or returns; when every fiber of the block is
// blocked or finished, the scheduler resolves whatever barrier can complete (it computes
// the results of a warp collective centrally, so there is no slot reuse to worry about)
// and resumes the fibers. If nothing can complete, that is a deadlock and the launch fails
// with a description of who waits where. Because only one fiber runs at a time and
// switches only happen at barriers, atomics are plain read-modify-write.
#pragma once
#define __CUDA_EMULATOR__ 1
// Kernels take the device-code path of #if __CUDA_ARCH__ and the NVRTC path (CuPy compiles
// RawKernel/RawModule source with NVRTC), as they would on the GPU.
#define __CUDACC__ 1
#define __CUDACC_RTC__ 1
#define __CUDA_ARCH__ 800
// Source that still #includes the CUDA headers compiles: the Python side blanks those
// lines, and these guards cover the usual header guards in case one slips through.
#define __CUDA_FP16_H__
#define __CUDA_FP16_HPP__

#include <stdint.h>
#include <stdlib.h>
#include <stddef.h>
#include <string.h>
#include <stdio.h>
#include <math.h>
#include <float.h>
#include <limits.h>
#include <ucontext.h>
#include <sys/mman.h>
#include <utility>
#include <type_traits>
#include <string>

// ---- keywords ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
// Function-local __shared__ variables become `static`: one copy, shared by all fibers of
// the running block (blocks run one at a time). The Python side also rewrites simple
// function-local declarations to poison them with 0xFF at the start of every block, and
// rewrites `extern __shared__ T buf[];` to a reference to the per-launch dynamic buffer.
#define __shared__ static

// ---- built-in vector types (sizes and alignments as in CUDA's vector_types.h) -------------
struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
    dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct __attribute__((aligned(8))) float2 { float x, y; };
struct float3 { float x, y, z; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(8))) int2 { int x, y; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct __attribute__((aligned(8))) uint2 { unsigned int x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned int x, y, z, w; };
struct __attribute__((aligned(4))) char4 { signed char x, y, z, w; };
struct __attribute__((aligned(4))) uchar4 { unsigned char x, y, z, w; };
struct __attribute__((aligned(2))) uchar2 { unsigned char x, y; };
struct __attribute__((aligned(4))) short2 { short x, y; };
struct __attribute__((aligned(4))) ushort2 { unsigned short x, y; };
struct __attribute__((aligned(16))) double2 { double x, y; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline char4 make_char4(signed char x, signed char y, signed char z, signed char w) { return {x, y, z, w}; }
inline uchar4 make_uchar4(unsigned char x, unsigned char y, unsigned char z, unsigned char w) { return {x, y, z, w}; }

// ---- fp16: exact software IEEE binary16 conversion, round-to-nearest-even -----------------
// NaN payloads follow numpy (truncated, kept non-zero); a GPU returns a canonical NaN.
namespace __emu {
inline float bits_to_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
inline float half_bits_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
    if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));   // inf / NaN
    if (exp == 0) {
        if (man == 0) return bits_to_float(sign);                               // +-0
        int e = -1;                                                             // subnormal:
        do { man <<= 1; ++e; } while (!(man & 0x400u));                         // normalise
        return bits_to_float(sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13));
    }
    return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}
inline uint16_t float_to_half_bits(float f) {
    uint32_t u = float_to_bits(f), sign = (u >> 16) & 0x8000u, exp = (u >> 23) & 0xffu;
    uint32_t man = u & 0x7fffffu;
    if (exp == 0xff) {                                                          // inf / NaN
        if (man == 0) return (uint16_t)(sign | 0x7c00u);
        uint32_t m = man >> 13;
        return (uint16_t)(sign | 0x7c00u | (m ? m : 1u));
    }
    int e = (int)exp - 127 + 15;
    if (e >= 0x1f) return (uint16_t)(sign | 0x7c00u);                           // overflow
    if (e <= 0) {                                                               // subnormal
        if (e < -10) return (uint16_t)sign;                                     // < half ulp
        man |= 0x800000u;                                                       // implicit 1
        int shift = 14 - e;                                                     // 14..24
        uint32_t q = man >> shift, rem = man & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (q & 1u))) ++q;                 // may become
        return (uint16_t)(sign | q);                                            // min normal
    }
    uint32_t q = ((uint32_t)e << 10) | (man >> 13), rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ++q;                     // may carry to inf
    return (uint16_t)(sign | q);
}
}  // namespace __emu

struct __half {
    unsigned short __x;
    __half() = default;                                   // trivial: fine in structs/shared
    __half(float f) : __x(__emu::float_to_half_bits(f)) {}
    operator float() const { return __emu::half_bits_to_float(__x); }
};
typedef __half half;
struct __half2 { __half x, y; };
inline float __half2float(__half h) { return __emu::half_bits_to_float(h.__x); }
inline __half __float2half(float f) { __half h; h.__x = __emu::float_to_half_bits(f); return h; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return (short)h.__x; }
inline __half __ushort_as_half(unsigned short u) { __half h; h.__x = u; return h; }
inline __half __short_as_half(short s) { __half h; h.__x = (unsigned short)s; return h; }
inline float __low2float(__half2 v) { return __half2float(v.x); }
inline float __high2float(__half2 v) { return __half2float(v.y); }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half(a), __float2half(b)}; }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }

// ---- math and bit intrinsics --------------------------------------------------------------
// The fast GPU versions (__expf, rsqrtf, __fdividef, ...) are approximate on the device and
// exact here; compare with tolerances.
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x == x ? x : 0.0f)); }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline long long __double_as_longlong(double d) { long long i; memcpy(&i, &d, 8); return i; }
inline double __longlong_as_double(long long i) { double d; memcpy(&d, &i, 8); return d; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
// CUDA's overloaded integer min/max (host C++ has only std::min / fminf).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(int a, unsigned b) { return min((unsigned)a, b); }
inline unsigned max(int a, unsigned b) { return max((unsigned)a, b); }
inline unsigned min(unsigned a, int b) { return min(a, (unsigned)b); }
inline unsigned max(unsigned a, int b) { return max(a, (unsigned)b); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
// __dp4a: dot product of the four bytes of a and b, plus c, wrapping like 32-bit hardware.
inline int __dp4a(int a, int b, int c) {
    uint32_t acc = (uint32_t)c;
    for (int i = 0; i < 4; ++i)
        acc += (uint32_t)((int)(int8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i)));
    return (int)acc;
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
    for (int i = 0; i < 4; ++i) c += ((a >> (8 * i)) & 0xffu) * ((b >> (8 * i)) & 0xffu);
    return c;
}
inline int __dp4a(char4 a, char4 b, int c) { int x, y; memcpy(&x, &a, 4); memcpy(&y, &b, 4); return __dp4a(x, y, c); }
inline unsigned __dp4a(uchar4 a, uchar4 b, unsigned c) { unsigned x, y; memcpy(&x, &a, 4); memcpy(&y, &b, 4); return __dp4a(x, y, c); }
// __byte_perm: result byte n is byte (s >> 4n) & 7 of the 8-byte value {y:x}.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    unsigned long long v = ((unsigned long long)y << 32) | x;
    unsigned r = 0;
    for (int n = 0; n < 4; ++n) r |= (unsigned)((v >> (8 * ((s >> (4 * n)) & 7))) & 0xff) << (8 * n);
    return r;
}
template <class T> inline T __ldg(const T* p) { return *p; }
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __nanosleep(unsigned) {}

// ---- atomics: fibers never switch inside these, so plain read-modify-write is atomic -------
#define __EMU_ATOMIC(NAME, T, EXPR) inline T NAME(T* p, T v) { T old = *p; *p = (EXPR); return old; }
#define __EMU_ATOMIC_ALL_INT(NAME, EXPR) __EMU_ATOMIC(NAME, int, EXPR) __EMU_ATOMIC(NAME, unsigned, EXPR) \
    __EMU_ATOMIC(NAME, unsigned long long, EXPR) __EMU_ATOMIC(NAME, long long, EXPR)
__EMU_ATOMIC_ALL_INT(atomicAdd, (decltype(v))(old + v))
__EMU_ATOMIC(atomicAdd, float, old + v)
__EMU_ATOMIC(atomicAdd, double, old + v)
__EMU_ATOMIC_ALL_INT(atomicSub, (decltype(v))(old - v))
__EMU_ATOMIC_ALL_INT(atomicMax, old > v ? old : v)
__EMU_ATOMIC_ALL_INT(atomicMin, old < v ? old : v)
__EMU_ATOMIC_ALL_INT(atomicAnd, old & v)
__EMU_ATOMIC_ALL_INT(atomicOr, old | v)
__EMU_ATOMIC_ALL_INT(atomicXor, old ^ v)
__EMU_ATOMIC_ALL_INT(atomicExch, v)
__EMU_ATOMIC(atomicExch, float, v)
#undef __EMU_ATOMIC_ALL_INT
#undef __EMU_ATOMIC
inline unsigned atomicInc(unsigned* p, unsigned v) { unsigned old = *p; *p = old >= v ? 0 : old + 1; return old; }
template <class T> inline T atomicCAS(T* p, T compare, T val) { T old = *p; if (old == compare) *p = val; return old; }
inline unsigned short atomicCAS(unsigned short* p, unsigned short c, unsigned short v) { unsigned short o = *p; if (o == c) *p = v; return o; }

// ---- the scheduler --------------------------------------------------------------------------
namespace __emu {
enum State { RUNNABLE, AT_SYNC, AT_WARP, DONE };
enum WarpOp { W_SHFL, W_UP, W_DOWN, W_XOR, W_BALLOT, W_ANY, W_ALL, W_SYNCWARP };
static const char* const warp_op_names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
    "__shfl_xor_sync", "__ballot_sync", "__any_sync", "__all_sync", "__syncwarp"};

struct Fiber {
    ucontext_t ctx;
    uint3 tid;
    int state, line;           // line: source line of the barrier it waits at
    int op, param, width, size;
    unsigned mask;
    unsigned long long value, result;   // raw bits of a warp collective's operand / result
};

struct Launch {
    void (*body)(void*) = nullptr;      // runs the kernel once, as the current fiber
    void* body_ctx = nullptr;
    Fiber* fibers = nullptr;
    Fiber* cur = nullptr;
    int nthreads = 0;
    ucontext_t sched;
    uint3 blockIdx{0, 0, 0};
    dim3 blockDim, gridDim;
    bool failed = false;
    std::string error;
};
static Launch g;                        // one per compiled module; Python serialises launches
static void* dyn_smem = nullptr;        // `extern __shared__` arrays are references to this
static unsigned long long epoch = 0;    // counts blocks over all launches, for per-block
                                        // poisoning of __shared__ variables

// Stop the whole launch with an error (from inside a fiber); never returns.
[[noreturn]] inline void fail(const std::string& msg) {
    g.failed = true;
    if (g.error.empty()) g.error = msg;
    g.cur->state = DONE;
    swapcontext(&g.cur->ctx, &g.sched);
    __builtin_unreachable();
}
inline void block_here(int state, int line) {
    g.cur->state = state;
    g.cur->line = line;
    swapcontext(&g.cur->ctx, &g.sched);           // back when the scheduler resolved it
}

inline void poison_shared(void* p, size_t n, unsigned long long& seen_epoch) {
    if (seen_epoch != epoch) { memset(p, 0xff, n); seen_epoch = epoch; }
}

// __syncthreads and its counting variants; mode 0 plain, 1 count, 2 and, 3 or.
inline int syncthreads(int line, int mode = 0, int pred = 0) {
    g.cur->op = mode;
    g.cur->value = pred != 0;
    block_here(AT_SYNC, line);
    return (int)g.cur->result;
}

template <class T> inline unsigned long long to_bits(T v) {
    static_assert(sizeof(T) <= 8, "warp shuffle of a type larger than 8 bytes");
    unsigned long long u = 0; memcpy(&u, &v, sizeof(T)); return u;
}
template <class T> inline T from_bits(unsigned long long u) { T v; memcpy(&v, &u, sizeof(T)); return v; }

inline unsigned long long warp_op(int line, int op, unsigned mask, unsigned long long value,
                                  int param, int width, int size) {
    Fiber* f = g.cur;
    f->op = op; f->mask = mask; f->value = value; f->param = param; f->width = width; f->size = size;
    block_here(AT_WARP, line);
    return f->result;
}
template <class T> inline T shfl(int line, int op, unsigned mask, T v, int param, int width = 32) {
    return from_bits<T>(warp_op(line, op, mask, to_bits(v), param, width, (int)sizeof(T)));
}

inline unsigned lane_of(const Fiber* f) {
    unsigned linear = f->tid.x + g.blockDim.x * (f->tid.y + g.blockDim.y * f->tid.z);
    return linear % 32;
}

// Which lane a shuffle reads from, or -1 for "own value" (CUDA's rules for width segments).
inline int shfl_source(int op, int lane, int param, int width) {
    if (width <= 0 || width > 32 || (width & (width - 1))) width = 32;
    int base = lane & ~(width - 1);
    switch (op) {
        case W_SHFL: return base + (param & (width - 1));
        case W_UP: return (lane - base) >= param ? lane - param : -1;
        case W_DOWN: return (lane - base) + param < width ? lane + param : -1;
        case W_XOR: { int s = lane ^ param; return s < base + width ? s : -1; }
    }
    return -1;
}

// Try to complete warp collectives in warp `w`; returns true if some fibers were released.
inline bool resolve_warp(int w) {
    Fiber* lanes[32] = {};
    int first = w * 32, n = g.nthreads - first < 32 ? g.nthreads - first : 32;
    for (int i = 0; i < n; ++i) lanes[i] = &g.fibers[first + i];
    bool progress = false;
    for (int i = 0; i < n; ++i) {
        Fiber* f = lanes[i];
        if (f->state != AT_WARP) continue;
        // The group: lanes named in the mask that exist and have not exited. Exited lanes
        // count as arrived (CUDA: "all non-exited threads named in mask").
        unsigned group = 0;
        bool ready = true;
        for (int j = 0; j < n; ++j) {
            if (!((f->mask >> j) & 1u) && j != i) continue;
            Fiber* o = lanes[j];
            if (o->state == DONE) continue;
            if (o->state != AT_WARP || o->op != f->op || o->mask != f->mask) { ready = false; break; }
            group |= 1u << j;
        }
        if (!ready) continue;
        unsigned vote = 0;
        for (int j = 0; j < n; ++j) if (((group >> j) & 1u) && lanes[j]->value) vote |= 1u << j;
        unsigned long long results[32];
        for (int j = 0; j < n; ++j) {
            if (!((group >> j) & 1u)) continue;
            Fiber* o = lanes[j];
            switch (o->op) {
                case W_BALLOT: results[j] = vote; break;
                case W_ANY: results[j] = vote != 0; break;
                case W_ALL: results[j] = vote == group; break;
                case W_SYNCWARP: results[j] = 0; break;
                default: {
                    // Reading a lane that is absent, exited or not in the group: undefined on
                    // a GPU; here the caller gets its own value.
                    int s = shfl_source(o->op, j, o->param, o->width);
                    results[j] = (s >= 0 && s < n && ((group >> s) & 1u) && lanes[s]->size == o->size)
                                     ? lanes[s]->value : o->value;
                }
            }
        }
        for (int j = 0; j < n; ++j)
            if ((group >> j) & 1u) { lanes[j]->result = results[j]; lanes[j]->state = RUNNABLE; }
        progress = true;
    }
    return progress;
}

inline std::string describe_block() {
    // e.g. "threads 0-31: __syncthreads() at line 12; threads 32-63: exited"
    std::string out;
    int i = 0;
    auto what = [](const Fiber& f) {
        if (f.state == DONE) return std::string("exited");
        std::string s = f.state == AT_SYNC ? std::string("__syncthreads()") : std::string(warp_op_names[f.op]) + "()";
        return s + " at line " + std::to_string(f.line);
    };
    while (i < g.nthreads) {
        int j = i;
        std::string w = what(g.fibers[i]);
        while (j + 1 < g.nthreads && what(g.fibers[j + 1]) == w) ++j;
        if (!out.empty()) out += "; ";
        out += (i == j ? "thread " + std::to_string(i) : "threads " + std::to_string(i) + "-" + std::to_string(j)) + ": " + w;
        i = j + 1;
    }
    return out;
}

inline void fiber_entry() {
    g.body(g.body_ctx);
    g.cur->state = DONE;      // returning switches to uc_link, the scheduler
}

// Runs one block to completion; returns false (with g.error set) on deadlock or failure.
inline bool run_block(int order, unsigned long long& rng) {
    int n = g.nthreads;
    int perm[1024];                                   // blockDim <= 1024, checked in Python
    for (int i = 0; i < n; ++i) perm[i] = order == 1 ? n - 1 - i : i;
    for (;;) {
        if (order == 2)                                   // a fresh shuffle per round
            for (int i = n - 1; i > 0; --i) {
                rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
                int j = (int)((rng >> 33) % (unsigned long long)(i + 1));
                std::swap(perm[i], perm[j]);
            }
        // Run every runnable fiber until it blocks or exits.
        for (int k = 0; k < n; ++k) {
            Fiber* f = &g.fibers[perm[k]];
            if (f->state != RUNNABLE) continue;
            g.cur = f;
            swapcontext(&g.sched, &f->ctx);
            if (g.failed) return false;
        }
        // Everyone is blocked or done: resolve warp collectives first, then __syncthreads.
        bool progress = false;
        for (int w = 0; w * 32 < n; ++w) progress |= resolve_warp(w);
        if (progress) continue;
        int live = 0, at_sync = 0, line = -1;
        bool same_line = true;
        unsigned count = 0;
        for (int i = 0; i < n; ++i) {
            Fiber& f = g.fibers[i];
            if (f.state == DONE) continue;
            ++live;
            if (f.state == AT_SYNC) {
                ++at_sync;
                count += (unsigned)f.value;
                if (line < 0) line = f.line; else if (f.line != line) same_line = false;
            }
        }
        if (live == 0) return true;
        // Exited threads count as arrived. Different __syncthreads() lines are separate
        // barriers here (on hardware they all map to barrier 0, which hides the bug).
        if (at_sync == live && same_line) {
            for (int i = 0; i < n; ++i) {
                Fiber& f = g.fibers[i];
                if (f.state != AT_SYNC) continue;
                f.result = f.op == 1 ? count : f.op == 2 ? (count == (unsigned)live) : f.op == 3 ? (count != 0) : 0;
                f.state = RUNNABLE;
            }
            continue;
        }
        g.error = "deadlock in block (" + std::to_string(g.blockIdx.x) + "," + std::to_string(g.blockIdx.y) +
                  "," + std::to_string(g.blockIdx.z) + "): " + describe_block();
        return false;
    }
}

// dims: grid x y z, block x y z. order: 0 thread order, 1 reversed, 2 shuffled every round.
inline int run_grid(void (*body)(void*), void* ctx, const unsigned* dims, unsigned long long shmem,
                    int order, unsigned long long stack_bytes, char* err, unsigned long long errlen) {
    g = Launch();
    g.body = body; g.body_ctx = ctx;
    g.gridDim = dim3(dims[0], dims[1], dims[2]);
    g.blockDim = dim3(dims[3], dims[4], dims[5]);
    int n = (int)(dims[3] * dims[4] * dims[5]);
    g.nthreads = n;
    const size_t page = 4096, stack = (stack_bytes + page - 1) / page * page, slot = stack + page;
    // One mapping for all stacks; untouched pages cost nothing. A PROT_NONE guard page
    // below each stack turns a fiber's stack overflow into a crash instead of corruption.
    char* stacks = (char*)mmap(nullptr, slot * n, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (stacks == MAP_FAILED) { snprintf(err, errlen, "mmap of fiber stacks failed"); return 1; }
    for (int i = 0; i < n; ++i) mprotect(stacks + i * slot, page, PROT_NONE);
    Fiber* fibers = new Fiber[n];
    g.fibers = fibers;
    void* smem = nullptr;
    if (posix_memalign(&smem, 256, shmem ? shmem : 16)) smem = nullptr;
    dyn_smem = smem;
    unsigned long long rng = 0x853c49e6748fea9bULL;
    bool ok = smem != nullptr;
    if (!ok) g.error = "could not allocate dynamic shared memory";
    for (unsigned z = 0; ok && z < dims[2]; ++z)
        for (unsigned y = 0; ok && y < dims[1]; ++y)
            for (unsigned x = 0; ok && x < dims[0]; ++x) {
                g.blockIdx = {x, y, z};
                ++epoch;
                memset(smem, 0xff, shmem);      // poison: uninitialised reads show as NaN / -1
                for (int i = 0; i < n; ++i) {
                    Fiber& f = fibers[i];
                    f.tid = {i % dims[3], (i / dims[3]) % dims[4], i / (dims[3] * dims[4])};
                    f.state = RUNNABLE;
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = stacks + i * slot + page;
                    f.ctx.uc_stack.ss_size = stack;
                    f.ctx.uc_link = &g.sched;
                    makecontext(&f.ctx, fiber_entry, 0);
                }
                ok = run_block(order, rng);
            }
    if (!ok) snprintf(err, errlen, "%s", g.error.c_str());
    fflush(stdout);                          // device printf output appears in order
    delete[] fibers;
    g.fibers = nullptr;
    free(smem);
    dyn_smem = nullptr;
    munmap(stacks, slot * n);
    return ok ? 0 : 1;
}

// Calls kernel k with arguments unpacked from args[i] (a pointer to the i-th value), by
// value, so each CUDA thread gets its own copy of the parameters, as on the GPU.
template <class... A, size_t... I>
inline void invoke(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*reinterpret_cast<std::remove_cv_t<A>*>(args[I])...);
}
template <class... A>
inline int launch(void (*k)(A...), const unsigned* dims, unsigned long long shmem, void** args, int order,
                  unsigned long long stack_bytes, char* err, unsigned long long errlen) {
    struct Ctx { void (*k)(A...); void** args; } c{k, args};
    return run_grid([](void* p) { Ctx* c = (Ctx*)p; invoke(c->k, c->args, std::index_sequence_for<A...>{}); },
                    &c, dims, shmem, order, stack_bytes, err, errlen);
}

// Describes parameter types for the Python side's argument checks: one
// "kind class size align const" entry per parameter, ';'-separated.
// kind: v value, p pointer; class: f float, h half, i signed, u unsigned, c char, b bool,
// v void, s struct or other.
template <class T> constexpr char type_class() {
    using U = std::remove_cv_t<T>;
    return std::is_same<U, __half>::value ? 'h' : std::is_same<U, bool>::value ? 'b'
         : std::is_same<U, char>::value ? 'c' : std::is_floating_point<U>::value ? 'f'
         : std::is_integral<U>::value ? (std::is_signed<U>::value ? 'i' : 'u')
         : std::is_void<U>::value ? 'v' : std::is_pointer<U>::value ? 'p' : 's';
}
template <class T> constexpr size_t size_or_0() { if constexpr (std::is_void<T>::value) return 0; else return sizeof(T); }
template <class T> constexpr size_t align_or_1() { if constexpr (std::is_void<T>::value) return 1; else return alignof(T); }
template <class T> inline std::string describe_param() {
    if constexpr (std::is_pointer<T>::value) {
        using P = std::remove_pointer_t<T>;
        return std::string("p ") + type_class<P>() + " " + std::to_string(size_or_0<P>()) + " " +
               std::to_string(align_or_1<P>()) + " " + (std::is_const<P>::value ? "1" : "0");
    } else {
        return std::string("v ") + type_class<T>() + " " + std::to_string(sizeof(T)) + " " +
               std::to_string(alignof(T)) + " 0";
    }
}
template <class... A> inline const char* signature(void (*)(A...)) {
    static std::string s;
    s.clear();
    ((s += describe_param<A>() + ";"), ...);
    return s.c_str();
}
}  // namespace __emu

// ---- built-in variables and barriers, as macros so that they read the current fiber ---------
#define threadIdx (::__emu::g.cur->tid)
#define blockIdx (::__emu::g.blockIdx)
#define blockDim (::__emu::g.blockDim)
#define gridDim (::__emu::g.gridDim)
static constexpr int warpSize = 32;
#define __syncthreads() ::__emu::syncthreads(__LINE__)
#define __syncthreads_count(p) ::__emu::syncthreads(__LINE__, 1, (p))
#define __syncthreads_and(p) ::__emu::syncthreads(__LINE__, 2, (p))
#define __syncthreads_or(p) ::__emu::syncthreads(__LINE__, 3, (p))
// A function, not a macro, because of the optional mask; __builtin_LINE() is the caller's line.
inline void __syncwarp(unsigned mask = 0xffffffffu, int line = __builtin_LINE()) {
    ::__emu::warp_op(line, ::__emu::W_SYNCWARP, mask, 0, 0, 32, 0);
}
#define __shfl_sync(m, v, ...) ::__emu::shfl(__LINE__, ::__emu::W_SHFL, (m), (v), __VA_ARGS__)
#define __shfl_up_sync(m, v, ...) ::__emu::shfl(__LINE__, ::__emu::W_UP, (m), (v), __VA_ARGS__)
#define __shfl_down_sync(m, v, ...) ::__emu::shfl(__LINE__, ::__emu::W_DOWN, (m), (v), __VA_ARGS__)
#define __shfl_xor_sync(m, v, ...) ::__emu::shfl(__LINE__, ::__emu::W_XOR, (m), (v), __VA_ARGS__)
#define __ballot_sync(m, p) ((unsigned)::__emu::warp_op(__LINE__, ::__emu::W_BALLOT, (m), (p) != 0, 0, 32, 4))
#define __any_sync(m, p) ((int)::__emu::warp_op(__LINE__, ::__emu::W_ANY, (m), (p) != 0, 0, 32, 4))
#define __all_sync(m, p) ((int)::__emu::warp_op(__LINE__, ::__emu::W_ALL, (m), (p) != 0, 0, 32, 4))
#define __trap() ::__emu::fail("__trap() called in thread (" + std::to_string(threadIdx.x) + "," + \
    std::to_string(threadIdx.y) + "," + std::to_string(threadIdx.z) + ") at line " + std::to_string(__LINE__))
// Lanes of this warp that have not exited (an approximation: no notion of divergence here).
inline unsigned __activemask() {
    unsigned m = 0, base = (unsigned)(::__emu::g.cur - ::__emu::g.fibers) / 32 * 32;
    for (unsigned j = 0; j < 32 && base + j < (unsigned)::__emu::g.nthreads; ++j)
        if (::__emu::g.fibers[base + j].state != ::__emu::DONE) m |= 1u << j;
    return m;
}
inline unsigned __lanemask_lt() { return (1u << ::__emu::lane_of(::__emu::g.cur)) - 1u; }

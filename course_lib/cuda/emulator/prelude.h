// prelude.h -- makes CUDA C kernel source compile as ordinary C++ (g++ -include prelude.h)
// and run on the CPU. Used by course_lib/cuda/emulator/__init__.py; see README.md there.
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
//
// The file has two parts. Everything up to "the runtime" is what kernels see (force-included
// into each module). The runtime (scheduler, fault and alignment handlers) is compiled once
// from this same file with -D__EMU_RUNTIME into a cached object that every module links, so
// that each kernel compile stays short.
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
#include <utility>
#include <type_traits>
#ifdef __EMU_RUNTIME          // only the runtime (see "the runtime's interface" below) needs these
#include <signal.h>
#include <sys/mman.h>
#include <string>
#include <vector>
#endif

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
// The alignment matters: a GPU faults on a float4/uint4/int2/... load from an address that
// is not a multiple of it, and the emulator's alignment check (see "alignment check" below)
// only sees such a load if the type here carries the same alignment.
#define __EMU_VEC(T, B, A1, A2, A3, A4)                                                          \
    struct __attribute__((aligned(A1))) T##1 { B x; };                                            \
    struct __attribute__((aligned(A2))) T##2 { B x, y; };                                         \
    struct __attribute__((aligned(A3))) T##3 { B x, y, z; };                                      \
    struct __attribute__((aligned(A4))) T##4 { B x, y, z, w; };                                   \
    inline T##1 make_##T##1(B x) { return {x}; }                                                  \
    inline T##2 make_##T##2(B x, B y) { return {x, y}; }                                          \
    inline T##3 make_##T##3(B x, B y, B z) { return {x, y, z}; }                                  \
    inline T##4 make_##T##4(B x, B y, B z, B w) { return {x, y, z, w}; }
__EMU_VEC(char, signed char, 1, 2, 1, 4)
__EMU_VEC(uchar, unsigned char, 1, 2, 1, 4)
__EMU_VEC(short, short, 2, 4, 2, 8)
__EMU_VEC(ushort, unsigned short, 2, 4, 2, 8)
__EMU_VEC(int, int, 4, 8, 4, 16)
__EMU_VEC(uint, unsigned int, 4, 8, 4, 16)
__EMU_VEC(long, long, sizeof(long), 2 * sizeof(long), sizeof(long), 16)
__EMU_VEC(ulong, unsigned long, sizeof(long), 2 * sizeof(long), sizeof(long), 16)
__EMU_VEC(longlong, long long, 8, 16, 8, 16)
__EMU_VEC(ulonglong, unsigned long long, 8, 16, 8, 16)
__EMU_VEC(float, float, 4, 8, 4, 16)
__EMU_VEC(double, double, 8, 16, 8, 16)
#undef __EMU_VEC
struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
    dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

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
struct __attribute__((aligned(4))) __half2 { __half x, y; };   // CUDA: __align__(4)
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
// float -> int conversions with CUDA's rounding modes (rn: to nearest, ties to even, like cvt.rni).
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)truncf(x); }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
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

// ---- launch state and the runtime's interface -----------------------------------------------
// Everything below the "runtime" line is compiled once (g++ -D__EMU_RUNTIME -x c++ prelude.h,
// no sanitizer, cached) and linked into every module; kernels see only these declarations.
// That keeps each kernel's compile short, also with -fsanitize=alignment, which would
// otherwise instrument the scheduler and the std::string code it uses. Hidden visibility:
// every module (.so) has its own launch state.
#pragma GCC visibility push(hidden)
namespace __emu {
enum State { RUNNABLE, AT_SYNC, AT_WARP, DONE };
enum WarpOp { W_SHFL, W_UP, W_DOWN, W_XOR, W_BALLOT, W_ANY, W_ALL, W_SYNCWARP };

struct Fiber {
    ucontext_t ctx;
    uint3 tid;
    int state, line;           // line: source line of the barrier it waits at
    int op, param, width, size;
    unsigned mask;
    unsigned long long value, result;   // raw bits of a warp collective's operand / result
};

// check_bounds: a PROT_NONE page next to an argument's copy (the Python side, _GuardedCopy,
// maps them). A fault inside one is an out-of-bounds access of that argument.
struct GuardPage {
    unsigned long long lo, hi;          // the page: [lo, hi)
    unsigned long long start, nbytes;   // the argument's data in its copy
    unsigned long long elem;            // element size, for the message (0/1: bytes)
    const char* label;                  // e.g. "argument 1 ('y', 160 bytes)"
};

// Everything a launch needs besides the kernel's arguments; mirrored by _LaunchConfig (ctypes)
// in __init__.py, so the two must change together.
struct LaunchConfig {
    unsigned dims[6];                   // grid x y z, block x y z
    unsigned long long shmem;           // dynamic shared memory bytes
    int thread_order;                   // 0 forward, 1 reverse, 2 random (reshuffled every round)
    int block_order;                    // 0 forward, 1 reverse, 2 random (one shuffle per launch)
    unsigned long long seed;            // for block_order 2
    unsigned long long stack_bytes;     // per fiber
    const GuardPage* guards;
    int nguards;
    char* err;                          // the error message, if the launch fails
    unsigned long long errlen;
};

struct Launch {
    void (*body)(void*) = nullptr;      // runs the kernel once, as the current fiber
    void* body_ctx = nullptr;
    const LaunchConfig* cfg = nullptr;
    Fiber* fibers = nullptr;
    Fiber* cur = nullptr;
    bool in_fiber = false;              // true while a fiber (kernel code) runs, not the scheduler
    int nthreads = 0;
    char* stacks = nullptr;             // fiber i's stack guard page is at stacks + i * stack_slot
    size_t stack_slot = 0, page = 0;
    ucontext_t sched;
    uint3 blockIdx{0, 0, 0};
    dim3 blockDim, gridDim;
    bool failed = false;
};
extern Launch g;                        // one per compiled module; Python serialises launches
extern void* dyn_smem;                  // `extern __shared__` arrays are references to this
extern unsigned long long epoch;        // counts blocks over all launches, for per-block
                                        // poisoning of __shared__ variables

[[noreturn]] void fail(const char* msg);      // stop the launch with an error (from a fiber)
[[noreturn]] void trap(int line);             // __trap()
int syncthreads(int line, int mode, int pred);
unsigned long long warp_op(int line, int op, unsigned mask, unsigned long long value, int param,
                           int width, int size);
void misaligned_ldg(const char* pretty_function, uintptr_t addr, unsigned long long align, unsigned line);
int run_grid(void (*body)(void*), void* ctx, const LaunchConfig& c);

inline void poison_shared(void* p, size_t n, unsigned long long& seen_epoch) {
    if (seen_epoch != epoch) { memset(p, 0xff, n); seen_epoch = epoch; }
}

template <class T> inline unsigned long long to_bits(T v) {
    static_assert(sizeof(T) <= 8, "warp shuffle of a type larger than 8 bytes");
    unsigned long long u = 0; memcpy(&u, &v, sizeof(T)); return u;
}
template <class T> inline T from_bits(unsigned long long u) { T v; memcpy(&v, &u, sizeof(T)); return v; }
template <class T> inline T shfl(int line, int op, unsigned mask, T v, int param, int width = 32) {
    return from_bits<T>(warp_op(line, op, mask, to_bits(v), param, width, (int)sizeof(T)));
}

inline unsigned lane_of(const Fiber* f) {
    unsigned linear = f->tid.x + g.blockDim.x * (f->tid.y + g.blockDim.y * f->tid.z);
    return linear % 32;
}

// Calls kernel k with arguments unpacked from args[i] (a pointer to the i-th value), by
// value, so each CUDA thread gets its own copy of the parameters, as on the GPU.
template <class... A, size_t... I>
inline void invoke(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*reinterpret_cast<std::remove_cv_t<A>*>(args[I])...);
}
template <class... A>
inline int launch(void (*k)(A...), const LaunchConfig* cfg, void** args) {
    struct Ctx { void (*k)(A...); void** args; } c{k, args};
    return run_grid([](void* p) { Ctx* c = (Ctx*)p; invoke(c->k, c->args, std::index_sequence_for<A...>{}); },
                    &c, *cfg);
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
template <class T> inline void describe_param(char*& out, char* end) {
    size_t room = (size_t)(end - out);
    int n;
    if constexpr (std::is_pointer<T>::value) {
        using P = std::remove_pointer_t<T>;
        n = snprintf(out, room, "p %c %zu %zu %d;", type_class<P>(), size_or_0<P>(), align_or_1<P>(),
                     std::is_const<P>::value ? 1 : 0);
    } else {
        n = snprintf(out, room, "v %c %zu %zu 0;", type_class<T>(), sizeof(T), alignof(T));
    }
    out += n > 0 && (size_t)n < room ? n : 0;
}
template <class... A> inline const char* signature(void (*)(A...)) {
    static char buf[8192];
    char* out = buf;
    buf[0] = 0;
    (describe_param<A>(out, buf + sizeof buf), ...);
    return buf;
}
}  // namespace __emu
#pragma GCC visibility pop

// __ldg checks the alignment itself, so that the message names the kernel's line (not this
// file's, as the sanitizer would for the load below).
template <class T> inline T __ldg(const T* p, unsigned line = __builtin_LINE()) {
#ifdef __EMU_CHECK_ALIGNMENT
    if ((uintptr_t)p % alignof(T)) ::__emu::misaligned_ldg(__PRETTY_FUNCTION__, (uintptr_t)p, alignof(T), line);
#endif
    return *p;
}

#ifdef __EMU_RUNTIME
// ==== the runtime ==============================================================================
#pragma GCC visibility push(hidden)
namespace __emu {
static const char* const warp_op_names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
    "__shfl_xor_sync", "__ballot_sync", "__any_sync", "__all_sync", "__syncwarp"};
Launch g;
void* dyn_smem = nullptr;
unsigned long long epoch = 0;
static std::string error;               // the launch's first error

// "thread (3,0,0) of block (1,0,0)": the running fiber, for error messages.
static std::string where() {
    auto v = [](unsigned x, unsigned y, unsigned z) {
        return "(" + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) + ")";
    };
    return "thread " + v(g.cur->tid.x, g.cur->tid.y, g.cur->tid.z) + " of block " +
           v(g.blockIdx.x, g.blockIdx.y, g.blockIdx.z);
}

void fail(const char* msg) {
    g.failed = true;
    if (error.empty()) error = msg;
    g.cur->state = DONE;
    swapcontext(&g.cur->ctx, &g.sched);   // never resumed
    __builtin_unreachable();
}
void trap(int line) {
    fail(("__trap() called in " + where() + " at line " + std::to_string(line)).c_str());
}

static void block_here(int state, int line) {
    g.cur->state = state;
    g.cur->line = line;
    swapcontext(&g.cur->ctx, &g.sched);           // back when the scheduler resolved it
}

// __syncthreads and its counting variants; mode 0 plain, 1 count, 2 and, 3 or.
int syncthreads(int line, int mode, int pred) {
    g.cur->op = mode;
    g.cur->value = pred != 0;
    block_here(AT_SYNC, line);
    return (int)g.cur->result;
}

unsigned long long warp_op(int line, int op, unsigned mask, unsigned long long value, int param, int width,
                           int size) {
    Fiber* f = g.cur;
    f->op = op; f->mask = mask; f->value = value; f->param = param; f->width = width; f->size = size;
    block_here(AT_WARP, line);
    return f->result;
}

// Which lane a shuffle reads from, or -1 for "own value" (CUDA's rules for width segments).
static int shfl_source(int op, int lane, int param, int width) {
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
static bool resolve_warp(int w) {
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

static std::string describe_block() {
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

// ---- faults: out-of-bounds accesses (check_bounds) and fiber stack overflows ---------------
// During a launch a SIGSEGV/SIGBUS handler runs on its own stack (sigaltstack, so that it also
// runs when a fiber has overflowed its stack). A fault in one of the PROT_NONE pages that
// check_bounds places around each argument's copy, or in the guard page below a fiber's
// stack, stops the launch with a message: the handler jumps back to the scheduler and
// abandons the fiber, as fail() does. Any other fault is not ours: the handler puts the
// previous handlers back and returns, the access faults again, and the process crashes as it
// would without the emulator (Python's faulthandler, if enabled, still prints its traceback).
static struct sigaction old_segv, old_bus;
static stack_t old_altstack;
static bool fault_handlers_on = false;
alignas(64) static char fault_stack[64 * 1024];

// 1 if the faulting access was a write, 0 a read, -1 unknown (from the CPU's fault record).
static int fault_is_write(void* uctx) {
#if defined(__x86_64__)
    return (((ucontext_t*)uctx)->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;   // page fault error code
#elif defined(__aarch64__)
    // The signal frame holds records {u32 magic, u32 size, ...}; the ESR one (magic 0x45535201)
    // has the exception syndrome, whose bit 6 (WnR) says "write" for a data abort.
    unsigned char* p = ((ucontext_t*)uctx)->uc_mcontext.__reserved;
    unsigned char* end = p + sizeof(((ucontext_t*)uctx)->uc_mcontext.__reserved);
    while (p + 8 <= end) {
        uint32_t magic, size;
        memcpy(&magic, p, 4); memcpy(&size, p + 4, 4);
        if (magic == 0 || size < 8) break;
        if (magic == 0x45535201u && p + 16 <= end) { uint64_t esr; memcpy(&esr, p + 8, 8); return (int)((esr >> 6) & 1); }
        p += size;
    }
    return -1;
#else
    (void)uctx;
    return -1;
#endif
}

// The message for a fault at `addr`, or "" if the address is not one of ours.
static std::string describe_fault(uintptr_t addr, int write) {
    const LaunchConfig* c = g.cfg;
    for (int i = 0; c && i < c->nguards; ++i) {
        const GuardPage& gp = c->guards[i];
        if (addr < gp.lo || addr >= gp.hi) continue;
        long long off = (long long)(addr - gp.start), elem = (long long)gp.elem;
        std::string msg = std::string("out-of-bounds ") + (write == 1 ? "write to " : write == 0 ? "read of " : "access to ") +
                          gp.label + ": the access reached byte offset " + std::to_string(off);
        if (elem > 1) msg += " (element " + std::to_string(off >= 0 ? off / elem : -((-off + elem - 1) / elem)) + ")";
        msg += off >= 0 ? ", past its end" : ", before its start";
        return msg + ", in " + where();
    }
    for (int i = 0; g.stacks && i < g.nthreads; ++i) {
        uintptr_t lo = (uintptr_t)(g.stacks + i * g.stack_slot);
        if (addr >= lo && addr < lo + g.page)
            return "stack overflow in " + where() + ": it needs more than stack_size=" +
                   std::to_string(c ? c->stack_bytes : 0) + " bytes (deep recursion or large local arrays?)";
    }
    return "";
}

static void uninstall_fault_handlers(bool restore_altstack) {
    if (!fault_handlers_on) return;
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    if (restore_altstack) sigaltstack(&old_altstack, nullptr);
    fault_handlers_on = false;
}

static void on_fault(int, siginfo_t* si, void* uctx) {
    std::string msg = g.in_fiber ? describe_fault((uintptr_t)si->si_addr, fault_is_write(uctx)) : "";
    if (msg.empty()) {                    // not ours: crash as before (still on the alt stack,
        uninstall_fault_handlers(false);  // which sigaltstack cannot change from here)
        return;
    }
    g.failed = true;
    if (error.empty()) error = msg;
    g.cur->state = DONE;
    g.in_fiber = false;
    setcontext(&g.sched);                 // the scheduler's saved signal mask unblocks SIGSEGV
}

static void install_fault_handlers() {
    stack_t st{};
    st.ss_sp = fault_stack;
    st.ss_size = sizeof fault_stack;
    sigaltstack(&st, &old_altstack);
    old_altstack.ss_flags &= SS_DISABLE;  // sigaltstack() accepts only 0 or SS_DISABLE back
    struct sigaction sa{};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &old_segv);
    sigaction(SIGBUS, &sa, &old_bus);
    fault_handlers_on = true;
}

// ---- running a launch ------------------------------------------------------------------------
static void fiber_entry() {
    g.body(g.body_ctx);
    g.cur->state = DONE;      // returning switches to uc_link, the scheduler
}

// Runs one block to completion; returns false (with `error` set) on deadlock or failure.
static bool run_block(int order, unsigned long long& rng) {
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
            g.in_fiber = true;
            swapcontext(&g.sched, &f->ctx);
            g.in_fiber = false;
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
        error = "deadlock in block (" + std::to_string(g.blockIdx.x) + "," + std::to_string(g.blockIdx.y) +
                "," + std::to_string(g.blockIdx.z) + "): " + describe_block();
        return false;
    }
}

// The k-th block to run (0 <= k < total), as a linear index: index order, reversed, or one
// shuffle per launch (blocks that depend on each other then give different results).
struct BlockOrder {
    int order;
    unsigned long long total;
    std::vector<unsigned long long> perm;
    BlockOrder(int order_, unsigned long long total_, unsigned long long seed) : order(order_), total(total_) {
        if (order != 2) return;
        perm.resize(total);
        for (unsigned long long i = 0; i < total; ++i) perm[i] = i;
        unsigned long long rng = seed * 0x9E3779B97F4A7C15ULL + 0x853c49e6748fea9bULL;
        for (unsigned long long i = total; i > 1; --i) {
            rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
            std::swap(perm[i - 1], perm[(rng >> 17) % i]);
        }
    }
    unsigned long long operator[](unsigned long long k) const {
        return order == 0 ? k : order == 1 ? total - 1 - k : perm[k];
    }
};

static void reset_fibers(const unsigned* dims) {
    for (int i = 0; i < g.nthreads; ++i) {
        Fiber& f = g.fibers[i];
        f.tid = {i % dims[3], (i / dims[3]) % dims[4], i / (dims[3] * dims[4])};
        f.state = RUNNABLE;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = g.stacks + i * g.stack_slot + g.page;
        f.ctx.uc_stack.ss_size = g.stack_slot - g.page;
        f.ctx.uc_link = &g.sched;
        makecontext(&f.ctx, fiber_entry, 0);
    }
}

static bool run_blocks(const LaunchConfig& c, void* smem) {
    const unsigned* dims = c.dims;
    unsigned long long gx = dims[0], gxy = gx * dims[1], total = gxy * dims[2];
    BlockOrder blocks(c.block_order, total, c.seed);
    unsigned long long rng = 0x853c49e6748fea9bULL;       // for thread_order 2
    for (unsigned long long k = 0; k < total; ++k) {
        unsigned long long b = blocks[k];
        g.blockIdx = {(unsigned)(b % gx), (unsigned)(b % gxy / gx), (unsigned)(b / gxy)};
        ++epoch;
        memset(smem, 0xff, c.shmem);      // poison: uninitialised reads show as NaN / -1
        reset_fibers(dims);
        if (!run_block(c.thread_order, rng)) return false;
    }
    return true;
}

int run_grid(void (*body)(void*), void* ctx, const LaunchConfig& c) {
    g = Launch();
    error.clear();
    g.body = body; g.body_ctx = ctx; g.cfg = &c;
    g.gridDim = dim3(c.dims[0], c.dims[1], c.dims[2]);
    g.blockDim = dim3(c.dims[3], c.dims[4], c.dims[5]);
    int n = (int)(c.dims[3] * c.dims[4] * c.dims[5]);
    g.nthreads = n;
    const size_t page = 4096, stack = (c.stack_bytes + page - 1) / page * page, slot = stack + page;
    // One mapping for all stacks; untouched pages cost nothing. A PROT_NONE guard page
    // below each stack turns a fiber's stack overflow into an error instead of corruption.
    char* stacks = (char*)mmap(nullptr, slot * n, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (stacks == MAP_FAILED) { snprintf(c.err, c.errlen, "mmap of fiber stacks failed"); return 1; }
    for (int i = 0; i < n; ++i) mprotect(stacks + i * slot, page, PROT_NONE);
    g.stacks = stacks; g.stack_slot = slot; g.page = page;
    g.fibers = new Fiber[n];
    void* smem = nullptr;
    if (posix_memalign(&smem, 256, c.shmem ? c.shmem : 16)) smem = nullptr;
    dyn_smem = smem;
    bool ok = smem != nullptr;
    if (!ok) error = "could not allocate dynamic shared memory";
    if (ok) {
        install_fault_handlers();
        ok = run_blocks(c, smem);
        uninstall_fault_handlers(true);
    }
    if (!ok) snprintf(c.err, c.errlen, "%s", error.c_str());
    fflush(stdout);                          // device printf output appears in order
    delete[] g.fibers;
    g.fibers = nullptr;
    g.stacks = nullptr;
    g.cfg = nullptr;
    free(smem);
    dyn_smem = nullptr;
    munmap(stacks, slot * n);
    return ok ? 0 : 1;
}

// ---- alignment check ------------------------------------------------------------------------
// Unless $COURSE_CUDA_EMULATOR_ALIGNMENT=0, kernels are compiled with g++ -fsanitize=alignment
// (and __EMU_CHECK_ALIGNMENT defined): every load, store and member access through a pointer
// checks that the address is a multiple of the type's alignment, and calls the handler below
// if not. A GPU faults there ("misaligned address"), where a CPU would quietly load. The
// handlers are ours (libubsan is not linked): they stop the launch as __trap() does.
// Layouts of the data the compiler passes (GCC's and clang's UBSan ABI, "_v1").
struct UbsanSourceLocation { const char* file; unsigned line, column; };
struct UbsanTypeDescriptor { unsigned short kind, info; char name[1]; };
struct UbsanTypeMismatchData {
    UbsanSourceLocation loc;
    const UbsanTypeDescriptor* type;
    unsigned char log_alignment;        // log2 of the alignment the type needs
    unsigned char type_check_kind;      // 0 load, 1 store, 2 reference binding (p[i]), 3 member access, ...
};

// GCC writes "'const struct uint4'"; a CUDA programmer writes const uint4.
static std::string plain_type_name(std::string s) {
    if (s.size() >= 2 && s.front() == '\'' && s.back() == '\'') s = s.substr(1, s.size() - 2);
    for (const char* tag : {"struct ", "class ", "union "})
        for (size_t k; (k = s.find(tag)) != std::string::npos;) s.erase(k, strlen(tag));
    return s;
}
// "line 12" for the kernel source, "prelude.h line 230" for code in the prelude.
static std::string source_line(const char* file, unsigned line) {
    std::string f = file ? file : "";
    size_t slash = f.find_last_of('/');
    if (slash != std::string::npos) f = f.substr(slash + 1);
    bool kernel = f.empty() || (f.compare(0, 7, "kernel.") == 0 && f.size() > 3 && f.compare(f.size() - 3, 3, ".cu") == 0);
    return (kernel ? "" : f + " ") + "line " + std::to_string(line);
}
static std::string type_mismatch_message(const char* access, const std::string& type, uintptr_t addr,
                                         unsigned long long align, const char* file, unsigned line) {
    char hex[32];
    snprintf(hex, sizeof hex, "0x%llx", (unsigned long long)addr);
    std::string at = " (" + source_line(file, line) + (g.in_fiber ? ", " + where() : std::string()) + ")";
    if (addr == 0) return std::string(access) + " null pointer of type '" + type + "'" + at;
    if (addr & (align - 1))
        return std::string("misaligned ") + access + " '" + type + "' at address " + hex + ": needs " +
               std::to_string(align) + "-byte alignment, a GPU faults here" + at;
    return std::string(access) + " '" + type + "' at address " + hex + ": type check failed" + at;
}
// Inside a kernel thread: stop the launch. Elsewhere (no fiber to abandon): warn on stderr.
static void report_type_mismatch(const std::string& msg) {
    if (g.in_fiber) fail(msg.c_str());
    fprintf(stderr, "CUDA emulator: %s\n", msg.c_str());
}
static void on_type_mismatch(const UbsanTypeMismatchData* d, uintptr_t ptr) {
    static const char* const access[] = {"load of", "store to", "access to", "member access within",
                                         "member call on", "constructor call on"};
    std::string type = plain_type_name(d->type->name);
    const char* what = d->type_check_kind < 6 ? access[d->type_check_kind] : "access to";
    // `*p` / `p[i]` is checked as a reference binding before the load or store; a const one
    // can only be read.
    if (d->type_check_kind == 2 && type.compare(0, 6, "const ") == 0) what = "load of";
    report_type_mismatch(type_mismatch_message(what, type, ptr, 1ULL << d->log_alignment, d->loc.file,
                                               d->loc.line));
}
void misaligned_ldg(const char* pretty_function, uintptr_t addr, unsigned long long align, unsigned line) {
    std::string f = pretty_function, type = "?";         // "T __ldg(const T*, unsigned int) [with T = uint4]"
    size_t a = f.find("T = ");
    if (a != std::string::npos) type = "const " + f.substr(a + 4, f.find_first_of(";]", a) - a - 4);
    report_type_mismatch(type_mismatch_message("__ldg of", type, addr, align, nullptr, line));
}
}  // namespace __emu
#pragma GCC visibility pop
extern "C" __attribute__((visibility("hidden"))) void __ubsan_handle_type_mismatch_v1(
        const ::__emu::UbsanTypeMismatchData* d, uintptr_t ptr) {
    ::__emu::on_type_mismatch(d, ptr);
}
extern "C" __attribute__((visibility("hidden"))) void __ubsan_handle_type_mismatch_v1_abort(
        const ::__emu::UbsanTypeMismatchData* d, uintptr_t ptr) {
    ::__emu::on_type_mismatch(d, ptr);
    abort();
}
#endif  // __EMU_RUNTIME

// ---- built-in variables and barriers, as macros so that they read the current fiber ---------
#define threadIdx (::__emu::g.cur->tid)
#define blockIdx (::__emu::g.blockIdx)
#define blockDim (::__emu::g.blockDim)
#define gridDim (::__emu::g.gridDim)
static constexpr int warpSize = 32;
#define __syncthreads() ::__emu::syncthreads(__LINE__, 0, 0)
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
#define __trap() ::__emu::trap(__LINE__)
// Lanes of this warp that have not exited (an approximation: no notion of divergence here).
inline unsigned __activemask() {
    unsigned m = 0, base = (unsigned)(::__emu::g.cur - ::__emu::g.fibers) / 32 * 32;
    for (unsigned j = 0; j < 32 && base + j < (unsigned)::__emu::g.nthreads; ++j)
        if (::__emu::g.fibers[base + j].state != ::__emu::DONE) m |= 1u << j;
    return m;
}
inline unsigned __lanemask_lt() { return (1u << ::__emu::lane_of(::__emu::g.cur)) - 1u; }

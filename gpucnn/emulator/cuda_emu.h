// cuda_emu.h: the CUDA subset gpucnn's kernels use, so that g++ compiles an unmodified .cu file
// for the CPU emulator (gpucnn/emulator/build.py). Force-included before the kernel source:
//
//     g++ -std=c++20 -O2 -shared -fPIC -pthread -include cuda_emu.h -x c++ wrapper.cpp emu_runtime.o
//
// where the generated wrapper #includes the .cu file. Each CUDA thread runs as a fiber; the
// scheduler, the warp exchange and the worker pool live in emu_runtime.cpp, which is compiled once.
//
// This header includes no system header, so a kernel that leans on std::, FLT_MAX or <cmath>
// fails here as it fails under NVRTC. Math goes through GCC builtins and libm.
#ifndef GPUCNN_CUDA_EMU_H
#define GPUCNN_CUDA_EMU_H

#define EMU_HIDDEN __attribute__((visibility("hidden")))

typedef __SIZE_TYPE__ size_t;
typedef __PTRDIFF_TYPE__ ptrdiff_t;

// ---- qualifiers ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ __inline__ __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
// Shared memory is per block; a block's fibers all run on one OS thread and blocks on one
// thread run one after another, so thread-local storage is exactly per block. The runtime
// fills this module's whole TLS block with 0xFF bytes before each block.
#define __shared__ thread_local

// ---- vector types ---------------------------------------------------------------------------
struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};
struct __attribute__((aligned(8))) float2 { float x, y; };
struct float3 { float x, y, z; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(8))) int2 { int x, y; };
struct int3 { int x, y, z; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct __attribute__((aligned(8))) uint2 { unsigned int x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned int x, y, z, w; };
struct __attribute__((aligned(16))) double2 { double x, y; };

static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline float3 make_float3(float x, float y, float z) { return float3{x, y, z}; }
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
static inline int2 make_int2(int x, int y) { return int2{x, y}; }
static inline int3 make_int3(int x, int y, int z) { return int3{x, y, z}; }
static inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
static inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }
static inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return uint3{x, y, z}; }
static inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
    return uint4{x, y, z, w};
}
static inline double2 make_double2(double x, double y) { return double2{x, y}; }

// ---- interface to the runtime (emu_runtime.cpp) -------------------------------------------
namespace emu {

// Everything the runtime keeps per OS thread, in one plain struct: the runtime saves and
// restores it around the 0xFF fill of the TLS block. __thread (not thread_local) because the
// type is trivial and the definition lives in another translation unit.
struct ThreadState {
    uint3 thread_idx;   // of the fiber now running; rewritten at every switch
    uint3 block_idx;
    uint3 block_dim;
    uint3 grid_dim;
    void* worker;       // emu::Worker* of this OS thread while it runs a block
    void* fiber;        // emu::Fiber* now running
    unsigned char* tls_base;  // this thread's copy of the module's TLS block
    unsigned long tls_size;
    unsigned char* dynamic_shared;  // this thread's extern __shared__ array (48 KiB), or null
};
extern __thread ThreadState ts EMU_HIDDEN;

enum WarpOp : int {
    WARP_SHFL_IDX = 0, WARP_SHFL_UP, WARP_SHFL_DOWN, WARP_SHFL_XOR,
    WARP_BALLOT, WARP_ANY, WARP_ALL, WARP_SYNC, WARP_OP_COUNT
};
enum BarrierOp : int { BARRIER_PLAIN = 0, BARRIER_COUNT, BARRIER_AND, BARRIER_OR };

// Wait at the block barrier; returns the reduction of `predicate` for the counting variants.
EMU_HIDDEN int barrier(int op, int predicate);
// Wait for the lanes of `mask` at a warp operation; returns the 64-bit result slot.
EMU_HIDDEN unsigned long long warp_exchange(int op, unsigned int mask, unsigned long long value,
                                            int arg, int width, int nbytes);
EMU_HIDDEN unsigned int active_mask();
[[noreturn]] EMU_HIDDEN void trap(const char* what);

// Launch `kernel` (a trampoline unpacking args) over the grid; 0 on success, else a message in err.
// dynamic_shared returns the calling thread's extern __shared__ array (null when the file has none).
EMU_HIDDEN int launch(const char* name, void (*kernel)(void**), const unsigned int* grid,
                      const unsigned int* block, unsigned int shared_bytes, void* (*dynamic_shared)(),
                      int order, unsigned long long seed, void** args, char* err, unsigned int errlen);

template <class A, class B> struct same_type { static constexpr bool value = false; };
template <class A> struct same_type<A, A> { static constexpr bool value = true; };

template <class T> inline unsigned long long to_bits(T v) {
    static_assert(sizeof(T) <= 8, "warp intrinsics exchange values of at most 8 bytes");
    unsigned long long bits = 0;
    __builtin_memcpy(&bits, &v, sizeof(T));
    return bits;
}
template <class T> inline T from_bits(unsigned long long bits) {
    T v;
    __builtin_memcpy(&v, &bits, sizeof(T));
    return v;
}

}  // namespace emu

// ---- built-in variables ---------------------------------------------------------------------
#define threadIdx (static_cast<const uint3&>(::emu::ts.thread_idx))
#define blockIdx (static_cast<const uint3&>(::emu::ts.block_idx))
#define blockDim (static_cast<const uint3&>(::emu::ts.block_dim))
#define gridDim (static_cast<const uint3&>(::emu::ts.grid_dim))
static const int warpSize = 32;

// ---- barriers and warp intrinsics -----------------------------------------------------------
static inline void __syncthreads() { emu::barrier(emu::BARRIER_PLAIN, 0); }
static inline int __syncthreads_count(int p) { return emu::barrier(emu::BARRIER_COUNT, p != 0); }
static inline int __syncthreads_and(int p) { return emu::barrier(emu::BARRIER_AND, p != 0); }
static inline int __syncthreads_or(int p) { return emu::barrier(emu::BARRIER_OR, p != 0); }
static inline void __syncwarp(unsigned int mask = 0xffffffffu) {
    emu::warp_exchange(emu::WARP_SYNC, mask, 0, 0, 32, 0);
}
template <class T> inline T __shfl_sync(unsigned int mask, T var, int src_lane, int width = 32) {
    return emu::from_bits<T>(emu::warp_exchange(emu::WARP_SHFL_IDX, mask, emu::to_bits(var), src_lane, width,
                                                sizeof(T)));
}
template <class T> inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = 32) {
    return emu::from_bits<T>(emu::warp_exchange(emu::WARP_SHFL_UP, mask, emu::to_bits(var), (int)delta, width,
                                                sizeof(T)));
}
template <class T> inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = 32) {
    return emu::from_bits<T>(emu::warp_exchange(emu::WARP_SHFL_DOWN, mask, emu::to_bits(var), (int)delta, width,
                                                sizeof(T)));
}
template <class T> inline T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = 32) {
    return emu::from_bits<T>(emu::warp_exchange(emu::WARP_SHFL_XOR, mask, emu::to_bits(var), lane_mask, width,
                                                sizeof(T)));
}
static inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
    return (unsigned int)emu::warp_exchange(emu::WARP_BALLOT, mask, predicate != 0, 0, 32, 4);
}
static inline int __any_sync(unsigned int mask, int predicate) {
    return (int)emu::warp_exchange(emu::WARP_ANY, mask, predicate != 0, 0, 32, 4);
}
static inline int __all_sync(unsigned int mask, int predicate) {
    return (int)emu::warp_exchange(emu::WARP_ALL, mask, predicate != 0, 0, 32, 4);
}
static inline unsigned int __activemask() { return emu::active_mask(); }
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
[[noreturn]] static inline void __trap() { emu::trap("the kernel called __trap()"); }

// ---- atomics (blocks run in parallel on OS threads, so these are real atomics) ---------------
#define EMU_INT_ATOMICS(T)                                                                          \
    static inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }    \
    static inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }    \
    static inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }    \
    static inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }      \
    static inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }    \
    static inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }  \
    static inline T atomicCAS(T* p, T expected, T desired) {                                       \
        __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED); \
        return expected;                                                                           \
    }                                                                                              \
    static inline T atomicMax(T* p, T v) {                                                         \
        T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                              \
        while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {} \
        return old;                                                                                \
    }                                                                                              \
    static inline T atomicMin(T* p, T v) {                                                         \
        T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                              \
        while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {} \
        return old;                                                                                \
    }
EMU_INT_ATOMICS(int)
EMU_INT_ATOMICS(unsigned int)
EMU_INT_ATOMICS(unsigned long long)
#undef EMU_INT_ATOMICS

// Floating-point atomics: a compare-and-swap loop on the bit pattern.
#define EMU_FLOAT_ATOMICS(F, U)                                                                     \
    static inline F atomicAdd(F* p, F v) {                                                         \
        U* bits = reinterpret_cast<U*>(p);                                                         \
        U old = __atomic_load_n(bits, __ATOMIC_RELAXED);                                           \
        for (;;) {                                                                                 \
            U desired = emu::to_bits(emu::from_bits<F>(old) + v);                                  \
            if (__atomic_compare_exchange_n(bits, &old, desired, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) \
                return emu::from_bits<F>(old);                                                     \
        }                                                                                          \
    }                                                                                              \
    static inline F atomicExch(F* p, F v) {                                                        \
        return emu::from_bits<F>(__atomic_exchange_n(reinterpret_cast<U*>(p), (U)emu::to_bits(v), __ATOMIC_RELAXED)); \
    }
EMU_FLOAT_ATOMICS(float, unsigned int)
EMU_FLOAT_ATOMICS(double, unsigned long long)
#undef EMU_FLOAT_ATOMICS

// ---- min / max (CUDA's overload set) -------------------------------------------------------
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
static inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
static inline unsigned int min(int a, unsigned int b) { return min((unsigned int)a, b); }
static inline unsigned int max(int a, unsigned int b) { return max((unsigned int)a, b); }
static inline unsigned int min(unsigned int a, int b) { return min(a, (unsigned int)b); }
static inline unsigned int max(unsigned int a, int b) { return max(a, (unsigned int)b); }
static inline long min(long a, long b) { return a < b ? a : b; }
static inline long max(long a, long b) { return a > b ? a : b; }
static inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
static inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return __builtin_fminf(a, b); }
static inline float max(float a, float b) { return __builtin_fmaxf(a, b); }
static inline double min(double a, double b) { return __builtin_fmin(a, b); }
static inline double max(double a, double b) { return __builtin_fmax(a, b); }
static inline double min(float a, double b) { return __builtin_fmin(a, b); }
static inline double max(float a, double b) { return __builtin_fmax(a, b); }
static inline double min(double a, float b) { return __builtin_fmin(a, b); }
static inline double max(double a, float b) { return __builtin_fmax(a, b); }

// ---- math: libm for the transcendental functions, builtins for the rest ----------------------
extern "C" {
float expf(float) noexcept;
float exp2f(float) noexcept;
float expm1f(float) noexcept;
float logf(float) noexcept;
float log2f(float) noexcept;
float log10f(float) noexcept;
float log1pf(float) noexcept;
float powf(float, float) noexcept;
float tanhf(float) noexcept;
float sinf(float) noexcept;
float cosf(float) noexcept;
float tanf(float) noexcept;
float erff(float) noexcept;
float fmodf(float, float) noexcept;
double exp(double) noexcept;
double log(double) noexcept;
double pow(double, double) noexcept;
double tanh(double) noexcept;
int printf(const char*, ...);
}
static inline float sqrtf(float x) { return __builtin_sqrtf(x); }
static inline double sqrt(double x) { return __builtin_sqrt(x); }
static inline float rsqrtf(float x) { return 1.0f / __builtin_sqrtf(x); }
static inline float fabsf(float x) { return __builtin_fabsf(x); }
static inline double fabs(double x) { return __builtin_fabs(x); }
static inline float fminf(float a, float b) { return __builtin_fminf(a, b); }
static inline float fmaxf(float a, float b) { return __builtin_fmaxf(a, b); }
static inline double fmin(double a, double b) { return __builtin_fmin(a, b); }
static inline double fmax(double a, double b) { return __builtin_fmax(a, b); }
static inline float floorf(float x) { return __builtin_floorf(x); }
static inline float ceilf(float x) { return __builtin_ceilf(x); }
static inline float truncf(float x) { return __builtin_truncf(x); }
static inline float roundf(float x) { return __builtin_roundf(x); }
static inline float copysignf(float a, float b) { return __builtin_copysignf(a, b); }
static inline float fmaf(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
static inline float __expf(float x) { return expf(x); }
static inline float __logf(float x) { return logf(x); }
static inline float __powf(float a, float b) { return powf(a, b); }
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
static inline bool isnan(float x) { return __builtin_isnan(x); }
static inline bool isnan(double x) { return __builtin_isnan(x); }
static inline bool isinf(float x) { return __builtin_isinf(x); }
static inline bool isinf(double x) { return __builtin_isinf(x); }
static inline bool isfinite(float x) { return __builtin_isfinite(x); }
static inline bool isfinite(double x) { return __builtin_isfinite(x); }
static inline int __float_as_int(float x) { return emu::from_bits<int>(emu::to_bits(x)); }
static inline unsigned int __float_as_uint(float x) { return emu::from_bits<unsigned int>(emu::to_bits(x)); }
static inline float __int_as_float(int x) { return emu::from_bits<float>(emu::to_bits(x)); }
static inline float __uint_as_float(unsigned int x) { return emu::from_bits<float>(emu::to_bits(x)); }

static inline float rintf(float x) { return __builtin_rintf(x); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fmaf_rn(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
static inline int __float2int_rn(float x) { return (int)__builtin_rintf(x); }
static inline int __float2int_rz(float x) { return (int)x; }
static inline int __float2int_rd(float x) { return (int)__builtin_floorf(x); }
static inline int __float2int_ru(float x) { return (int)__builtin_ceilf(x); }
static inline float __int2float_rn(int x) { return (float)x; }
#ifndef GPUCNN_EMU_RUNTIME  // <stdlib.h> in the runtime declares the C abs
static inline int abs(int x) { return x < 0 ? -x : x; }
static inline long long abs(long long x) { return x < 0 ? -x : x; }
static inline float abs(float x) { return __builtin_fabsf(x); }
static inline double abs(double x) { return __builtin_fabs(x); }
#endif

// Read-only cache load: on the CPU, a plain load.
template <class T> static inline T __ldg(const T* p) { return *p; }

#endif  // GPUCNN_CUDA_EMU_H

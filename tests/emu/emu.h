// A CPU emulator for the kernels in cuda/, for machines without a GPU (tests/cuda_emu.py).
//
// Each cuda/<op>.cu is compiled by g++ as ordinary C++, unchanged, with this header in front:
// the CUDA keywords become C++ (or nothing), __shared__ becomes `thread_local`, and the intrinsics the
// kernels use (shuffles, __syncthreads, bf16 conversions, cache-hinted loads and stores, fast-math
// functions) get CPU definitions. Every CUDA thread of a block runs as a fiber (own stack) on one OS
// thread; __syncthreads and the warp shuffles are barriers at which the scheduler switches fibers,
// so blocks run one after another and a thread_local variable is exactly per-block shared memory
// (`extern __shared__` arrays are defined by the generated registration file, tests/cuda_emu.py);
// the scheduler fills all of it with NaN bytes before each block, since a GPU gives a block garbage.
//
// The scheduler reports, instead of hanging or guessing: threads of a block that wait at different
// __syncthreads calls (divergent barriers; threads that have exited are not waited for, as on
// Volta and later), threads that can never meet (a deadlock), a full-mask shuffle after some lanes of
// the warp have exited, more dynamic shared memory than a Hopper block may have, argument lists that
// do not match the kernel's parameters, and misaligned 128-bit loads and stores. Out-of-bounds accesses are caught by
// the Python side's guard pages.
//
// What it does not model: concurrency between blocks (so it cannot find races between blocks),
// fast-math approximations (exp/log here are libm's), or timing.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <cstddef>
#include <string>
#include <type_traits>
#include <vector>

// ---- keywords ------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ thread_local
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
extern dim3 threadIdx, blockIdx, blockDim, gridDim;    // set by the scheduler for the running fiber

namespace emu {
void check_aligned(const void* p, size_t bytes, const char* what);   // stops the launch if misaligned
}

// 16 bytes moved as one: every load or store through an int4 lvalue (Packed128's load128/store128 and
// the cache-hinted variants) must be 16-byte aligned, as a GPU requires ("misaligned address"). x86
// would not fault, so the copy constructor (a load from *p) and the assignment (a store to *p) check.
struct alignas(16) int4 {
    int x, y, z, w;
    int4() = default;
    int4(const int4& o) : x(o.x), y(o.y), z(o.z), w(o.w) { emu::check_aligned(&o, 16, "128-bit load"); }
    int4& operator=(const int4& o) {
        emu::check_aligned(this, 16, "128-bit store");
        x = o.x, y = o.y, z = o.z, w = o.w;
        return *this;
    }
};

// ---- bf16 ------------------------------------------------------------------------------------
struct __nv_bfloat16 {
    uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t u = uint32_t(h.bits) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {     // round to nearest even; NaN stays NaN
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {uint16_t(u >> 16)};
}

// ---- bit casts, math, min/max ------------------------------------------------------------------
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// ---- cache-hinted loads and stores: plain accesses on a CPU ------------------------------------
template <class V> inline V __ldcs(const V* p) { return *p; }
template <class V> inline void __stcs(V* p, V v) { *p = v; }
template <class V> inline void __stcg(V* p, V v) { *p = v; }

// ---- barriers and shuffles (runtime.cpp) -----------------------------------------------------
namespace emu {
void syncthreads(const char* file, int line);
uint64_t shuffle(unsigned int mask, uint64_t value, int src_lane);  // value of src_lane's call
int lane_id();
// a barrier of the whole warp that hands every lane all 32 lanes' `bytes` (at most 64) from `mine`,
// in lane order, into `all`: the data movement of ldmatrix and mma.sync (sm80.h)
void warp_gather(const void* mine, size_t bytes, void* all);
// cp.async (sm80.h): a copy started, the groups closed, every closed group landed
void async_copy(void* dst, const void* src, size_t bytes);   // 4 or 16 bytes
void async_commit();
void async_wait_all();
}  // namespace emu

// a macro, so that the scheduler knows which __syncthreads each thread waits at
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)

template <class V> inline V __shfl_sync(unsigned int mask, V v, int src_lane, int width = 32) {
    static_assert(sizeof(V) <= 8, "shuffle of a type wider than 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(V));
    const int lane = emu::lane_id();
    const int src = (lane & ~(width - 1)) + (src_lane & (width - 1));
    const uint64_t r = emu::shuffle(mask, bits, src);
    V out;
    memcpy(&out, &r, sizeof(V));
    return out;
}

// a barrier of the lanes in mask, as a shuffle is (and with its checks)
inline void __syncwarp(unsigned int mask = 0xffffffffu) { emu::shuffle(mask, 0, emu::lane_id()); }

template <class V> inline V __shfl_xor_sync(unsigned int mask, V v, int lane_mask, int width = 32) {
    return __shfl_sync(mask, v, (emu::lane_id() ^ lane_mask) & (width - 1), width);
}

// ---- kernel registry -------------------------------------------------------------------------
// Each kernel instantiation is registered under its NVRTC name expression with a description of
// its parameters, so the Python side can check every argument (pointer or value, element type,
// size) before the call, which a real launch never does.
namespace emu {

struct Param {
    bool pointer;
    char type;     // f float, b bf16, i int32, u uint32, q int64, Q uint64, v void, ? other
    int size;      // bytes of the value passed (8 for a pointer)
};

template <class V> constexpr char type_code() {
    using U = std::remove_cv_t<V>;
    if constexpr (std::is_same_v<U, float>) return 'f';
    else if constexpr (std::is_same_v<U, __nv_bfloat16>) return 'b';
    else if constexpr (std::is_same_v<U, int>) return 'i';
    else if constexpr (std::is_same_v<U, unsigned int>) return 'u';
    else if constexpr (std::is_same_v<U, long> || std::is_same_v<U, long long>) return 'q';
    else if constexpr (std::is_same_v<U, unsigned long> || std::is_same_v<U, unsigned long long>) return 'Q';
    else if constexpr (std::is_same_v<U, void>) return 'v';
    else return '?';
}

template <class A> Param describe() {
    if constexpr (std::is_pointer_v<A>) return {true, type_code<std::remove_pointer_t<A>>(), 8};
    else return {false, type_code<A>(), int(sizeof(A))};
}

using Invoker = void (*)(void* fn, void** args);

struct Kernel {
    std::string name;
    std::vector<Param> params;
    void* fn;
    Invoker invoke;
    float* (*dynamic_shared)();     // address of this file's `extern __shared__` array, or nullptr
};

void register_kernel(Kernel k);

template <class... A, size_t... I>
void call_with(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

template <class... A> void invoke(void* fn, void** args) {
    call_with(reinterpret_cast<void (*)(A...)>(fn), args, std::index_sequence_for<A...>{});
}

template <class... A> struct Registrar {
    Registrar(const char* name, void (*f)(A...), float* (*dynamic_shared)()) {
        register_kernel(Kernel{name, {describe<A>()...}, reinterpret_cast<void*>(f), &invoke<A...>,
                               dynamic_shared});
    }
};

constexpr size_t MAX_DYNAMIC_SHARED_BYTES = 227 * 1024;   // per block on sm_90

}  // namespace emu

#define EMU_CAT2(a, b) a##b
#define EMU_CAT(a, b) EMU_CAT2(a, b)
#define EMU_REGISTER(DYN, ...) \
    static ::emu::Registrar EMU_CAT(emu_registrar_, __COUNTER__)(#__VA_ARGS__, &__VA_ARGS__, DYN)

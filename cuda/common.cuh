// Device-only helpers shared by every cuda/<op>.cu: warp and block reductions, the 16-byte Packed128
// vector, float <-> storage-type conversion, and SquirrelNoise5 stochastic rounding.
//
// Kernels are templates on the storage type T (float or __nv_bfloat16); llmpy/gpu/_kernels.py
// instantiates them through NVRTC name expressions such as "gelu_forward_kernel<__nv_bfloat16>".
// Arithmetic is always fp32; T only decides how values are stored (llmc-facts.md §6.0).
// No host code and no system headers here: NVRTC has none (cupy-notes.md §1.3).
#pragma once
#include <cuda_bf16.h>

constexpr int WARP_SIZE = 32;
constexpr unsigned int FULL_MASK = 0xffffffffu;

// -------------------------------------------------------------------------------------------------
// Reductions. Butterfly (xor) shuffles leave the result in every lane, so no broadcast is needed.

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(FULL_MASK, v, offset);
    }
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    }
    return v;
}

__device__ __forceinline__ float neg_infinity() { return __int_as_float(0xff800000); }

// Block-wide sum or max over a 1-D block (blockDim.x a multiple of 32, at most 1024): warp reduce,
// one value per warp through shared memory, warp reduce again. Every thread of the block must call
// it, and every thread gets the result. The leading barrier makes back-to-back calls safe.
template <bool IS_MAX>
__device__ float block_reduce(float v) {
    __shared__ float per_warp[WARP_SIZE];
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int num_warps = blockDim.x / WARP_SIZE;
    v = IS_MAX ? warp_max(v) : warp_sum(v);
    __syncthreads();                       // an earlier call may still be reading per_warp
    if (lane == 0) per_warp[warp] = v;
    __syncthreads();
    v = lane < num_warps ? per_warp[lane] : (IS_MAX ? neg_infinity() : 0.0f);
    return IS_MAX ? warp_max(v) : warp_sum(v);
}

__device__ __forceinline__ float block_sum(float v) { return block_reduce<false>(v); }
__device__ __forceinline__ float block_max(float v) { return block_reduce<true>(v); }

// -------------------------------------------------------------------------------------------------
// Storage type <-> fp32.

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest-even conversion into the storage type: from_float<T>(x).
template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// -------------------------------------------------------------------------------------------------
// Packed128: 16 bytes of T (8 bf16 or 4 float) moved with one 128-bit instruction. Pointers must be
// 16-byte aligned; the launchers check the base pointers and the row lengths that keep this true.

template <class T>
struct alignas(16) Packed128 {
    static constexpr int size = 16 / sizeof(T);
    T v[size];

    __device__ __forceinline__ T& operator[](int i) { return v[i]; }
    __device__ __forceinline__ const T& operator[](int i) const { return v[i]; }
    __device__ __forceinline__ static Packed128 from_bits(int4 bits) {
        Packed128 p;
        memcpy(&p, &bits, sizeof(bits));
        return p;
    }
    __device__ __forceinline__ int4 bits() const {
        int4 b;
        memcpy(&b, this, sizeof(b));
        return b;
    }
};

template <class T> __device__ __forceinline__ Packed128<T> load128(const T* p) {
    return Packed128<T>::from_bits(*reinterpret_cast<const int4*>(p));
}
// "cache streaming": the data is read once, so do not let it evict reusable lines.
template <class T> __device__ __forceinline__ Packed128<T> load128cs(const T* p) {
    return Packed128<T>::from_bits(__ldcs(reinterpret_cast<const int4*>(p)));
}
template <class T> __device__ __forceinline__ void store128(T* p, Packed128<T> x) {
    *reinterpret_cast<int4*>(p) = x.bits();
}
// streaming store: written once, not read again soon
template <class T> __device__ __forceinline__ void store128cs(T* p, Packed128<T> x) {
    __stcs(reinterpret_cast<int4*>(p), x.bits());
}
// cache in L2 only: another kernel reads it soon
template <class T> __device__ __forceinline__ void store128cg(T* p, Packed128<T> x) {
    __stcg(reinterpret_cast<int4*>(p), x.bits());
}

// One warp writes residual = a + b (fp32 add, rounded to T) over a row of C elements, lane by lane
// in 16-byte chunks: the fused residual + norm kernels. Each lane writes exactly the chunks the
// warp-per-row norm then reads back with the same lane, so no sync is needed between the two.
template <class T>
__device__ __forceinline__ void residual_row(T* residual, const T* a, const T* b, int C, int lane) {
    using x128 = Packed128<T>;
    constexpr int S = x128::size;
    for (int c = lane * S; c < C; c += WARP_SIZE * S) {
        const x128 x = load128cs(a + c);
        const x128 y = load128cs(b + c);
        x128 r;
        for (int k = 0; k < S; k++) r[k] = from_float<T>(to_float(x[k]) + to_float(y[k]));
        store128(residual + c, r);
    }
}

// Elementwise kernels: the calling thread's 16-byte chunk at element i of n, out[j] = f(a[j]) or
// f(a[j], b[j]) in fp32; a chunk that runs past n is finished element by element. `a` is read once
// (streaming); `b` (a gradient) is read with a normal load; out is cached for the next kernel.
// out may alias a or b: each thread reads its chunk before it writes it.
template <class T, class F>
__device__ __forceinline__ void map_chunk(T* out, const T* a, size_t i, size_t n, F f) {
    using x128 = Packed128<T>;
    if (i + x128::size <= n) {
        const x128 x = load128cs(a + i);
        x128 y;
        for (int k = 0; k < x128::size; k++) y[k] = from_float<T>(f(to_float(x[k])));
        store128(out + i, y);
    } else {
        for (size_t j = i; j < n; j++) out[j] = from_float<T>(f(to_float(a[j])));
    }
}

template <class T, class F>
__device__ __forceinline__ void map_chunk2(T* out, const T* a, const T* b, size_t i, size_t n, F f) {
    using x128 = Packed128<T>;
    if (i + x128::size <= n) {
        const x128 x = load128cs(a + i);
        const x128 d = load128(b + i);
        x128 y;
        for (int k = 0; k < x128::size; k++) y[k] = from_float<T>(f(to_float(x[k]), to_float(d[k])));
        store128(out + i, y);
    } else {
        for (size_t j = i; j < n; j++) out[j] = from_float<T>(f(to_float(a[j]), to_float(b[j])));
    }
}

// -------------------------------------------------------------------------------------------------
// Stochastic rounding (llmc-facts.md §6.12). SquirrelNoise5 (Squirrel Eiserloh, GDC 2017) is a
// stateless integer hash: noise(position, seed). The 2-D position combines the thread's x and y
// coordinates with a large prime, x + 198491317 * y, using unsigned (wrapping) arithmetic.

__device__ __forceinline__ unsigned int squirrel_noise5(unsigned int position, unsigned int seed) {
    constexpr unsigned int NOISE1 = 0xd2a80a3fu;
    constexpr unsigned int NOISE2 = 0xa884f197u;
    constexpr unsigned int NOISE3 = 0x6c736f4bu;
    constexpr unsigned int NOISE4 = 0xb79f3abbu;
    constexpr unsigned int NOISE5 = 0x1b56c4f5u;
    unsigned int h = position;
    h *= NOISE1;
    h += seed;
    h ^= h >> 9;
    h += NOISE2;
    h ^= h >> 11;
    h *= NOISE3;
    h ^= h >> 13;
    h += NOISE4;
    h ^= h >> 15;
    h *= NOISE5;
    h ^= h >> 17;
    return h;
}

__device__ __forceinline__ unsigned int noise_2d(unsigned int x, unsigned int y, unsigned int seed) {
    constexpr unsigned int PRIME = 198491317u;
    return squirrel_noise5(x + PRIME * y, seed);
}

// Rounds `in` to bf16, up with probability (dropped low 16 bits) / 2^16, so the expected value is
// `in`. The random threshold comes from the calling thread's position (threadIdx.x,
// blockIdx.x * blockDim.x + blockIdx.y) and `seed`: the same launch geometry and seed reproduce
// the same bits (llm.c's resume relies on that). Forcing the low bits to all ones makes the final
// round-to-nearest go up; clearing them makes it exact (down).
__device__ __forceinline__ void stochastic_rounding(float in, __nv_bfloat16* out, unsigned int seed) {
    const unsigned int r = noise_2d(threadIdx.x, blockIdx.x * blockDim.x + blockIdx.y, seed);
    const unsigned int threshold = r & 0xffffu;
    unsigned int bits = __float_as_uint(in);
    bits = (bits & 0xffffu) > threshold ? (bits | 0xffffu) : (bits & ~0xffffu);
    *out = __float2bfloat16_rn(__uint_as_float(bits));
}

// fp32 storage: nothing to round.
__device__ __forceinline__ void stochastic_rounding(float in, float* out, unsigned int seed) {
    *out = in;
}

// GELU, tanh approximation, as in GPT-2's MLP. Launched by llmpy/gpu/gelu.py; reference llmpy/cpu/gelu.py.
//   gelu_forward_kernel<T>:  out  = 0.5 x (1 + tanh(u)),  u = k (x + 0.044715 x^3),  k = sqrt(2/pi)
//   gelu_backward_kernel<T>: dinp = gelu'(x) * dout      (overwrites dinp; dinp may be dout itself)
// Thread mapping: one thread per 16-byte chunk (8 bf16 or 4 float); a thread whose chunk runs past n
// finishes element by element, so any n works (the base pointers must be 16-byte aligned).
// Memory bound: 2 (forward) and 3 (backward) accesses of sizeof(T) bytes per element; fp32 math.
// Numerics: 0.5 (1 + tanh u) is computed as sigmoid(2u) = 1 / (1 + exp(-2u)). Under --use_fast_math
// tanhf compiles to tanh.approx.f32 (relative error ~2^-11, what llm.c gets); the exp form stays
// within a few ulp in fp32. The same identity gives the derivative (as llmpy/cpu/gelu.py does).
#include "common.cuh"

constexpr float GELU_K = 0.7978845608f;  // sqrt(2 / pi)
constexpr float GELU_C = 0.044715f;      // cubic coefficient of the tanh approximation
constexpr float EXP_ARG_MAX = 60.0f;     // exp(60) ~ 1e26: no overflow, and 1/(1+e^60) is 0 to fp32

__device__ __forceinline__ float gelu(float x) {
    const float u = GELU_K * (x + GELU_C * x * x * x);
    return x / (1.0f + __expf(fminf(-2.0f * u, EXP_ARG_MAX)));     // x sigmoid(2u)
}

// gelu'(x) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) u'  =  s (1 + 2 x u' (1 - s)),
// with s = sigmoid(2u), 1 - s = e s, e = exp(-2u), u' = k (1 + 3 * 0.044715 x^2)
__device__ __forceinline__ float gelu_grad(float x) {
    const float u = GELU_K * (x + GELU_C * x * x * x);
    const float e = __expf(fminf(-2.0f * u, EXP_ARG_MAX));
    const float s = 1.0f / (1.0f + e);
    const float du_dx = GELU_K * (1.0f + 3.0f * GELU_C * x * x);
    return s * (1.0f + 2.0f * x * du_dx * (e * s));
}

template <class T>
__global__ void gelu_forward_kernel(T* out, const T* inp, int n) {
    using x128 = Packed128<T>;
    const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * x128::size;
    if (i >= (size_t)n) return;
    if (i + x128::size <= (size_t)n) {
        const x128 x = load128cs(inp + i);     // read once
        x128 y;
        for (int k = 0; k < x128::size; k++) y[k] = from_float<T>(gelu(to_float(x[k])));
        store128(out + i, y);                  // the next matmul reads it: keep it cached
    } else {
        for (size_t j = i; j < (size_t)n; j++) out[j] = from_float<T>(gelu(to_float(inp[j])));
    }
}

// No __restrict__: dinp and dout may be the same buffer (each thread reads its chunk, then writes it).
template <class T>
__global__ void gelu_backward_kernel(T* dinp, const T* inp, const T* dout, int n) {
    using x128 = Packed128<T>;
    const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * x128::size;
    if (i >= (size_t)n) return;
    if (i + x128::size <= (size_t)n) {
        const x128 x = load128cs(inp + i);
        const x128 d = load128(dout + i);
        x128 g;
        for (int k = 0; k < x128::size; k++) {
            g[k] = from_float<T>(gelu_grad(to_float(x[k])) * to_float(d[k]));
        }
        store128(dinp + i, g);
    } else {
        for (size_t j = i; j < (size_t)n; j++) {
            dinp[j] = from_float<T>(gelu_grad(to_float(inp[j])) * to_float(dout[j]));
        }
    }
}

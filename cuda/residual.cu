// Residual add: the two branches of a transformer block meet. Launched by llmpy/gpu/residual.py;
// reference llmpy/cpu/residual.py. (The backward is the identity: the gradient flows to both inputs.)
//   residual_forward_kernel<T>: out = inp1 + inp2        (fp32 add, rounded to T; overwrites out)
// Thread mapping: one thread per 16-byte chunk (8 bf16 or 4 float); the chunk that runs past n is
// finished element by element, so any n works (base pointers 16-byte aligned).
// Memory bound: 3 accesses of sizeof(T) bytes per element. out may alias inp1 or inp2.
#include "common.cuh"

template <class T>
__global__ void residual_forward_kernel(T* out, const T* inp1, const T* inp2, int n) {
    using x128 = Packed128<T>;
    const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * x128::size;
    if (i >= (size_t)n) return;
    if (i + x128::size <= (size_t)n) {
        const x128 a = load128cs(inp1 + i);
        const x128 b = load128cs(inp2 + i);
        x128 y;
        for (int k = 0; k < x128::size; k++) y[k] = from_float<T>(to_float(a[k]) + to_float(b[k]));
        store128(out + i, y);
    } else {
        for (size_t j = i; j < (size_t)n; j++) out[j] = from_float<T>(to_float(inp1[j]) + to_float(inp2[j]));
    }
}

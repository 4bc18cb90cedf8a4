// Squared ReLU, nanochat's MLP activation. Launched by llmpy/gpu/relu2.py; reference llmpy/cpu/relu2.py.
//   relu2_forward_kernel<T>:  out  = max(x, 0)^2
//   relu2_backward_kernel<T>: dinp = 2 max(x, 0) * dout   (overwrites dinp; dinp may be dout itself)
// A plain elementwise kernel: cuBLASLt's epilogues have ReLU (and a bit-mask DRELU for the backward)
// but no square, and its DRELU gives dout [x > 0], not 2 x dout, so neither direction fuses into the
// matmul. Thread mapping as gelu.cu: one thread per 16-byte chunk (8 bf16 or 4 float), the thread whose
// chunk runs past n finishes element by element (common.cuh's map_chunk). Memory bound; fp32 math.
#include "common.cuh"

template <class T>
__global__ void relu2_forward_kernel(T* out, const T* inp, int n) {
    const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * Packed128<T>::size;
    if (i >= (size_t)n) return;
    map_chunk(out, inp, i, n, [](float x) {
        const float r = fmaxf(x, 0.0f);
        return r * r;
    });
}

// No __restrict__: dinp and dout may be the same buffer.
template <class T>
__global__ void relu2_backward_kernel(T* dinp, const T* inp, const T* dout, int n) {
    const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * Packed128<T>::size;
    if (i >= (size_t)n) return;
    map_chunk2(dinp, inp, dout, i, n, [](float x, float d) { return 2.0f * fmaxf(x, 0.0f) * d; });
}

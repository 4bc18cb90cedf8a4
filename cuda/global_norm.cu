// Squared L2 norm of a gradient buffer, deterministic in two stages (llmc-facts.md §6.13).
// Launched by llmpy/gpu/global_norm.py (global_norm_squared); reference llmpy/cpu/adamw.py.
//   global_norm_squared_kernel<T>: partials[blockIdx.x] = sum of x^2 over this block's elements
//                                  (grid-stride, fp32; overwrites, or adds when accumulate != 0)
//   global_norm_finish_kernel:     out[0] = sum of partials[0..num_partials) (one block, fixed order)
// Thread mapping: stage 1 uses a fixed grid (set by the launcher, not by the device), each thread
// summing elements i, i + grid*block, ...; a block reduction gives one partial per block. Stage 2 is
// a single block. The summation order depends only on the sizes: the result is bit-reproducible.
// Memory bound (stage 1 reads the buffer once).
#include "common.cuh"

template <class T>
__global__ void global_norm_squared_kernel(float* partials, const T* data, long long n, int accumulate) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    float acc = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float x = to_float(data[i]);
        acc += x * x;
    }
    const float block_total = block_sum(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = accumulate ? partials[blockIdx.x] + block_total : block_total;
}

__global__ void global_norm_finish_kernel(float* out, const float* partials, int num_partials) {
    float acc = 0.0f;
    for (int i = threadIdx.x; i < num_partials; i += blockDim.x) acc += partials[i];
    const float total = block_sum(acc);
    if (threadIdx.x == 0) out[0] = total;
}

// Elementwise type conversion. Launched by llmpy/gpu/cast.py (copy_and_cast, init_master).
//   copy_and_cast_kernel<Tdst, Tsrc>: dst[i] = Tdst(src[i]), round to nearest even into bf16
//   (float -> bf16 for exporting fp32 weights; bf16 -> float to initialise the fp32 master weights
//   from the bf16 parameters before the first AdamW step, llmc-facts.md §6.12 init_state).
// Thread mapping: one thread per element (grid-stride, so any n fits any grid). Memory bound.
#include "common.cuh"

template <class Tdst, class Tsrc>
__global__ void copy_and_cast_kernel(Tdst* dst, const Tsrc* src, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        dst[i] = from_float<Tdst>(to_float(src[i]));
    }
}

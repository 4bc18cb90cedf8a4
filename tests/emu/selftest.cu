// Kernels for the emulator's own tests (tests/test_cuda_emu.py): one correct reduction, and one
// kernel per mistake the emulator must report rather than run through. Not part of llmpy.
#include "common.cuh"

// out[b] = sum of the block's inputs (block_sum: shuffles, shared memory, two barriers)
__global__ void block_sum_kernel(float* out, const float* in) {
    const float s = block_sum(in[blockIdx.x * blockDim.x + threadIdx.x]);
    if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// out[i] = 1 for i < n, whatever the size of out
__global__ void fill_kernel(float* out, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) out[i] = 1.0f;
}

// out[0] = sum of in[0..n)
__global__ void sum_kernel(float* out, const float* in, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += in[i];
    out[0] = s;
}

// the first warp and the rest wait at different __syncthreads
__global__ void divergent_sync_kernel(float* out) {
    if (threadIdx.x < 32) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}

// half a warp shuffles while the other half waits at __syncthreads: a hang on a GPU
__global__ void half_warp_shuffle_kernel(float* out) {
    float v = 1.0f;
    if (threadIdx.x % 32 < 16) v = warp_sum(v);
    __syncthreads();
    out[threadIdx.x] = v;
}

// lane 5 exits, the others shuffle with the full mask
__global__ void shuffle_after_exit_kernel(float* out) {
    if (threadIdx.x % 32 == 5) return;
    out[threadIdx.x] = warp_sum(1.0f);
}

// reads dynamic shared memory nobody wrote
__global__ void uninitialized_shared_kernel(float* out) {
    extern __shared__ float buf[];
    out[threadIdx.x] = buf[threadIdx.x];
}

// thread i reads what thread i+1 wrote with no barrier in between: a race
__global__ void racy_shared_kernel(float* out) {
    __shared__ float slot[1024];
    slot[threadIdx.x] = float(blockIdx.x * blockDim.x + threadIdx.x);
    out[blockIdx.x * blockDim.x + threadIdx.x] = slot[(threadIdx.x + 1) % blockDim.x];
}

// a 128-bit load one float past an aligned address: a GPU stops with "misaligned address"
__global__ void misaligned_load_kernel(float* out, const float* in) {
    const Packed128<float> v = load128(in + 1);
    out[threadIdx.x] = v[0];
}

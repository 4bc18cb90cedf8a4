// Kernels for the emulator's own tests (tests/test_cuda_emu.py): one correct reduction, and one
// kernel per mistake the emulator must report rather than run through. Not part of llmpy.
#include "common.cuh"
#include <mma.h>

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
    extern __shared__ __align__(32) float buf[];
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

// writes floats [0, n) of dynamic shared memory
__global__ void shared_fill_kernel(int n) {
    extern __shared__ __align__(32) float buf[];
    for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = 0.0f;
}

// c (16 x 16, row-major) = a b^T for a, b (16 x 16 bf16, row-major), read from a + offset and b + offset with
// leading dimension ldm; with sync = 0 each lane reads c back from shared memory without __syncwarp
__global__ void wmma_product_kernel(float* c, const __nv_bfloat16* a, const __nv_bfloat16* b, int offset,
                                    int ldm, int sync) {
    using namespace nvcuda;
    extern __shared__ __align__(32) float buf[];          // 256 floats: the tile
    float* tile = buf;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;   // b^T
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    wmma::load_matrix_sync(fa, a + offset, ldm);
    wmma::load_matrix_sync(fb, b + offset, ldm);
    wmma::mma_sync(acc, fa, fb, acc);
    wmma::store_matrix_sync(tile, acc, 16, wmma::mem_row_major);
    if (sync) __syncwarp();
    for (int i = threadIdx.x; i < 256; i += 32) c[i] = tile[(i + 1) % 256];   // the next lane's elements
}

// Kernels for the emulator's own tests (tests/test_cuda_emu.py): one correct reduction, and one
// kernel per mistake the emulator must report rather than run through. Not part of llmpy.
#include "common.cuh"
#include "sm80.cuh"

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

// block 0 writes a static shared variable that every block reads: the others find garbage there on a
// GPU, not block 0's value (nor zeros)
__global__ void stale_shared_kernel(float* out) {
    __shared__ float value;
    if (blockIdx.x == 0) value = 1.0f;
    __syncthreads();
    out[blockIdx.x] = value;
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

// c (16 x 16 fp32, row-major) = a b^T (trans = 0) or a b (trans = 1) for a, b (16 x 16 bf16, row-major),
// through ldmatrix and mma.sync (sm80.cuh) as cuda/flash_attention.cu uses them. One warp: the
// inputs are copied into shared memory (row stride 24) and the fragments read from element `offset` on.
__global__ void mma_product_kernel(float* c, const __nv_bfloat16* a, const __nv_bfloat16* b, int offset, int trans) {
    __shared__ __align__(16) __nv_bfloat16 as[16 * 24 + 8], bs[16 * 24 + 8];
    constexpr int LD = 24;
    const int lane = threadIdx.x;
    for (int i = lane; i < 256; i += 32) {
        as[offset + i / 16 * LD + i % 16] = a[i];
        bs[offset + i / 16 * LD + i % 16] = b[i];
    }
    __syncwarp();
    unsigned fa[4], fb[4];
    ldmatrix_x4(fa, fragment_row(as + offset, LD, lane));
    if (trans) {
        ldmatrix_x4_trans(fb, fragment_row(bs + offset, LD, lane));     // b as k x n
    } else {
        ldmatrix_x4(fb, fragment_row_nk(bs + offset, LD, lane));        // b as n x k: the product is a b^T
    }
    float d[2][4] = {};
    mma_bf16_16816(d[0], fa, fb[0], fb[1]);
    mma_bf16_16816(d[1], fa, fb[2], fb[3]);
    const int g = lane / 4, t = lane % 4;
    for (int n = 0; n < 2; n++)
        for (int i = 0; i < 4; i++) c[(g + 8 * (i / 2)) * 16 + 8 * n + 2 * t + i % 2] = d[n][i];
}

// out[4i .. 4i+3] = in[offset + 4j .. offset + 4j + 3] for thread i and j = (i + 1) % blockDim.x: each
// thread copies its 16 bytes into shared memory with cp.async and reads its neighbour's after the
// barrier; with wait = 0 nobody waits for the copies first
__global__ void async_copy_kernel(float* out, const float* in, int offset, int wait) {
    extern __shared__ __align__(32) float buf[];
    const int i = threadIdx.x, j = (threadIdx.x + 1) % blockDim.x;
    cp_async16(buf + 4 * i, in + offset + 4 * i);
    cp_async_commit();
    if (wait) cp_async_wait_all();
    __syncthreads();
    for (int k = 0; k < 4; k++) out[4 * i + k] = buf[4 * j + k];
}

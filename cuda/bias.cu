// Bias gradient of a linear layer: dbias[c] += sum over rows of dout[row, c], deterministic.
// Launched by llmpy/gpu/bias.py (matmul_bias_backward, called by the matmul backward in
// llmpy/gpu/matmul.py); reference: the dbias line of llmpy/cpu/matmul.py.
//   bias_backward_kernel<T>:      block (x, y) sums rows [y*R, (y+1)*R) of 32 chunks of channels
//                                 (R = ceil(N / gridDim.y)); writes fp32 partials[y, c] when
//                                 partials != nullptr, else adds straight into dbias (gridDim.y == 1)
//   bias_backward_fold_kernel<T>: dbias[c] += sum over y of partials[y, c], in order
// Thread mapping: block (32, W): lane = one 16-byte chunk of channels (8 bf16 / 4 float), the W warps
// split the block's rows (warp w: rows w, w+W, ...), warp 0 adds the warps' sums in order through
// shared memory. Fold: one thread per channel. Memory bound (reads dout once).
// Requires OC % (16 / sizeof(T)) == 0 and 16-byte aligned pointers (checked by the launcher).
#include "common.cuh"

constexpr int BIAS_MAX_WARPS = 16;  // blockDim.y limit: the shared fold buffer is sized for it

template <class T>
__global__ void bias_backward_kernel(T* dbias, float* partials, const T* dout, int N, int OC) {
    using x128 = Packed128<T>;
    constexpr int S = x128::size;
    __shared__ float per_warp[BIAS_MAX_WARPS][WARP_SIZE][S];
    const int lane = threadIdx.x, warp = threadIdx.y, W = blockDim.y;
    const int c = (blockIdx.x * WARP_SIZE + lane) * S;
    const int rows_per_split = (N + gridDim.y - 1) / gridDim.y;
    const int row_begin = blockIdx.y * rows_per_split;
    const int row_end = min(N, row_begin + rows_per_split);

    float acc[S] = {};
    if (c < OC) {
        for (int r = row_begin + warp; r < row_end; r += W) {
            const x128 d = load128cs(dout + (size_t)r * OC + c);
            for (int k = 0; k < S; k++) acc[k] += to_float(d[k]);
        }
    }
    if (warp > 0) {
        for (int k = 0; k < S; k++) per_warp[warp][lane][k] = acc[k];
    }
    __syncthreads();
    if (warp > 0 || c >= OC) return;
    for (int w = 1; w < W; w++) {
        for (int k = 0; k < S; k++) acc[k] += per_warp[w][lane][k];
    }
    if (partials != nullptr) {
        for (int k = 0; k < S; k++) partials[(size_t)blockIdx.y * OC + c + k] = acc[k];
    } else {
        const x128 old = load128(dbias + c);
        x128 y;
        for (int k = 0; k < S; k++) y[k] = from_float<T>(to_float(old[k]) + acc[k]);
        store128(dbias + c, y);
    }
}

template <class T>
__global__ void bias_backward_fold_kernel(T* dbias, const float* partials, int num_splits, int OC) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= OC) return;
    float acc = 0.0f;
    for (int y = 0; y < num_splits; y++) acc += partials[(size_t)y * OC + c];
    dbias[c] = from_float<T>(to_float(dbias[c]) + acc);
}

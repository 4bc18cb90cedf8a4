// RMSNorm without weights over the last dimension C (eps 1e-6), nanochat's `norm`: the block norms,
// the final norm, and QK-norm over the head dimension D of q and k. Launched by llmpy/gpu/rmsnorm.py;
// reference llmpy/cpu/rmsnorm.py.
//   rmsnorm_forward_kernel<T>:        out = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps) (saved, fp32)
//   fused_residual_rmsnorm_forward_kernel<T>: residual = inp1 + inp2 (rounded to T), then RMSNorm of
//                                     the rounded residual into normed and rstd (as GPT-2's fused
//                                     residual + LayerNorm, llmc-facts.md §6.4)
//   rmsnorm_backward_kernel<T>:       dinp (+)= (dout - n * mean(dout * n)) * rstd, n = x * rstd;
//                                     accumulates when `accumulate` != 0 (the residual stream's
//                                     gradient), else overwrites (QK-norm's q and k)
// No weights, so no parameter gradient and no cross-row reduction: every kernel is one warp per row,
// lanes striding over the row in 16-byte chunks; the row is read twice (the second time from cache).
// Memory bound. Requires C % (16 / sizeof(T)) == 0 and 16-byte aligned pointers (the launcher checks).
// For QK-norm (C = D = 64 or 128) most lanes of a warp idle: a row is only 8 or 16 bf16 chunks.
#include "common.cuh"

constexpr float RMS_EPS = 1e-6f;

// One warp normalizes row x into y; returns rstd.
template <class T>
__device__ __forceinline__ float rmsnorm_row(T* y, const T* x, int C, int lane) {
    using x128 = Packed128<T>;
    constexpr int S = x128::size;
    float sq = 0.0f;
    for (int c = lane * S; c < C; c += WARP_SIZE * S) {
        const x128 v = load128(x + c);
        for (int k = 0; k < S; k++) sq += to_float(v[k]) * to_float(v[k]);
    }
    const float s = rsqrtf(warp_sum(sq) / C + RMS_EPS);
    for (int c = lane * S; c < C; c += WARP_SIZE * S) {
        const x128 v = load128cs(x + c);               // last use of the row
        x128 o;
        for (int k = 0; k < S; k++) o[k] = from_float<T>(to_float(v[k]) * s);
        store128(y + c, o);                            // read next by a matmul or attention: keep cached
    }
    return s;
}

// out may be inp itself (each lane reads its chunks before it writes them).
template <class T>
__global__ void rmsnorm_forward_kernel(T* out, float* rstd, const T* inp, int N, int C) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= N) return;                              // whole warps leave together
    const float s = rmsnorm_row(out + (size_t)row * C, inp + (size_t)row * C, C, lane);
    if (lane == 0) rstd[row] = s;
}

template <class T>
__global__ void fused_residual_rmsnorm_forward_kernel(T* residual, T* normed, float* rstd, const T* inp1,
                                                      const T* inp2, int N, int C) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= N) return;
    const size_t offset = (size_t)row * C;
    residual_row(residual + offset, inp1 + offset, inp2 + offset, C, lane);
    const float s = rmsnorm_row(normed + offset, residual + offset, C, lane);
    if (lane == 0) rstd[row] = s;
}

// y = x * s:  dx = s * (dy - y * mean(dy * y))   (the projection of dy off y, rescaled).
// dinp may be dout itself when not accumulating (each lane reads its chunks before writing them).
template <class T>
__global__ void rmsnorm_backward_kernel(T* dinp, const T* dout, const T* inp, const float* rstd,
                                        int N, int C, int accumulate) {
    using x128 = Packed128<T>;
    constexpr int S = x128::size;
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= N) return;
    const T* x = inp + (size_t)row * C;
    const T* dy = dout + (size_t)row * C;
    T* dx = dinp + (size_t)row * C;
    const float s = rstd[row];
    float dot = 0.0f;
    for (int c = lane * S; c < C; c += WARP_SIZE * S) {
        const x128 xv = load128(x + c), dv = load128(dy + c);
        for (int k = 0; k < S; k++) dot += to_float(dv[k]) * to_float(xv[k]);
    }
    const float b = warp_sum(dot) * s * s / C;         // mean(dy * n) * rstd, with n = x * rstd
    for (int c = lane * S; c < C; c += WARP_SIZE * S) {
        const x128 xv = load128cs(x + c), dv = load128cs(dy + c);
        x128 o;
        if (accumulate) {
            const x128 old = load128(dx + c);
            for (int k = 0; k < S; k++) {
                o[k] = from_float<T>(to_float(old[k]) + (to_float(dv[k]) - to_float(xv[k]) * b) * s);
            }
        } else {
            for (int k = 0; k < S; k++) o[k] = from_float<T>((to_float(dv[k]) - to_float(xv[k]) * b) * s);
        }
        store128cg(dx + c, o);                         // the next kernel reads it: L2 only
    }
}

// LayerNorm over the last dimension C (eps 1e-5, biased variance), and residual add + LayerNorm fused.
// Launched by llmpy/gpu/layernorm.py; reference llmpy/cpu/layernorm.py.
//   layernorm_forward_kernel<T>:       out = (x - mean) * rstd * weight + bias; saves mean, rstd (fp32)
//   fused_residual_forward_kernel<T>:  residual = inp1 + inp2 (rounded to T), then LayerNorm of the
//                                      rounded residual into normed, mean, rstd (llmc-facts.md §6.4)
//   layernorm_backward_kernel<T>:      dinp += (dnorm - mean(dnorm) - n * mean(dnorm * n)) * rstd with
//                                      n = (x - mean) * rstd, dnorm = weight * dout; and per-block fp32
//                                      partial sums of dweight (n * dout) and dbias (dout) -> partials
//   layernorm_backward_fold_kernel<T>: dweight += sum of the partials, dbias += likewise (block order)
// Thread mapping: forward kernels use one warp per row, lanes striding over the row in 16-byte chunks;
// the row is read 3 times, the 2nd and 3rd from cache. Memory bound.
// Backward is deterministic and takes two kernels (a simpler scheme than llm.c's single kernel with a
// last-block fold behind an atomic counter, §6.5): kernel 1 walks groups of W rows (W = warps per
// block, groups grid-strided over blocks); for each group, warp w computes dinp of row w and, in the
// same pass over the row, adds n * dout and dout into its own fp32 dweight/dbias accumulators (dynamic
// shared memory, W x 2C floats; each entry has one owning lane: no atomics, no barriers). So every
// thread works and x and dout are read twice per row, not three times (review SLOW-4: the former
// phase B ran on C/8 threads of 256 and re-read the group's rows). At the end the block adds its W
// warps' accumulators in warp order into partials[block] (2*C floats). Kernel 2 sums the blocks'
// partials in block order, one block per 32 channels with its warps splitting the blocks, and adds into
// dweight/dbias (round to nearest). dinp, dweight and dbias all ACCUMULATE (+=).
// Requires C % (16 / sizeof(T)) == 0 and 16-byte aligned pointers (checked by the launcher).
#include "common.cuh"

constexpr float LN_EPS = 1e-5f;

// ---------------------------------------------------------------------------------------------
// forward

// One warp normalizes row x (already in memory) into y; returns (mean, rstd) via the references.
template <class T>
__device__ __forceinline__ void layernorm_row(T* y, const T* x, const T* weight, const T* bias,
                                              int C, int lane, float& mean_out, float& rstd_out) {
    using x128 = Packed128<T>;
    constexpr int S = x128::size;
    float sum = 0.0f;
    for (int c = lane * S; c < C; c += WARP_SIZE * S) {
        const x128 v = load128(x + c);
        for (int k = 0; k < S; k++) sum += to_float(v[k]);
    }
    const float m = warp_sum(sum) / C;
    float sq = 0.0f;                                   // two-pass variance: no cancellation
    for (int c = lane * S; c < C; c += WARP_SIZE * S) {
        const x128 v = load128(x + c);
        for (int k = 0; k < S; k++) {
            const float d = to_float(v[k]) - m;
            sq += d * d;
        }
    }
    const float s = rsqrtf(warp_sum(sq) / C + LN_EPS);
    for (int c = lane * S; c < C; c += WARP_SIZE * S) {
        const x128 v = load128cs(x + c);               // last use of the row
        const x128 w = load128(weight + c);
        const x128 b = load128(bias + c);
        x128 o;
        for (int k = 0; k < S; k++) {
            o[k] = from_float<T>((to_float(v[k]) - m) * s * to_float(w[k]) + to_float(b[k]));
        }
        store128(y + c, o);                            // read next by a matmul: keep cached
    }
    mean_out = m;
    rstd_out = s;
}

template <class T>
__global__ void layernorm_forward_kernel(T* out, float* mean, float* rstd, const T* inp,
                                         const T* weight, const T* bias, int N, int C) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= N) return;                              // whole warps leave together
    float m, s;
    layernorm_row(out + (size_t)row * C, inp + (size_t)row * C, weight, bias, C, lane, m, s);
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}

template <class T>
__global__ void fused_residual_forward_kernel(T* residual, T* normed, float* mean, float* rstd,
                                              const T* inp1, const T* inp2, const T* weight,
                                              const T* bias, int N, int C) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= N) return;
    const size_t offset = (size_t)row * C;
    residual_row(residual + offset, inp1 + offset, inp2 + offset, C, lane);
    float m, s;
    layernorm_row(normed + offset, residual + offset, weight, bias, C, lane, m, s);
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}

// ---------------------------------------------------------------------------------------------
// backward

template <class T>
__global__ void layernorm_backward_kernel(T* dinp, float* partials, const T* dout, const T* inp,
                                          const T* weight, const float* mean, const float* rstd,
                                          int N, int C) {
    using x128 = Packed128<T>;
    constexpr int S = x128::size;
    // per-warp accumulators [W][2][S][C/S]: warp w's dweight (0) or dbias (1) of channel chunk * S + k at
    // ((2 w + which) S + k) C/S + chunk, so a warp's lanes (consecutive chunks) hit consecutive words
    extern __shared__ float acc[];
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int W = blockDim.x / WARP_SIZE;
    const int chunks = C / S;
    float* my_dweight = acc + (size_t)2 * warp * C;    // + k * chunks + chunk; dbias C further
    float* my_dbias = my_dweight + C;

    for (int c = lane * S; c < C; c += WARP_SIZE * S) {
        for (int k = 0; k < S; k++) my_dweight[k * chunks + c / S] = my_dbias[k * chunks + c / S] = 0.0f;
    }
    for (int row0 = blockIdx.x * W; row0 < N; row0 += gridDim.x * W) {
        // warp w: the input gradient of row row0 + w, and its dweight/dbias terms
        const int row = row0 + warp;
        if (row >= N) continue;
        const T* x = inp + (size_t)row * C;
        const T* dy = dout + (size_t)row * C;
        T* dx = dinp + (size_t)row * C;
        const float m = mean[row], s = rstd[row];
        float sum_dn = 0.0f, sum_dn_n = 0.0f;
        for (int c = lane * S; c < C; c += WARP_SIZE * S) {
            const x128 xv = load128(x + c), dv = load128(dy + c), wv = load128(weight + c);
            for (int k = 0; k < S; k++) {
                const float dn = to_float(wv[k]) * to_float(dv[k]);
                sum_dn += dn;
                sum_dn_n += dn * (to_float(xv[k]) - m) * s;
            }
        }
        const float a = warp_sum(sum_dn) / C;          // mean(dnorm)
        const float b = warp_sum(sum_dn_n) / C;        // mean(dnorm * n)
        for (int c = lane * S; c < C; c += WARP_SIZE * S) {
            const x128 xv = load128(x + c), dv = load128(dy + c), wv = load128(weight + c);
            const x128 old = load128(dx + c);
            x128 o;
            for (int k = 0; k < S; k++) {
                const float n = (to_float(xv[k]) - m) * s;
                const float dyk = to_float(dv[k]);
                const float dn = to_float(wv[k]) * dyk;
                o[k] = from_float<T>(to_float(old[k]) + (dn - a - n * b) * s);
                my_dweight[k * chunks + c / S] += n * dyk;
                my_dbias[k * chunks + c / S] += dyk;
            }
            store128cg(dx + c, o);                     // the next kernel reads it: L2 only
        }
    }
    __syncthreads();                                   // every warp's accumulators are final
    float* out = partials + (size_t)blockIdx.x * 2 * C;
    for (int j = threadIdx.x; j < 2 * C; j += blockDim.x) {
        const int which = j / C, c = j % C;
        const float* entry = acc + (size_t)which * C + (c % S) * chunks + c / S;
        float sum = 0.0f;
        for (int w = 0; w < W; w++) sum += entry[(size_t)2 * w * C];   // warp order: deterministic
        out[j] = sum;
    }
}

constexpr int LN_FOLD_MAX_WARPS = 32;

// block (32, W): lane = one of 32 entries of the 2*C vector [dweight | dbias], warps split the
// partial rows (warp w takes rows w, w+W, ...), warp 0 adds the warps' sums in order.
template <class T>
__global__ void layernorm_backward_fold_kernel(T* dweight, T* dbias, const float* partials,
                                               int num_partials, int C) {
    __shared__ float per_warp[LN_FOLD_MAX_WARPS][WARP_SIZE];
    const int lane = threadIdx.x, warp = threadIdx.y, W = blockDim.y;
    const int j = blockIdx.x * WARP_SIZE + lane;       // index into [dweight | dbias]
    float sum = 0.0f;
    if (j < 2 * C) {
        for (int p = warp; p < num_partials; p += W) sum += partials[(size_t)p * 2 * C + j];
    }
    per_warp[warp][lane] = sum;
    __syncthreads();
    if (warp != 0 || j >= 2 * C) return;
    for (int w = 1; w < W; w++) sum += per_warp[w][lane];
    T* target = j < C ? dweight + j : dbias + (j - C);
    *target = from_float<T>(to_float(*target) + sum);
}

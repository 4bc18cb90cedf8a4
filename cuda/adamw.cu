// AdamW update with optional fp32 master weights and stochastic rounding (llmc-facts.md §6.12).
// Launched by llmpy/gpu/adamw.py; reference llmpy/cpu/adamw.py.
//   adamw_kernel<T>: g = grad_scale * grad;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
//                    p_old = master ? master : param;
//                    p = p_old - lr (m / b1corr / (sqrt(v / b2corr) + eps) + wd p_old)
//                    writes m, v, master (if given), and param = stochastic_round(p)
//   init_from_master_kernel<T>: param = stochastic_round(master), with AdamW's geometry and seed, so
//                    resuming reproduces the last update's rounding bit for bit (§2.3)
// Thread mapping: grid (ceil(n / blockDim), slices), one thread per element of a slice; slice y starts
// at y * w_stride in params, y * g_stride in grads and y * s_stride in m, v, master (one launch covers
// all L layers of a tensor, and ZeRO-style shards). The rounding noise hashes (threadIdx.x,
// blockIdx.x * blockDim.x + blockIdx.y, seed): the block size is part of the result. Memory bound.
//
// Step-dependent scalars for CUDA-graph replay (a captured launch keeps its by-value arguments):
//   scalars  (nullptr or device float[4]) = [lr, grad_scale, b1corr, b2corr], b?corr = 1 - beta?^t;
//            when given they replace the by-value lr, grad_scale, beta1_correction, beta2_correction.
//   seed_ptr (nullptr or device uint32[1]): when given, replaces the by-value seed.
#include "common.cuh"

template <class T>
__global__ void adamw_kernel(T* params, float* master, const T* grads, float* m, float* v,
                             int n, long long w_stride, long long g_stride, long long s_stride,
                             float lr, float beta1, float beta2, float beta1_correction,
                             float beta2_correction, float eps, float weight_decay, float grad_scale,
                             unsigned int seed, const float* scalars, const unsigned int* seed_ptr) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (scalars != nullptr) {
        lr = scalars[0];
        grad_scale = scalars[1];
        beta1_correction = scalars[2];
        beta2_correction = scalars[3];
    }
    if (seed_ptr != nullptr) seed = *seed_ptr;
    params += blockIdx.y * w_stride + i;
    grads += blockIdx.y * g_stride + i;
    const long long s = blockIdx.y * s_stride + i;

    const float g = grad_scale * to_float(*grads);
    // m + (1 - b1)(g - m) written as two fmas: b1 m + (g - b1 g)
    const float m_new = fmaf(beta1, m[s], fmaf(-beta1, g, g));
    const float v_new = fmaf(beta2, v[s], fmaf(-beta2, g * g, g * g));
    m[s] = m_new;
    v[s] = v_new;
    const float m_hat = m_new / beta1_correction;
    const float v_hat = v_new / beta2_correction;
    const float p_old = master != nullptr ? master[s] : to_float(*params);
    const float p_new = p_old - lr * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * p_old);
    stochastic_rounding(p_new, params, seed);
    if (master != nullptr) master[s] = p_new;
}

template <class T>
__global__ void init_from_master_kernel(T* params, const float* master, int n, long long w_stride,
                                        long long s_stride, unsigned int seed,
                                        const unsigned int* seed_ptr) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (seed_ptr != nullptr) seed = *seed_ptr;
    stochastic_rounding(master[blockIdx.y * s_stride + i], params + blockIdx.y * w_stride + i, seed);
}

// Muon's elementwise pieces (nanochat's optimizer for the block matrices). Launched by
// llmpy/gpu/muon.py, which runs the Newton-Schulz products between them as batched bf16 cuBLASLt
// GEMMs; reference llmpy/cpu/muon.py. A launch covers a batch of same-shape matrices (e.g. one weight
// of every layer), matrix z at offset z * n in every buffer; grid (blocks per matrix, batch).
//   muon_momentum_kernel<T>:  g = grad_scale * grad;  buf = m buf + (1 - m) g  (fp32, overwritten);
//                             u = nesterov ? (1 - m) g + m buf : buf;  x = bf16(u);
//                             partials[z * gridDim.x + block] = sum of x^2 over the block's elements.
//                             buf = nullptr: u = g (Newton-Schulz of a given matrix, no momentum)
//   muon_normalize_kernel:    x *= 1 / (||x||_F + 1e-7), the norm summed from the matrix's partials in
//                             block order (deterministic), as Newton-Schulz's first step
//   muon_copy_kernel:         dst = src (bf16): C of a GEMM whose beta term needs a second operand
//   muon_apply_kernel<T>:     p = (master ? master : param) - lr scale x, scale = max(1, rows/cols)^0.5;
//                             param = stochastic_round(p) with adamw.cu's hash and geometry, master = p
//                             (if given). No weight decay: nanochat's Muon has none.
// Step-dependent scalars for CUDA-graph replay: scalars (nullptr or device float[2] = [lr, grad_scale])
// replaces the by-value lr and grad_scale, seed_ptr (nullptr or device uint32[1]) the seed, as AdamW's.
// Thread mapping: element-per-thread, grid-strided within a matrix. Memory bound.
#include "common.cuh"

constexpr float NS_NORM_EPS = 1e-7f;

// No __restrict__: x may alias grad (newton_schulz in place on a bf16 array).
template <class T>
__global__ void muon_momentum_kernel(__nv_bfloat16* x, float* partials, float* buf, const T* grad,
                                     int n, float momentum, int nesterov, float grad_scale,
                                     const float* scalars) {
    if (scalars != nullptr) grad_scale = scalars[1];
    const size_t base = (size_t)blockIdx.y * n;
    float acc = 0.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const size_t j = base + i;
        const float g = grad_scale * to_float(grad[j]);
        float u = g;
        if (buf != nullptr) {
            const float b = fmaf(momentum, buf[j] - g, g);    // lerp(g, buf, m) = m buf + (1 - m) g
            buf[j] = b;
            u = nesterov ? fmaf(momentum, b - g, g) : b;
        }
        const __nv_bfloat16 x_j = __float2bfloat16_rn(u);
        x[j] = x_j;                                            // x may be grad itself (bf16, no momentum)
        const float uf = __bfloat162float(x_j);                // the norm of what Newton-Schulz gets
        acc += uf * uf;
    }
    const float total = block_sum(acc);
    if (threadIdx.x == 0) partials[(size_t)blockIdx.y * gridDim.x + blockIdx.x] = total;
}

__global__ void muon_normalize_kernel(__nv_bfloat16* x, const float* partials, int num_partials, int n) {
    __shared__ float inv_norm;
    if (threadIdx.x == 0) {                                    // a few dozen values: one thread, in order
        const float* p = partials + (size_t)blockIdx.y * num_partials;
        float sum = 0.0f;
        for (int k = 0; k < num_partials; k++) sum += p[k];
        inv_norm = 1.0f / (sqrtf(sum) + NS_NORM_EPS);
    }
    __syncthreads();
    const float s = inv_norm;
    const size_t base = (size_t)blockIdx.y * n;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        x[base + i] = __float2bfloat16_rn(__bfloat162float(x[base + i]) * s);
    }
}

__global__ void muon_copy_kernel(__nv_bfloat16* dst, const __nv_bfloat16* src, int n) {
    using x128 = Packed128<__nv_bfloat16>;
    const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * x128::size;
    if (i >= (size_t)n) return;
    map_chunk(dst, src, i, n, [](float v) { return v; });      // bf16 -> fp32 -> bf16 is exact
}

template <class T>
__global__ void muon_apply_kernel(T* params, float* master, const __nv_bfloat16* x, int n, float lr,
                                  float scale, unsigned int seed, const float* scalars,
                                  const unsigned int* seed_ptr) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (scalars != nullptr) lr = scalars[0];
    if (seed_ptr != nullptr) seed = *seed_ptr;
    const size_t j = (size_t)blockIdx.y * n + i;
    const float p_old = master != nullptr ? master[j] : to_float(params[j]);
    const float p_new = p_old - lr * scale * __bfloat162float(x[j]);
    stochastic_rounding(p_new, params + j, seed);
    if (master != nullptr) master[j] = p_new;
}

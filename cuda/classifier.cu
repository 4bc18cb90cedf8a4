// Fused classifier: softmax + cross-entropy loss + logit gradient in one pass over the logits
// (llmc-facts.md §6.11). Launched by llmpy/gpu/classifier.py; reference llmpy/cpu/classifier.py.
//   fused_classifier_kernel<T>: for row r = (b,t), over the V real columns of logits (B*T, Vp):
//       losses[r] += log(sum_j exp(x_j - max)) + max - x_target          (ACCUMULATES, fp32)
//       dlogits[r,j] = (softmax_j - [j == target]) * dloss, j < V       (columns V..Vp-1 untouched)
//   dlogits may be logits itself (in place, as llm.c does) or nullptr (loss only).
//   softcap > 0 (nanochat): x_j is replaced by z_j = softcap * tanh(x_j / softcap) everywhere above,
//       and dlogits[r,j] is multiplied by dz_j/dx_j = 1 - tanh^2; softcap = 0 leaves GPT-2's kernel.
//   softcap_forward_kernel<T>: out = softcap * tanh(inp / softcap) alone, elementwise
// Thread mapping: one block per row (rows walked last to first, so the first blocks find the rows
// the preceding matmul wrote last still in L2); threads stride over the row in 16-byte chunks.
// Pass 1: per-thread online max/sum, block max, rescale, block sum. Thread 0 adds the loss. Pass 2
// writes dlogits. Memory bound: reads the row twice, writes it once.
// Requires Vp % (16 / sizeof(T)) == 0 and 16-byte aligned pointers (checked by the launcher).
#include "common.cuh"

constexpr float SOFTCAP_TANH_MAX_ARG = 9.0f;   // tanh(9) = 1 - 3e-8: 1 in fp32; keeps expm1f finite

// Logit softcap z = cap * tanh(x / cap) and dz/dx = 1 - tanh^2, both with full fp32 accuracy:
// tanh u = e / (e + 2) with e = expm1(2|u|) (no cancellation near 0; the fast-math tanh.approx would
// be ~2^-11 relative), and 1 - tanh^2 = (1 - t)(1 + t) with 1 - t = 2 / (e + 2) (no cancellation
// near |t| = 1). cap <= 0: z = x, dz/dx = 1.
__device__ __forceinline__ float softcap_value(float x, float cap, float* slope) {
    if (cap <= 0.0f) {
        if (slope != nullptr) *slope = 1.0f;
        return x;
    }
    const float e = expm1f(2.0f * fminf(fabsf(x) / cap, SOFTCAP_TANH_MAX_ARG));
    const float t = e / (e + 2.0f);
    if (slope != nullptr) *slope = (2.0f / (e + 2.0f)) * (1.0f + t);
    return copysignf(cap * t, x);
}

template <class T>
__global__ void __launch_bounds__(1024)
fused_classifier_kernel(T* dlogits, float* losses, const T* logits, const int* targets, float dloss,
                        int rows, int V, int Vp, float softcap) {
    using x128 = Packed128<T>;
    constexpr int S = x128::size;
    const int row = rows - 1 - blockIdx.x;
    const T* x = logits + (size_t)row * Vp;
    const int num_chunks = (V + S - 1) / S;            // the last may be partial: columns >= V skipped

    float m = neg_infinity(), s = 0.0f;
    for (int i = threadIdx.x; i < num_chunks; i += blockDim.x) {
        const x128 v = load128(x + i * S);             // Vp % S == 0: the chunk stays inside the row
        for (int k = 0; k < S; k++) {
            if (i * S + k >= V) break;
            const float xk = softcap_value(to_float(v[k]), softcap, nullptr);
            if (xk > m) {
                s *= __expf(m - xk);
                m = xk;
            }
            s += __expf(xk - m);
        }
    }
    const float row_max = block_max(m);
    const float row_sum = block_sum(s * __expf(m - row_max));
    const int target = targets[row];
    if (threadIdx.x == 0) {
        losses[row] += __logf(row_sum) + row_max - softcap_value(to_float(x[target]), softcap, nullptr);
    }
    if (dlogits == nullptr) return;
    __syncthreads();                                   // thread 0 read x[target]; it may be overwritten now

    const float inv_sum = 1.0f / row_sum;
    T* dx = dlogits + (size_t)row * Vp;
    for (int i = threadIdx.x; i < num_chunks; i += blockDim.x) {
        const x128 v = load128cs(x + i * S);           // last read of the logits
        if ((i + 1) * S <= V) {
            x128 g;
            for (int k = 0; k < S; k++) {
                const int j = i * S + k;
                float slope;
                const float p = __expf(softcap_value(to_float(v[k]), softcap, &slope) - row_max) * inv_sum;
                g[k] = from_float<T>((p - (j == target ? 1.0f : 0.0f)) * dloss * slope);
            }
            store128(dx + i * S, g);                   // the classifier matmul's backward reads it
        } else {
            for (int k = 0; k < S; k++) {              // partial last chunk: leave columns >= V alone
                const int j = i * S + k;
                if (j >= V) break;
                float slope;
                const float p = __expf(softcap_value(to_float(v[k]), softcap, &slope) - row_max) * inv_sum;
                dx[j] = from_float<T>((p - (j == target ? 1.0f : 0.0f)) * dloss * slope);
            }
        }
    }
}

// out = softcap * tanh(inp / softcap), elementwise (logits that are read, not trained on: sampling and
// evaluation). One thread per 16-byte chunk, as gelu.cu; out may be inp.
template <class T>
__global__ void softcap_forward_kernel(T* out, const T* inp, int n, float softcap) {
    const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * Packed128<T>::size;
    if (i >= (size_t)n) return;
    map_chunk(out, inp, i, n, [softcap](float x) { return softcap_value(x, softcap, nullptr); });
}

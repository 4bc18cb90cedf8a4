// Fused classifier: softmax + cross-entropy loss + logit gradient in one pass over the logits
// (llmc-facts.md §6.11). Launched by llmpy/gpu/classifier.py; reference llmpy/cpu/classifier.py.
//   fused_classifier_kernel<T>: for row r = (b,t), over the V real columns of logits (B*T, Vp):
//       losses[r] += log(sum_j exp(x_j - max)) + max - x_target          (ACCUMULATES, fp32)
//       dlogits[r,j] = (softmax_j - [j == target]) * dloss, j < V       (columns V..Vp-1 untouched)
//   dlogits may be logits itself (in place, as llm.c does) or nullptr (loss only).
// Thread mapping: one block per row (rows walked last to first, so the first blocks find the rows
// the preceding matmul wrote last still in L2); threads stride over the row in 16-byte chunks.
// Pass 1: per-thread online max/sum, block max, rescale, block sum. Thread 0 adds the loss. Pass 2
// writes dlogits. Memory bound: reads the row twice, writes it once.
// Requires Vp % (16 / sizeof(T)) == 0 and 16-byte aligned pointers (checked by the launcher).
#include "common.cuh"

template <class T>
__global__ void __launch_bounds__(1024)
fused_classifier_kernel(T* dlogits, float* losses, const T* logits, const int* targets, float dloss,
                        int rows, int V, int Vp) {
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
            const float xk = to_float(v[k]);
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
        losses[row] += __logf(row_sum) + row_max - to_float(x[target]);
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
                const float p = __expf(to_float(v[k]) - row_max) * inv_sum;
                g[k] = from_float<T>((p - (j == target ? 1.0f : 0.0f)) * dloss);
            }
            store128(dx + i * S, g);                   // the classifier matmul's backward reads it
        } else {
            for (int k = 0; k < S; k++) {              // partial last chunk: leave columns >= V alone
                const int j = i * S + k;
                if (j >= V) break;
                const float p = __expf(to_float(v[k]) - row_max) * inv_sum;
                dx[j] = from_float<T>((p - (j == target ? 1.0f : 0.0f)) * dloss);
            }
        }
    }
}

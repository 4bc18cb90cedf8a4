// Causal self-attention, the non-matmul half (llmc-facts.md §6.8). Launched by llmpy/gpu/attention.py,
// which runs the batched matmuls (q k^T, att v, ...) through cuBLASLt; reference llmpy/cpu/attention.py.
// Layouts: inp/dinp (B, T, 3C) = [q | k | v] per token, each C = NH heads x HS; qkvr/dqkvr
// (3, B, NH, T, HS); y/dy (B, NH, T, HS); out/dout (B, T, C); att/preatt (B, NH, T, T).
//   permute_kernel<T>:            qkvr[s,b,h,t,d] = inp[b,t,s*C + h*HS + d]      (s = 0,1,2 for q,k,v)
//   unpermute_kernel<T>:          out[b,t,h*HS + d] = y[b,h,t,d]
//   softmax_forward_kernel<T>:    att[r,j] = exp(scale (preatt[r,j] - max)) / sum for j <= t, 0 for j > t
//                                 (row r = (b,h,t); scale = 1/sqrt(HS) folded in; zeros ARE written)
//   softmax_backward_kernel<T>:   dpreatt[r,j] = scale att[r,j] (datt[r,j] - sum_i att[r,i] datt[r,i]),
//                                 j <= t; 0 for j > t
//   unpermute_backward_kernel<T>: dy[b,h,t,d] = dout[b,t,h*HS + d]
//   permute_backward_kernel<T>:   dinp[b,t,s*C + h*HS + d] = dqkvr[s,b,h,t,d]    (overwrites dinp)
//   softmax_forward128_kernel<T>, softmax_backward128_kernel<T>: the same two, for T a multiple of
//                                 Packed128<T>::size (8 bf16, 4 float) with 16-byte aligned arrays
// Thread mapping: the permutes use one thread per element (index walks the destination, so stores
// are coalesced), 3 elements per thread for the q/k/v ones; the softmaxes use one warp per row, fp32
// online softmax. The plain ones stride their lanes over single columns (any T); the 128 ones move
// 16 bytes per lane (a warp covers 32 chunks), and skip reading chunks that start after column t.
// All memory bound. The softmax kernels may run in place (att == preatt, dpreatt == datt): every lane
// reads all its columns before writing them, and no other lane touches those columns.
#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// permutes

// Index math in int: the launcher keeps every array under 2^31 elements (64-bit division is slow).

template <class T>
__global__ void permute_kernel(T* qkvr, const T* inp, int B, int T_, int NH, int HS) {
    const int plane = B * NH * T_ * HS;                                 // = B*T*C
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;              // over (b, h, t, d)
    if (idx >= plane) return;
    const int d = idx % HS;
    const int t = (idx / HS) % T_;
    const int h = (idx / (HS * T_)) % NH;
    const int b = idx / (HS * T_ * NH);
    const int C = NH * HS;
    const int src = (b * T_ + t) * 3 * C + h * HS + d;
    qkvr[idx] = inp[src];
    qkvr[plane + idx] = inp[src + C];
    qkvr[2 * plane + idx] = inp[src + 2 * C];
}

template <class T>
__global__ void permute_backward_kernel(T* dinp, const T* dqkvr, int B, int T_, int NH, int HS) {
    const int plane = B * NH * T_ * HS;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;              // over (b, t, h, d)
    if (idx >= plane) return;
    const int C = NH * HS;
    const int d = idx % HS;
    const int h = (idx / HS) % NH;
    const int t = (idx / C) % T_;
    const int b = idx / (C * T_);
    const int src = ((b * NH + h) * T_ + t) * HS + d;
    const int dst = (b * T_ + t) * 3 * C + h * HS + d;
    dinp[dst] = dqkvr[src];
    dinp[dst + C] = dqkvr[plane + src];
    dinp[dst + 2 * C] = dqkvr[2 * plane + src];
}

template <class T>
__global__ void unpermute_kernel(T* out, const T* y, int B, int T_, int NH, int HS) {
    const int C = NH * HS;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;              // over (b, t, h, d)
    if (idx >= B * T_ * C) return;
    const int d = idx % HS;
    const int h = (idx / HS) % NH;
    const int t = (idx / C) % T_;
    const int b = idx / (C * T_);
    out[idx] = y[((b * NH + h) * T_ + t) * HS + d];
}

template <class T>
__global__ void unpermute_backward_kernel(T* dy, const T* dout, int B, int T_, int NH, int HS) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;              // over (b, h, t, d)
    if (idx >= B * NH * T_ * HS) return;
    const int d = idx % HS;
    const int t = (idx / HS) % T_;
    const int h = (idx / (HS * T_)) % NH;
    const int b = idx / (HS * T_ * NH);
    dy[idx] = dout[(b * T_ + t) * NH * HS + h * HS + d];
}

// ---------------------------------------------------------------------------------------------
// softmax over causal rows

// rows = B*NH*T; row r has t = r % T and uses columns 0..t.
template <class T>
__global__ void softmax_forward_kernel(T* att, const T* preatt, float scale, int rows, int T_) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= rows) return;
    const int t = row % T_;
    const T* x = preatt + (size_t)row * T_;
    T* y = att + (size_t)row * T_;
    // online softmax over this lane's columns: running max m, sum s of exp(scale (x - m))
    float m = neg_infinity(), s = 0.0f;
    for (int j = lane; j <= t; j += WARP_SIZE) {
        const float v = to_float(x[j]);
        if (v > m) {
            s *= __expf(scale * (m - v));
            m = v;
        }
        s += __expf(scale * (v - m));
    }
    const float row_max = warp_max(m);
    s *= __expf(scale * (m - row_max));                 // a lane with no columns has s = 0
    const float inv_sum = 1.0f / warp_sum(s);
    for (int j = lane; j < T_; j += WARP_SIZE) {
        const float p = j <= t ? __expf(scale * (to_float(x[j]) - row_max)) * inv_sum : 0.0f;
        y[j] = from_float<T>(p);
    }
}

template <class T>
__global__ void softmax_backward_kernel(T* dpreatt, const T* datt, const T* att, float scale,
                                        int rows, int T_) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= rows) return;
    const int t = row % T_;
    const size_t offset = (size_t)row * T_;
    float dot = 0.0f;
    for (int j = lane; j <= t; j += WARP_SIZE) dot += to_float(att[offset + j]) * to_float(datt[offset + j]);
    dot = warp_sum(dot);
    for (int j = lane; j < T_; j += WARP_SIZE) {
        const float g = j <= t ? scale * to_float(att[offset + j]) * (to_float(datt[offset + j]) - dot) : 0.0f;
        dpreatt[offset + j] = from_float<T>(g);
    }
}

// Vectorised rows: lane l owns chunks l, l + 32, ... of Packed128<T>::size columns. T_ is a multiple
// of the chunk size and the arrays are 16-byte aligned (the launcher checks), so every chunk is
// in bounds and aligned. A chunk that starts at or before column t is read whole; its columns after
// t are masked.
template <class T>
__global__ void softmax_forward128_kernel(T* att, const T* preatt, float scale, int rows, int T_) {
    constexpr int V = Packed128<T>::size;
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= rows) return;
    const int t = row % T_;
    const T* x = preatt + (size_t)row * T_;
    T* y = att + (size_t)row * T_;
    float m = neg_infinity(), s = 0.0f;
    for (int j0 = lane * V; j0 <= t; j0 += WARP_SIZE * V) {
        const Packed128<T> p = load128(x + j0);
        float chunk_max = to_float(p[0]);                 // column j0 <= t always counts
        for (int k = 1; k < V; k++) {
            if (j0 + k <= t) chunk_max = fmaxf(chunk_max, to_float(p[k]));
        }
        if (chunk_max > m) {
            s *= __expf(scale * (m - chunk_max));         // m = -inf: s was 0 and stays 0
            m = chunk_max;
        }
        for (int k = 0; k < V; k++) {
            if (j0 + k <= t) s += __expf(scale * (to_float(p[k]) - m));
        }
    }
    const float row_max = warp_max(m);
    s *= __expf(scale * (m - row_max));
    const float inv_sum = 1.0f / warp_sum(s);
    for (int j0 = lane * V; j0 < T_; j0 += WARP_SIZE * V) {
        Packed128<T> out;
        if (j0 <= t) {
            const Packed128<T> p = load128(x + j0);
            for (int k = 0; k < V; k++) {
                const float e = j0 + k <= t ? __expf(scale * (to_float(p[k]) - row_max)) * inv_sum : 0.0f;
                out[k] = from_float<T>(e);
            }
        } else {
            for (int k = 0; k < V; k++) out[k] = from_float<T>(0.0f);
        }
        store128(y + j0, out);
    }
}

template <class T>
__global__ void softmax_backward128_kernel(T* dpreatt, const T* datt, const T* att, float scale,
                                           int rows, int T_) {
    constexpr int V = Packed128<T>::size;
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= rows) return;
    const int t = row % T_;
    const size_t offset = (size_t)row * T_;
    float dot = 0.0f;
    for (int j0 = lane * V; j0 <= t; j0 += WARP_SIZE * V) {
        const Packed128<T> a = load128(att + offset + j0);
        const Packed128<T> d = load128(datt + offset + j0);
        for (int k = 0; k < V; k++) {
            if (j0 + k <= t) dot += to_float(a[k]) * to_float(d[k]);
        }
    }
    dot = warp_sum(dot);
    for (int j0 = lane * V; j0 < T_; j0 += WARP_SIZE * V) {
        Packed128<T> out;
        if (j0 <= t) {
            const Packed128<T> a = load128(att + offset + j0);
            const Packed128<T> d = load128(datt + offset + j0);
            for (int k = 0; k < V; k++) {
                const float g = j0 + k <= t ? scale * to_float(a[k]) * (to_float(d[k]) - dot) : 0.0f;
                out[k] = from_float<T>(g);
            }
        } else {
            for (int k = 0; k < V; k++) out[k] = from_float<T>(0.0f);
        }
        store128(dpreatt + offset + j0, out);
    }
}

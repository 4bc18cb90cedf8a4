// Causal self-attention, the non-matmul half (llmc-facts.md §6.8). Launched by llmpy/gpu/attention.py,
// which runs the batched matmuls (q k^T, att v, ...) through cuBLASLt; reference llmpy/cpu/attention.py.
// Layouts: inp/dinp (B, T, 3C) = [q | k | v] per token, each C = NH heads x HS; qkvr/dqkvr
// (3, B, NH, T, HS); y/dy (B, NH, T, HS); out/dout (B, T, C); att/preatt (B, NH, T, T).
//   permute_kernel<T>:            qkvr[s,b,h,t,d] = inp[b,t,s*C + h*HS + d]      (s = 0,1,2 for q,k,v)
//   unpermute_kernel<T>:          out[b,t,h*HS + d] = y[b,h,t,d]
//   softmax_forward_kernel<T>:    att[r,j] = exp(scale (preatt[r,j] - max)) / sum for j <= t, 0 for j > t
//                                 (row r = (b,h,t); scale = 1/sqrt(HS) folded in). The zeros j > t are
//                                 written only with write_upper = 1, which in place (att == preatt) is
//                                 required: q k^T filled the upper triangle. Out of place, with att's
//                                 upper triangle zeroed once by its owner, write_upper = 0 stores only
//                                 the columns j < t + 1 rounded up to a chunk (llm.c's kernel5 stores
//                                 j <= t), which saves a third of the writes at T = 1024.
//   softmax_backward_kernel<T>:   dpreatt[r,j] = scale att[r,j] (datt[r,j] - sum_i att[r,i] datt[r,i]),
//                                 j <= t; 0 for j > t
//   unpermute_backward_kernel<T>: dy[b,h,t,d] = dout[b,t,h*HS + d]
//   permute_backward_kernel<T>:   dinp[b,t,s*C + h*HS + d] = dqkvr[s,b,h,t,d]    (overwrites dinp)
//   softmax_forward128_kernel<T>, softmax_backward128_kernel<T>: the same two, for T a multiple of
//                                 Packed128<T>::size (8 bf16, 4 float) with 16-byte aligned arrays
// Thread mapping: the permutes use one thread per element (index walks the destination, so stores
// are coalesced), 3 elements per thread for the q/k/v ones; the softmaxes use one warp per row, fp32
// online softmax, one routine for both chunk widths (single columns, or 16 bytes per lane in the
// 128 kernels). All memory bound. The softmax kernels may run in place (att == preatt, dpreatt == datt): every lane
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

// rows = B*NH*T; row r has t = r % T and uses columns 0..t. Warp w of the grid owns row w; lane l
// owns the chunks l, l + 32, ... of V columns each. V = 1 (any T, scalar loads, coalesced across the
// warp) or V = Packed128<T>::size (one 16-byte load; T a multiple of V and 16-byte aligned arrays,
// which the launcher checks, keep every chunk inside its row and aligned). A chunk that starts at or
// before column t is read whole and its columns after t are masked; later chunks are not read.

template <class T, int V>
struct Chunk {
    T v[V];
    __device__ __forceinline__ float operator[](int k) const { return to_float(v[k]); }
};

template <class T, int V>
__device__ __forceinline__ Chunk<T, V> load_chunk(const T* p) {
    Chunk<T, V> c;
    if constexpr (V == 1) {
        c.v[0] = *p;
    } else {
        static_assert(V == Packed128<T>::size, "a chunk is one element or 16 bytes");
        const Packed128<T> packed = load128(p);
        for (int k = 0; k < V; k++) c.v[k] = packed[k];
    }
    return c;
}

template <class T, int V>
__device__ __forceinline__ void store_chunk(T* p, const float (&x)[V]) {
    if constexpr (V == 1) {
        *p = from_float<T>(x[0]);
    } else {
        Packed128<T> packed;
        for (int k = 0; k < V; k++) packed[k] = from_float<T>(x[k]);
        store128(p, packed);
    }
}

template <class T, int V>
__device__ __forceinline__ void softmax_forward_row(T* att, const T* preatt, float scale, int rows, int T_,
                                                    int write_upper) {
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    if (row >= rows) return;
    const int t = row % T_;
    const T* x = preatt + (size_t)row * T_;             // x and y may be the same row (in place)
    T* y = att + (size_t)row * T_;
    // online softmax over this lane's columns: running max m, sum s of exp(scale (x - m))
    float m = neg_infinity(), s = 0.0f;
    for (int j0 = lane * V; j0 <= t; j0 += WARP_SIZE * V) {
        const Chunk<T, V> c = load_chunk<T, V>(x + j0);
        float chunk_max = c[0];                          // column j0 <= t always counts
        for (int k = 1; k < V; k++) {
            if (j0 + k <= t) chunk_max = fmaxf(chunk_max, c[k]);
        }
        if (chunk_max > m) {
            s *= __expf(scale * (m - chunk_max));        // m = -inf: s was 0 and stays 0
            m = chunk_max;
        }
        for (int k = 0; k < V; k++) {
            if (j0 + k <= t) s += __expf(scale * (c[k] - m));
        }
    }
    const float row_max = warp_max(m);
    s *= __expf(scale * (m - row_max));                 // a lane with no columns has s = 0
    const float inv_sum = 1.0f / warp_sum(s);
    const int end = write_upper ? T_ : t + 1;            // a chunk that straddles t stores its zeros
    for (int j0 = lane * V; j0 < end; j0 += WARP_SIZE * V) {
        float p[V];
        for (int k = 0; k < V; k++) p[k] = 0.0f;
        if (j0 <= t) {
            const Chunk<T, V> c = load_chunk<T, V>(x + j0);
            for (int k = 0; k < V; k++) {
                if (j0 + k <= t) p[k] = __expf(scale * (c[k] - row_max)) * inv_sum;
            }
        }
        store_chunk<T, V>(y + j0, p);
    }
}

template <class T, int V>
__device__ __forceinline__ void softmax_backward_row(T* dpreatt, const T* datt, const T* att, float scale,
                                                     int rows, int T_) {
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    if (row >= rows) return;
    const int t = row % T_;
    const size_t offset = (size_t)row * T_;
    float dot = 0.0f;
    for (int j0 = lane * V; j0 <= t; j0 += WARP_SIZE * V) {
        const Chunk<T, V> a = load_chunk<T, V>(att + offset + j0), d = load_chunk<T, V>(datt + offset + j0);
        for (int k = 0; k < V; k++) {
            if (j0 + k <= t) dot += a[k] * d[k];
        }
    }
    dot = warp_sum(dot);
    for (int j0 = lane * V; j0 < T_; j0 += WARP_SIZE * V) {
        float g[V];
        for (int k = 0; k < V; k++) g[k] = 0.0f;
        if (j0 <= t) {
            const Chunk<T, V> a = load_chunk<T, V>(att + offset + j0), d = load_chunk<T, V>(datt + offset + j0);
            for (int k = 0; k < V; k++) {
                if (j0 + k <= t) g[k] = scale * a[k] * (d[k] - dot);
            }
        }
        store_chunk<T, V>(dpreatt + offset + j0, g);
    }
}

template <class T>
__global__ void softmax_forward_kernel(T* att, const T* preatt, float scale, int rows, int T_, int write_upper) {
    softmax_forward_row<T, 1>(att, preatt, scale, rows, T_, write_upper);
}

template <class T>
__global__ void softmax_forward128_kernel(T* att, const T* preatt, float scale, int rows, int T_,
                                          int write_upper) {
    softmax_forward_row<T, Packed128<T>::size>(att, preatt, scale, rows, T_, write_upper);
}

template <class T>
__global__ void softmax_backward_kernel(T* dpreatt, const T* datt, const T* att, float scale,
                                        int rows, int T_) {
    softmax_backward_row<T, 1>(dpreatt, datt, att, scale, rows, T_);
}

template <class T>
__global__ void softmax_backward128_kernel(T* dpreatt, const T* datt, const T* att, float scale,
                                           int rows, int T_) {
    softmax_backward_row<T, Packed128<T>::size>(dpreatt, datt, att, scale, rows, T_);
}

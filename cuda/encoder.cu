// Token + position embedding. Launched by llmpy/gpu/encoder.py; reference llmpy/cpu/encoder.py.
//   encoder_forward_kernel<T>:      out[b,t,:] = wte[inp[b,t],:] + wpe[t,:]                 (overwrites)
//                                   wpe = nullptr: out[b,t,:] = wte[inp[b,t],:] (rotary models, nanochat)
//   encoder_backward_wpe_kernel<T>: dwpe[t,:] += sum_b dout[b,t,:]                          (accumulates)
//   encoder_backward_wte_kernel<T>: dwte[v,:] += sum over positions p with token v of dout[p,:]
// Thread mapping: forward and dwpe use one thread per 16-byte chunk (8 bf16 / 4 float channels);
// dwte uses one block of (32, warps) threads per (token bucket, group of 32 chunks): the warps split
// the bucket's positions, each lane owns one chunk of channels, warp 0 folds the warps in order.
// All memory bound. Deterministic: fixed summation orders, no atomics. The backward kernels round
// into bf16 stochastically (seeded, common.cuh), as llm.c does (llmc-facts.md §6.2).
// Requires C % (16 / sizeof(T)) == 0 and 16-byte aligned base pointers (checked by the launcher).
//
// dwte's work list is built on the host (llmpy/gpu/encoder.py: wte_buckets): an int32 array
//   [token of bucket 0..nb-1 | start 0..nb (prefix offsets) | positions b*T+t, grouped by bucket]
// with one bucket per distinct token, largest first, and positions ascending within a bucket.
#include "common.cuh"

template <class T>
__global__ void encoder_forward_kernel(T* out, const int* inp, const T* wte, const T* wpe,
                                       int BT, int T_, int C) {
    using x128 = Packed128<T>;
    const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * x128::size;
    if (i >= (size_t)BT * C) return;
    const int bt = (int)i / C;                         // int: out has fewer than 2^31 elements
    const int t = bt % T_;
    const int c = (int)i % C;
    const x128 a = load128cs(wte + (size_t)inp[bt] * C + c);
    if (wpe == nullptr) {
        store128(out + i, a);
        return;
    }
    const x128 p = load128(wpe + (size_t)t * C + c);  // reused by all B sequences: keep cached
    x128 y;
    for (int k = 0; k < x128::size; k++) y[k] = from_float<T>(to_float(a[k]) + to_float(p[k]));
    store128(out + i, y);
}

// One thread per chunk of dwpe[:T]: sums the B rows of dout in order.
template <class T>
__global__ void encoder_backward_wpe_kernel(T* dwpe, const T* dout, int B, int T_, int C,
                                            unsigned int seed) {
    using x128 = Packed128<T>;
    const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * x128::size;
    const size_t TC = (size_t)T_ * C;
    if (i >= TC) return;
    float acc[x128::size] = {};
    for (int b = 0; b < B; b++) {
        const x128 d = load128cs(dout + b * TC + i);
        for (int k = 0; k < x128::size; k++) acc[k] += to_float(d[k]);
    }
    const x128 old = load128(dwpe + i);
    x128 y;
    for (int k = 0; k < x128::size; k++) {
        stochastic_rounding(to_float(old[k]) + acc[k], &y.v[k], seed + (unsigned int)(i + k));
    }
    store128(dwpe + i, y);
}

constexpr int WTE_MAX_WARPS = 8;  // blockDim.y limit: the shared fold buffer below is sized for it

template <class T>
__global__ void encoder_backward_wte_kernel(T* dwte, const T* dout, const int* buckets,
                                            int num_buckets, int C, unsigned int seed) {
    using x128 = Packed128<T>;
    __shared__ float partial[WTE_MAX_WARPS][WARP_SIZE][x128::size];
    const int lane = threadIdx.x, warp = threadIdx.y, num_warps = blockDim.y;
    const int bucket = blockIdx.x;
    const int c = (blockIdx.y * WARP_SIZE + lane) * x128::size;     // this lane's channels
    const int token = buckets[bucket];
    const int begin = buckets[num_buckets + bucket];
    const int end = buckets[num_buckets + bucket + 1];
    const int* positions = buckets + 2 * num_buckets + 1;

    float acc[x128::size] = {};
    if (c < C) {
        for (int j = begin + warp; j < end; j += num_warps) {          // warp w: items w, w+W, ...
            const x128 d = load128cs(dout + (size_t)positions[j] * C + c);
            for (int k = 0; k < x128::size; k++) acc[k] += to_float(d[k]);
        }
    }
    if (warp > 0) {
        for (int k = 0; k < x128::size; k++) partial[warp][lane][k] = acc[k];
    }
    __syncthreads();
    if (warp > 0 || c >= C) return;
    for (int w = 1; w < num_warps; w++) {                               // fixed order: deterministic
        for (int k = 0; k < x128::size; k++) acc[k] += partial[w][lane][k];
    }
    T* row = dwte + (size_t)token * C + c;
    const x128 old = load128(row);
    x128 y;
    for (int k = 0; k < x128::size; k++) {
        stochastic_rounding(to_float(old[k]) + acc[k], &y.v[k], seed + k);
    }
    store128(row, y);
}

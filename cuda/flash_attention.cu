// Fused causal self-attention for bf16 storage, HS = 64: FlashAttention-2's algorithm (Dao, 2023,
// https://arxiv.org/abs/2307.08691) on tensor cores through the WMMA API. The T x T probabilities never
// go to global memory: a block keeps a 64-row tile of queries in shared memory, walks the key tiles at
// or before it, and keeps a running (online) softmax, so memory traffic is O(T HS) per head instead of
// attention.cu's O(T^2). Launched by llmpy/gpu/flash_attention.py; reference llmpy/cpu/attention.py
// (flash_attention_forward/backward). It plays the part of llm.c's cuDNN path (llmc-facts.md §6.8).
//
// Layouts, no permutes: qkv/dqkv (B, T, 3C), token (b, t) = [q | k | v], each C = NH heads x 64;
// out/dout (B, T, C); lse/delta (B, NH, T) fp32. scale = 1/sqrt(HS); logits z = scale q.k.
//   flash_attention_forward_kernel:       out = softmax(z, causal) v;  lse[b,h,t] = log sum_{j<=t} exp(z_tj)
//   flash_attention_delta_kernel:         delta[b,h,t] = sum_d dout[b,t,h*HS+d] out[b,t,h*HS+d]
//   flash_attention_backward_dkdv_kernel: dk, dv parts of dqkv; block = 64 keys, loops over queries >= key
//   flash_attention_backward_dq_kernel:   dq part of dqkv; block = 64 queries, loops over keys <= query
// In the backward, P = exp(z - lse) and dz = P (dP - delta), dP = dout v^T, are recomputed from q, k, v in
// both kernels (7 tile products per pair of tiles instead of FlashAttention-2's 5), so that dq is a sum
// inside one block instead of atomics across blocks: the backward is deterministic, as llm.c's is.
//
// Thread mapping (all kernels but delta): 4 warps, warp w owns rows 16w..16w+15 of the block's 64-row
// tile and computes their products with 16x16x16 bf16 WMMA (fp32 accumulation). Fragment layouts are
// opaque, so row-wise work (masking, softmax, rescaling) goes through a per-warp fp32 scratch tile in
// shared memory, where lane l owns row l/2, columns 32 (l%2) .. 32 (l%2) + 31. Shared tiles have row
// strides of 72 bf16 / 68 floats: multiples of 16 bytes (WMMA's rule), 32-byte aligned 16-row steps,
// and rows 4 banks apart. Probabilities and dz are rounded to bf16 before their products (l, the
// softmax denominator, sums them in fp32). Each kernel carves its dynamic shared memory in the order
// it takes the regions below; the launcher passes that many bytes (54272, 90624 and 80896) and checks
// HS = 64 and that every index fits in an int.
#include "common.cuh"
#include <mma.h>

namespace wmma = nvcuda::wmma;
using bf16 = __nv_bfloat16;

constexpr int FA_HS = 64;                  // head size
constexpr int FA_TILE = 64;                // rows of a query or key tile
constexpr int FA_WARPS = 4;
constexpr int FA_THREADS = FA_WARPS * WARP_SIZE;
constexpr int FA_ROWS = FA_TILE / FA_WARPS;  // 16 rows per warp: one WMMA tile high
constexpr int FA_LDB = FA_HS + 8;          // bf16 tile row stride (FA_HS == FA_TILE: one stride for both)
constexpr int FA_LDS = FA_TILE + 4;        // fp32 scratch row stride
constexpr int FA_COLS = FA_TILE / 2;       // scratch columns per lane
constexpr int FA_TILE_BYTES = FA_TILE * FA_LDB * 2;                 // one 64 x 64 bf16 tile
constexpr int FA_F32_BYTES = FA_WARPS * FA_ROWS * FA_LDS * 4;       // per-warp fp32 16 x 64 scratch, all warps
constexpr int FA_B16_BYTES = FA_WARPS * FA_ROWS * FA_LDB * 2;       // per-warp bf16 16 x 64 scratch, all warps
static_assert(FA_HS == FA_TILE, "one row stride and one product shape serve q/k/v tiles and score tiles");

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>;
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major>;
using FragBT = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major>;  // B^T of a row-major tile
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

extern __shared__ __align__(128) int4 fa_smem[];

// Carves the dynamic shared memory: consecutive 32-byte aligned regions (every size above is a
// multiple of 32 bytes).
struct SmemCursor {
    unsigned char* p;
    __device__ explicit SmemCursor(void* base) : p(static_cast<unsigned char*>(base)) {}
    template <class U> __device__ U* take(int bytes) {
        U* r = reinterpret_cast<U*>(p);
        p += bytes;
        return r;
    }
};

// Copies a 64 x 64 bf16 tile whose row i is at src + i * stride into shared memory (row stride FA_LDB),
// 16 bytes per thread and step. Rows i >= valid are zeros (past the end of the sequence).
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* src, int stride, int valid) {
    constexpr int CHUNKS = FA_HS / 8;
    for (int i = threadIdx.x; i < FA_TILE * CHUNKS; i += FA_THREADS) {
        const int r = i / CHUNKS, c = (i % CHUNKS) * 8;
        if (r < valid) {
            store128(dst + r * FA_LDB + c, load128(src + (size_t)r * stride + c));
        } else {
            for (int k = 0; k < 8; k++) dst[r * FA_LDB + c + k] = from_float<bf16>(0.0f);
        }
    }
}

// One warp: out (16 x 64 fp32, stride FA_LDS) = a (16 x 64) times b (64 x 64), or times b^T when
// TRANS_B; a and b bf16 in shared memory with row stride FA_LDB.
template <bool TRANS_B>
__device__ __forceinline__ void warp_product(float* out, const bf16* a, const bf16* b) {
    FragA fa[FA_HS / 16];
    for (int k = 0; k < FA_HS / 16; k++) wmma::load_matrix_sync(fa[k], a + k * 16, FA_LDB);
    for (int n = 0; n < FA_TILE / 16; n++) {
        FragC acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int k = 0; k < FA_HS / 16; k++) {
            if constexpr (TRANS_B) {
                FragBT fb;
                wmma::load_matrix_sync(fb, b + n * 16 * FA_LDB + k * 16, FA_LDB);
                wmma::mma_sync(acc, fa[k], fb, acc);
            } else {
                FragB fb;
                wmma::load_matrix_sync(fb, b + k * 16 * FA_LDB + n * 16, FA_LDB);
                wmma::mma_sync(acc, fa[k], fb, acc);
            }
        }
        wmma::store_matrix_sync(out + n * 16, acc, FA_LDS, wmma::mem_row_major);
    }
}

// One warp: acc (16 x 64, as 4 fragments of 16 columns) += a (16 x 64) times b (64 x 64).
__device__ __forceinline__ void warp_product_add(FragC (&acc)[FA_HS / 16], const bf16* a, const bf16* b) {
    FragA fa[FA_TILE / 16];
    for (int k = 0; k < FA_TILE / 16; k++) wmma::load_matrix_sync(fa[k], a + k * 16, FA_LDB);
    for (int n = 0; n < FA_HS / 16; n++) {
        for (int k = 0; k < FA_TILE / 16; k++) {
            FragB fb;
            wmma::load_matrix_sync(fb, b + k * 16 * FA_LDB + n * 16, FA_LDB);
            wmma::mma_sync(acc[n], fa[k], fb, acc[n]);
        }
    }
}

// One warp: writes the 16 x 64 fp32 rows held in acc, rounded to bf16, to dst + row * stride (row <
// valid only), through the warp's fp32 scratch (lane l writes row l/2, 32 columns, 16 bytes at a time).
__device__ __forceinline__ void warp_store_rows(bf16* dst, int stride, int valid, FragC (&acc)[FA_HS / 16],
                                                float* scratch) {
    for (int n = 0; n < FA_HS / 16; n++) {
        wmma::store_matrix_sync(scratch + n * 16, acc[n], FA_LDS, wmma::mem_row_major);
    }
    __syncwarp();
    const int lane = threadIdx.x % WARP_SIZE, r = lane / 2, c0 = (lane % 2) * FA_COLS;
    if (r < valid) {
        for (int j = 0; j < FA_COLS; j += 8) {
            Packed128<bf16> v;
            for (int k = 0; k < 8; k++) v[k] = from_float<bf16>(scratch[r * FA_LDS + c0 + j + k]);
            store128(dst + (size_t)r * stride + c0 + j, v);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// forward

__global__ void __launch_bounds__(FA_THREADS)
flash_attention_forward_kernel(bf16* out, float* lse, const bf16* qkv, int B, int T_, int NH, float scale) {
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int r = lane / 2, c0 = (lane % 2) * FA_COLS;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * FA_TILE;    // longest rows (most key tiles) first
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    const int C = NH * FA_HS, stride = 3 * C;
    const bf16* q = qkv + (size_t)b * T_ * stride + h * FA_HS;    // q of token (b, 0), head h
    const bf16* k = q + C;
    const bf16* v = q + 2 * C;

    SmemCursor cur(fa_smem);
    bf16* Qs = cur.take<bf16>(FA_TILE_BYTES);
    bf16* Ks = cur.take<bf16>(FA_TILE_BYTES);
    bf16* Vs = cur.take<bf16>(FA_TILE_BYTES);
    float* S = cur.take<float>(FA_F32_BYTES) + warp * FA_ROWS * FA_LDS;    // this warp's scratch
    bf16* P = cur.take<bf16>(FA_B16_BYTES) + warp * FA_ROWS * FA_LDB;

    load_tile(Qs, q + (size_t)q0 * stride, stride, T_ - q0);
    const int t = q0 + warp * FA_ROWS + r;                   // this lane's query (t >= T_: padding row)
    float m = neg_infinity(), l = 0.0f, o[FA_COLS];          // running max of q.k, sum, output columns
    for (int j = 0; j < FA_COLS; j++) o[j] = 0.0f;

    for (int k0 = 0; k0 <= q0; k0 += FA_TILE) {              // key tiles at or before the query tile
        __syncthreads();                                     // the previous tile's K and V are not read any more
        load_tile(Ks, k + (size_t)k0 * stride, stride, T_ - k0);
        load_tile(Vs, v + (size_t)k0 * stride, stride, T_ - k0);
        __syncthreads();
        warp_product<true>(S, Qs + warp * FA_ROWS * FA_LDB, Ks);    // S = q k^T (unscaled)
        __syncwarp();
        // online softmax over the lane's 32 columns; key k0 <= t, so every row has a finite maximum
        float s[FA_COLS], tile_max = neg_infinity();
        for (int j = 0; j < FA_COLS; j++) {
            s[j] = k0 + c0 + j <= t ? S[r * FA_LDS + c0 + j] : neg_infinity();
            tile_max = fmaxf(tile_max, s[j]);
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(FULL_MASK, tile_max, 1));
        const float m_new = fmaxf(m, tile_max);
        const float correction = __expf(scale * (m - m_new));   // first tile: exp(-inf) = 0
        float sum = 0.0f;
        for (int j = 0; j < FA_COLS; j++) {
            const float p = __expf(scale * (s[j] - m_new));     // masked columns: exp(-inf) = 0
            sum += p;
            P[r * FA_LDB + c0 + j] = from_float<bf16>(p);
        }
        sum += __shfl_xor_sync(FULL_MASK, sum, 1);
        l = l * correction + sum;
        m = m_new;
        __syncwarp();                                        // P written, S read by every lane
        warp_product<false>(S, P, Vs);                       // S = P v
        __syncwarp();
        for (int j = 0; j < FA_COLS; j++) o[j] = o[j] * correction + S[r * FA_LDS + c0 + j];
    }

    if (t < T_) {
        const float inv_l = 1.0f / l;
        bf16* dst = out + ((size_t)b * T_ + t) * C + h * FA_HS + c0;
        for (int j = 0; j < FA_COLS; j += 8) {
            Packed128<bf16> packed;
            for (int i = 0; i < 8; i++) packed[i] = from_float<bf16>(o[j + i] * inv_l);
            store128(dst + j, packed);
        }
        if (c0 == 0) lse[(size_t)bh * T_ + t] = scale * m + __logf(l);
    }
}

// ---------------------------------------------------------------------------------------------
// backward

// one thread per (b, t, h): 64 products, 16 bytes at a time; consecutive threads read consecutive rows
__global__ void flash_attention_delta_kernel(float* delta, const bf16* dout, const bf16* out, int B, int T_,
                                             int NH) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * T_ * NH) return;
    const int h = idx % NH, t = (idx / NH) % T_, b = idx / (NH * T_);
    const bf16* x = dout + (size_t)idx * FA_HS;              // = (b T + t) C + h HS
    const bf16* y = out + (size_t)idx * FA_HS;
    float acc = 0.0f;
    for (int d = 0; d < FA_HS; d += 8) {
        const Packed128<bf16> a = load128(x + d), c = load128(y + d);
        for (int i = 0; i < 8; i++) acc += to_float(a[i]) * to_float(c[i]);
    }
    delta[((size_t)b * NH + h) * T_ + t] = acc;
}

__global__ void __launch_bounds__(FA_THREADS)
flash_attention_backward_dkdv_kernel(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse,
                                     const float* delta, int B, int T_, int NH, float scale) {
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int r = lane / 2, c0 = (lane % 2) * FA_COLS;
    const int k0 = blockIdx.x * FA_TILE;                     // first key tiles have the most queries
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    const int C = NH * FA_HS, stride = 3 * C;
    const size_t token0 = (size_t)b * T_;
    const bf16* q = qkv + token0 * stride + h * FA_HS;
    const bf16* go = dout + token0 * C + h * FA_HS;          // dout of token (b, 0), head h
    const float* lse_bh = lse + (size_t)bh * T_;
    const float* delta_bh = delta + (size_t)bh * T_;

    SmemCursor cur(fa_smem);
    bf16* Ks = cur.take<bf16>(FA_TILE_BYTES);
    bf16* Vs = cur.take<bf16>(FA_TILE_BYTES);
    bf16* Qs = cur.take<bf16>(FA_TILE_BYTES);
    bf16* dOs = cur.take<bf16>(FA_TILE_BYTES);
    float* St = cur.take<float>(FA_F32_BYTES) + warp * FA_ROWS * FA_LDS;     // z^T rows: this warp's keys
    float* dPt = cur.take<float>(FA_F32_BYTES) + warp * FA_ROWS * FA_LDS;    // dP^T
    bf16* Pt = cur.take<bf16>(FA_B16_BYTES) + warp * FA_ROWS * FA_LDB;
    bf16* dSt = cur.take<bf16>(FA_B16_BYTES) + warp * FA_ROWS * FA_LDB;      // dz^T
    float* lse_s = cur.take<float>(FA_TILE * 4);
    float* delta_s = cur.take<float>(FA_TILE * 4);

    load_tile(Ks, q + C + (size_t)k0 * stride, stride, T_ - k0);
    load_tile(Vs, q + 2 * C + (size_t)k0 * stride, stride, T_ - k0);
    const int key = k0 + warp * FA_ROWS + r;                 // this lane's key
    FragC dk[FA_HS / 16], dv[FA_HS / 16];
    for (int n = 0; n < FA_HS / 16; n++) {
        wmma::fill_fragment(dk[n], 0.0f);
        wmma::fill_fragment(dv[n], 0.0f);
    }

    for (int q0 = k0; q0 < T_; q0 += FA_TILE) {               // query tiles at or after the key tile
        __syncthreads();
        load_tile(Qs, q + (size_t)q0 * stride, stride, T_ - q0);
        load_tile(dOs, go + (size_t)q0 * C, C, T_ - q0);
        for (int i = threadIdx.x; i < FA_TILE; i += FA_THREADS) {
            const bool inside = q0 + i < T_;
            lse_s[i] = inside ? lse_bh[q0 + i] : 0.0f;
            delta_s[i] = inside ? delta_bh[q0 + i] : 0.0f;
        }
        __syncthreads();
        warp_product<true>(St, Ks + warp * FA_ROWS * FA_LDB, Qs);     // k q^T
        warp_product<true>(dPt, Vs + warp * FA_ROWS * FA_LDB, dOs);   // v dout^T
        __syncwarp();
        for (int j = 0; j < FA_COLS; j++) {
            const int c = c0 + j, tq = q0 + c;
            float p = 0.0f, dz = 0.0f;
            if (tq >= key && tq < T_) {
                p = __expf(scale * St[r * FA_LDS + c] - lse_s[c]);
                dz = p * (dPt[r * FA_LDS + c] - delta_s[c]);
            }
            Pt[r * FA_LDB + c] = from_float<bf16>(p);
            dSt[r * FA_LDB + c] = from_float<bf16>(scale * dz);     // d(q.k) = scale dz
        }
        __syncwarp();
        warp_product_add(dv, Pt, dOs);                       // dv += P^T dout
        warp_product_add(dk, dSt, Qs);                       // dk += d(q.k)^T q
    }

    const int valid = T_ - (k0 + warp * FA_ROWS);
    bf16* dst = dqkv + (token0 + k0 + warp * FA_ROWS) * stride + h * FA_HS;
    warp_store_rows(dst + C, stride, valid, dk, St);
    __syncwarp();                                            // St is rewritten next
    warp_store_rows(dst + 2 * C, stride, valid, dv, St);
}

__global__ void __launch_bounds__(FA_THREADS)
flash_attention_backward_dq_kernel(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse,
                                   const float* delta, int B, int T_, int NH, float scale) {
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int r = lane / 2, c0 = (lane % 2) * FA_COLS;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * FA_TILE;    // longest rows first
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    const int C = NH * FA_HS, stride = 3 * C;
    const size_t token0 = (size_t)b * T_;
    const bf16* q = qkv + token0 * stride + h * FA_HS;

    SmemCursor cur(fa_smem);
    bf16* Qs = cur.take<bf16>(FA_TILE_BYTES);
    bf16* dOs = cur.take<bf16>(FA_TILE_BYTES);
    bf16* Ks = cur.take<bf16>(FA_TILE_BYTES);
    bf16* Vs = cur.take<bf16>(FA_TILE_BYTES);
    float* S = cur.take<float>(FA_F32_BYTES) + warp * FA_ROWS * FA_LDS;
    float* dP = cur.take<float>(FA_F32_BYTES) + warp * FA_ROWS * FA_LDS;
    bf16* dS = cur.take<bf16>(FA_B16_BYTES) + warp * FA_ROWS * FA_LDB;

    load_tile(Qs, q + (size_t)q0 * stride, stride, T_ - q0);
    load_tile(dOs, dout + (token0 + q0) * C + h * FA_HS, C, T_ - q0);
    const int t = q0 + warp * FA_ROWS + r;
    const float lse_t = t < T_ ? lse[(size_t)bh * T_ + t] : 0.0f;
    const float delta_t = t < T_ ? delta[(size_t)bh * T_ + t] : 0.0f;
    FragC dq[FA_HS / 16];
    for (int n = 0; n < FA_HS / 16; n++) wmma::fill_fragment(dq[n], 0.0f);

    for (int k0 = 0; k0 <= q0; k0 += FA_TILE) {
        __syncthreads();
        load_tile(Ks, q + C + (size_t)k0 * stride, stride, T_ - k0);
        load_tile(Vs, q + 2 * C + (size_t)k0 * stride, stride, T_ - k0);
        __syncthreads();
        warp_product<true>(S, Qs + warp * FA_ROWS * FA_LDB, Ks);      // q k^T
        warp_product<true>(dP, dOs + warp * FA_ROWS * FA_LDB, Vs);    // dout v^T
        __syncwarp();
        for (int j = 0; j < FA_COLS; j++) {
            const int c = c0 + j;
            float dz = 0.0f;
            if (k0 + c <= t && t < T_) {
                const float p = __expf(scale * S[r * FA_LDS + c] - lse_t);
                dz = p * (dP[r * FA_LDS + c] - delta_t);
            }
            dS[r * FA_LDB + c] = from_float<bf16>(scale * dz);
        }
        __syncwarp();
        warp_product_add(dq, dS, Ks);                         // dq += d(q.k) k
    }

    warp_store_rows(dqkv + (token0 + q0 + warp * FA_ROWS) * stride + h * FA_HS, stride,
                    T_ - (q0 + warp * FA_ROWS), dq, S);
}

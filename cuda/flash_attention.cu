// Fused causal self-attention for bf16 storage, HS = 64: FlashAttention-2's algorithm (Dao, 2023,
// https://arxiv.org/abs/2307.08691) on tensor cores through ldmatrix and mma.sync (sm80.cuh).
// The T x T probabilities never go to global memory: a block keeps a 64-row tile of queries, walks the
// key tiles at or before it, and keeps a running (online) softmax, so memory traffic is O(T HS) per
// head instead of attention.cu's O(T^2). Launched by llmpy/gpu/flash_attention.py; reference
// llmpy/cpu/attention.py (flash_attention_forward/backward). It plays the part of llm.c's cuDNN path
// (llmc-facts.md §6.8).
//
// Layouts, no permutes: qkv/dqkv (B, T, C + 2 Ckv), token (b, t) = [q | k | v], q C = NH heads x 64, k and
// v Ckv = NKV heads x 64 each (GPT-2: NKV = NH, 3C); out/dout (B, T, C); lse/delta (B, NH, T) fp32.
// Grouped-query attention (nanochat): query head h reads kv head h / (NH / NKV), straight from the
// packed row, so k and v are never copied per query head; dk/dv blocks sum over their group's G = NH / NKV
// query heads inside the block (one block per (b, kv head, key tile)). scale = 1/sqrt(HS); z = scale q.k.
//   flash_attention_forward_kernel:       out = softmax(z, causal) v;  lse[b,h,t] = log sum_{j<=t} exp(z_tj)
//   flash_attention_delta_kernel:         delta[b,h,t] = sum_d dout[b,t,h*HS+d] out[b,t,h*HS+d]
//   flash_attention_backward_dkdv_kernel: dk, dv parts of dqkv; block = 64 keys, loops over queries >= key
//                                         of each query head of the kv head's group
//   flash_attention_backward_dq_kernel:   dq part of dqkv; block = 64 queries, loops over keys <= query
// In the backward, P = exp(z - lse) and dz = P (dP - delta), dP = dout v^T, are recomputed from q, k, v in
// both kernels (7 tile products per pair of tiles instead of FlashAttention-2's 5), so that dq is a sum
// inside one block instead of atomics across blocks: the backward is deterministic, as llm.c's is.
//
// Variants: the forward and dq kernels are templates on <WARPS, EXP2, GQA>. WARPS = 4 or 8 warps per
// block, whose query tile has 16 WARPS rows: 64 or 128. The key tiles the loop walks over stay 64 rows, so
// a 128-row block reads each of them from shared memory for twice the rows (review SLOW-2); in the
// forward, warps whose rows all precede a key tile skip it. GQA = false (NKV = NH) keeps GPT-2's address
// arithmetic (stride 3C, k at q + C) and with it the register counts it was tuned with (a single general
// form took the 4-warp dq kernel from 128-131 to 154-168 registers and spilled the 8-warp forward on
// sm_90); GQA = true computes k and v from the kv head, h / (NH / NKV). EXP2 = true folds log2(e) into the
// softmax scale and computes every exp as exp2f(fma(z, scale log2 e, -shift)), one multiply less per
// element than __expf (which is ex2 of x log2 e); lse stays in natural-log units. <4, false, false> is the
// original kernel; the launcher's tile=128 takes <8, true, *>. dk/dv keeps its 64-key, 4-warp kernel in both: with 8 warps it needs 214 registers
// (one block per SM), and its exp2 variant spills at the 168 that keep three blocks per SM.
//
// Thread mapping (all kernels but delta): 4 or 8 warps; warp w owns rows 16w..16w+15 of the block's own
// tile. A 16 x 64 product of the warp lives in registers as 8 C fragments of 16 x 8 (float s[8][4]):
// lane l holds rows g = l/4 and g + 8, columns 8n + 2t and 8n + 2t + 1 (t = l%4) of fragment n. Row-wise
// softmax work is done there (a row's 64 values are spread over the 4 lanes of a quad: two xor
// shuffles), and the fragments, rounded to bf16, are the A operand of the next product (pack_a_fragment):
// nothing goes through shared memory but the q/k/v/dout tiles themselves and the final 16 x 64 rows,
// which are staged there for 16-byte global stores. Probabilities and dz are rounded to bf16 before
// their products (l, the softmax denominator, sums them in fp32).
//
// The tiles the loop walks over (k and v in the forward and dq kernels, q, dout, lse and delta in dk/dv)
// are double buffered: the next tile's cp.async copies are issued before the current tile's products and
// land while they run; one barrier per tile both publishes the tile and frees the other buffer.
//
// Shared tiles are 64 (or 128) x 64 bf16 with a row stride of 72 (144 bytes): 16-byte aligned rows for
// ldmatrix, and the 8 rows one ldmatrix tile reads start 4 banks apart, so they hit all 32 banks once.
// Each kernel carves its dynamic shared memory in the order it takes the regions below; the launcher
// passes that many bytes (forward, dk/dv, dq: 46080, 56320 and 55296; 8 warps: 55296 and 73728 for the
// forward and dq; above 48 KiB it opts in) and checks HS = 64 and that every index fits in an int.
#include "common.cuh"
#include "sm80.cuh"

using bf16 = __nv_bfloat16;

constexpr int FA_HS = 64;                  // head size
constexpr int FA_TILE = 64;                // rows of a tile the loop walks over (a block's own: 16 WARPS)
constexpr int FA_ROWS = 16;                // rows per warp: one MMA tile high
constexpr float FA_LOG2E = 1.4426950408889634f;

constexpr int FA_DKDV_THREADS = 4 * WARP_SIZE;   // dk/dv has 4 warps in both variants (see the header)

// __launch_bounds__' second argument, the blocks an SM must hold, caps the registers per thread. On sm_90
// the 8-warp kernels get 2 (<= 128 registers: 16 warps per SM, as four 4-warp blocks have; uncapped,
// ptxas took 130 and 162). 0 leaves the rest to ptxas, which is what the 4-warp kernels were tuned with
// and, on sm_80, lands at 128 and 132 for the 8-warp ones without spilling, where a cap of 128 spilled.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int fa_min_blocks(int warps) { return warps == 8 ? 2 : 0; }
#else
constexpr int fa_min_blocks(int warps) { return 0; }
#endif
constexpr int FA_LD = FA_HS + 8;           // shared tile row stride (FA_HS == FA_TILE: one stride for all)
constexpr int FA_TILE_ELEMS = FA_TILE * FA_LD;
constexpr int FA_TILE_BYTES = FA_TILE_ELEMS * 2;
constexpr int FA_K16 = FA_HS / 16;         // 16-wide k steps over a head or over a 64-key tile
constexpr int FA_N8 = FA_TILE / 8;         // 8-wide C fragments across 64 columns
constexpr int FA_CHUNKS = FA_HS / 8;       // 16-byte chunks per tile row
static_assert(FA_HS == FA_TILE, "one row stride and one product shape serve q/k/v tiles and score tiles");

using Acc = float[FA_N8][4];               // a warp's 16 x 64 fp32 rows, as 8 C fragments
using FragA = unsigned[FA_K16][4];         // a warp's 16 x 64 bf16 rows, as 4 A fragments (16 x 16)

__device__ __forceinline__ void zero(Acc& acc) {
    for (int n = 0; n < FA_N8; n++)
        for (int i = 0; i < 4; i++) acc[n][i] = 0.0f;
}

extern __shared__ __align__(128) int4 fa_smem[];

// Carves the dynamic shared memory: consecutive 16-byte aligned regions (every size is a multiple of 16).
struct SmemCursor {
    unsigned char* p;
    __device__ explicit SmemCursor(void* base) : p(static_cast<unsigned char*>(base)) {}
    template <class U> __device__ U* take(int bytes) {
        U* r = reinterpret_cast<U*>(p);
        p += bytes;
        return r;
    }
};

// Starts copying a ROWS x 64 bf16 tile whose row i is at src + i * stride into shared memory (row stride
// FA_LD) with cp.async, 16 bytes per thread and step (THREADS threads); rows i >= valid (past the end of
// the sequence) are zeroed directly. The caller commits, waits and synchronises before the tile is read.
template <int THREADS, int ROWS = FA_TILE>
__device__ __forceinline__ void copy_tile_async(bf16* dst, const bf16* src, int stride, int valid) {
    for (int i = threadIdx.x; i < ROWS * FA_CHUNKS; i += THREADS) {
        const int r = i / FA_CHUNKS, c = (i % FA_CHUNKS) * 8;
        if (r < valid) {
            cp_async16(dst + r * FA_LD + c, src + (size_t)r * stride + c);
        } else {
            Packed128<bf16> zeros;
            for (int k = 0; k < 8; k++) zeros[k] = from_float<bf16>(0.0f);
            store128(dst + r * FA_LD + c, zeros);
        }
    }
}

// Starts the copies of the ROWS-row key and value tiles at k0 (rows at k and v + t * stride) into buffer
// `buf` of Ks and Vs (double buffered when buf can be 1), and commits them, with any copy this thread
// started before, as a group.
template <int THREADS, int ROWS = FA_TILE>
__device__ __forceinline__ void copy_keys_values_async(bf16* Ks, bf16* Vs, int buf, const bf16* k, const bf16* v,
                                                       int k0, int stride, int T_) {
    copy_tile_async<THREADS, ROWS>(Ks + buf * ROWS * FA_LD, k + (size_t)k0 * stride, stride, T_ - k0);
    copy_tile_async<THREADS, ROWS>(Vs + buf * ROWS * FA_LD, v + (size_t)k0 * stride, stride, T_ - k0);
    cp_async_commit();
}

// The A fragments of the warp's 16 rows (row stride FA_LD) of a shared tile.
__device__ __forceinline__ void load_a(FragA& a, const bf16* rows) {
    const bf16* p = fragment_row(rows, FA_LD, threadIdx.x % WARP_SIZE);
    for (int k = 0; k < FA_K16; k++) ldmatrix_x4(a[k], p + 16 * k);
}

// s = a b^T: a the warp's 16 x 64 rows, b a 64 x 64 shared tile (row n of b is column n of the product).
__device__ __forceinline__ void product_abt(Acc& s, const FragA& a, const bf16* b) {
    zero(s);
    const bf16* p = fragment_row_nk(b, FA_LD, threadIdx.x % WARP_SIZE);
    for (int k = 0; k < FA_K16; k++) {
        for (int n = 0; n < FA_N8; n += 2) {      // b rows 8n .. 8n + 15, columns 16k .. 16k + 15
            unsigned f[4];
            ldmatrix_x4(f, p + 8 * n * FA_LD + 16 * k);
            mma_bf16_16816(s[n], a[k], f[0], f[1]);
            mma_bf16_16816(s[n + 1], a[k], f[2], f[3]);
        }
    }
}

// acc += p b: p the warp's 16 x 64 values in C fragments (rounded to bf16 here), b a 64 x 64 shared tile.
__device__ __forceinline__ void product_add_ab(Acc& acc, const Acc& p, const bf16* b) {
    const bf16* row = fragment_row(b, FA_LD, threadIdx.x % WARP_SIZE);
    for (int k = 0; k < FA_K16; k++) {
        unsigned a[4];
        pack_a_fragment(a, p[2 * k], p[2 * k + 1]);
        for (int n = 0; n < FA_N8; n += 2) {      // b rows 16k .. 16k + 15, columns 8n .. 8n + 15
            unsigned f[4];
            ldmatrix_x4_trans(f, row + 16 * k * FA_LD + 8 * n);
            mma_bf16_16816(acc[n], a, f[0], f[1]);
            mma_bf16_16816(acc[n + 1], a, f[2], f[3]);
        }
    }
}

// Writes the warp's 16 x 64 rows acc, rounded to bf16, to dst + row * stride for rows < valid: through
// `stage` (the warp's 16 rows of a shared tile that only this warp reads), then 16 bytes per lane and step.
__device__ __forceinline__ void store_rows(bf16* dst, int stride, int valid, const Acc& acc, bf16* stage) {
    const int lane = threadIdx.x % WARP_SIZE, g = lane / 4, t = lane % 4;
    __syncwarp();                                            // every lane is done reading stage
    for (int n = 0; n < FA_N8; n++) {
        unsigned* top = reinterpret_cast<unsigned*>(stage + g * FA_LD + 8 * n + 2 * t);
        unsigned* bottom = reinterpret_cast<unsigned*>(stage + (g + 8) * FA_LD + 8 * n + 2 * t);
        *top = pack_bf16x2(acc[n][0], acc[n][1]);
        *bottom = pack_bf16x2(acc[n][2], acc[n][3]);
    }
    __syncwarp();
    for (int i = lane; i < FA_ROWS * FA_CHUNKS; i += WARP_SIZE) {
        const int r = i / FA_CHUNKS, c = (i % FA_CHUNKS) * 8;
        if (r < valid) store128(dst + (size_t)r * stride + c, load128(stage + r * FA_LD + c));
    }
}

// Sum (or max) of one row's values over the 4 lanes of a quad, which hold it together.
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(FULL_MASK, v, 1);
    return v + __shfl_xor_sync(FULL_MASK, v, 2);
}
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, 1));
    return fmaxf(v, __shfl_xor_sync(FULL_MASK, v, 2));
}

// exp(scale z - shift) for a logit z (unscaled q.k) and a shift (a row's lse). With EXP2, the caller
// passes scale and shift multiplied by log2(e): one fma and an ex2.
template <bool EXP2>
__device__ __forceinline__ float exp_logit(float z, float scale, float shift) {
    if constexpr (EXP2) return exp2f(fmaf(z, scale, -shift));
    else return __expf(scale * z - shift);
}

// ---------------------------------------------------------------------------------------------
// forward

template <int WARPS, bool EXP2, bool GQA>
__global__ void __launch_bounds__(WARPS * WARP_SIZE, fa_min_blocks(WARPS))
flash_attention_forward_kernel(bf16* out, float* lse, const bf16* qkv, int B, int T_, int NH, int NKV,
                               float scale) {
    constexpr int THREADS = WARPS * WARP_SIZE, QROWS = WARPS * FA_ROWS;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE, g = lane / 4, t4 = lane % 4;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * QROWS;     // longest rows (most key tiles) first
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    const int C = NH * FA_HS, Ckv = GQA ? NKV * FA_HS : C, stride = C + 2 * Ckv;
    const bf16* q = qkv + (size_t)b * T_ * stride + h * FA_HS;    // q of token (b, 0), head h
    const bf16* k = GQA ? qkv + (size_t)b * T_ * stride + C + h / (NH / NKV) * FA_HS : q + C;   // its kv head
    const bf16* v = GQA ? k + Ckv : q + 2 * C;
    const float scale2 = scale * FA_LOG2E;

    SmemCursor cur(fa_smem);
    bf16* Qs = cur.take<bf16>(QROWS * FA_LD * 2);
    bf16* Ks = cur.take<bf16>(2 * FA_TILE_BYTES);           // double buffered: tile buf at + buf * FA_TILE_ELEMS
    bf16* Vs = cur.take<bf16>(2 * FA_TILE_BYTES);
    bf16* my_rows = Qs + warp * FA_ROWS * FA_LD;             // read only by this warp: the output's stage

    copy_tile_async<THREADS, QROWS>(Qs, q + (size_t)q0 * stride, stride, T_ - q0);
    copy_keys_values_async<THREADS>(Ks, Vs, 0, k, v, 0, stride, T_);
    FragA qf;                                                // q stays in registers
    const int first = q0 + warp * FA_ROWS, last = first + FA_ROWS - 1;
    const int row[2] = {first + g, first + g + 8};           // >= T_: padding rows
    float m[2] = {neg_infinity(), neg_infinity()};           // running max of q.k per row
    float l[2] = {0.0f, 0.0f};                               // this lane's part of the running sum
    Acc o;
    zero(o);

    const int k_end = min(q0 + QROWS, T_);                   // key tiles at or before the tile's last row
    for (int k0 = 0, buf = 0; k0 < k_end; k0 += FA_TILE, buf ^= 1) {
        cp_async_wait_all();
        __syncthreads();                                     // this tile is in; the other buffer is free
        if (k0 + FA_TILE < k_end) copy_keys_values_async<THREADS>(Ks, Vs, buf ^ 1, k, v, k0 + FA_TILE, stride, T_);
        if (WARPS > 4 && k0 > last) continue;                // every key after this warp's rows
        if (k0 == 0) load_a(qf, my_rows);
        Acc s;
        product_abt(s, qf, Ks + buf * FA_TILE_ELEMS);        // q k^T, unscaled
        if (WARPS == 4 ? k0 == q0 : k0 + FA_TILE - 1 > first) {   // a diagonal tile: keys after the query
            for (int n = 0; n < FA_N8; n++)
                for (int i = 0; i < 4; i++)
                    if (k0 + 8 * n + 2 * t4 + i % 2 > row[i / 2]) s[n][i] = neg_infinity();
        }
        // online softmax; key k0 <= every row of the warp (k0 and first are multiples of 16), so each
        // row has a finite maximum
        for (int r = 0; r < 2; r++) {
            float mx = m[r];
            for (int n = 0; n < FA_N8; n++) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
            mx = quad_max(mx);
            float correction;                                // first tile: exp(-inf) = 0
            if constexpr (EXP2) correction = exp2f(scale2 * (m[r] - mx));
            else correction = __expf(scale * (m[r] - mx));
            const float shift2 = scale2 * mx;
            float sum = 0.0f;
            for (int n = 0; n < FA_N8; n++) {
                for (int i = 2 * r; i < 2 * r + 2; i++) {
                    if constexpr (EXP2) s[n][i] = exp2f(fmaf(s[n][i], scale2, -shift2));   // masked: 0
                    else s[n][i] = __expf(scale * (s[n][i] - mx));
                    sum += s[n][i];
                    o[n][i] *= correction;
                }
            }
            l[r] = l[r] * correction + sum;
            m[r] = mx;
        }
        product_add_ab(o, s, Vs + buf * FA_TILE_ELEMS);      // o += P v
    }

    for (int r = 0; r < 2; r++) {
        l[r] = quad_sum(l[r]);
        const float inv = 1.0f / l[r];
        for (int n = 0; n < FA_N8; n++) o[n][2 * r] *= inv, o[n][2 * r + 1] *= inv;
    }
    store_rows(out + ((size_t)b * T_ + first) * C + h * FA_HS, C, T_ - first, o, my_rows);
    if (t4 == 0) {
        for (int r = 0; r < 2; r++)
            if (row[r] < T_) lse[(size_t)bh * T_ + row[r]] = scale * m[r] + __logf(l[r]);
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

__global__ void __launch_bounds__(FA_DKDV_THREADS)
flash_attention_backward_dkdv_kernel(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse,
                                     const float* delta, int B, int T_, int NH, int NKV, float scale) {
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE, g = lane / 4, t4 = lane % 4;
    const int k0 = blockIdx.x * FA_TILE;                     // first key tiles have the most queries
    const int bk = blockIdx.y, b = bk / NKV, hk = bk % NKV;  // one kv head; its group's query heads:
    const int G = NH / NKV, h0 = hk * G;                     // h0 .. h0 + G - 1
    const int C = NH * FA_HS, Ckv = NKV * FA_HS, stride = C + 2 * Ckv;
    const size_t token0 = (size_t)b * T_;
    const bf16* k = qkv + token0 * stride + C + hk * FA_HS;
    const bf16* q = qkv + token0 * stride + h0 * FA_HS;      // the group's first query head; head h0 + j
    const bf16* go = dout + token0 * C + h0 * FA_HS;         // at + j FA_HS here and in dout (token (b, 0)),
    const float* lse_bh = lse + ((size_t)b * NH + h0) * T_;  // + j T_ in lse and delta
    const float* delta_bh = delta + ((size_t)b * NH + h0) * T_;

    SmemCursor cur(fa_smem);
    bf16* Ks = cur.take<bf16>(FA_TILE_BYTES);
    bf16* Vs = cur.take<bf16>(FA_TILE_BYTES);
    bf16* Qs = cur.take<bf16>(2 * FA_TILE_BYTES);           // double buffered: tile buf at + buf * FA_TILE_ELEMS
    bf16* dOs = cur.take<bf16>(2 * FA_TILE_BYTES);
    float* lse_s = cur.take<float>(2 * FA_TILE * 4);        // and lse_s + buf * FA_TILE
    float* delta_s = cur.take<float>(2 * FA_TILE * 4);
    bf16* my_keys = Ks + warp * FA_ROWS * FA_LD;             // this warp's rows of K and V: only it reads them
    bf16* my_values = Vs + warp * FA_ROWS * FA_LD;

    // the query tile at q0 of head h0 + j, its dout, lse and delta into buffer `to`, committed as one group
    auto copy_queries = [&](int j, int q0, int to) {
        copy_tile_async<FA_DKDV_THREADS>(Qs + to * FA_TILE_ELEMS, q + (size_t)q0 * stride + j * FA_HS, stride,
                                         T_ - q0);
        copy_tile_async<FA_DKDV_THREADS>(dOs + to * FA_TILE_ELEMS, go + (size_t)q0 * C + j * FA_HS, C, T_ - q0);
        const int i = threadIdx.x, at = to * FA_TILE + i;
        if (i < FA_TILE && q0 + i < T_) {
            cp_async4(lse_s + at, lse_bh + (size_t)j * T_ + q0 + i);
            cp_async4(delta_s + at, delta_bh + (size_t)j * T_ + q0 + i);
        } else if (i < FA_TILE) {
            lse_s[at] = delta_s[at] = 0.0f;
        }
        cp_async_commit();
    };
    copy_keys_values_async<FA_DKDV_THREADS>(Ks, Vs, 0, k, k + Ckv, k0, stride, T_);   // the block's keys
    copy_queries(0, k0, 0);
    const int key[2] = {k0 + warp * FA_ROWS + g, k0 + warp * FA_ROWS + g + 8};
    Acc dk, dv;
    zero(dk);
    zero(dv);

    // each head of the group, its query tiles at or after the key tile
    for (int j = 0, q0 = k0, buf = 0; j < G; buf ^= 1) {
        cp_async_wait_all();
        __syncthreads();                                     // this tile is in; the other buffer is free
        const int next_q0 = q0 + FA_TILE < T_ ? q0 + FA_TILE : k0;   // this head's next tile, or the next head's
        const int next_j = next_q0 == k0 ? j + 1 : j;
        if (next_j < G) copy_queries(next_j, next_q0, buf ^ 1);   // in flight during the products
        const bf16* Qt = Qs + buf * FA_TILE_ELEMS;
        const bf16* dOt = dOs + buf * FA_TILE_ELEMS;
        const float* lse_t = lse_s + buf * FA_TILE;
        const float* delta_t = delta_s + buf * FA_TILE;
        FragA a;
        Acc st, dpt;                                         // z^T and dP^T: rows are this warp's keys
        load_a(a, my_keys);
        product_abt(st, a, Qt);                              // k q^T
        load_a(a, my_values);
        product_abt(dpt, a, dOt);                            // v dout^T
        for (int n = 0; n < FA_N8; n++) {
            for (int i = 0; i < 4; i++) {
                const int c = 8 * n + 2 * t4 + i % 2, tq = q0 + c;
                float p = 0.0f, dz = 0.0f;
                if (tq >= key[i / 2] && tq < T_) {
                    p = __expf(scale * st[n][i] - lse_t[c]);
                    dz = p * (dpt[n][i] - delta_t[c]);
                }
                st[n][i] = p;
                dpt[n][i] = scale * dz;                      // d(q.k) = scale dz
            }
        }
        product_add_ab(dv, st, dOt);                         // dv += P^T dout
        product_add_ab(dk, dpt, Qt);                         // dk += d(q.k)^T q
        q0 = next_q0;
        j = next_j;
    }

    const int first = k0 + warp * FA_ROWS;
    bf16* dst = dqkv + (token0 + first) * stride + C + hk * FA_HS;
    store_rows(dst, stride, T_ - first, dk, my_keys);
    store_rows(dst + Ckv, stride, T_ - first, dv, my_values);
}

template <int WARPS, bool EXP2, bool GQA>
__global__ void __launch_bounds__(WARPS * WARP_SIZE, fa_min_blocks(WARPS))
flash_attention_backward_dq_kernel(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse,
                                   const float* delta, int B, int T_, int NH, int NKV, float scale) {
    constexpr int THREADS = WARPS * WARP_SIZE, QROWS = WARPS * FA_ROWS;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE, g = lane / 4, t4 = lane % 4;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * QROWS;     // longest rows first
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    const int C = NH * FA_HS, Ckv = GQA ? NKV * FA_HS : C, stride = C + 2 * Ckv;
    const size_t token0 = (size_t)b * T_;
    const bf16* q = qkv + token0 * stride + h * FA_HS;
    const bf16* k = GQA ? qkv + token0 * stride + C + h / (NH / NKV) * FA_HS : q + C;   // its group's kv head
    const bf16* v = GQA ? k + Ckv : q + 2 * C;
    constexpr float LOG_UNIT = EXP2 ? FA_LOG2E : 1.0f;     // exp2's unit: scale and lse times log2(e)
    const float zscale = scale * LOG_UNIT;

    SmemCursor cur(fa_smem);
    bf16* Qs = cur.take<bf16>(QROWS * FA_LD * 2);
    bf16* dOs = cur.take<bf16>(QROWS * FA_LD * 2);
    bf16* Ks = cur.take<bf16>(2 * FA_TILE_BYTES);           // double buffered: tile buf at + buf * FA_TILE_ELEMS
    bf16* Vs = cur.take<bf16>(2 * FA_TILE_BYTES);
    bf16* my_rows = Qs + warp * FA_ROWS * FA_LD;             // this warp's rows of Q and dout: only it reads them

    copy_tile_async<THREADS, QROWS>(Qs, q + (size_t)q0 * stride, stride, T_ - q0);
    copy_tile_async<THREADS, QROWS>(dOs, dout + (token0 + q0) * C + h * FA_HS, C, T_ - q0);
    copy_keys_values_async<THREADS>(Ks, Vs, 0, k, v, 0, stride, T_);
    const int first = q0 + warp * FA_ROWS;
    const int row[2] = {first + g, first + g + 8};
    float lse_r[2], delta_r[2];
    for (int r = 0; r < 2; r++) {
        lse_r[r] = row[r] < T_ ? lse[(size_t)bh * T_ + row[r]] * LOG_UNIT : 0.0f;
        delta_r[r] = row[r] < T_ ? delta[(size_t)bh * T_ + row[r]] : 0.0f;
    }
    Acc dq;
    zero(dq);

    const int k_end = min(q0 + QROWS, T_);                   // key tiles at or before the tile's last row
    for (int k0 = 0, buf = 0; k0 < k_end; k0 += FA_TILE, buf ^= 1) {
        cp_async_wait_all();
        __syncthreads();                                     // this tile is in; the other buffer is free
        if (k0 + FA_TILE < k_end) {
            copy_keys_values_async<THREADS>(Ks, Vs, buf ^ 1, k, v, k0 + FA_TILE, stride, T_);
        }
        // unlike the forward, no warp skips a key tile after its rows (the mask zeroes it): the skip took
        // dq<8, true> past 128 registers on sm_90
        FragA a;
        Acc s, dp;
        load_a(a, my_rows);
        product_abt(s, a, Ks + buf * FA_TILE_ELEMS);         // q k^T
        load_a(a, dOs + warp * FA_ROWS * FA_LD);
        product_abt(dp, a, Vs + buf * FA_TILE_ELEMS);        // dout v^T
        for (int n = 0; n < FA_N8; n++) {
            for (int i = 0; i < 4; i++) {
                const int r = i / 2;
                float dz = 0.0f;
                if (k0 + 8 * n + 2 * t4 + i % 2 <= row[r] && row[r] < T_) {
                    const float p = exp_logit<EXP2>(s[n][i], zscale, lse_r[r]);
                    dz = p * (dp[n][i] - delta_r[r]);
                }
                s[n][i] = scale * dz;                        // d(q.k) = scale dz
            }
        }
        product_add_ab(dq, s, Ks + buf * FA_TILE_ELEMS);     // dq += d(q.k) k
    }

    store_rows(dqkv + (token0 + first) * stride + h * FA_HS, stride, T_ - first, dq, my_rows);
}

// ---------------------------------------------------------------------------------------------
// grouped-query attention with separate q (B, T, NH, 64), k and v (B, T, NKV, 64) arrays (llmpy.cpu's
// contract): the packed rows the kernels above read, and back. One thread per 16-byte chunk of a packed
// row (C + 2 Ckv channels); both ways are plain copies.

// The array, row and column of a packed row's chunk i: q (0), k (1) or v (2).
__device__ __forceinline__ int qkv_chunk(int i, int C, int Ckv, size_t& offset) {
    const int width = C + 2 * Ckv, token = i / width, col = i - token * width;
    if (col < C) {
        offset = (size_t)token * C + col;
        return 0;
    }
    const int which = col < C + Ckv ? 1 : 2;
    offset = (size_t)token * Ckv + col - C - (which - 1) * Ckv;
    return which;
}

__global__ void qkv_pack_kernel(bf16* qkv, const bf16* q, const bf16* k, const bf16* v, int BT, int C, int Ckv) {
    const int i = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i >= BT * (C + 2 * Ckv)) return;
    size_t at;
    const int which = qkv_chunk(i, C, Ckv, at);
    store128(qkv + i, load128cs((which == 0 ? q : which == 1 ? k : v) + at));   // read once
}

// Separate stores, not one through a selected pointer: that compiles to a generic (not global) store.
__global__ void qkv_unpack_kernel(bf16* q, bf16* k, bf16* v, const bf16* qkv, int BT, int C, int Ckv) {
    const int i = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i >= BT * (C + 2 * Ckv)) return;
    size_t at;
    const int which = qkv_chunk(i, C, Ckv, at);
    const Packed128<bf16> x = load128cs(qkv + i);
    if (which == 0) store128(q + at, x);
    else if (which == 1) store128(k + at, x);
    else store128(v + at, x);
}

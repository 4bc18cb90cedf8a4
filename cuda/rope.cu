// Rotary position embedding (RoPE) on (B, T, H, D) heads, nanochat's "halves" layout: with
// x1 = x[..., :D/2], x2 = x[..., D/2:] and the angle t * inv_freq[i] at position t,
//   y = cat(x1 cos + x2 sin, -x1 sin + x2 cos)
// Launched by llmpy/gpu/rope.py; reference llmpy/cpu/rope.py. cos and sin are fp32 tables
// (maxT, D/2), built once on the host (rope.py), row t for position t.
//   rope_kernel<T>: the rotation above with sin multiplied by sin_sign. The backward is the
//                   transposed rotation, dx = cat(dy1 cos - dy2 sin, dy1 sin + dy2 cos): the same
//                   kernel with sin_sign = -1.
// Thread mapping: one thread per 16-byte chunk of the first half of a head and the matching chunk of
// the second half (S = 8 bf16 / 4 float values each). out may be inp itself (a thread reads both of
// its chunks before writing them). Memory bound: each element is read and written once; the tables
// are small and stay in cache. Requires D % (2 * 16 / sizeof(T)) == 0 (the launcher checks).
#include "common.cuh"

template <class T>
__global__ void rope_kernel(T* out, const T* inp, const float* cos_table, const float* sin_table,
                            float sin_sign, int rows, int T_len, int H, int D) {
    using x128 = Packed128<T>;
    constexpr int S = x128::size;
    const int half = D / 2;
    const int chunks = half / S;                       // chunk pairs per head
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= rows * chunks) return;
    const int row = g / chunks;                        // (b, t, h) flattened
    const int i0 = (g - row * chunks) * S;
    const int t = (row / H) % T_len;
    const float* c = cos_table + (size_t)t * half + i0;
    const float* s = sin_table + (size_t)t * half + i0;
    const size_t base = (size_t)row * D + i0;
    const x128 a = load128cs(inp + base);              // read once
    const x128 b = load128cs(inp + base + half);
    x128 ya, yb;
    for (int k = 0; k < S; k++) {
        const float x1 = to_float(a[k]), x2 = to_float(b[k]);
        const float ck = c[k], sk = sin_sign * s[k];
        ya[k] = from_float<T>(x1 * ck + x2 * sk);
        yb[k] = from_float<T>(x2 * ck - x1 * sk);
    }
    store128(out + base, ya);                          // attention (or QK-norm) reads it next
    store128(out + base + half, yb);
}

// Stand-in for the CUDA toolkit's <mma.h> (the WMMA tensor-core API) in the CPU emulator. See emu.h.
//
// On a GPU a fragment is spread over the 32 lanes of a warp in a layout the API keeps opaque; a
// kernel may only load, store, fill and multiply fragments, or apply the same operation to every
// element of x[]. Here every lane holds the whole tile, row-major, and computes whole products, which
// is what any kernel that keeps to those rules can observe, except that a store writes only the lane's
// share (below). The loads and stores check what a GPU requires of them: a 256-bit (32-byte) aligned
// pointer and a leading dimension that is a multiple of 16 bytes. They are not barriers: on a GPU, shared memory that other lanes wrote is only safe to load
// after a __syncwarp, and here a lane that has not reached it has not written yet either, so a missing
// __syncwarp shows up as NaNs (shared memory starts as 0xff bytes).
#pragma once
#include "emu.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K> struct tile_shape;
template <int M, int N, int K> struct tile_shape<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct tile_shape<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K> struct tile_shape<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    static constexpr int rows = tile_shape<Use, M, N, K>::rows, cols = tile_shape<Use, M, N, K>::cols;
    static constexpr int num_elements = rows * cols;
    T x[num_elements];          // element (r, c) at x[r * cols + c]
};

namespace detail {
inline void check_pointer(const void* p, unsigned ldm, size_t elem_bytes, const char* what) {
    ::emu::check_aligned(p, 32, what);
    if ((ldm * elem_bytes) % 16 != 0) {
        ::emu::fail_launch(std::string(what) + ": leading dimension " + std::to_string(ldm) +
                           " elements is not a multiple of 16 bytes");
    }
}
template <class T> inline float value(T v) { return float(v); }
inline float value(__nv_bfloat16 v) { return __bfloat162float(v); }
}  // namespace detail

template <int M, int N, int K>
inline void fill_fragment(fragment<accumulator, M, N, K, float>& f, float v) {
    for (float& e : f.x) e = v;
}

// matrix_a / matrix_b: the layout is part of the fragment's type
template <class Use, int M, int N, int K, class T, class L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm) {
    static_assert(std::is_same_v<L, row_major> || std::is_same_v<L, col_major>, "matrix fragment layout");
    detail::check_pointer(p, ldm, sizeof(T), "wmma::load_matrix_sync");
    using F = fragment<Use, M, N, K, T, L>;
    for (int r = 0; r < F::rows; r++)
        for (int c = 0; c < F::cols; c++)
            f.x[r * F::cols + c] = std::is_same_v<L, row_major> ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r];
}

// accumulator: the layout is an argument
template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t l) {
    detail::check_pointer(p, ldm, sizeof(float), "wmma::load_matrix_sync");
    for (int r = 0; r < M; r++)
        for (int c = 0; c < N; c++)
            f.x[r * N + c] = l == mem_row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r];
}

// each lane stores its share of the tile (element i by lane i % 32), as on a GPU, where a lane holds
// only some elements: a lane that reads the tile back before a __syncwarp finds other lanes' parts unwritten
template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t l) {
    detail::check_pointer(p, ldm, sizeof(float), "wmma::store_matrix_sync");
    for (int i = ::emu::lane_id(); i < M * N; i += 32) {
        const int r = i / N, c = i % N;
        (l == mem_row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r]) = f.x[i];
    }
}

// d = a b + c, products and sums in fp32 (d may be c)
template <int M, int N, int K, class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
    float out[M * N];
    for (int r = 0; r < M; r++)
        for (int n = 0; n < N; n++) {
            float acc = c.x[r * N + n];
            for (int k = 0; k < K; k++) acc += detail::value(a.x[r * K + k]) * detail::value(b.x[k * N + n]);
            out[r * N + n] = acc;
        }
    for (int i = 0; i < M * N; i++) d.x[i] = out[i];
}

}  // namespace wmma
}  // namespace nvcuda

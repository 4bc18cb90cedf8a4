// Stand-ins for the sm_80 instructions of cuda/sm80.cuh (cp.async, ldmatrix and mma.sync.m16n8k16 for
// bf16) in the CPU emulator. See emu.h.
//
// cp.async: the 16 source bytes are read when the copy starts (guard pages catch a bad address) but
// written to shared memory only when the thread waits for the copy's group, so shared memory read
// before the wait, or a buffer refilled while another thread still reads it, shows the wrong data (a
// GPU's copy lands at some moment in between). Both addresses must be aligned to the copy's size.
//
// On a GPU each instruction is executed by the whole warp at once: lane l supplies one row address
// (ldmatrix) or its share of the operands (mma), and receives its share of the result in the
// fragment layouts of the PTX ISA (§9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point
// type" and §9.7.14.5.15 ldmatrix). Here every lane hands its inputs to every other lane
// (emu::warp_gather, a barrier of the warp), then computes its own share from them with those same
// index formulas, so a kernel that assumes another layout gets wrong numbers. The products and sums
// are fp32 in k order; the tensor cores' order is unspecified.
//
// What is checked: every row address of ldmatrix is 16-byte aligned, and all 32 lanes take part
// (a lane that has exited makes the barrier fail).
#pragma once
#include "emu.h"

namespace emu {
namespace detail {

inline float bf16_half(unsigned reg, int high) {
    return __bfloat162float(__nv_bfloat16{uint16_t(high ? reg >> 16 : reg & 0xffffu)});
}

inline unsigned pack_halves(__nv_bfloat16 lo, __nv_bfloat16 hi) { return lo.bits | unsigned(hi.bits) << 16; }

// four 8 x 8 matrices of 16-bit elements: lanes 8j .. 8j+7 give the rows of matrix j; register j of
// lane l gets row l/4, columns 2(l%4) and 2(l%4)+1 of matrix j (lower column in the low half), or,
// transposed, rows 2(l%4) and 2(l%4)+1 of column l/4
inline void ldmatrix(unsigned (&r)[4], const __nv_bfloat16* row, bool trans) {
    check_aligned(row, 16, trans ? "ldmatrix.trans row" : "ldmatrix row");
    const __nv_bfloat16* rows[32];
    warp_gather(&row, sizeof row, rows);
    const int lane = lane_id(), q = lane / 4, e = 2 * (lane % 4);
    for (int j = 0; j < 4; j++) {
        const __nv_bfloat16* const* m = rows + 8 * j;
        r[j] = trans ? pack_halves(m[e][q], m[e + 1][q]) : pack_halves(m[q][e], m[q][e + 1]);
    }
}

}  // namespace detail
}  // namespace emu

inline void cp_async16(void* smem, const void* gmem) { emu::async_copy(smem, gmem, 16); }
inline void cp_async4(void* smem, const void* gmem) { emu::async_copy(smem, gmem, 4); }
inline void cp_async_commit() { emu::async_commit(); }
inline void cp_async_wait_all() { emu::async_wait_all(); }

inline void ldmatrix_x4(unsigned (&r)[4], const __nv_bfloat16* row) { emu::detail::ldmatrix(r, row, false); }
inline void ldmatrix_x4_trans(unsigned (&r)[4], const __nv_bfloat16* row) { emu::detail::ldmatrix(r, row, true); }

// d (16 x 8 fp32) += a (16 x 16 bf16, row-major) b (16 x 8 bf16, column-major), with groupID g = l/4
// and t = l%4 for lane l:
//   a: register i holds a(g + 8 (i%2), 2t + 8 (i/2) + {0, 1})    b: register i holds b(2t + 8i + {0, 1}, g)
//   d: d[i] is d(g + 8 (i/2), 2t + i%2)
inline void mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    struct Operands {
        unsigned a[4], b[2];
    };
    const Operands mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
    Operands all[32];
    emu::warp_gather(&mine, sizeof mine, all);
    using emu::detail::bf16_half;
    auto A = [&](int row, int k) {
        return bf16_half(all[4 * (row % 8) + k % 8 / 2].a[row / 8 + 2 * (k / 8)], k % 2);
    };
    auto B = [&](int k, int col) { return bf16_half(all[4 * col + k % 8 / 2].b[k / 8], k % 2); };
    const int lane = emu::lane_id(), g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; i++) {
        const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
        float acc = d[i];
        for (int k = 0; k < 16; k++) acc += A(row, k) * B(k, col);
        d[i] = acc;
    }
}

// Instructions of sm_80 and later for cuda/flash_attention.cu: cp.async, which copies global memory
// to shared memory without passing through registers while the threads go on computing; ldmatrix,
// which loads four 8 x 8 tiles of 16-bit elements from shared memory straight into the register
// layout of an MMA operand; and the bf16 tensor-core product mma.sync.m16n8k16 with fp32 accumulation.
// Unlike the WMMA API, the register layouts are documented (PTX ISA §9.7.14.5.8 and §9.7.14.5.15), so
// a kernel can do row-wise work (masking, softmax) in registers and feed one product's output to the
// next as an operand.
//
// With g = lane / 4 and t = lane % 4 (the PTX ISA's groupID and threadID_in_group):
//   A (16 x 16, row-major), 4 registers of 2 bf16: register i holds A(g + 8 (i%2), 2t + 8 (i/2) + {0,1})
//   B (16 x 8, column-major), 2 registers:          register i holds B(2t + 8i + {0,1}, g)
//   C, D (16 x 8 fp32), 4 floats:                   element i is C(g + 8 (i/2), 2t + i%2)
// so the C fragments of two adjacent 8-column tiles, rounded to bf16 and paired, are the A fragment of
// the 16 x 16 tile they form: pack_a_fragment below.
//
// The CPU emulator compiles this file as plain C++ (no __CUDACC__) and brings its own cp_async16,
// cp_async_commit, cp_async_wait_all, ldmatrix_x4, ldmatrix_x4_trans and mma_bf16_16816 (tests/emu/sm80.h):
// the same layouts, and copies that land in shared memory only at the wait.
#pragma once
#include "common.cuh"

#if defined(__CUDACC__)
// The 32-bit shared-state-space address of a generic pointer into shared memory, as the instructions take it.
__device__ __forceinline__ unsigned shared_address(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Starts copying 16 bytes (both addresses 16-byte aligned) from global to shared memory. The copy is
// only known to have landed after cp_async_commit and cp_async_wait_all by this thread, and is seen by
// other threads after a barrier that follows that wait.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(smem)), "l"(gmem));
}

// The same for 4 bytes (both addresses 4-byte aligned).
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(shared_address(smem)), "l"(gmem));
}

// Closes the group of this thread's copies started since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until every committed group of this thread's copies has landed.
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Lanes 8j .. 8j+7 pass the addresses of the 8 rows (16 bytes each, 16-byte aligned) of tile j; lane l
// gets, in register j, row l/4 of tile j, columns 2 (l%4) and 2 (l%4) + 1 (the lower in the low half).
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const __nv_bfloat16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
}

// The same, each tile transposed: register j gets rows 2 (l%4) and 2 (l%4) + 1 of column l/4.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const __nv_bfloat16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
}

// d += a b for one 16 x 8 tile of d, with a 16 x 16 and b 16 x 8 (fragments as above).
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// Two floats rounded to bf16 (nearest even), lo in the low half: one register of an A or B fragment.
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    return static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
           static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16;
}

// The A fragment of the 16 x 16 tile formed by two adjacent 16 x 8 C fragments (left, right), rounded.
__device__ __forceinline__ void pack_a_fragment(unsigned (&a)[4], const float (&left)[4], const float (&right)[4]) {
    a[0] = pack_bf16x2(left[0], left[1]);      // row g,     columns 2t, 2t+1
    a[1] = pack_bf16x2(left[2], left[3]);      // row g + 8
    a[2] = pack_bf16x2(right[0], right[1]);    // row g,     columns 8 + 2t, 8 + 2t + 1
    a[3] = pack_bf16x2(right[2], right[3]);    // row g + 8
}

// Lane l's row address for ldmatrix_x4 over the 16 x 16 tile at `tile` (row stride ld elements), with
// the four 8 x 8 quarters in the order top-left, bottom-left, top-right, bottom-right. Non-transposed,
// the registers are then the A fragment of the tile; transposed (ldmatrix_x4_trans), registers {0, 1}
// and {2, 3} are the B fragments of its left and right 8 columns (the tile read as k x n, row-major).
__device__ __forceinline__ const __nv_bfloat16* fragment_row(const __nv_bfloat16* tile, int ld, int lane) {
    return tile + (lane % 8 + 8 * (lane / 8 % 2)) * ld + 8 * (lane / 16);
}

// The same for B fragments of a tile stored n x k (row n holds B's column n): quarters in the order
// top-left, top-right, bottom-left, bottom-right, so that non-transposed, registers {0, 1} are the B
// fragment of rows 0-7 (n) and {2, 3} that of rows 8-15.
__device__ __forceinline__ const __nv_bfloat16* fragment_row_nk(const __nv_bfloat16* tile, int ld, int lane) {
    return tile + (lane % 8 + 8 * (lane / 16)) * ld + 8 * (lane / 8 % 2);
}

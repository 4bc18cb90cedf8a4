"""LayerNorm on the GPU: launchers for cuda/layernorm.cu. Reference: llmpy/cpu/layernorm.py.

Forward: one warp per row. Backward: two deterministic kernels (per-block fp32 partial sums of
dweight/dbias in a scratch buffer, then an ordered fold); see the header of cuda/layernorm.cu.
"""
import cupy as cp
import numpy as np

from llmpy.gpu import _kernels as K

BLOCK_SIZE = 256             # 8 warps = 8 rows per block (llm.c's forward block)
BACKWARD_BLOCK_SIZE = 256    # 8 rows per group in the backward
BACKWARD_MAX_BLOCKS = 512    # fixed, not from the SM count: the fp32 summation order (and so the
                             # bits) does not depend on the GPU; 2 x 132 SMs (H100) would be 264
FOLD_WARPS = 8               # warps per block of the fold kernel (at most 32)


def _check_forward(mean, rstd, weight, bias, **rows):
    """Check the (..., C) `rows` arrays (first one = the input), weight, bias, mean and rstd;
    returns (dtype, N rows, C)."""
    dtype = K.check_floats(**rows, weight=weight, bias=bias)
    K.check_same_shape(**rows)
    shape = next(iter(rows.values())).shape
    C = shape[-1]
    K.check("weight", weight, shape=(C,))
    K.check("bias", bias, shape=(C,))
    K.check("mean", mean, dtype=np.float32, shape=shape[:-1])
    K.check("rstd", rstd, dtype=np.float32, shape=shape[:-1])
    _check_C(C, dtype)
    return dtype, int(np.prod(shape[:-1], dtype=np.int64)), C


def _check_C(C: int, dtype):
    if C < 1:
        raise ValueError("C (the last dimension) must be at least 1")
    K.check_multiple("C", C, K.x128_elems(dtype), f"16-byte loads of {dtype}")


def rows_grid(N: int, block_size: int) -> tuple[int]:
    """One warp per row: block_size // 32 rows per block."""
    return K.grid_1d(N, block_size // 32)


def layernorm_forward(out, mean, rstd, inp, weight, bias, *, block_size=BLOCK_SIZE):
    """out = (inp - mean) * rstd * weight + bias over the last axis (eps 1e-5, biased variance).

    out, inp (..., C) float32 or bf16, C a multiple of 8 (bf16) / 4 (float32); weight, bias (C,);
    mean, rstd (...) float32. Overwrites out, mean and rstd.
    """
    dtype, N, C = _check_forward(mean, rstd, weight, bias, inp=inp, out=out)
    block_size = K.check_block_size(block_size)
    K.launch("layernorm.cu", K.template_name("layernorm_forward_kernel", dtype),
             rows_grid(N, block_size), (block_size,),
             (out, mean, rstd, inp, weight, bias, K.i32(N), K.i32(C)))


def fused_residual_forward(residual, normed, mean, rstd, inp1, inp2, weight, bias, *,
                           block_size=BLOCK_SIZE):
    """residual = inp1 + inp2 (rounded to the storage type), normed = LayerNorm(residual).

    residual, normed, inp1, inp2 (..., C); weight, bias (C,); mean, rstd (...) float32.
    Overwrites residual, normed, mean and rstd.
    """
    dtype, N, C = _check_forward(mean, rstd, weight, bias, inp1=inp1, inp2=inp2,
                                  residual=residual, normed=normed)
    block_size = K.check_block_size(block_size)
    K.launch("layernorm.cu", K.template_name("fused_residual_forward_kernel", dtype),
             rows_grid(N, block_size), (block_size,),
             (residual, normed, mean, rstd, inp1, inp2, weight, bias, K.i32(N), K.i32(C)))


def backward_blocks(N: int, block_size: int = BACKWARD_BLOCK_SIZE,
                    max_blocks: int = BACKWARD_MAX_BLOCKS) -> int:
    """Blocks of the backward's first kernel: one group of block_size // 32 rows each, at most max_blocks."""
    return max(1, min(max_blocks, K.ceil_div(N, block_size // 32)))


MAX_SHARED_MEM = 227 * 1024   # bytes of dynamic shared memory a block may opt into (sm_90; sm_80: 163 KiB)


def backward_shared_mem(C: int, block_size: int = BACKWARD_BLOCK_SIZE) -> int:
    """Dynamic shared memory of the backward's first kernel: fp32 dweight and dbias per warp (W x 2C)."""
    return block_size // 32 * 2 * C * 4


def backward_scratch_size(N: int, C: int, *, block_size: int = BACKWARD_BLOCK_SIZE,
                          max_blocks: int = BACKWARD_MAX_BLOCKS) -> int:
    """float32 elements the backward needs in `scratch` (2*C partial sums per block)."""
    return backward_blocks(N, block_size, max_blocks) * 2 * C


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, *, scratch=None,
                       block_size=BACKWARD_BLOCK_SIZE, max_blocks=BACKWARD_MAX_BLOCKS):
    """Gradients of layernorm_forward, given its saved mean and rstd.

    dinp, dout, inp (..., C); dweight, dbias, weight (C,); mean, rstd (...) float32.
    ALL THREE ACCUMULATE: dinp += (the residual-stream gradient), dweight +=, dbias +=.
    dinp must not alias dout or inp (both are read again after dinp is written).
    scratch: float32 device array of >= backward_scratch_size(N, C) elements (contents overwritten);
    allocated when None (pass one from the arena inside a captured CUDA graph).
    """
    dtype = K.check_floats(dinp=dinp, dweight=dweight, dbias=dbias, dout=dout, inp=inp, weight=weight)
    C = inp.shape[-1]
    K.check_same_shape(inp=inp, dinp=dinp, dout=dout)
    for name, a in (("dweight", dweight), ("dbias", dbias), ("weight", weight)):
        K.check(name, a, shape=(C,))
    K.check("mean", mean, dtype=np.float32, shape=inp.shape[:-1])
    K.check("rstd", rstd, dtype=np.float32, shape=inp.shape[:-1])
    _check_C(C, dtype)
    block_size = K.check_block_size(block_size)
    smem = backward_shared_mem(C, block_size)
    if smem > MAX_SHARED_MEM:
        raise ValueError(f"C = {C}: the backward keeps {block_size // 32} warps x 2C fp32 sums in shared memory, "
                         f"{smem} bytes, over {MAX_SHARED_MEM}; use a smaller block_size")
    N = inp.size // C
    blocks = backward_blocks(N, block_size, max_blocks)
    need = blocks * 2 * C
    if scratch is None:
        scratch = cp.empty(need, dtype=np.float32)
    K.check("scratch", scratch, dtype=np.float32)
    if scratch.size < need:
        raise ValueError(f"scratch: {scratch.size} float32 elements, need {need}")
    K.launch("layernorm.cu", K.template_name("layernorm_backward_kernel", dtype),
             (blocks,), (block_size,),
             (dinp, scratch, dout, inp, weight, mean, rstd, K.i32(N), K.i32(C)),
             shared_mem=smem)
    K.launch("layernorm.cu", K.template_name("layernorm_backward_fold_kernel", dtype),
             (K.ceil_div(2 * C, 32),), (32, FOLD_WARPS),
             (dweight, dbias, scratch, K.i32(blocks), K.i32(C)))

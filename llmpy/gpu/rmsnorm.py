"""RMSNorm without weights on the GPU: launchers for cuda/rmsnorm.cu. Reference: llmpy/cpu/rmsnorm.py.

One warp per row for all three kernels (no weights: nothing to reduce across rows). The same
functions do QK-norm: q and k viewed as (..., D) rows.
"""
import numpy as np

from llmpy.gpu import _kernels as K
from llmpy.gpu.layernorm import rows_grid

BLOCK_SIZE = 256             # 8 warps = 8 rows per block, as layernorm's


def _check_rows(rstd, **rows):
    """Check the (..., C) `rows` arrays (first one = the input) and rstd (...) float32;
    returns (dtype, N rows, C)."""
    dtype = K.check_floats(**rows)
    K.check_same_shape(**rows)
    shape = next(iter(rows.values())).shape
    if not shape:
        raise ValueError("rmsnorm: the arrays need at least one dimension (..., C)")
    C = shape[-1]
    K.check("rstd", rstd, dtype=np.float32, shape=shape[:-1])
    if C < 1:
        raise ValueError("C (the last dimension) must be at least 1")
    K.check_multiple("C", C, K.x128_elems(dtype), f"16-byte loads of {dtype}")
    return dtype, int(np.prod(shape[:-1], dtype=np.int64)), C


def rmsnorm_forward(out, rstd, inp, *, block_size=BLOCK_SIZE):
    """out = inp / sqrt(mean(inp^2) + 1e-6) over the last axis; rstd (...) float32 saves the scale.

    out, inp (..., C) float32 or bf16, C a multiple of 8 (bf16) / 4 (float32); out may be inp.
    Overwrites out and rstd.
    """
    dtype, N, C = _check_rows(rstd, inp=inp, out=out)
    block_size = K.check_block_size(block_size)
    K.launch("rmsnorm.cu", K.template_name("rmsnorm_forward_kernel", dtype), rows_grid(N, block_size),
             (block_size,), (out, rstd, inp, K.i32(N), K.i32(C)))


def fused_residual_rmsnorm_forward(residual, normed, rstd, inp1, inp2, *, block_size=BLOCK_SIZE):
    """residual = inp1 + inp2 (rounded to the storage type), normed = RMSNorm(residual).

    residual, normed, inp1, inp2 (..., C); rstd (...) float32. Overwrites residual, normed and rstd.
    """
    dtype, N, C = _check_rows(rstd, inp1=inp1, inp2=inp2, residual=residual, normed=normed)
    block_size = K.check_block_size(block_size)
    K.launch("rmsnorm.cu", K.template_name("fused_residual_rmsnorm_forward_kernel", dtype),
             rows_grid(N, block_size), (block_size,), (residual, normed, rstd, inp1, inp2, K.i32(N), K.i32(C)))


def rmsnorm_backward(dinp, dout, inp, rstd, *, accumulate=True, block_size=BLOCK_SIZE):
    """Gradient of rmsnorm_forward, given its saved rstd: dinp (+)= (dout - n mean(dout n)) rstd,
    n = inp * rstd.

    dinp, dout, inp (..., C); rstd (...) float32. accumulate=True adds into dinp (the residual
    stream's gradient), False overwrites it (then dinp may be dout itself).
    """
    dtype, N, C = _check_rows(rstd, inp=inp, dinp=dinp, dout=dout)
    block_size = K.check_block_size(block_size)
    K.launch("rmsnorm.cu", K.template_name("rmsnorm_backward_kernel", dtype), rows_grid(N, block_size),
             (block_size,), (dinp, dout, inp, rstd, K.i32(N), K.i32(C), K.i32(1 if accumulate else 0)))

"""Bias gradient of a linear layer on the GPU: launcher for cuda/bias.cu, called by the matmul
backward in llmpy/gpu/matmul.py. Reference: the dbias line of llmpy/cpu/matmul.py."""
import cupy as cp
import numpy as np

from llmpy.gpu import _kernels as K

WARPS = 8              # warps per block splitting rows (at most 16, BIAS_MAX_WARPS in cuda/bias.cu)
MAX_WARPS = 16
TARGET_BLOCKS = 512    # ~4 blocks per SM on a 132-SM H100; fixed, so results do not depend on the GPU
MIN_ROWS_PER_WARP = 4  # do not split rows finer than this
FOLD_BLOCK_SIZE = 256


def bias_grid(N: int, OC: int, dtype, warps: int = WARPS) -> tuple[int, int]:
    """(channel groups of 32 chunks, row splits). Splits fill ~TARGET_BLOCKS blocks, each warp
    keeping at least MIN_ROWS_PER_WARP rows; one split means no scratch and no fold kernel."""
    groups = K.ceil_div(OC, 32 * K.x128_elems(dtype))
    splits = max(1, min(TARGET_BLOCKS // groups, K.ceil_div(N, warps * MIN_ROWS_PER_WARP)))
    return (groups, splits)


def scratch_size(N: int, OC: int, dtype, warps: int = WARPS) -> int:
    """float32 elements the reduction needs in `scratch` (0 when it needs none)."""
    splits = bias_grid(N, OC, dtype, warps)[1]
    return splits * OC if splits > 1 else 0


def matmul_bias_backward(dbias, dout, *, scratch=None, warps=WARPS):
    """dbias += dout summed over all leading positions, in a fixed order (bit-reproducible).

    dout (..., OC) float32 or bf16, OC a multiple of 8 (bf16) / 4 (float32); dbias (OC,), same dtype.
    ACCUMULATES into dbias. scratch: float32 device array of >= scratch_size(N, OC) elements for the
    per-split partial sums; allocated when needed and None (pass one from the arena in a graph).
    """
    dtype = K.check_floats(dbias=dbias, dout=dout)
    OC = dout.shape[-1] if dout.ndim else 0
    K.check("dbias", dbias, shape=(OC,))
    if OC < 1:
        raise ValueError("dout: the last dimension (OC) must be at least 1")
    K.check_multiple("OC", OC, K.x128_elems(dtype), f"16-byte loads of {dtype}")
    if not 1 <= warps <= MAX_WARPS:
        raise ValueError(f"warps must be in [1, {MAX_WARPS}], got {warps}")
    N = dout.size // OC
    grid = bias_grid(N, OC, dtype, warps)
    partials = None
    if grid[1] > 1:
        need = grid[1] * OC
        if scratch is None:
            scratch = cp.empty(need, dtype=np.float32)
        K.check("scratch", scratch, dtype=np.float32)
        if scratch.size < need:
            raise ValueError(f"scratch: {scratch.size} float32 elements, need {need}")
        partials = scratch
    K.launch("bias.cu", K.template_name("bias_backward_kernel", dtype), grid, (32, warps),
             (dbias, K.nullable(partials), dout, K.i32(N), K.i32(OC)))
    if partials is not None:
        K.launch("bias.cu", K.template_name("bias_backward_fold_kernel", dtype),
                 K.grid_1d(OC, FOLD_BLOCK_SIZE), (FOLD_BLOCK_SIZE,),
                 (dbias, partials, K.i32(grid[1]), K.i32(OC)))

"""Squared global gradient norm on the GPU: launcher for cuda/global_norm.cu.
Reference: llmpy/cpu/adamw.py (global_norm_squared)."""
import cupy as cp
import numpy as np

from llmpy.gpu import _kernels as K

BLOCK_SIZE = 512        # stage-1 threads per block (llm.c's choice)
NUM_PARTIALS = 1024     # stage-1 blocks at most: fixed, so the fp32 summation order (the bits) does
                        # not depend on the GPU; llm.c fills the GPU (528 on H100) instead
FINISH_BLOCK_SIZE = 1024


def norm_blocks(n: int, block_size: int = BLOCK_SIZE, max_blocks: int = NUM_PARTIALS) -> int:
    """Stage-1 blocks: enough to give every thread an element, at most max_blocks (grid-stride)."""
    return max(1, min(max_blocks, K.ceil_div(n, block_size)))


def global_norm_squared(out, grad, *, scratch=None, block_size=BLOCK_SIZE, max_blocks=NUM_PARTIALS):
    """out[0] = sum(grad^2), summed in fp32 in a fixed order (bit-reproducible).

    out: float32 device array with at least one element, OVERWRITTEN. grad: float32 or bf16, any
    shape, contiguous. scratch: float32 device array of >= norm_blocks(grad.size) elements for the
    per-block partial sums; allocated when None (pass one from the arena inside a captured graph).
    """
    dtype = K.check("grad", grad, dtype=K.FLOAT_DTYPES, int32_size=False).dtype
    K.check("out", out, dtype=np.float32)
    if out.size < 1:
        raise ValueError("out: needs one element")
    block_size = K.check_block_size(block_size)
    blocks = norm_blocks(grad.size, block_size, max_blocks)
    if scratch is None:
        scratch = cp.empty(blocks, dtype=np.float32)
    K.check("scratch", scratch, dtype=np.float32)
    if scratch.size < blocks:
        raise ValueError(f"scratch: {scratch.size} float32 elements, need {blocks}")
    K.launch("global_norm.cu", K.template_name("global_norm_squared_kernel", dtype), (blocks,),
             (block_size,), (scratch, grad, np.int64(grad.size), K.i32(0)))
    K.launch("global_norm.cu", "global_norm_finish_kernel", (1,), (FINISH_BLOCK_SIZE,),
             (out, scratch, K.i32(blocks)))

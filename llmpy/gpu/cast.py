"""Type conversion on the GPU: launcher for cuda/cast.cu (no CPU counterpart: the CPU keeps float32)."""
import cupy as cp
import numpy as np

from llmpy.gpu import _kernels as K

BLOCK_SIZE = 512
MAX_BLOCKS = 65536      # grid-stride beyond this: any n fits


def copy_and_cast(out, inp, *, block_size=BLOCK_SIZE):
    """out = inp converted to out's dtype (float32 <-> bf16, round to nearest even). Same shapes,
    contiguous. Overwrites out. Equal dtypes are a plain device copy."""
    for name, a in (("out", out), ("inp", inp)):
        K.check(name, a, dtype=K.FLOAT_DTYPES, int32_size=False)
    K.check_same_shape(out=out, inp=inp)
    if out.dtype == inp.dtype:
        cp.copyto(out, inp)
        return
    block_size = K.check_block_size(block_size)
    blocks = max(1, min(MAX_BLOCKS, K.ceil_div(inp.size, block_size)))
    K.launch("cast.cu", K.template_name("copy_and_cast_kernel", out.dtype, inp.dtype), (blocks,),
             (block_size,), (out, inp, np.int64(inp.size)))


def init_master(master, param, *, block_size=BLOCK_SIZE):
    """master = float32(param): the fp32 master weights before the first AdamW step (llm.c's
    init_state). master float32, param float32 or bf16, same shape. Overwrites master."""
    K.check("master", master, dtype=np.float32, int32_size=False)
    copy_and_cast(master, param, block_size=block_size)

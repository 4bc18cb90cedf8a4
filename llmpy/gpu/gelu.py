"""GELU on the GPU: launchers for cuda/gelu.cu. Reference: llmpy/cpu/gelu.py."""
from llmpy.gpu import _kernels as K

BLOCK_SIZE = 256   # threads per block; llm.c uses 512 (fwd) / 128 (bwd). Any multiple of 32 is correct.


def gelu_forward(out, inp, *, block_size=BLOCK_SIZE):
    """out = gelu(inp) (tanh approximation), elementwise. out, inp: same shape, float32 or bf16,
    contiguous, 16-byte aligned. Overwrites out."""
    dtype = K.check_floats(out=out, inp=inp)
    K.check_same_shape(inp=inp, out=out)
    block_size = K.check_block_size(block_size)
    K.launch("gelu.cu", K.template_name("gelu_forward_kernel", dtype),
             K.elementwise_grid(inp.size, dtype, block_size), (block_size,), (out, inp, K.i32(inp.size)))


def gelu_backward(dinp, inp, dout, *, block_size=BLOCK_SIZE):
    """dinp = gelu'(inp) * dout, elementwise. Same shapes and dtype; dinp may be dout itself.
    Overwrites dinp."""
    dtype = K.check_floats(dinp=dinp, inp=inp, dout=dout)
    K.check_same_shape(inp=inp, dinp=dinp, dout=dout)
    block_size = K.check_block_size(block_size)
    K.launch("gelu.cu", K.template_name("gelu_backward_kernel", dtype),
             K.elementwise_grid(inp.size, dtype, block_size), (block_size,),
             (dinp, inp, dout, K.i32(inp.size)))

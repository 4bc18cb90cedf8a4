"""GELU on the GPU: launchers for cuda/gelu.cu. Reference: llmpy/cpu/gelu.py."""
from llmpy.gpu import _kernels as K

BLOCK_SIZE = 256   # threads per block; llm.c uses 512 (fwd) / 128 (bwd). Any multiple of 32 is correct.


def gelu_forward(out, inp, *, block_size=BLOCK_SIZE):
    """out = gelu(inp) (tanh approximation), elementwise. out, inp: same shape, float32 or bf16,
    contiguous, 16-byte aligned. Overwrites out."""
    K.launch_elementwise("gelu.cu", "gelu_forward_kernel", block_size, out=out, inp=inp)


def gelu_backward(dinp, inp, dout, *, block_size=BLOCK_SIZE):
    """dinp = gelu'(inp) * dout, elementwise. Same shapes and dtype; dinp may be dout itself.
    Overwrites dinp."""
    K.launch_elementwise("gelu.cu", "gelu_backward_kernel", block_size, dinp=dinp, inp=inp, dout=dout)

"""Squared ReLU on the GPU: launchers for cuda/relu2.cu. Reference: llmpy/cpu/relu2.py.

A plain kernel, not a cuBLASLt epilogue: cuBLASLt has ReLU epilogues but no square (cuda/relu2.cu).
"""
from llmpy.gpu import _kernels as K

BLOCK_SIZE = 256   # threads per block, as gelu's. Any multiple of 32 is correct.


def relu2_forward(out, inp, *, block_size=BLOCK_SIZE):
    """out = max(inp, 0)^2, elementwise. out, inp: same shape, float32 or bf16, contiguous, 16-byte
    aligned. Overwrites out."""
    K.launch_elementwise("relu2.cu", "relu2_forward_kernel", block_size, out=out, inp=inp)


def relu2_backward(dinp, inp, dout, *, block_size=BLOCK_SIZE):
    """dinp = 2 max(inp, 0) * dout, elementwise. Same shapes and dtype; dinp may be dout itself.
    Overwrites dinp."""
    K.launch_elementwise("relu2.cu", "relu2_backward_kernel", block_size, dinp=dinp, inp=inp, dout=dout)

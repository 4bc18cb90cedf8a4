"""Residual add on the GPU: launcher for cuda/residual.cu. Reference: llmpy/cpu/residual.py."""
from llmpy.gpu import _kernels as K

BLOCK_SIZE = 256   # llm.c's choice; any multiple of 32 is correct


def residual_forward(out, inp1, inp2, *, block_size=BLOCK_SIZE):
    """out = inp1 + inp2, elementwise (fp32 add, rounded to the storage type). All three: same shape,
    float32 or bf16, contiguous, 16-byte aligned; out may be inp1 or inp2. Overwrites out."""
    K.launch_elementwise("residual.cu", "residual_forward_kernel", block_size, out=out, inp1=inp1, inp2=inp2)

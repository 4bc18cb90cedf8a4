"""Rotary position embedding on the GPU: launchers for cuda/rope.cu. Reference: llmpy/cpu/rope.py.

q or k as (B, T, H, D) with the "halves" layout (x1 = x[..., :D/2] pairs with x2 = x[..., D/2:]);
cos and sin are float32 device tables (maxT, D/2) with maxT >= T, row t for position t (upload the
reference's tables once; the kernels never compute an angle). The backward is the forward with the
rotation reversed (sin negated), so one kernel does both.
"""
import cupy as cp
import numpy as np

from llmpy.cpu import rope as cpu_rope
from llmpy.gpu import _kernels as K

BLOCK_SIZE = 256


def _launch(out, inp, cos, sin, sin_sign, block_size, names):
    out_name, inp_name = names
    dtype = K.check_floats(**{inp_name: inp, out_name: out})
    K.check_same_shape(**{inp_name: inp, out_name: out})
    if inp.ndim != 4:
        raise ValueError(f"{inp_name}: shape {inp.shape}, expected (B, T, H, D)")
    B, T, H, D = inp.shape
    S = K.x128_elems(dtype)
    K.check_multiple("D", D, 2 * S, f"16-byte loads of both halves in {dtype}")
    for name, table in (("cos", cos), ("sin", sin)):
        K.check(name, table, dtype=np.float32, shape=(None, D // 2))
        if table.shape[0] < T:
            raise ValueError(f"{name}: {table.shape[0]} positions, the input has T = {T}")
    block_size = K.check_block_size(block_size)
    rows = B * T * H
    if rows == 0:
        return
    K.launch("rope.cu", K.template_name("rope_kernel", dtype), K.grid_1d(rows * (D // 2 // S), block_size),
             (block_size,), (out, inp, cos, sin, K.f32(sin_sign), K.i32(rows), K.i32(T), K.i32(H), K.i32(D)))


def rope_tables(T: int, D: int, base: float = cpu_rope.BASE, dtype=np.float32):
    """(cos, sin) device tables, each (T, D/2): llmpy.cpu.rope_tables' values, uploaded."""
    return tuple(cp.asarray(t) for t in cpu_rope.rope_tables(T, D, base, dtype))


def rope_forward(out, inp, cos, sin, *, block_size=BLOCK_SIZE):
    """out = RoPE(inp): (B, T, H, D) float32 or bf16, D a multiple of 16 (bf16) / 8 (float32);
    cos, sin float32 (maxT, D/2). Overwrites out; out may be inp (in place)."""
    _launch(out, inp, cos, sin, 1.0, block_size, ("out", "inp"))


def rope_backward(dinp, dout, cos, sin, *, block_size=BLOCK_SIZE):
    """dinp = the gradient through rope_forward (the inverse rotation of dout). Shapes as rope_forward.
    Overwrites dinp; dinp may be dout (in place)."""
    _launch(dinp, dout, cos, sin, -1.0, block_size, ("dinp", "dout"))

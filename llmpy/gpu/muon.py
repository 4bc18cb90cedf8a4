"""Muon on the GPU (nanochat's optimizer for the block matrices): launchers for cuda/muon.cu and the
Newton-Schulz iteration as batched bf16 cuBLASLt GEMMs (llmpy/gpu/matmul.py). Reference:
llmpy/cpu/muon.py.

One call updates a batch of same-shape matrices, param (..., rows, cols) (e.g. one weight of every
layer, stacked): momentum (Nesterov), orthogonalisation, step scaled by max(1, rows / cols)^0.5.

Newton-Schulz (5 iterations, quintic coefficients a, b, c = 3.4445, -4.7750, 2.0315), on X normalised
to unit Frobenius norm. For a wide X (rows <= cols), with A the rows x rows Gram matrix,
    A = X X^T;  B = b A + c A A;  X = a X + B X
and for a tall one, instead of transposing X, the cols x cols Gram matrix on the other side:
    A = X^T X;  B = b A + c A A;  X = a X + X B
(the same iteration on X^T, since B is symmetric). Each line is one GEMM (batched over the stack);
b A and a X are its beta term on the output, which must not be an input: A is first copied into B
(then B = c A A + b B), and X into Y (then X = B Y + a X, or Y B + a X). All in bf16 with fp32
accumulation, each product rounded once to bf16 (muon_copy_kernel copies exactly).
"""
from __future__ import annotations

import math

import cupy as cp
import numpy as np

from llmpy.gpu import _kernels as K
from llmpy.gpu import matmul

NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
BLOCK_SIZE = 256
NORM_BLOCKS = 32        # blocks per matrix of the momentum kernel: the norm's partial sums (fixed, so
                        # the summation order, and the bits, do not depend on the GPU)
APPLY_BLOCK_SIZE = 512  # part of the stochastic-rounding geometry, as AdamW's


def _matrices(name, a):
    if a.ndim < 2:
        raise ValueError(f"{name}: shape {a.shape}, expected (..., rows, cols)")
    rows, cols = a.shape[-2:]
    return int(np.prod(a.shape[:-2], dtype=np.int64)), rows, cols


def norm_blocks(n: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks per matrix of n elements in the momentum kernel (partial sums of the norm)."""
    return max(1, min(NORM_BLOCKS, K.ceil_div(n, block_size)))


def _padded(n: int) -> int:
    """n rounded up to 8 bf16 elements: every buffer carved from a workspace starts 16-byte aligned."""
    return K.ceil_div(n, 8) * 8


def ns_workspace_size(shape) -> int:
    """bf16 elements newton_schulz needs in `workspace` for x of `shape` (..., rows, cols): two
    Gram-sized matrices (A, B) and a copy of X, for every matrix of the batch."""
    batch = int(np.prod(shape[:-2], dtype=np.int64))
    rows, cols = shape[-2:]
    k = min(rows, cols)
    return 2 * _padded(batch * k * k) + _padded(batch * rows * cols)


def workspace_size(shape) -> int:
    """bf16 elements muon_update needs in `workspace`: X itself, then newton_schulz's."""
    return _padded(int(np.prod(shape, dtype=np.int64))) + ns_workspace_size(shape)


def scratch_size(shape) -> int:
    """float32 elements muon_update and newton_schulz need in `scratch` (the norm's partial sums)."""
    batch = int(np.prod(shape[:-2], dtype=np.int64))
    return batch * norm_blocks(shape[-2] * shape[-1])


def _buffer(name, given, need, dtype):
    """A flat device buffer of >= need elements of dtype: `given`, checked, or a fresh one."""
    if given is None:
        return cp.empty(need, dtype=dtype)
    K.check(name, given, dtype=dtype, aligned=True)
    if given.size < need:
        raise ValueError(f"{name}: {given.size} {np.dtype(dtype).name} elements, need {need}")
    return given


def _copy(dst, src):
    n = src.size
    K.launch("muon.cu", "muon_copy_kernel", K.elementwise_grid(n, K.BF16, BLOCK_SIZE), (BLOCK_SIZE,),
             (dst, src, K.i32(n)))


def _orthogonalise(x, grad, momentum, *, beta, nesterov, grad_scale, steps, scalars, workspace, scratch):
    """x (bf16) = NewtonSchulz5 of grad after the momentum step (momentum None: of grad itself);
    workspace holds newton_schulz's buffers (not x)."""
    dtype = x.dtype if grad is x else K.check_floats(grad=grad, aligned=False)
    batch, rows, cols = _matrices("grad", grad)
    n = rows * cols
    blocks = norm_blocks(n)
    workspace = _buffer("workspace", workspace, ns_workspace_size(grad.shape), K.BF16)
    scratch = _buffer("scratch", scratch, batch * blocks, np.float32)
    K.launch("muon.cu", K.template_name("muon_momentum_kernel", dtype), (blocks, batch), (BLOCK_SIZE,),
             (x, scratch, K.nullable(momentum), grad, K.i32(n), K.f32(beta), K.i32(1 if nesterov else 0),
              K.f32(grad_scale), K.nullable(scalars)))
    K.launch("muon.cu", "muon_normalize_kernel", (blocks, batch), (BLOCK_SIZE,), (x, scratch, K.i32(blocks), K.i32(n)))
    a, b, c = NS_COEFFS
    k = min(rows, cols)
    X = x.reshape(batch, rows, cols)
    gram = _padded(batch * k * k)
    A = workspace[:batch * k * k].reshape(batch, k, k)
    B = workspace[gram:gram + batch * k * k].reshape(batch, k, k)
    Y = workspace[2 * gram:2 * gram + x.size].reshape(batch, rows, cols)
    wide = rows <= cols
    for _ in range(steps):
        matmul.batched_matmul(A, X, X, transa=not wide, transb=wide)          # X X^T or X^T X
        _copy(B, A)
        matmul.batched_matmul(B, A, A, transa=False, transb=False, alpha=c, beta=b)
        _copy(Y, X)
        if wide:
            matmul.batched_matmul(X, B, Y, transa=False, transb=False, alpha=1.0, beta=a)
        else:
            matmul.batched_matmul(X, Y, B, transa=False, transb=False, alpha=1.0, beta=a)


def newton_schulz(out, G, steps=NS_STEPS, *, workspace=None, scratch=None):
    """out = NewtonSchulz5(G) for each matrix of the stack G (..., rows, cols), in bf16.

    G float32 or bf16; out bf16, G's shape (OVERWRITTEN; may be G when G is bf16). workspace (bf16,
    >= ns_workspace_size(G.shape)) and scratch (float32, >= scratch_size(G.shape)) are allocated
    when None (pass arena buffers inside a captured CUDA graph).
    """
    K.check("out", out, dtype=K.BF16, aligned=True)
    if G is not out:
        K.check("G", G, dtype=K.FLOAT_DTYPES)
        K.check_same_shape(out=out, G=G)
    _matrices("G", G)
    if G.size:
        _orthogonalise(out, G, None, beta=0.0, nesterov=False, grad_scale=1.0, steps=steps, scalars=None,
                       workspace=workspace, scratch=scratch)


def step_scale(rows: int, cols: int) -> float:
    """Muon's shape factor of the step: max(1, rows / cols)^0.5."""
    return math.sqrt(max(1.0, rows / cols))


def muon_update(param, momentum, grad, *, lr, beta=0.95, nesterov=True, grad_scale=1.0, steps=NS_STEPS,
                master=None, seed=0, scalars=None, seed_ptr=None, workspace=None, scratch=None):
    """One Muon step on a stack of same-shape matrices, in place (as llmpy.cpu.muon_update).

    param, grad (..., rows, cols) float32 or bf16; momentum (the buffer) and master float32, param's shape.
    g = grad_scale * grad; momentum = beta momentum + (1 - beta) g (OVERWRITTEN); u = (1 - beta) g +
    beta momentum with nesterov, else momentum; X = NewtonSchulz5(u) per matrix (bf16);
    param -= lr max(1, rows/cols)^0.5 X, from master when given (and written back there), rounded
    stochastically into bf16 params (seed, as AdamW). No weight decay (nanochat's Muon has none).
    GPU-only knobs: scalars (device float32 [lr, grad_scale]) and seed_ptr (device uint32 [seed])
    replace lr, grad_scale and seed at run time (CUDA-graph replay); workspace (bf16, >=
    workspace_size(shape)) and scratch (float32, >= scratch_size(shape)), allocated when None.
    """
    dtype = K.check_floats(param=param, grad=grad, aligned=False)
    K.check_same_shape(param=param, grad=grad)
    batch, rows, cols = _matrices("param", param)
    K.check("momentum", momentum, dtype=np.float32, shape=param.shape)
    if master is not None:
        K.check("master", master, dtype=np.float32, shape=param.shape)
    if scalars is not None:
        K.check("scalars", scalars, dtype=np.float32, shape=(2,))
    if seed_ptr is not None:
        K.check("seed_ptr", seed_ptr, dtype=np.uint32, shape=(1,))
    n = rows * cols
    if param.size == 0:
        return
    workspace = _buffer("workspace", workspace, workspace_size(param.shape), K.BF16)
    x = workspace[:param.size].reshape(param.shape)
    _orthogonalise(x, grad, momentum, beta=beta, nesterov=nesterov, grad_scale=grad_scale, steps=steps,
                   scalars=scalars, workspace=workspace[_padded(param.size):], scratch=scratch)
    K.launch("muon.cu", K.template_name("muon_apply_kernel", dtype), (K.ceil_div(n, APPLY_BLOCK_SIZE), batch),
             (APPLY_BLOCK_SIZE,), (param, K.nullable(master), x, K.i32(n), K.f32(lr), K.f32(step_scale(rows, cols)),
                                   K.u32(seed), K.nullable(scalars), K.nullable(seed_ptr)))

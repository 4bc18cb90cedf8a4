"""AdamW on the GPU: launchers for cuda/adamw.cu. Reference: llmpy/cpu/adamw.py.

bf16 parameters are rounded stochastically (SquirrelNoise5, llmc-facts.md §6.12): the noise depends on
the seed and on the launch geometry, so `block_size` and `num_slices` are part of the result; keep
them equal between adamw_update and init_from_master to reproduce an update's rounding on resume.

For CUDA-graph replay pass `scalars` (device float32 [lr, grad_scale, 1 - beta1^t, 1 - beta2^t]) and
`seed_ptr` (device uint32 [seed]): the kernel reads them at run time, and the captured by-value lr,
grad_scale, t and seed are then ignored. `step_scalars` computes the four values on the host.
"""
import numpy as np

from llmpy.gpu import _kernels as K
from llmpy.gpu.global_norm import global_norm_squared  # noqa: F401  (the spec lists it with adamw)

BLOCK_SIZE = 512   # llm.c's AdamW block; part of the stochastic-rounding geometry (see above)


def step_scalars(*, lr, beta1, beta2, t, grad_scale=1.0) -> np.ndarray:
    """float32 [lr, grad_scale, 1 - beta1^t, 1 - beta2^t]: the layout of adamw_kernel's `scalars`."""
    if t < 1:
        raise ValueError(f"t is the 1-based step number, got {t}")
    b1, b2 = np.float32(beta1), np.float32(beta2)
    return np.array([lr, grad_scale, np.float32(1) - b1 ** np.float32(t),
                     np.float32(1) - b2 ** np.float32(t)], dtype=np.float32)


def adamw_grid(n: int, num_slices: int, block_size: int) -> tuple[int, int]:
    """(ceil(per-slice elements / block_size), slices): one thread per element of a slice."""
    if num_slices < 1 or n % num_slices:
        raise ValueError(f"num_slices = {num_slices} must divide the {n} elements")
    return (max(1, K.ceil_div(n // num_slices, block_size)), num_slices)


def _check_device_scalars(scalars, seed_ptr):
    if scalars is not None:
        K.check("scalars", scalars, dtype=np.float32, shape=(4,))
    if seed_ptr is not None:
        K.check("seed_ptr", seed_ptr, dtype=np.uint32)
        if seed_ptr.size < 1:
            raise ValueError("seed_ptr: needs one element")


def adamw_update(param, m, v, grad, *, lr, beta1, beta2, eps, weight_decay, t, grad_scale=1.0,
                 master=None, seed=0, num_slices=1, scalars=None, seed_ptr=None,
                 block_size=BLOCK_SIZE):
    """One AdamW step on a parameter tensor, in place.

    param, grad: same shape, float32 or bf16; m, v (and master): float32, param's shape. t: 1-based
    step for the bias corrections; grad_scale multiplies grad (clipping) without writing it.
    Overwrites m, v and param; with master, the old value is read from master, the new one written to
    master and rounded stochastically (seed, uint32) into param. num_slices: layers covered by this
    launch (llm.c uses L for the per-layer tensors, 1 otherwise; it only shapes the rounding noise).
    scalars / seed_ptr: device values that replace lr, grad_scale, t and seed (module docstring).
    """
    dtype = K.check_floats(param=param, grad=grad, aligned=False)
    K.check_same_shape(param=param, grad=grad)
    for name, a in (("m", m), ("v", v)) + ((("master", master),) if master is not None else ()):
        K.check(name, a, dtype=np.float32, shape=param.shape)
    _check_device_scalars(scalars, seed_ptr)
    block_size = K.check_block_size(block_size)
    n = param.size
    grid = adamw_grid(n, num_slices, block_size)
    per_slice = n // num_slices
    stride = np.int64(per_slice)                       # slices are back to back in all buffers
    lr_, gs, b1c, b2c = step_scalars(lr=lr, beta1=beta1, beta2=beta2, t=t, grad_scale=grad_scale)
    if n == 0:
        return
    K.launch("adamw.cu", K.template_name("adamw_kernel", dtype), grid, (block_size,),
             (param, K.nullable(master), grad, m, v, K.i32(per_slice), stride, stride, stride,
              lr_, K.f32(beta1), K.f32(beta2), b1c, b2c, K.f32(eps), K.f32(weight_decay), gs,
              K.u32(seed), K.nullable(scalars), K.nullable(seed_ptr)))


def init_from_master(param, master, *, seed=0, num_slices=1, seed_ptr=None, block_size=BLOCK_SIZE):
    """param = stochastic_round(master) with AdamW's geometry and seed (bit-exact resume).

    param float32 or bf16; master float32, same shape. Overwrites param.
    """
    dtype = K.check_floats(param=param, aligned=False)
    K.check("master", master, dtype=np.float32, shape=param.shape)
    _check_device_scalars(None, seed_ptr)
    block_size = K.check_block_size(block_size)
    n = param.size
    grid = adamw_grid(n, num_slices, block_size)
    if n == 0:
        return
    stride = np.int64(n // num_slices)
    K.launch("adamw.cu", K.template_name("init_from_master_kernel", dtype), grid, (block_size,),
             (param, master, K.i32(n // num_slices), stride, stride, K.u32(seed), K.nullable(seed_ptr)))

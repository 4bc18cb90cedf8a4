"""AdamW optimizer step and the global gradient norm in NumPy: the reference for cuda/adamw.cu.

AdamW (Loshchilov & Hutter, https://arxiv.org/abs/1711.05101), decoupled weight decay, as llm.c and
torch.optim.AdamW, https://pytorch.org/docs/stable/generated/torch.optim.AdamW.html:
  g = grad_scale * grad;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
  p -= lr * ((m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * p)
evaluated in torch's operation order (p *= 1 - lr*wd, then p -= (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)).
The 124M-element buffers are walked in chunks with per-thread scratch, so the ~14 passes of in-place
ufuncs run out of L2 instead of main memory, and the chunks are split across the cores (ufuncs release
the GIL; elementwise math makes the result independent of the split).
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

CHUNK = 1 << 17             # elements per ufunc call: a few float32 arrays of this fit in L2
NORM_CHUNK = 1 << 16        # elements per float32 dot product in global_norm_squared
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_THREADS = min(8, _CORES)
_pool = ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="llmpy-adamw") if _THREADS > 1 else None


def _flat(a):
    """1-D view of a contiguous array; raises instead of silently copying an output."""
    return a.reshape(-1, copy=False)


def _adamw_range(p_all, m_all, v_all, g_all, param_all, lo, hi, k):
    """AdamW on elements [lo, hi) of the flat arrays; k holds the step's constants in the arrays' dtype."""
    s = np.empty(min(CHUNK, hi - lo), dtype=p_all.dtype)   # scratch: the update
    u = np.empty_like(s) if k["grad_scale"] != 1 else None  # scratch: the scaled gradient
    for i in range(lo, hi, CHUNK):
        j = min(i + CHUNK, hi)
        p, m, v, g, sk = p_all[i:j], m_all[i:j], v_all[i:j], g_all[i:j], s[:j - i]
        if u is not None:
            g = np.multiply(g, k["grad_scale"], out=u[:j - i])
        np.subtract(g, m, out=sk)
        sk *= k["one_b1"]
        m += sk                            # m = b1 m + (1 - b1) g, as m + (1 - b1)(g - m)
        np.multiply(g, g, out=sk)
        sk -= v
        sk *= k["one_b2"]
        v += sk                            # v = b2 v + (1 - b2) g^2
        np.sqrt(v, out=sk)
        sk *= k["rsqrt_bc2"]
        sk += k["eps"]                     # sqrt(vhat) + eps
        np.divide(m, sk, out=sk)
        sk *= k["step"]                    # lr * mhat / (sqrt(vhat) + eps)
        p *= k["decay"]                    # decoupled weight decay: p *= 1 - lr * wd
        p -= sk
        if param_all is not None:
            param_all[i:j] = p             # master -> param (same dtype on the CPU: a copy)


def adamw_update(param, m, v, grad, *, lr, beta1, beta2, eps, weight_decay, t, grad_scale=1.0,
                 master=None, seed=0):
    """One AdamW step on a parameter tensor, in place.

    param, m, v, grad, master: same shape, contiguous (float32 when training). t: the 1-based step
    number used for bias correction. grad_scale multiplies grad (gradient clipping) without writing it.
    Overwrites m, v and param. With master, the old value is read from master, the new value is written
    to master and copied into param (a plain copy: the CPU keeps float32 params, so there is nothing
    to round; seed, which seeds the GPU's stochastic rounding, is accepted for the same signature).
    """
    del seed   # only the GPU's bf16 rounding uses it
    p_all = _flat(param) if master is None else _flat(master)
    param_all = None if master is None else _flat(param)
    dt = p_all.dtype.type   # scalars in the arrays' dtype, so float32 math stays float32 (NEP 50)
    k = {"one_b1": dt(1.0 - beta1), "one_b2": dt(1.0 - beta2),
         "rsqrt_bc2": dt(1.0 / math.sqrt(1.0 - beta2 ** t)), "eps": dt(eps),
         "step": dt(lr / (1.0 - beta1 ** t)), "decay": dt(1.0 - lr * weight_decay),
         "grad_scale": dt(grad_scale)}
    args = (p_all, _flat(m), _flat(v), _flat(grad), param_all)
    n = p_all.size
    if _pool is None or n < 2 * CHUNK:
        _adamw_range(*args, 0, n, k)
        return
    # one contiguous slice per thread, cut on chunk boundaries
    per = -(-n // (_THREADS * CHUNK)) * CHUNK
    jobs = [_pool.submit(_adamw_range, *args, lo, min(lo + per, n), k) for lo in range(0, n, per)]
    for job in jobs:
        job.result()


def global_norm_squared(out, grad):
    """Sum of squares of every gradient element (its square root is the global norm for clipping).

    out: 1-element float32 array, OVERWRITTEN with sum(grad^2). grad: any shape, contiguous.
    Each chunk of NORM_CHUNK elements is one BLAS dot product in grad's dtype; the chunk sums are
    accumulated in float64, so the error does not grow with the 124M-term total.
    """
    g_all = _flat(grad)
    total = 0.0
    for i in range(0, g_all.size, NORM_CHUNK):
        chunk = g_all[i:i + NORM_CHUNK]
        total += float(np.dot(chunk, chunk))
    out[0] = total

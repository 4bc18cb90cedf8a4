"""Test helpers shared by tests/ and scripts/: tensor comparison, finite differences, the GPU gate,
error budgets, and a NumPy column-major GEMM that executes cuBLASLt plans.

Importing this module needs only NumPy; pytest is imported when `requires_gpu` is first used.
"""
import functools

import numpy as np


def assert_close(actual, expected, *, atol=0.0, rtol=0.0, name=""):
    """Raise AssertionError unless |actual - expected| <= atol + rtol |expected| everywhere.

    The message gives the max abs diff, its index and the first values side by side (like llm.c's
    tensor checker). NaNs must match NaNs; shapes must match exactly.
    """
    a, e = np.asarray(actual), np.asarray(expected)
    label = f"{name}: " if name else ""
    if a.shape != e.shape:
        raise AssertionError(f"{label}shape {a.shape} != expected {e.shape}")
    a64, e64 = a.astype(np.float64).reshape(-1), e.astype(np.float64).reshape(-1)
    with np.errstate(invalid="ignore"):
        diff = np.abs(a64 - e64)
    nan_a, nan_e = np.isnan(a64), np.isnan(e64)
    diff[np.isnan(diff)] = 0.0                       # both NaN, or equal infinities
    diff[nan_a ^ nan_e] = np.inf
    bad = diff > atol + rtol * np.abs(np.nan_to_num(e64))
    if not bad.any():
        return
    worst = int(np.argmax(diff))
    index = tuple(int(i) for i in np.unravel_index(worst, a.shape))
    lines = [f"{label}{int(bad.sum())} of {a.size} elements differ (atol={atol:g}, rtol={rtol:g}); "
             f"max abs diff {diff[worst]:.6g} at index {index}: "
             f"actual {a64[worst]:.9g} expected {e64[worst]:.9g}; first failing index "
             f"{tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), a.shape))}",
             f"  {'flat index':>10} {'actual':>16} {'expected':>16}"]
    for i in range(min(5, a.size)):
        lines.append(f"  {i:>10} {a64[i]:>16.9g} {e64[i]:>16.9g}")
    raise AssertionError("\n".join(lines))


def assert_matches_torch(torch_op, inputs: dict, dout: np.ndarray, got: dict, *, atol: float, rtol: float):
    """PyTorch as the oracle of a forward/backward pair: torch_op(*tensors) on `inputs` (name -> array,
    in torch_op's order), backpropagated from dout, must match got["out"] and got["d" + name]."""
    import torch
    leaves = {name: torch.tensor(a, requires_grad=True) for name, a in inputs.items()}
    out = torch_op(*leaves.values())
    out.backward(torch.from_numpy(dout))
    assert_close(got["out"], out.detach().numpy(), atol=atol, rtol=rtol, name="out")
    for name, leaf in leaves.items():
        assert_close(got["d" + name], leaf.grad.numpy(), atol=atol, rtol=rtol, name="d" + name)


def numerical_grad(f, x, eps=1e-6):
    """Central-difference gradient of the scalar f() with respect to the float64 array x.

    Each element of x is perturbed in place by +-eps and restored; f takes no arguments (a closure
    over x). Returns an array of x's shape.
    """
    if x.dtype != np.float64:
        raise TypeError(f"numerical_grad needs a float64 array, got {x.dtype}")
    grad = np.empty_like(x)
    flat_x, flat_g = x.reshape(-1, copy=False), grad.reshape(-1)
    for i in range(flat_x.size):
        saved = flat_x[i]
        flat_x[i] = saved + eps
        plus = float(f())
        flat_x[i] = saved - eps
        minus = float(f())
        flat_x[i] = saved
        flat_g[i] = (plus - minus) / (2.0 * eps)
    return grad


@functools.cache
def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:   # no CuPy, no driver, no device: all mean "no GPU"
        return False


def gpu_marks() -> list:
    """The marks of a GPU-only test or parameter: `gpu`, and a skip unless a GPU is available."""
    import pytest
    return [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA device")]


def requires_gpu(test):
    """Decorator for a test function or class: mark it `gpu` and skip it unless a GPU is available."""
    for mark in gpu_marks():
        test = mark(test)
    return test


def bf16_round(x):
    """Round to the nearest bfloat16 (ties to even) and return the result as float32.

    The bit trick: add 0x7FFF plus the lowest kept bit to the float32 bits, then clear the low 16 bits.
    NaNs stay NaN; overflow past the largest bf16 gives inf, as a hardware conversion does.
    """
    x32 = np.asarray(x, dtype=np.float32)
    bits = x32.view(np.uint32).astype(np.uint64)   # uint64: the addition cannot wrap
    bits += 0x7FFF + ((bits >> 16) & 1)
    rounded = (bits & 0xFFFF0000).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x32), x32, rounded)


def error_budget(kernel, exact, lowp, k=2.0, floor=1e-6, name=""):
    """Assert max|kernel - exact| <= k * max|lowp - exact| + floor (the flash-attention style budget).

    exact: the reference in float64; lowp: the reference with inputs and result rounded to the low
    precision the kernel uses (e.g. with bf16_round). Returns the kernel's max error.
    """
    exact64 = np.asarray(exact, dtype=np.float64)
    err = float(np.max(np.abs(np.asarray(kernel, dtype=np.float64) - exact64), initial=0.0))
    budget = k * float(np.max(np.abs(np.asarray(lowp, dtype=np.float64) - exact64), initial=0.0)) + floor
    if not err <= budget:
        label = f"{name}: " if name else ""
        raise AssertionError(f"{label}max error {err:.6g} exceeds budget {budget:.6g} "
                             f"(k={k:g} x low-precision error + floor {floor:g})")
    return err


def ulp_budget(kernel, exact, mantissa_bits: int, ulps: float = 1.0, floor: float = 0.0, name=""):
    """Assert |kernel - exact| <= ulps * spacing + floor element by element, where spacing is the gap
    between neighbouring values of a float format with `mantissa_bits` explicit mantissa bits (7 for
    bf16, 23 for float32) at max(|kernel|, |exact|).

    For stochastically rounded results: each lands on one of the two neighbours of the fp32 value,
    so it is within one spacing of it wherever it is, which a max-over-the-tensor budget cannot
    express (a 1-ulp move of the largest element can exceed every round-to-nearest error elsewhere).
    Returns the largest error in spacings.
    """
    k, e = np.asarray(kernel, dtype=np.float64), np.asarray(exact, dtype=np.float64)
    m = np.maximum(np.abs(k), np.abs(e))
    spacing = np.exp2(np.floor(np.log2(np.where(m > 0, m, 1.0))) - mantissa_bits)
    spacing = np.where(m > 0, spacing, 0.0)
    err = np.abs(k - e)
    bad = err > ulps * spacing + floor
    if bad.any():
        i = int(np.argmax(bad))
        label = f"{name}: " if name else ""
        raise AssertionError(f"{label}{int(bad.sum())} elements off by more than {ulps:g} ulp + {floor:g}; "
                             f"first at flat index {i}: kernel {k.flat[i]:.9g}, exact {e.flat[i]:.9g}")
    return float(np.max(err / np.where(spacing > 0, spacing, np.inf), initial=0.0))


def colmajor_view(buf: np.ndarray, offset: int, rows: int, cols: int, ld: int) -> np.ndarray:
    """The (rows, cols) column-major matrix with leading dimension ld starting at flat buf[offset]."""
    assert ld >= rows, "cuBLASLt requires ld >= rows"
    assert offset + (cols - 1) * ld + rows <= buf.size, "matrix runs past the end of its buffer"
    s = buf.itemsize
    return np.lib.stride_tricks.as_strided(buf[offset:], shape=(rows, cols), strides=(s, ld * s))


def colmajor_gemm(plan, A: np.ndarray, B: np.ndarray, D: np.ndarray, *, alpha: float = 1.0,
                  beta: float = 0.0, compute=None, epilogue=None) -> None:
    """D = alpha * op(A) @ op(B) + beta * D per batch, on flat buffers, exactly as cuBLASLt reads a
    llmpy.gpu.cublaslt.GemmPlan (column-major layouts, leading dimensions, batch strides).

    compute: dtype the operands are widened to for the product (None: the buffers' own);
    epilogue(acc, i): maps batch i's (m, n) result before it is stored into D (rounded to D's dtype)."""
    for i in range(plan.batch):
        a = colmajor_view(A, i * plan.stride_a, *plan.a_layout)
        b = colmajor_view(B, i * plan.stride_b, *plan.b_layout)
        d = colmajor_view(D, i * plan.stride_d, *plan.d_layout)
        op_a = a.T if plan.transa else a
        op_b = b.T if plan.transb else b
        assert op_a.shape == (plan.m, plan.k) and op_b.shape == (plan.k, plan.n)
        if compute is not None:
            op_a, op_b = op_a.astype(compute), op_b.astype(compute)
        acc = op_a @ op_b
        acc *= acc.dtype.type(alpha)
        if beta:                                      # beta = 0: D is not read
            acc += acc.dtype.type(beta) * d.astype(acc.dtype)
        d[...] = acc if epilogue is None else epilogue(acc, i)

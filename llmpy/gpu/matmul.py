"""GPU matmuls: the linear layers (forward with fused bias/GELU, backward) and attention's batched
products, on cuBLASLt. Paired with the NumPy reference `llmpy/cpu/matmul.py`; the cuBLASLt handle and
its cache live in `llmpy/gpu/cublaslt.py`. Tests: `python -m pytest tests/test_gpu_matmul.py`.

Row-major arrays, column-major library. A row-major (r, c) array is, read column-major, its transpose:
a (c, r) matrix with leading dimension c. So the row-major product out = op(a) @ op(b) is computed as the
column-major product out^T = op(b)^T @ op(a)^T, i.e. cuBLASLt's A is our right factor b and its B is
our left factor a (llm.c does the same):

    product                         cuBLASLt A, op   cuBLASLt B, op   m   n   k    lda ldb ldd
    out(BT,OC)  = inp @ W^T          W,    T          inp,  N          OC  BT  C    C   C   OC
    dinp(BT,C)  = dout @ W           W,    N          dout, N          C   BT  OC   C   OC  C
    dW(OC,C)   += dout^T @ inp       inp,  N          dout, T          C   OC  BT   C   OC  C

The planners below are pure functions of shapes (unit-tested against a NumPy column-major GEMM without
a GPU); the ops validate their arrays, plan, and make one cuBLASLt call per product.
"""
from __future__ import annotations

import functools
import math

from llmpy.gpu.cublaslt import (  # noqa: F401  (re-exported: the engine configures matmuls here)
    EPILOGUE_BIAS, EPILOGUE_DEFAULT, EPILOGUE_DGELU, EPILOGUE_GELU_AUX, EPILOGUE_GELU_AUX_BIAS,
    MIN_POINTER_ALIGNMENT, CublasLt, GemmPlan, cuda_data_type, default_handle, set_default_handle, set_tf32,
)

AUX_LD_MULTIPLE = 8  # cuBLASLt: EPILOGUE_AUX_LD must be divisible by 8

# -------------------------------------------------------------------------------------------------
# Planning: row-major shapes -> GemmPlan (pure Python, no device). Memoized: a training step asks for
# the same few shapes every time, and planning is most of an op's host overhead.


def _memo(planner):
    """Memoize a planner on its shape arguments (any sequences; converted to tuples for the cache)."""
    cached = functools.lru_cache(maxsize=1024)(planner)

    @functools.wraps(planner)
    def plan(*shapes, **options):
        return cached(*map(tuple, shapes), **options)
    return plan


def _shape(name: str, shape, min_ndim: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {shape}")
    if any(s < 1 for s in shape):
        raise ValueError(f"{name} has an empty dimension: shape {shape}")
    return shape


@_memo
def gemm_plan_batched(out_shape, a_shape, b_shape, *, transa: bool = False, transb: bool = False,
                      names: tuple[str, str, str] = ("out", "a", "b")) -> GemmPlan:
    """Plan out[i] = op(a[i]) @ op(b[i]) for C-contiguous row-major arrays (..., rows, cols).

    Leading dimensions are the batch and must be the same for all three; op() transposes the last two
    axes when the flag is set. `names` label the arrays in error messages.
    """
    n_out, n_a, n_b = names
    out_shape, a_shape, b_shape = (_shape(n, s, 2) for n, s in zip(names, (out_shape, a_shape, b_shape)))
    lead = a_shape[:-2]
    if b_shape[:-2] != lead or out_shape[:-2] != lead:
        raise ValueError(f"batch dimensions differ: {n_out} {out_shape}, {n_a} {a_shape}, {n_b} {b_shape}")
    rows_a, cols_a = a_shape[-2:]
    rows_b, cols_b = b_shape[-2:]
    M, K = (cols_a, rows_a) if transa else (rows_a, cols_a)
    Kb, N = (cols_b, rows_b) if transb else (rows_b, cols_b)
    if Kb != K:
        raise ValueError(f"inner dimensions differ: op({n_a}) is ({M}, {K}) but op({n_b}) is ({Kb}, {N})")
    if out_shape[-2:] != (M, N):
        raise ValueError(f"{n_out} has shape {out_shape}, expected (..., {M}, {N})")
    batch = math.prod(lead)
    # Column-major view: out^T (N, M) = op(b)^T @ op(a)^T. cuBLASLt's A is b, read as b^T with ld = cols_b
    # (so A gets op T exactly when b is transposed), and its B is a; every leading dimension is the
    # row length of its row-major array.
    return GemmPlan(transa=transb, transb=transa, m=N, n=M, k=K, lda=cols_b, ldb=cols_a, ldd=N,
                    batch=batch,
                    stride_a=rows_b * cols_b if batch > 1 else 0,
                    stride_b=rows_a * cols_a if batch > 1 else 0,
                    stride_d=M * N if batch > 1 else 0)


def _matrix(name: str, shape) -> tuple[int, int]:
    shape = _shape(name, shape, 2)
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2-D, got shape {shape}")
    return shape


def _as_rows(name: str, shape, like_name: str, like) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two (..., C) activations whose leading dimensions must match, as 2-D (BT, C) shapes."""
    shape, like = _shape(name, shape, 1), _shape(like_name, like, 1)
    if shape[:-1] != like[:-1]:
        raise ValueError(f"{name} has shape {shape} but {like_name} has {like}: leading dimensions differ")
    bt = math.prod(shape[:-1])
    return (bt, shape[-1]), (bt, like[-1])


@_memo
def gemm_plan_forward(out_shape, inp_shape, w_shape) -> GemmPlan:
    """out (..., OC) = inp (..., C) @ weight (OC, C)^T."""
    out2, inp2 = _as_rows("out", out_shape, "inp", inp_shape)
    return gemm_plan_batched(out2, inp2, _matrix("weight", w_shape), transb=True, names=("out", "inp", "weight"))


@_memo
def gemm_plan_dinp(dinp_shape, dout_shape, w_shape) -> GemmPlan:
    """dinp (..., C) = dout (..., OC) @ weight (OC, C)."""
    dinp2, dout2 = _as_rows("dinp", dinp_shape, "dout", dout_shape)
    return gemm_plan_batched(dinp2, dout2, _matrix("weight", w_shape), names=("dinp", "dout", "weight"))


@_memo
def gemm_plan_dweight(dw_shape, dout_shape, inp_shape) -> GemmPlan:
    """dweight (OC, C) (+)= dout (..., OC)^T @ inp (..., C), summing over all leading positions."""
    dout2, inp2 = _as_rows("dout", dout_shape, "inp", inp_shape)
    return gemm_plan_batched(_matrix("dweight", dw_shape), dout2, inp2, transa=True,
                             names=("dweight", "dout", "inp"))


def select_epilogue(*, has_bias: bool, gelu: bool, backward: bool = False) -> int:
    """llm.c's choice: GELU_AUX_BIAS / GELU_AUX / BIAS / DEFAULT forward; DGELU / DEFAULT for dinp."""
    if backward:
        if has_bias:
            raise ValueError("the dinp product has no bias epilogue (dbias is a separate reduction)")
        return EPILOGUE_DGELU if gelu else EPILOGUE_DEFAULT
    if gelu:
        return EPILOGUE_GELU_AUX_BIAS if has_bias else EPILOGUE_GELU_AUX
    return EPILOGUE_BIAS if has_bias else EPILOGUE_DEFAULT


# -------------------------------------------------------------------------------------------------
# Public ops (same positional signatures as llmpy.cpu.matmul)


def _device_ptr(name: str, arr, dtype=None, shape=None) -> int:
    """Validate one operand and return its device pointer; errors name the argument."""
    ptr = getattr(getattr(arr, "data", None), "ptr", None)
    if not isinstance(ptr, int):
        raise ValueError(f"{name} must be a CuPy device array, got {type(arr).__name__}")
    if dtype is not None and arr.dtype != dtype:
        raise ValueError(f"{name} has dtype {arr.dtype}, expected {dtype} like the other operands")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (cuBLASLt reads raw memory; strides are ignored)")
    if ptr % MIN_POINTER_ALIGNMENT:
        raise ValueError(f"{name} pointer 0x{ptr:x} is not {MIN_POINTER_ALIGNMENT}-byte aligned")
    return ptr


def _check_aux_ld(name: str, plan: GemmPlan) -> None:
    if plan.ldd % AUX_LD_MULTIPLE:
        raise ValueError(f"{name}: the GELU epilogue needs the last dimension ({plan.ldd}) to be a "
                         f"multiple of {AUX_LD_MULTIPLE}")


def matmul_forward(out, inp, weight, bias, *, gelu_aux=None, handle: CublasLt | None = None) -> None:
    """out = inp @ weight^T + bias, or out = GELU(inp @ weight^T + bias) when gelu_aux is given.

    out (..., OC), inp (..., C), weight (OC, C), bias (OC,) or None; one dtype (float32 or bfloat16).
    Writes out (overwrite). With gelu_aux (shaped like out) the fused GELU epilogue also writes the
    pre-activation there, for the backward's DGELU. handle: None = default_handle().
    """
    x = _device_ptr("inp", inp)
    data_type = cuda_data_type(inp.dtype, "inp")
    w = _device_ptr("weight", weight, inp.dtype)
    o = _device_ptr("out", out, inp.dtype)
    plan = gemm_plan_forward(out.shape, inp.shape, weight.shape)
    b = 0 if bias is None else _device_ptr("bias", bias, inp.dtype, (plan.m,))
    aux = 0
    if gelu_aux is not None:
        aux = _device_ptr("gelu_aux", gelu_aux, inp.dtype, out.shape)
        _check_aux_ld("gelu_aux", plan)
    epilogue = select_epilogue(has_bias=bias is not None, gelu=gelu_aux is not None)
    # cuBLASLt A = weight (op T), B = inp, D = out
    (handle or default_handle()).matmul(plan, data_type, w, x, o, epilogue=epilogue, bias=b, aux=aux)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, *, gelu_aux=None,
                    handle: CublasLt | None = None) -> None:
    """Backward of out = inp @ weight^T + bias.

    dout (..., OC), inp (..., C), weight (OC, C); dinp like inp, dweight like weight, dbias (OC,) or None.
    Write semantics (llm.c): dinp OVERWRITTEN (= dout @ weight); dweight ACCUMULATED (+= dout^T @ inp);
    dbias ACCUMULATED (+= sum of dout over all leading positions). With gelu_aux (the pre-activation
    saved by a GELU matmul_forward, shaped like dinp) the DGELU epilogue multiplies dinp by GELU'(aux):
    the layer's input came out of that GELU.
    """
    g = _device_ptr("dout", dout)
    data_type = cuda_data_type(dout.dtype, "dout")
    x = _device_ptr("inp", inp, dout.dtype)
    w = _device_ptr("weight", weight, dout.dtype)
    dx = _device_ptr("dinp", dinp, dout.dtype, inp.shape)
    dw = _device_ptr("dweight", dweight, dout.dtype, weight.shape)
    p_dinp = gemm_plan_dinp(dinp.shape, dout.shape, weight.shape)
    p_dw = gemm_plan_dweight(dweight.shape, dout.shape, inp.shape)
    if dbias is not None:
        _device_ptr("dbias", dbias, dout.dtype, (dout.shape[-1],))
    aux = 0
    if gelu_aux is not None:
        aux = _device_ptr("gelu_aux", gelu_aux, dout.dtype, dinp.shape)
        _check_aux_ld("gelu_aux", p_dinp)
    lt = handle or default_handle()
    if dbias is not None:
        from llmpy.gpu.bias import matmul_bias_backward  # custom reduction kernel (llm.c's kernel9)
        matmul_bias_backward(dbias, dout)
    # dinp = dout @ W: cuBLASLt A = weight, B = dout; beta 0 overwrites
    lt.matmul(p_dinp, data_type, w, g, dx, aux=aux,
              epilogue=select_epilogue(has_bias=False, gelu=gelu_aux is not None, backward=True))
    # dweight += dout^T @ inp: cuBLASLt A = inp, B = dout (op T); beta 1 accumulates
    lt.matmul(p_dw, data_type, x, g, dw, beta=1.0)


def batched_matmul(out, a, b, *, transa: bool, transb: bool, alpha: float = 1.0, beta: float = 0.0,
                   handle: CublasLt | None = None) -> None:
    """out[i] = alpha * op(a[i]) @ op(b[i]) + beta * out[i] for every batch index i.

    a, b, out: C-contiguous row-major (..., rows, cols) arrays of one dtype with the same leading
    (batch) dimensions; op() transposes the last two axes when transa/transb is set. Overwrites out
    when beta == 0, else accumulates into it. Used by attention (q @ k^T, att @ v and the backward).
    """
    pa = _device_ptr("a", a)
    data_type = cuda_data_type(a.dtype, "a")
    pb = _device_ptr("b", b, a.dtype)
    po = _device_ptr("out", out, a.dtype)
    plan = gemm_plan_batched(out.shape, a.shape, b.shape, transa=bool(transa), transb=bool(transb))
    # cuBLASLt A = b, B = a (column-major out^T = op(b)^T @ op(a)^T)
    (handle or default_handle()).matmul(plan, data_type, pb, pa, po, alpha=alpha, beta=beta)

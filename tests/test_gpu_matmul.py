"""Tests for llmpy/gpu/matmul.py (cuBLASLt matmuls).

Host part (runs everywhere): the row-major -> column-major plans, applied by a NumPy emulation of
cuBLASLt's column-major GEMM to flat row-major buffers, must compute exactly inp @ W^T, dout @ W,
dout^T @ inp and every batched variant (integer-valued float64 data, so "exactly" is exact). This proves
the transposes and leading dimensions without a GPU. Also: argument validation and the small tables.

Op part, on the `backend` fixture: a GPU (pytest.mark.gpu; needs nvmath-python), or the kernel
emulator (tests/cuda_emu.py), whose EmulatedCublasLt executes the same plans, pointers and epilogues
with NumPy in fp32 (cuBLASLt's own numerics only on the GPU): the ops against NumPy float64 with
error-budget tolerances (STYLE.md §8): max|kernel - exact| <= 2 * max|lowp - exact| + floor, where
`lowp` is a plain low-precision implementation (result rounded to the storage dtype, unfused epilogues)
and `floor` is the fp32 accumulation error allowance.
"""
import importlib.util
import math

import numpy as np
import pytest

from llmpy.gpu import cublaslt, matmul
from llmpy.gpu.matmul import (GemmPlan, gemm_plan_batched, gemm_plan_dinp, gemm_plan_dweight,
                              gemm_plan_forward, select_epilogue)
from llmpy.testing import colmajor_gemm, error_budget, requires_gpu

HAVE_NVMATH = importlib.util.find_spec("nvmath") is not None
requires_nvmath = pytest.mark.skipif(not HAVE_NVMATH, reason="needs nvmath-python (cuBLASLt bindings)")


def _needs_nvmath(backend: str):
    """On a GPU the ops call cuBLASLt through nvmath-python; the emulator executes their plans itself."""
    if backend == "cuda" and not HAVE_NVMATH:
        pytest.skip("needs nvmath-python (cuBLASLt bindings)")

def ints(rng, *shape) -> np.ndarray:
    """Small integer values as float64: every product and sum below is exact."""
    return rng.integers(-4, 5, size=shape).astype(np.float64)


# -------------------------------------------------------------------------------------------------
# Host tests: plans


@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_plan_forward_computes_inp_at_w_t(lead):
    rng = np.random.default_rng(0)
    C, OC = 3, 7
    inp, w = ints(rng, *lead, C), ints(rng, OC, C)
    out = np.full((*lead, OC), np.nan)  # any element the plan fails to write stays NaN
    plan = gemm_plan_forward(out.shape, inp.shape, w.shape)
    colmajor_gemm(plan, w.ravel(), inp.ravel(), out.reshape(-1))  # A = weight, B = inp, D = out
    np.testing.assert_array_equal(out, inp @ w.T)


def test_plan_dinp_computes_dout_at_w():
    rng = np.random.default_rng(1)
    BT, C, OC = 5, 3, 7
    dout, w = ints(rng, BT, OC), ints(rng, OC, C)
    dinp = np.full((BT, C), np.nan)
    plan = gemm_plan_dinp(dinp.shape, dout.shape, w.shape)
    colmajor_gemm(plan, w.ravel(), dout.ravel(), dinp.reshape(-1))  # A = weight, B = dout
    np.testing.assert_array_equal(dinp, dout @ w)


def test_plan_dweight_accumulates_dout_t_at_inp():
    rng = np.random.default_rng(2)
    B, T, C, OC = 2, 3, 4, 7
    dout, inp, dw0 = ints(rng, B, T, OC), ints(rng, B, T, C), ints(rng, OC, C)
    dw = dw0.copy()
    plan = gemm_plan_dweight(dw.shape, dout.shape, inp.shape)
    colmajor_gemm(plan, inp.ravel(), dout.ravel(), dw.reshape(-1), beta=1.0)  # A = inp, B = dout
    np.testing.assert_array_equal(dw, dw0 + dout.reshape(-1, OC).T @ inp.reshape(-1, C))


def test_linear_plans_match_llmc_table():
    """The (transa, transb, m, n, k, lda, ldb, ldd) that llm.c passes for each linear-layer product."""
    BT, C, OC = 256, 768, 2304
    assert gemm_plan_forward((BT, OC), (BT, C), (OC, C)) == GemmPlan(True, False, OC, BT, C, C, C, OC)
    assert gemm_plan_dinp((BT, C), (BT, OC), (OC, C)) == GemmPlan(False, False, C, BT, OC, C, OC, C)
    assert gemm_plan_dweight((OC, C), (BT, OC), (BT, C)) == GemmPlan(False, True, C, OC, BT, C, OC, C)


def test_attention_qk_plan_matches_llmc():
    """preatt = q @ k^T per (b, h): llm.c uses transa=T, m=n=T, k=HS, strides T*HS, T*HS, T*T."""
    B, NH, T, HS = 4, 12, 64, 32
    plan = gemm_plan_batched((B, NH, T, T), (B, NH, T, HS), (B, NH, T, HS), transb=True)
    assert plan == GemmPlan(True, False, T, T, HS, HS, HS, T, batch=B * NH,
                            stride_a=T * HS, stride_b=T * HS, stride_d=T * T)


# Attention's products as (name, a shape, b shape, transa, transb): M=T rows, HS head size.
_ATT_T, _ATT_HS = 6, 4
ATTENTION_PRODUCTS = [
    ("preatt = q @ k^T", (_ATT_T, _ATT_HS), (_ATT_T, _ATT_HS), False, True),
    ("y = att @ v", (_ATT_T, _ATT_T), (_ATT_T, _ATT_HS), False, False),
    ("datt = dy @ v^T", (_ATT_T, _ATT_HS), (_ATT_T, _ATT_HS), False, True),
    ("dv = att^T @ dy", (_ATT_T, _ATT_T), (_ATT_T, _ATT_HS), True, False),
    ("dq = dpreatt @ k", (_ATT_T, _ATT_T), (_ATT_T, _ATT_HS), False, False),
    ("dk = dpreatt^T @ q", (_ATT_T, _ATT_T), (_ATT_T, _ATT_HS), True, False),
]
GENERIC_PRODUCTS = [(f"transa={ta} transb={tb}", (5, 7) if not ta else (7, 5), (7, 9) if not tb else (9, 7), ta, tb)
                    for ta in (False, True) for tb in (False, True)]


@pytest.mark.parametrize("name,a_mat,b_mat,transa,transb", ATTENTION_PRODUCTS + GENERIC_PRODUCTS,
                         ids=[p[0] for p in ATTENTION_PRODUCTS + GENERIC_PRODUCTS])
def test_plan_batched_computes_each_product(name, a_mat, b_mat, transa, transb):
    rng = np.random.default_rng(3)
    lead = (2, 3)  # (B, NH)
    a, b = ints(rng, *lead, *a_mat), ints(rng, *lead, *b_mat)
    op_a = np.swapaxes(a, -1, -2) if transa else a
    op_b = np.swapaxes(b, -1, -2) if transb else b
    expected_prod = op_a @ op_b
    out0 = ints(rng, *expected_prod.shape)
    plan = gemm_plan_batched(out0.shape, a.shape, b.shape, transa=transa, transb=transb)
    assert plan.batch == 6
    out = out0.copy()
    colmajor_gemm(plan, b.ravel(), a.ravel(), out.reshape(-1), alpha=0.5, beta=2.0)  # A = b, B = a
    np.testing.assert_array_equal(out, 0.5 * expected_prod + 2.0 * out0)
    out = np.full_like(out0, np.nan)
    colmajor_gemm(plan, b.ravel(), a.ravel(), out.reshape(-1))  # overwrite: every element written
    np.testing.assert_array_equal(out, expected_prod)


def test_plan_batched_two_dimensional_is_batch_one():
    plan = gemm_plan_batched((5, 9), (5, 7), (7, 9))
    assert (plan.batch, plan.stride_a, plan.stride_b, plan.stride_d) == (1, 0, 0, 0)


@pytest.mark.parametrize("call,needle", [
    (lambda: gemm_plan_forward((5, 7), (5, 3), (7, 4)), "inner dimensions"),
    (lambda: gemm_plan_forward((5, 8), (5, 3), (7, 3)), "out has shape"),
    (lambda: gemm_plan_forward((4, 7), (5, 3), (7, 3)), "out has shape (4, 7) but inp"),
    (lambda: gemm_plan_forward((5, 7), (5, 3), (1, 7, 3)), "weight must be 2-D"),
    (lambda: gemm_plan_forward((0, 7), (0, 3), (7, 3)), "empty dimension"),
    (lambda: gemm_plan_dinp((5, 3), (6, 7), (7, 3)), "dinp has shape (5, 3) but dout"),
    (lambda: gemm_plan_dweight((7, 4), (5, 7), (5, 3)), "dweight has shape"),
    (lambda: gemm_plan_batched((2, 5, 9), (3, 5, 7), (3, 7, 9)), "batch dimensions differ"),
    (lambda: gemm_plan_batched((5, 9), (7,), (7, 9)), "a must have at least 2 dimensions"),
])
def test_plan_shape_errors_name_the_argument(call, needle):
    with pytest.raises(ValueError) as info:
        call()
    assert needle in str(info.value)


# -------------------------------------------------------------------------------------------------
# Host tests: tables, keys and alignment


def test_select_epilogue_table():
    assert select_epilogue(has_bias=True, gelu=True) == matmul.EPILOGUE_GELU_AUX_BIAS
    assert select_epilogue(has_bias=False, gelu=True) == matmul.EPILOGUE_GELU_AUX
    assert select_epilogue(has_bias=True, gelu=False) == matmul.EPILOGUE_BIAS
    assert select_epilogue(has_bias=False, gelu=False) == matmul.EPILOGUE_DEFAULT
    assert select_epilogue(has_bias=False, gelu=True, backward=True) == matmul.EPILOGUE_DGELU
    assert select_epilogue(has_bias=False, gelu=False, backward=True) == matmul.EPILOGUE_DEFAULT
    with pytest.raises(ValueError):
        select_epilogue(has_bias=True, gelu=True, backward=True)


def test_data_and_compute_types():
    import ml_dtypes
    assert cublaslt.cuda_data_type(np.float32) == cublaslt.CUDA_R_32F
    assert cublaslt.cuda_data_type(ml_dtypes.bfloat16) == cublaslt.CUDA_R_16BF
    with pytest.raises(ValueError, match="inp has unsupported matmul dtype float64"):
        cublaslt.cuda_data_type(np.float64, "inp")
    assert cublaslt.compute_type(cublaslt.CUDA_R_32F, tf32=False) == cublaslt.COMPUTE_32F
    assert cublaslt.compute_type(cublaslt.CUDA_R_32F, tf32=True) == cublaslt.COMPUTE_32F_FAST_TF32
    assert cublaslt.compute_type(cublaslt.CUDA_R_16BF, tf32=True) == cublaslt.COMPUTE_32F  # bf16: always fp32


def test_pointer_alignment():
    assert cublaslt.pointer_alignment(0x7F0000000000) == 256  # capped at the library's default
    assert cublaslt.pointer_alignment(0x7F0000000010) == 16
    assert cublaslt.pointer_alignment(0x7F0000000040, stride_bytes=6 * 4) == 8  # stride 24 B limits it


def test_cache_key_separates_what_matters():
    plan = gemm_plan_forward((5, 8), (5, 16), (8, 16))
    base = dict(data_type=cublaslt.CUDA_R_16BF, compute=cublaslt.COMPUTE_32F, epilogue=matmul.EPILOGUE_BIAS,
                has_bias=True, alignments=(256, 256, 256))
    key = cublaslt.gemm_cache_key(plan, **base)
    assert key == cublaslt.gemm_cache_key(gemm_plan_forward((5, 8), (5, 16), (8, 16)), **base)
    hash(key)
    variants = [dict(data_type=cublaslt.CUDA_R_32F), dict(compute=cublaslt.COMPUTE_32F_FAST_TF32),
                dict(epilogue=matmul.EPILOGUE_GELU_AUX_BIAS), dict(has_bias=False), dict(alignments=(16, 256, 256))]
    for change in variants:
        assert cublaslt.gemm_cache_key(plan, **{**base, **change}) != key, change
    assert cublaslt.gemm_cache_key(gemm_plan_forward((6, 8), (6, 16), (8, 16)), **base) != key


@requires_nvmath
def test_enum_values_match_nvmath():
    from nvmath.bindings import cublas, cublasLt as lt
    assert cublaslt.COMPUTE_32F == cublas.ComputeType.COMPUTE_32F
    assert cublaslt.COMPUTE_32F_FAST_TF32 == cublas.ComputeType.COMPUTE_32F_FAST_TF32
    assert (cublaslt.OP_N, cublaslt.OP_T) == (cublas.Operation.N, cublas.Operation.T)
    for name in ("DEFAULT", "BIAS", "GELU_AUX", "GELU_AUX_BIAS", "DGELU"):
        assert getattr(cublaslt, f"EPILOGUE_{name}") == getattr(lt.Epilogue, name), name
    from cuda.bindings import runtime  # cudaDataType values
    assert cublaslt.CUDA_R_32F == runtime.cudaDataType.CUDA_R_32F
    assert cublaslt.CUDA_R_16BF == runtime.cudaDataType.CUDA_R_16BF


# -------------------------------------------------------------------------------------------------
# Host tests: argument validation (CuPy arrays over fake device pointers; nothing touches a device)


def fake_device_array(shape, dtype=np.float32, offset=0):
    """A cupy.ndarray over a made-up device address: fine for validation, never dereferenced."""
    cp = pytest.importorskip("cupy")
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize + 256
    mem = cp.cuda.UnownedMemory(0x7F0000000000, nbytes, None, 0)
    return cp.ndarray(shape, dtype, memptr=cp.cuda.MemoryPointer(mem, offset))


def _linear(BT=5, C=16, OC=24, dtype=np.float32):
    return dict(out=fake_device_array((BT, OC), dtype), inp=fake_device_array((BT, C), dtype),
                weight=fake_device_array((OC, C), dtype), bias=fake_device_array((OC,), dtype))


def test_forward_validation_names_the_argument():
    a = _linear()
    cases = [
        (dict(inp=np.zeros((5, 16), np.float32)), "inp must be a CuPy device array"),
        (dict(inp=fake_device_array((5, 16), np.float64)), "inp has unsupported matmul dtype float64"),
        (dict(weight=fake_device_array((24, 16), np.float16)), "weight has dtype float16"),
        (dict(out=fake_device_array((5, 24), offset=4)), "out pointer"),
        (dict(out=fake_device_array((24, 5)).T), "out must be C-contiguous"),
        (dict(bias=fake_device_array((16,))), "bias has shape (16,)"),
        (dict(weight=fake_device_array((24, 15))), "inner dimensions"),
    ]
    for change, needle in cases:
        args = {**a, **change}
        with pytest.raises(ValueError) as info:
            matmul.matmul_forward(args["out"], args["inp"], args["weight"], args["bias"])
        assert needle in str(info.value), (change, str(info.value))
    with pytest.raises(ValueError, match="gelu_aux has shape"):
        matmul.matmul_forward(a["out"], a["inp"], a["weight"], a["bias"], gelu_aux=fake_device_array((5, 16)))
    odd = _linear(OC=20)
    with pytest.raises(ValueError, match="multiple of 8"):
        matmul.matmul_forward(odd["out"], odd["inp"], odd["weight"], odd["bias"],
                              gelu_aux=fake_device_array((5, 20)))


def test_backward_validation_names_the_argument():
    BT, C, OC = 5, 16, 24
    good = dict(dinp=fake_device_array((BT, C)), dweight=fake_device_array((OC, C)),
                dbias=fake_device_array((OC,)), dout=fake_device_array((BT, OC)),
                inp=fake_device_array((BT, C)), weight=fake_device_array((OC, C)))
    cases = [
        (dict(dinp=fake_device_array((BT, C + 8))), "dinp has shape"),
        (dict(dweight=fake_device_array((OC, C), np.float16)), "dweight has dtype"),
        (dict(dbias=fake_device_array((C,))), "dbias has shape"),
        (dict(inp=fake_device_array((BT + 1, C))), "dinp has shape (5, 16), expected (6, 16)"),
        (dict(dout=fake_device_array((BT, OC), offset=8)), "dout pointer"),
    ]
    for change, needle in cases:
        args = {**good, **change}
        with pytest.raises(ValueError) as info:
            matmul.matmul_backward(args["dinp"], args["dweight"], args["dbias"], args["dout"], args["inp"],
                                   args["weight"])
        assert needle in str(info.value), (change, str(info.value))


def test_batched_validation_names_the_argument():
    a, b = fake_device_array((2, 5, 7)), fake_device_array((2, 7, 9))
    with pytest.raises(ValueError, match="out has shape"):
        matmul.batched_matmul(fake_device_array((2, 9, 5)), a, b, transa=False, transb=False)
    with pytest.raises(ValueError, match="inner dimensions"):
        matmul.batched_matmul(fake_device_array((2, 5, 9)), a, b, transa=True, transb=False)
    with pytest.raises(ValueError, match="b has dtype"):
        matmul.batched_matmul(fake_device_array((2, 5, 9)), a, fake_device_array((2, 7, 9), np.float16),
                              transa=False, transb=False)


# -------------------------------------------------------------------------------------------------
# GPU tests: the ops against NumPy float64 within an error budget


def _bf16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def rounded(x: np.ndarray, dtype) -> np.ndarray:
    """x rounded to `dtype` and back to float64: what storing in that dtype does."""
    return np.asarray(x, dtype=dtype).astype(np.float64)


# cuBLASLt's GELU epilogues may evaluate tanh with the hardware approximation (PTX tanh.approx.f32, max
# relative error 2^-10.987 per the PTX ISA), as CUTLASS's GELU epilogue does. The low-precision reference
# of the GELU tests uses a tanh off by that much, so an fp32 kernel is not held to exact-tanh accuracy.
TANH_APPROX_REL = 2.0 ** -10.987
GELU_K = math.sqrt(2.0 / math.pi)


def gelu(x, tanh_rel_err=0.0):
    """tanh-approximation GELU (llm.c, PyTorch approximate='tanh'); tanh scaled by (1 + tanh_rel_err)."""
    t = np.tanh(GELU_K * (x + 0.044715 * x ** 3)) * (1.0 + tanh_rel_err)
    return 0.5 * x * (1.0 + t)


def gelu_grad(x, tanh_rel_err=0.0):
    """d gelu / dx, with sech^2 written as 1 - tanh^2."""
    t = np.tanh(GELU_K * (x + 0.044715 * x ** 3)) * (1.0 + tanh_rel_err)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_K * (1.0 + 3 * 0.044715 * x ** 2)


def assert_within_budget(name, actual, exact, lowp, *, k_inner, factor=2.0):
    """max|actual - exact| <= factor * max|lowp - exact| + floor (STYLE.md §8). The floor allows for
    fp32 accumulation over k_inner terms, which a rounded-result `lowp` does not model."""
    floor = 4 * np.finfo(np.float32).eps * math.sqrt(k_inner) * max(1.0, float(np.abs(exact).max()))
    error_budget(np.asarray(actual), exact, lowp, k=factor, floor=floor, name=name)


def _random(rng, shape, dtype, scale=1.0):
    """Random values already representable in `dtype` (so the float64 reference sees the same inputs)."""
    return rounded(rng.standard_normal(shape) * scale, dtype)


def _dev(x64, dtype):
    import cupy as cp
    return cp.asarray(np.asarray(x64, dtype=dtype))


def _host(x):
    return x.get().astype(np.float64)


# (BT, C, OC): small odd BT; GPT-2 124M's qkv, fc-proj and classifier (Vp = 50304) layers. bf16 keeps
# C and OC multiples of 8 (16-byte rows, as llm.c requires); fp32 also gets a shape with no such luck.
LINEAR_SHAPES = [(5, 24, 40), (256, 768, 2304), (256, 3072, 768), (64, 768, 50304)]
ODD_FP32_SHAPE = (5, 13, 7)
DTYPES = ["float32", "bfloat16"]
LINEAR_CASES = [(d, *shape) for d in DTYPES for shape in LINEAR_SHAPES] + [("float32", *ODD_FP32_SHAPE)]


def _np_dtype(name):
    return np.dtype(np.float32) if name == "float32" else _bf16()


@pytest.mark.parametrize("dtype_name,BT,C,OC", LINEAR_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_gpu_forward(backend, dtype_name, BT, C, OC, with_bias):
    _needs_nvmath(backend)
    dtype, rng = _np_dtype(dtype_name), np.random.default_rng(10)
    inp, w = _random(rng, (BT, C), dtype), _random(rng, (OC, C), dtype, 1 / math.sqrt(C))
    bias = _random(rng, (OC,), dtype) if with_bias else None
    out = _dev(np.zeros((BT, OC)), dtype)
    matmul.matmul_forward(out, _dev(inp, dtype), _dev(w, dtype), None if bias is None else _dev(bias, dtype))
    exact = inp @ w.T + (0.0 if bias is None else bias)
    lowp = rounded(exact, dtype) if dtype_name == "bfloat16" else \
        (inp.astype(np.float32) @ w.astype(np.float32).T + (0 if bias is None else bias.astype(np.float32)))
    assert_within_budget("out", _host(out), exact, lowp, k_inner=C)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("BT,C,OC", [(5, 24, 40), (256, 768, 3072)])
def test_gpu_forward_gelu_epilogue(backend, dtype_name, BT, C, OC):
    _needs_nvmath(backend)
    dtype, rng = _np_dtype(dtype_name), np.random.default_rng(11)
    inp, w = _random(rng, (BT, C), dtype), _random(rng, (OC, C), dtype, 1 / math.sqrt(C))
    bias = _random(rng, (OC,), dtype)
    out, aux = _dev(np.zeros((BT, OC)), dtype), _dev(np.zeros((BT, OC)), dtype)
    matmul.matmul_forward(out, _dev(inp, dtype), _dev(w, dtype), _dev(bias, dtype), gelu_aux=aux)
    pre = inp @ w.T + bias
    # lowp: the unfused path, matmul stores pre in `dtype`, then a GELU kernel reads it and stores
    assert_within_budget("gelu_aux", _host(aux), pre, rounded(pre, dtype), k_inner=C)
    lowp = rounded(gelu(rounded(pre, dtype), TANH_APPROX_REL), dtype)
    assert_within_budget("out", _host(out), gelu(pre), lowp, k_inner=C)


@pytest.mark.parametrize("dtype_name,BT,C,OC", [c for c in LINEAR_CASES if c[-1] != 50304])
@pytest.mark.parametrize("with_gelu", [False, True])
def test_gpu_backward(backend, dtype_name, BT, C, OC, with_gelu):
    _needs_nvmath(backend)
    dtype, rng = _np_dtype(dtype_name), np.random.default_rng(12)
    dout, inp = _random(rng, (BT, OC), dtype), _random(rng, (BT, C), dtype)
    w = _random(rng, (OC, C), dtype, 1 / math.sqrt(C))
    dw0 = _random(rng, (OC, C), dtype)
    pre = _random(rng, (BT, C), dtype) if with_gelu else None
    dinp = _dev(np.full((BT, C), 7.0), dtype)  # overwritten, so the 7s must vanish
    dweight = _dev(dw0, dtype)
    if with_gelu and C % matmul.AUX_LD_MULTIPLE:      # cuBLASLt's aux leading dimension rule
        with pytest.raises(ValueError, match="multiple of 8"):
            matmul.matmul_backward(dinp, dweight, None, _dev(dout, dtype), _dev(inp, dtype), _dev(w, dtype),
                                   gelu_aux=_dev(pre, dtype))
        return
    matmul.matmul_backward(dinp, dweight, None, _dev(dout, dtype), _dev(inp, dtype), _dev(w, dtype),
                           gelu_aux=None if pre is None else _dev(pre, dtype))
    exact_dinp = dout @ w
    lowp_dinp = rounded(exact_dinp, dtype) if dtype_name == "bfloat16" else \
        dout.astype(np.float32) @ w.astype(np.float32)
    if with_gelu:
        exact_dinp = exact_dinp * gelu_grad(pre)
        lowp_dinp = rounded(lowp_dinp * gelu_grad(pre, TANH_APPROX_REL), dtype)
    assert_within_budget("dinp", _host(dinp), exact_dinp, lowp_dinp, k_inner=OC)
    exact_dw = dw0 + dout.T @ inp
    lowp_dw = rounded(exact_dw, dtype) if dtype_name == "bfloat16" else \
        dw0.astype(np.float32) + dout.astype(np.float32).T @ inp.astype(np.float32)
    assert_within_budget("dweight", _host(dweight), exact_dw, lowp_dw, k_inner=BT)


def test_gpu_backward_bias(backend):
    """dbias goes to llmpy.gpu.bias.matmul_bias_backward(dbias, dout) (owned by the kernels helper)."""
    _needs_nvmath(backend)
    pytest.importorskip("llmpy.gpu.bias")
    BT, C, OC = 64, 768, 768
    dtype, rng = _bf16(), np.random.default_rng(13)
    dout, inp = _random(rng, (BT, OC), dtype), _random(rng, (BT, C), dtype)
    w, db0 = _random(rng, (OC, C), dtype, 0.03), _random(rng, (OC,), dtype)
    dbias = _dev(db0, dtype)
    matmul.matmul_backward(_dev(np.zeros((BT, C)), dtype), _dev(np.zeros((OC, C)), dtype), dbias,
                           _dev(dout, dtype), _dev(inp, dtype), _dev(w, dtype))
    exact = db0 + dout.sum(axis=0)
    assert_within_budget("dbias", _host(dbias), exact, rounded(exact, dtype), k_inner=BT)


def _batched_cases():
    """(dtype, lead, a matrix, b matrix, transa, transb, alpha, beta): every transpose combination on a
    small shape (odd for fp32, multiples of 8 for bf16), plus attention's products at GPT-2 head sizes."""
    cases = []
    for dtype, (M, K, N) in (("float32", (5, 7, 9)), ("bfloat16", (24, 40, 16))):
        for transa, transb, alpha, beta in ((False, False, 0.5, 1.0), (True, False, 1.0, 0.0),
                                            (False, True, 1.0, 0.0), (True, True, 2.0, 1.0)):
            a_mat = (K, M) if transa else (M, K)
            b_mat = (N, K) if transb else (K, N)
            cases.append((dtype, (2, 3), a_mat, b_mat, transa, transb, alpha, beta))
        T, HS = 64, 64  # B=4, NH=12
        cases += [(dtype, (4, 12), (T, HS), (T, HS), False, True, 1.0, 0.0),   # preatt = q @ k^T
                  (dtype, (4, 12), (T, T), (T, HS), False, False, 1.0, 0.0),   # y = att @ v
                  (dtype, (4, 12), (T, T), (T, HS), True, False, 1.0, 0.0)]    # dv = att^T @ dy
    return cases


@pytest.mark.parametrize("dtype_name,lead,a_mat,b_mat,transa,transb,alpha,beta", _batched_cases())
def test_gpu_batched(backend, dtype_name, lead, a_mat, b_mat, transa, transb, alpha, beta):
    _needs_nvmath(backend)
    dtype, rng = _np_dtype(dtype_name), np.random.default_rng(14)
    a, b = _random(rng, (*lead, *a_mat), dtype), _random(rng, (*lead, *b_mat), dtype)
    op_a = np.swapaxes(a, -1, -2) if transa else a
    op_b = np.swapaxes(b, -1, -2) if transb else b
    out0 = _random(rng, (*lead, op_a.shape[-2], op_b.shape[-1]), dtype)
    out = _dev(out0, dtype)
    matmul.batched_matmul(out, _dev(a, dtype), _dev(b, dtype), transa=transa, transb=transb,
                          alpha=alpha, beta=beta)
    exact = alpha * (op_a @ op_b) + beta * out0
    if dtype_name == "bfloat16":
        lowp = rounded(exact, dtype)
    else:
        f = np.float32
        lowp = f(alpha) * (op_a.astype(f) @ op_b.astype(f)) + f(beta) * out0.astype(f)
    assert_within_budget("out", _host(out), exact, lowp, k_inner=op_a.shape[-1])


def _tf32(x):
    """Round fp32 values to TF32 (10 mantissa bits), nearest-even."""
    u = np.asarray(x, np.float32).view(np.uint32)
    u = (u + np.uint32(0xFFF) + ((u >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    return u.view(np.float32).astype(np.float64)


@requires_gpu
@requires_nvmath
def test_gpu_tf32_handle():
    """llm.c's -f 1: fp32 inputs on TF32 tensor cores. Budget: inputs rounded to TF32; factor 4
    because the hardware may truncate rather than round when converting to TF32."""
    BT, C, OC = 256, 768, 768
    rng = np.random.default_rng(15)
    inp, w = _random(rng, (BT, C), np.float32), _random(rng, (OC, C), np.float32, 1 / math.sqrt(C))
    out = _dev(np.zeros((BT, OC)), np.float32)
    handle = matmul.CublasLt(tf32=True)
    try:
        matmul.matmul_forward(out, _dev(inp, np.float32), _dev(w, np.float32), None, handle=handle)
    finally:
        handle.close()
    exact = inp @ w.T
    assert_within_budget("out", _host(out), exact, rounded(_tf32(inp) @ _tf32(w).T, np.float32),
                         k_inner=C, factor=4.0)


@requires_gpu
@requires_nvmath
def test_gpu_matmuls_replay_in_a_cuda_graph():
    """Warm up, capture forward + backward + a batched product on a side stream, replay on new inputs."""
    import cupy as cp
    dtype, rng = _bf16(), np.random.default_rng(16)
    BT, C, OC = 64, 128, 256
    inp, w, bias = (_dev(np.zeros(s), dtype) for s in ((BT, C), (OC, C), (OC,)))
    out, aux, dout = (_dev(np.zeros((BT, OC)), dtype) for _ in range(3))
    dinp, dweight = _dev(np.zeros((BT, C)), dtype), _dev(np.zeros((OC, C)), dtype)
    att = _dev(np.zeros((2, BT, BT)), dtype)
    q = _dev(np.zeros((2, BT, C)), dtype)

    def step():
        matmul.matmul_forward(out, inp, w, bias, gelu_aux=aux)
        matmul.matmul_backward(dinp, dweight, None, dout, inp, w)
        matmul.batched_matmul(att, q, q, transa=False, transb=True)

    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        step()  # warm-up: builds every descriptor and algorithm outside capture
        stream.synchronize()
        stream.begin_capture()
        step()
        graph = stream.end_capture()
    host = {"inp": _random(rng, (BT, C), dtype), "w": _random(rng, (OC, C), dtype, 0.1),
            "bias": _random(rng, (OC,), dtype), "dout": _random(rng, (BT, OC), dtype),
            "q": _random(rng, (2, BT, C), dtype, 0.1)}
    for arr, key in ((inp, "inp"), (w, "w"), (bias, "bias"), (dout, "dout"), (q, "q")):
        arr.set(np.asarray(host[key], dtype=dtype))
    dweight.data.memset_async(0, dweight.nbytes)
    cp.cuda.Device().synchronize()
    graph.launch(stream=stream)
    stream.synchronize()
    pre = host["inp"] @ host["w"].T + host["bias"]
    lowp = rounded(gelu(rounded(pre, dtype), TANH_APPROX_REL), dtype)
    assert_within_budget("out", _host(out), gelu(pre), lowp, k_inner=C)
    dw = host["dout"].T @ host["inp"]
    assert_within_budget("dweight", _host(dweight), dw, rounded(dw, dtype), k_inner=BT)
    qk = host["q"] @ np.swapaxes(host["q"], -1, -2)
    assert_within_budget("att", _host(att), qk, rounded(qk, dtype), k_inner=C)

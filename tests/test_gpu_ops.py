"""The CUDA kernels (llmpy.gpu) compute what the NumPy reference (llmpy.cpu) computes, op by op.

One harness, `check_case`, feeds identical NumPy inputs to both backends and compares every output
the op writes (overwritten and accumulated ones alike: accumulating outputs start from random
values), for float32 and bf16 storage, at GPT-2 shapes (B=4, T=64, C=768) and at odd sizes.

Tolerances come from an error budget, not magic numbers (STYLE.md §8, flash-attention): with
  exact = the reference in float64 on the original float64 inputs, and
  lowp  = the reference in float32 on the inputs rounded to the storage type, its storage-type
          outputs rounded again (what a plain low-precision implementation gets),
every output must satisfy max|gpu - exact| <= k * max|lowp - exact| + floor, with k = 2 unless a
case says why not, and floor = floor_ulps float32 ulps of max|exact| (fast-math exp/log, fp32
sums in another order). The GPU sees the rounded inputs, exactly as lowp does. Stochastically
rounded bf16 outputs are checked element by element instead: each lies within one bf16 ulp (+ floor)
of lowp's fp32 value before rounding (llmpy.testing.ulp_budget).

Every test runs on two backends (the `backend` fixture): a real GPU (marker gpu, skipped without
one; attention also needs nvmath-python for cuBLASLt), and the CPU emulator of tests/cuda_emu.py,
which compiles the same cuda/*.cu files with g++ and drives them through the same launchers, with
NumPy executing matmul.py's cuBLASLt plans. The emulator runs in CI, so a kernel or launcher
bug shows up without a GPU; what only a GPU can show (fast-math, races between blocks, speed) still
needs the gpu run.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
from typing import Callable

import ml_dtypes
import numpy as np
import pytest

import llmpy.cpu
from llmpy.testing import error_budget, ulp_budget

BF16 = np.dtype(ml_dtypes.bfloat16)
STORAGE = {"float32": np.dtype(np.float32), "bfloat16": BF16}
F32_ULP = float(np.finfo(np.float32).eps)

# -------------------------------------------------------------------------------------------------
# The harness


@dataclasses.dataclass(frozen=True)
class Case:
    op: str                         # function name in llmpy.cpu and llmpy.gpu (or in EXTRA_OPS)
    args: tuple                     # positional arguments: array names (str) or literal values
    outputs: tuple                  # names of the arrays compared after the call
    make: Callable                  # make(rng, **size) -> {name: float64 or int32 NumPy array}
    sizes: tuple                    # size dicts, one test each
    kwargs: dict = dataclasses.field(default_factory=dict)       # both backends; str = array name
    gpu_kwargs: dict = dataclasses.field(default_factory=dict)   # GPU-only knobs (seed, ...)
    fp32: tuple = ()                # arrays that are float32 whatever the storage type
    k: float = 2.0                  # error-budget factor
    floor_ulps: float = 8.0         # absolute floor in float32 ulps of max|exact|
    check: Callable | None = None   # extra assertion on the GPU results (dict name -> float64)
    stochastic: bool = False        # bf16 outputs are rounded stochastically: each must lie within
                                    # 1 bf16 ulp (+ floor) of lowp's fp32 value before rounding,
                                    # element by element, instead of the max-over-tensor budget
    cublaslt: bool = False          # the op runs batched matmuls (nvmath-python on a GPU; NumPy
                                    # stands in for them in the emulator)
    dtypes: tuple = tuple(STORAGE)  # storage types the GPU op supports
    label: str = ""                 # added to the test id where op and outputs repeat another case's


def _bias_backward_reference(dbias, dout):
    """The dbias line of llmpy.cpu.matmul.matmul_backward: dbias += sum of dout over rows."""
    dbias += dout.reshape(-1, dout.shape[-1]).sum(axis=0)


def _ops(backend: str, name: str):
    """The op `name` of a backend; matmul_bias_backward is not a backend op (the matmul backward
    calls it), so it comes from llmpy.gpu.bias and, on the CPU, from the reference above."""
    if backend == "cpu":
        return getattr(llmpy.cpu, name) if hasattr(llmpy.cpu, name) else _bias_backward_reference
    gpu = importlib.import_module("llmpy.gpu")
    if hasattr(gpu, name):
        return getattr(gpu, name)
    assert name == "matmul_bias_backward", name
    return importlib.import_module("llmpy.gpu.bias").matmul_bias_backward


def _call(fn, case: Case, arrays: dict, extra_kwargs: dict):
    resolve = (lambda a: arrays[a] if isinstance(a, str) else a)
    fn(*map(resolve, case.args), **{k: resolve(v) for k, v in {**case.kwargs, **extra_kwargs}.items()})


def _inputs(case: Case, size: dict, dtype_name: str):
    """(base float64/int32 inputs, kind(name), rounded(name)) of a case: kind is "int", "f32" or "T"
    (the storage type), rounded gives the values the GPU sees, as float32 (bf16 is exact in it)."""
    storage = STORAGE[dtype_name]
    base = case.make(np.random.default_rng(1234), **size)

    def kind(name):
        a = base[name]
        return "int" if a.dtype.kind in "iu" else ("f32" if name in case.fp32 else "T")

    def rounded(name):
        a = base[name]
        if kind(name) == "int":
            return a.copy()
        to = storage if kind(name) == "T" else np.float32
        return a.astype(to).astype(np.float32)
    return base, kind, rounded


def run_gpu(case: Case, size: dict, dtype_name: str, inputs=None) -> dict:
    """Run the case's GPU op on its inputs (`inputs`: _inputs' result when the caller has it);
    returns {output name: host array in its stored dtype}."""
    import cupy as cp
    storage = STORAGE[dtype_name]
    base, kind, rounded = inputs or _inputs(case, size, dtype_name)
    device = {n: cp.asarray(rounded(n).astype(storage) if kind(n) == "T" else rounded(n)) for n in base}
    _call(_ops("gpu", case.op), case, device, case.gpu_kwargs)
    return {n: device[n].get() for n in case.outputs}


def check_case(backend: str, case: Case, size: dict, dtype_name: str):
    if backend == "cuda" and case.cublaslt and importlib.util.find_spec("nvmath") is None:
        pytest.skip("needs nvmath-python (cuBLASLt bindings)")
    storage = STORAGE[dtype_name]
    inputs = _inputs(case, size, dtype_name)
    base, kind, rounded = inputs

    exact = {n: a.astype(np.float64) if kind(n) != "int" else a.copy() for n, a in base.items()}
    _call(_ops("cpu", case.op), case, exact, {})

    lowp = {n: rounded(n) for n in base}
    _call(_ops("cpu", case.op), case, lowp, {})
    lowp_fp32 = {n: lowp[n].copy() for n in case.outputs}     # before rounding into the storage type
    for n in case.outputs:
        if kind(n) == "T":
            lowp[n] = lowp[n].astype(storage).astype(np.float32)

    got = {n: a.astype(np.float64) for n, a in run_gpu(case, size, dtype_name, inputs).items()}

    for n in case.outputs:
        scale = float(np.abs(exact[n]).max(initial=0.0)) or 1.0
        if case.stochastic and kind(n) == "T" and storage == BF16:
            ulp_budget(got[n], lowp_fp32[n], mantissa_bits=7, floor=case.floor_ulps * F32_ULP * scale,
                       name=f"{case.op}:{n} ({dtype_name})")
            continue
        error_budget(got[n], exact[n], lowp[n], k=case.k, floor=case.floor_ulps * F32_ULP * scale,
                     name=f"{case.op}:{n} ({dtype_name})")
    if case.check is not None:
        case.check(got, size)


# -------------------------------------------------------------------------------------------------
# The cases: inputs at the scales training sees (LN outputs ~N(0,1), small gradients, ...)


def _normal(rng, *shape, scale=1.0, mean=0.0):
    return mean + scale * rng.standard_normal(shape)


def make_encoder(rng, B, T, C, V, maxT):
    return {"out": _normal(rng, B, T, C), "inp": rng.integers(0, V, size=(B, T)).astype(np.int32),
            "wte": _normal(rng, V, C, scale=0.1), "wpe": _normal(rng, maxT, C, scale=0.1),
            "dwte": _normal(rng, V, C, scale=0.1), "dwpe": _normal(rng, maxT, C, scale=0.1),
            "dout": _normal(rng, B, T, C)}


def make_layernorm(rng, N, C):
    inp = _normal(rng, N, C, scale=2.0, mean=0.5)
    mean = inp.mean(axis=-1)
    rstd = 1.0 / np.sqrt(inp.var(axis=-1) + 1e-5)
    return {"out": _normal(rng, N, C), "mean": rng.random(N), "rstd": rng.random(N),
            "saved_mean": mean, "saved_rstd": rstd, "inp": inp,
            "inp1": _normal(rng, N, C), "inp2": _normal(rng, N, C, scale=0.5), "residual": _normal(rng, N, C),
            "weight": _normal(rng, C, scale=0.2, mean=1.0), "bias": _normal(rng, C, scale=0.2),
            "dout": _normal(rng, N, C), "dinp": _normal(rng, N, C),
            "dweight": _normal(rng, C), "dbias": _normal(rng, C)}


def make_elementwise(rng, shape):
    return {"out": _normal(rng, *shape), "inp": _normal(rng, *shape, scale=2.0),
            "inp2": _normal(rng, *shape), "dout": _normal(rng, *shape), "dinp": _normal(rng, *shape)}


def make_attention(rng, B, T, NH, HS):
    C = NH * HS
    inp = _normal(rng, B, T, 3 * C)
    qkvr, att = np.empty((3, B, NH, T, HS)), np.empty((B, NH, T, T))
    llmpy.cpu.attention_forward(np.empty((B, T, C)), qkvr, att, inp.copy())   # what forward saves
    return {"out": _normal(rng, B, T, C), "qkvr": _normal(rng, 3, B, NH, T, HS), "att": _normal(rng, B, NH, T, T),
            "inp": inp, "saved_qkvr": qkvr, "saved_att": att, "dout": _normal(rng, B, T, C),
            "dinp": _normal(rng, B, T, 3 * C), "dqkvr": _normal(rng, 3, B, NH, T, HS),
            "datt": _normal(rng, B, NH, T, T), "scratch": _normal(rng, B, NH, T, HS)}


def make_attention_zeroed_upper(rng, B, T, NH, HS):
    """make_attention with att's upper triangle zeroed, as the engine's arena has it, and a preatt
    scratch (random: the GPU op overwrites it), for the launch that writes only the causal part."""
    arrays = make_attention(rng, B, T, NH, HS)
    arrays["att"] = np.tril(arrays["att"])
    arrays["preatt"] = _normal(rng, B, NH, T, T)
    return arrays


def make_flash(rng, B, T, NH):
    C = NH * 64
    inp = _normal(rng, B, T, 3 * C)
    out, lse = np.empty((B, T, C)), np.empty((B, NH, T))
    llmpy.cpu.flash_attention_forward(out, lse, inp)                  # what forward saves
    return {"out": _normal(rng, B, T, C), "lse": _normal(rng, B, NH, T), "inp": inp, "saved_out": out,
            "saved_lse": lse, "dout": _normal(rng, B, T, C), "dinp": _normal(rng, B, T, 3 * C),
            "delta": _normal(rng, B, NH, T)}


def make_classifier(rng, B, T, V, Vp):
    logits = _normal(rng, B, T, Vp, scale=2.0)
    logits[..., V:] = 0.0                              # padded wte rows are 0, so these logits are
    return {"logits": logits, "losses": rng.random((B, T)),
            "targets": rng.integers(0, V, size=(B, T)).astype(np.int32)}


def make_adamw(rng, n):
    param = _normal(rng, n, scale=0.1)
    return {"param": param, "master": param + _normal(rng, n, scale=1e-4),
            "m": _normal(rng, n, scale=1e-2), "v": 1e-4 * rng.random(n),
            "grad": _normal(rng, n, scale=1e-2)}


def make_norm(rng, n):
    return {"out": rng.random(1), "grad": _normal(rng, n, scale=1e-2)}


def make_bias(rng, N, OC):
    return {"dbias": _normal(rng, OC), "dout": _normal(rng, N, OC)}


def _upper_triangle_is_zero(got, size):
    T = size["T"]
    assert np.all(got["att"][..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0.0)


ENC_SIZES = (dict(B=4, T=64, C=768, V=1000, maxT=128), dict(B=3, T=5, C=24, V=7, maxT=8))
LN_SIZES = (dict(N=4 * 64, C=768), dict(N=21, C=40), dict(N=2 * 16, C=1600))
EW_SIZES = (dict(shape=(4, 64, 3072)), dict(shape=(37,)), dict(shape=(3, 5, 7)))
ATT_SIZES = (dict(B=4, T=64, NH=12, HS=64), dict(B=2, T=40, NH=3, HS=16),   # 128-bit softmax rows
             dict(B=2, T=13, NH=2, HS=8))                                        # scalar softmax rows
ADAMW_KW = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, t=3, grad_scale=0.5)
FLASH_SIZES = (dict(B=2, T=192, NH=2),   # 3 query tiles: the online softmax across key tiles
               dict(B=1, T=100, NH=3),   # a partial last tile
               dict(B=1, T=13, NH=1))    # fewer rows than one warp's 16-row MMA tile
FLASH_FP32 = ("lse", "saved_lse", "delta")
BF16_INTERMEDIATES = 3.0   # attention stores preatt/att/dy/datt in the storage type between
                           # matmuls; lowp (float32 throughout) does not round those
ROUNDED_RESIDUAL = 3.0     # fused_residual normalizes the residual after rounding it (as llm.c
                           # does); lowp normalizes the unrounded float32 sum

CASES = [
    Case("encoder_forward", ("out", "inp", "wte", "wpe"), ("out",), make_encoder, ENC_SIZES),
    Case("encoder_backward", ("dwte", "dwpe", "dout", "inp"), ("dwte", "dwpe"), make_encoder, ENC_SIZES,
         gpu_kwargs=dict(seed=1234), stochastic=True, floor_ulps=64),
    Case("layernorm_forward", ("out", "mean", "rstd", "inp", "weight", "bias"), ("out", "mean", "rstd"),
         make_layernorm, LN_SIZES, fp32=("mean", "rstd", "saved_mean", "saved_rstd"), floor_ulps=32),
    Case("fused_residual_forward", ("residual", "out", "mean", "rstd", "inp1", "inp2", "weight", "bias"),
         ("residual", "out", "mean", "rstd"), make_layernorm, LN_SIZES,
         fp32=("mean", "rstd", "saved_mean", "saved_rstd"), k=ROUNDED_RESIDUAL, floor_ulps=32),
    Case("layernorm_backward",
         ("dinp", "dweight", "dbias", "dout", "inp", "weight", "saved_mean", "saved_rstd"),
         ("dinp", "dweight", "dbias"), make_layernorm, LN_SIZES,
         fp32=("mean", "rstd", "saved_mean", "saved_rstd"), floor_ulps=64),
    Case("gelu_forward", ("out", "inp"), ("out",), make_elementwise, EW_SIZES, floor_ulps=32),
    Case("gelu_backward", ("dinp", "inp", "dout"), ("dinp",), make_elementwise, EW_SIZES, floor_ulps=32),
    Case("gelu_backward", ("dout", "inp", "dout"), ("dout",), make_elementwise, EW_SIZES[1:],   # in place
         floor_ulps=32),
    Case("residual_forward", ("out", "inp", "inp2"), ("out",), make_elementwise, EW_SIZES),
    Case("attention_forward", ("out", "qkvr", "att", "inp"), ("out", "qkvr", "att"), make_attention,
         ATT_SIZES, k=BF16_INTERMEDIATES, floor_ulps=64, check=_upper_triangle_is_zero,
         cublaslt=True),
    Case("attention_forward", ("out", "qkvr", "att", "inp"), ("out", "qkvr", "att"), make_attention_zeroed_upper,
         ATT_SIZES, gpu_kwargs=dict(preatt="preatt"), k=BF16_INTERMEDIATES, floor_ulps=64,
         check=_upper_triangle_is_zero, cublaslt=True, label="preatt"),
    Case("attention_backward", ("dinp", "dqkvr", "datt", "scratch", "dout", "saved_qkvr", "saved_att"),
         ("dinp",), make_attention, ATT_SIZES, k=BF16_INTERMEDIATES, floor_ulps=256,
         cublaslt=True),
    # bf16 only (tensor cores); P and dz are rounded to bf16 before their products, but the T x T matrices
    # are not stored, so the default budget holds (measured max error 0.4-1.1x lowp's)
    Case("flash_attention_forward", ("out", "lse", "inp"), ("out", "lse"), make_flash, FLASH_SIZES,
         fp32=FLASH_FP32, floor_ulps=64, dtypes=("bfloat16",)),
    Case("flash_attention_backward", ("dinp", "delta", "dout", "inp", "saved_out", "saved_lse"),
         ("dinp", "delta"), make_flash, FLASH_SIZES, fp32=FLASH_FP32, floor_ulps=256, dtypes=("bfloat16",)),
    # 128-row tiles (8 warps, exp2 with the folded scale): T = 192 is one whole and one half tile, where
    # the half's last four warps hold padding rows only; T = 100 one partial tile
    Case("flash_attention_forward", ("out", "lse", "inp"), ("out", "lse"), make_flash, FLASH_SIZES,
         gpu_kwargs=dict(tile=128), fp32=FLASH_FP32, floor_ulps=64, dtypes=("bfloat16",), label="tile128"),
    Case("flash_attention_backward", ("dinp", "delta", "dout", "inp", "saved_out", "saved_lse"),
         ("dinp", "delta"), make_flash, FLASH_SIZES, gpu_kwargs=dict(tile=128), fp32=FLASH_FP32, floor_ulps=256,
         dtypes=("bfloat16",), label="tile128"),
    Case("fused_classifier", ("logits", "losses", "logits", "targets", 1.0 / 256, 50257),
         ("logits", "losses"), make_classifier, (dict(B=4, T=64, V=50257, Vp=50304),),
         fp32=("losses",), floor_ulps=32),
    Case("fused_classifier", ("logits", "losses", "logits", "targets", 1.0 / 15, 1000),
         ("logits", "losses"), make_classifier, (dict(B=3, T=5, V=1000, Vp=1024),), fp32=("losses",),
         floor_ulps=32),
    Case("fused_classifier", (None, "losses", "logits", "targets", 1.0, 997),        # losses only
         ("losses",), make_classifier, (dict(B=3, T=5, V=997, Vp=1000),), fp32=("losses",), floor_ulps=32),
    Case("adamw_update", ("param", "m", "v", "grad"), ("param", "m", "v"), make_adamw,
         (dict(n=124_000), dict(n=1001)), kwargs=ADAMW_KW, gpu_kwargs=dict(seed=77),
         fp32=("m", "v", "master"), stochastic=True, floor_ulps=16),
    Case("adamw_update", ("param", "m", "v", "grad"), ("param", "m", "v", "master"), make_adamw,
         (dict(n=3 * 4096),), kwargs=dict(ADAMW_KW, master="master"), gpu_kwargs=dict(seed=77, num_slices=3),
         fp32=("m", "v", "master"), stochastic=True, floor_ulps=16),
    Case("global_norm_squared", ("out", "grad"), ("out",), make_norm, (dict(n=(1 << 20) + 3), dict(n=5)),
         fp32=("out",), floor_ulps=256),
    Case("matmul_bias_backward", ("dbias", "dout"), ("dbias",), make_bias,
         (dict(N=256, OC=768), dict(N=256, OC=2304), dict(N=15, OC=40), dict(N=4096, OC=768)), floor_ulps=64),
]


def _params_of(case):
    for size in case.sizes:
        for dtype_name in case.dtypes:
            label = "-".join(f"{k}{v}" for k, v in size.items()).replace(" ", "")
            yield pytest.param(case, size, dtype_name,
                               id=f"{case.op}-{'-'.join(case.outputs)}{case.label and '-' + case.label}-"
                                  f"{label}-{dtype_name}")


def _params():
    for case in CASES:
        yield from _params_of(case)


@pytest.mark.parametrize("case,size,dtype_name", list(_params()))
def test_gpu_matches_reference(backend, case, size, dtype_name):
    check_case(backend, case, size, dtype_name)


# GPT-2 124M's own attention shape, T = 1024 (16 key tiles per row for the fused kernels): about a
# minute on the emulator for the four, milliseconds on a GPU
GPT2_ATTENTION = dict(B=2, T=1024, NH=12, HS=64)
GPT2_CASES = [dataclasses.replace(c, sizes=({k: GPT2_ATTENTION[k] for k in c.sizes[0]},), dtypes=("bfloat16",))
              for c in CASES if c.op.endswith(("attention_forward", "attention_backward"))]


@pytest.mark.slow
@pytest.mark.parametrize("case,size,dtype_name", [p for c in GPT2_CASES for p in _params_of(c)])
def test_attention_matches_reference_at_gpt2_length(backend, case, size, dtype_name):
    check_case(backend, case, size, dtype_name)


@pytest.mark.parametrize("case,size,dtype_name", list(_params()))
def test_results_do_not_depend_on_block_or_thread_order(emulator, case, size, dtype_name):
    """Emulator only: blocks, and the threads of each block, run last to first give the same bits
    as in order, so no kernel passes data between threads or blocks without a barrier (a race that
    the in-order emulation, or one GPU's timing, could hide)."""
    in_order = run_gpu(case, size, dtype_name)
    emulator.set_reverse_order(True)
    reversed_order = run_gpu(case, size, dtype_name)
    for n in case.outputs:
        assert in_order[n].tobytes() == reversed_order[n].tobytes(), f"{case.op}:{n} depends on the order"


# -------------------------------------------------------------------------------------------------
# Properties the reference cannot show: determinism, device-side scalars, resume, rounding bias


@pytest.mark.parametrize("dtype_name,T", [("bfloat16", 40), ("float32", 40), ("bfloat16", 13)])
def test_softmax_with_preatt_writes_only_the_causal_part(backend, dtype_name, T):
    """With a preatt scratch the softmax stores att[t, j] for j <= t and the zeros that share a 16-byte
    chunk with the diagonal (T = 40: chunks of 8 bf16 or 4 float; T = 13: single columns), and leaves
    every later column as it was (SLOW-3). A sentinel stands where the engine's zeros would be."""
    from llmpy.gpu import attention
    dtype, rng = STORAGE[dtype_name], np.random.default_rng(3)
    B, NH, HS = 1, 2, 16
    arrays = make_attention(rng, B, T, NH, HS)
    sentinel = 5.0
    att = np.where(np.tri(T, dtype=bool), arrays["att"], sentinel)
    d = {n: _dev(arrays[n], dtype) for n in ("out", "qkvr", "inp")}
    att_d, preatt_d = _dev(att, dtype), _dev(_normal(rng, B, NH, T, T), dtype)
    attention.attention_forward(d["out"], d["qkvr"], att_d, d["inp"], preatt=preatt_d)
    got = att_d.get().astype(np.float64)
    chunk = 1 if T % (16 // dtype.itemsize) else 16 // dtype.itemsize
    rows = np.arange(T)[:, None]
    cols = np.arange(T)[None, :]
    stored_end = (rows // chunk + 1) * chunk                        # end of the chunk holding the diagonal
    np.testing.assert_allclose(np.where(cols <= rows, got, 0.0).sum(-1), 1.0, atol=0.02)   # probabilities
    assert np.all(got[..., (cols > rows) & (cols < stored_end)] == 0.0)
    assert np.all(got[..., cols >= stored_end] == sentinel)
    assert np.all(got[..., cols <= rows] > 0.0)


def _dev(x, dtype):
    import cupy as cp
    return cp.asarray(np.asarray(x).astype(dtype))


@pytest.mark.parametrize("dtype_name", list(STORAGE))
def test_reductions_are_bit_reproducible(backend, dtype_name):
    from llmpy.gpu import bias, encoder, global_norm, layernorm
    dtype, rng = STORAGE[dtype_name], np.random.default_rng(5)
    N, C = 4 * 64, 768
    x, dy, w = _normal(rng, N, C), _normal(rng, N, C), _normal(rng, C, mean=1.0)
    mean, rstd = x.mean(-1), 1 / np.sqrt(x.var(-1) + 1e-5)
    tokens = rng.integers(0, 50, size=(4, 64)).astype(np.int32)

    def run():
        dinp, dw, db = _dev(np.zeros((N, C)), dtype), _dev(np.zeros(C), dtype), _dev(np.zeros(C), dtype)
        layernorm.layernorm_backward(dinp, dw, db, _dev(dy, dtype), _dev(x, dtype), _dev(w, dtype),
                                     _dev(mean, np.float32), _dev(rstd, np.float32))
        dwte, dwpe = _dev(np.zeros((50, C)), dtype), _dev(np.zeros((64, C)), dtype)
        encoder.encoder_backward(dwte, dwpe, _dev(dy.reshape(4, 64, C), dtype), _dev(tokens, np.int32), seed=3)
        dbias, norm = _dev(np.zeros(C), dtype), _dev(np.zeros(1), np.float32)
        bias.matmul_bias_backward(dbias, _dev(dy, dtype))
        global_norm.global_norm_squared(norm, _dev(dy, dtype))
        return [a.get().tobytes() for a in (dinp, dw, db, dwte, dwpe, dbias, norm)]

    assert run() == run()


def test_adamw_device_scalars_and_resume(backend):
    """scalars/seed_ptr reproduce the by-value launch bit for bit, and init_from_master with the same
    seed reproduces the update's stochastic rounding (llm.c's bit-exact resume)."""
    import cupy as cp
    from llmpy.gpu import adamw
    rng = np.random.default_rng(9)
    base = make_adamw(rng, 3 * 5000)
    kw = dict(ADAMW_KW)

    def run(**extra):
        d = {n: _dev(base[n], BF16 if n in ("param", "grad") else np.float32) for n in base}
        adamw.adamw_update(d["param"], d["m"], d["v"], d["grad"], master=d["master"], num_slices=3, **kw, **extra)
        return d

    by_value = run(seed=41)
    scalars = cp.asarray(adamw.step_scalars(lr=kw["lr"], beta1=kw["beta1"], beta2=kw["beta2"], t=kw["t"],
                                            grad_scale=kw["grad_scale"]))
    on_device = run(seed=0, scalars=scalars, seed_ptr=cp.asarray(np.array([41], dtype=np.uint32)))
    for n in ("param", "m", "v", "master"):
        assert by_value[n].get().tobytes() == on_device[n].get().tobytes(), n
    resumed = cp.zeros_like(by_value["param"])
    adamw.init_from_master(resumed, by_value["master"], seed=41, num_slices=3)
    assert resumed.get().tobytes() == by_value["param"].get().tobytes()


def test_stochastic_rounding_is_unbiased(backend):
    """Rounding 1 + 0.3 ulp(bf16) a million times averages to 1 + 0.3 ulp (round-to-nearest gives 1)."""
    import cupy as cp
    from llmpy.gpu import adamw
    ulp = 2.0 ** -7
    n = 1 << 20
    master = cp.full(n, 1.0 + 0.3 * ulp, dtype=np.float32)
    param = cp.zeros(n, dtype=BF16)
    adamw.init_from_master(param, master, seed=123)
    values = param.get().astype(np.float64)
    assert set(np.unique(values)) <= {1.0, 1.0 + ulp}
    fraction_up = float(np.mean(values > 1.0))
    assert abs(fraction_up - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)


def test_copy_and_cast_round_trip(backend):
    import cupy as cp
    from llmpy.gpu import cast
    x = np.random.default_rng(2).standard_normal(10_001).astype(np.float32)
    lo = cp.empty(x.shape, dtype=BF16)
    cast.copy_and_cast(lo, cp.asarray(x))
    assert lo.get().tobytes() == x.astype(BF16).tobytes()          # round to nearest even, like ml_dtypes
    master = cp.empty(x.shape, dtype=np.float32)
    cast.init_master(master, lo)
    np.testing.assert_array_equal(master.get(), x.astype(BF16).astype(np.float32))

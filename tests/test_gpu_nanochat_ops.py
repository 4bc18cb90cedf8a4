"""The CUDA kernels of the nanochat model (issue 17) compute what their NumPy references compute:
RMSNorm (also QK-norm over the head dimension), RoPE, squared ReLU, the softcapped classifier and
Muon's Newton-Schulz orthogonalisation.

The harness and the error budget are tests/test_gpu_ops.py's (`check_case`): every output of the
GPU op against the reference in float64 (exact) with k times the error of a plain low-precision
run (the reference in float32 on inputs rounded to the storage type, outputs rounded again), plus
a floor of a few float32 ulps; float32 and bf16 storage; on the emulator (CI) and on a GPU (gpu
marker). Sizes are small: the emulator runs on a couple of shared CPU cores.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import llmpy.cpu
from llmpy.cpu.rope import rope_tables
import test_gpu_ops
from test_gpu_ops import STORAGE, Case, _normal, _params_of, check_case

# -------------------------------------------------------------------------------------------------
# Inputs


def make_rmsnorm(rng, N, C):
    inp = _normal(rng, N, C, scale=2.0, mean=0.5)
    return {"out": _normal(rng, N, C), "rstd": rng.random(N),
            "saved_rstd": 1.0 / np.sqrt((inp * inp).mean(-1) + 1e-6), "inp": inp,
            "inp1": _normal(rng, N, C), "inp2": _normal(rng, N, C, scale=0.5), "residual": _normal(rng, N, C),
            "dout": _normal(rng, N, C), "dinp": _normal(rng, N, C)}


def make_rope(rng, B, T, H, D, maxT):
    cos, sin = rope_tables(maxT, D, dtype=np.float64)
    return {"out": _normal(rng, B, T, H, D), "inp": _normal(rng, B, T, H, D), "cos": cos, "sin": sin,
            "dout": _normal(rng, B, T, H, D), "dinp": _normal(rng, B, T, H, D)}


def make_elementwise(rng, shape):
    return {"out": _normal(rng, *shape), "inp": _normal(rng, *shape, scale=2.0),
            "dout": _normal(rng, *shape), "dinp": _normal(rng, *shape)}


def make_classifier(rng, B, T, V, Vp, scale):
    logits = _normal(rng, B, T, Vp, scale=scale)
    logits[..., V:] = 0.0                              # padded wte / lm_head rows are 0
    return {"logits": logits, "losses": rng.random((B, T)), "out": _normal(rng, B, T, Vp),
            "targets": rng.integers(0, V, size=(B, T)).astype(np.int32)}


def make_gqa(rng, B, T, NH, NKV, HS):
    q, k, v = _normal(rng, B, T, NH, HS), _normal(rng, B, T, NKV, HS), _normal(rng, B, T, NKV, HS)
    out, att = np.empty((B, T, NH, HS)), np.empty((B, NH, T, T))
    llmpy.cpu.gqa_attention_forward(out, att, q, k, v)                  # what the forward saves
    return {"q": q, "k": k, "v": v, "out": _normal(rng, B, T, NH, HS), "att": _normal(rng, B, NH, T, T),
            "saved_att": att, "dout": _normal(rng, B, T, NH, HS), "dq": _normal(rng, B, T, NH, HS),
            "dk": _normal(rng, B, T, NKV, HS), "dv": _normal(rng, B, T, NKV, HS), "datt": _normal(rng, B, NH, T, T)}


def make_gqa_flash(rng, B, T, NH, NKV):
    HS = 64
    q, k, v = _normal(rng, B, T, NH, HS), _normal(rng, B, T, NKV, HS), _normal(rng, B, T, NKV, HS)
    out, lse = np.empty((B, T, NH, HS)), np.empty((B, NH, T))
    llmpy.cpu.gqa_flash_attention_forward(out, lse, q, k, v)           # what the forward saves
    return {"q": q, "k": k, "v": v, "out": _normal(rng, B, T, NH, HS), "lse": _normal(rng, B, NH, T),
            "saved_out": out, "saved_lse": lse, "dout": _normal(rng, B, T, NH, HS), "delta": _normal(rng, B, NH, T),
            "dq": _normal(rng, B, T, NH, HS), "dk": _normal(rng, B, T, NKV, HS), "dv": _normal(rng, B, T, NKV, HS)}


RMS_SIZES = (dict(N=64, C=768), dict(N=21, C=40), dict(N=48, C=64))     # last: QK-norm rows, D = 64
ROPE_SIZES = (dict(B=2, T=16, H=3, D=64, maxT=32), dict(B=1, T=5, H=2, D=16, maxT=5))
EW_SIZES = (dict(shape=(4, 16, 3072)), dict(shape=(37,)), dict(shape=(3, 5, 7)))
GQA_SIZES = (dict(B=2, T=24, NH=6, NKV=2, HS=16),    # groups of 3; 128-bit softmax rows
             dict(B=1, T=13, NH=4, NKV=1, HS=8),     # multi-query; scalar softmax rows
             dict(B=1, T=16, NH=2, NKV=2, HS=16))    # NKV = NH: plain multi-head attention
BF16_INTERMEDIATES = 3.0   # as test_gpu_ops' attention: att, datt and the permuted heads are stored in the
                           # storage type between the products; lowp (float32 throughout) does not round them
GQA_FLASH_SIZES = (dict(B=1, T=100, NH=4, NKV=2),   # 2 key tiles, a partial one; groups of 2
                   dict(B=2, T=40, NH=3, NKV=1))    # multi-query, one partial tile
FLASH_FP32 = ("lse", "saved_lse", "delta")
ROUNDED_RESIDUAL = 3.0     # the fused kernel normalizes the residual after rounding it to the storage
                           # type; lowp normalizes the unrounded float32 sum (as test_gpu_ops' layernorm)

CASES = [
    Case("rmsnorm_forward", ("out", "rstd", "inp"), ("out", "rstd"), make_rmsnorm, RMS_SIZES,
         fp32=("rstd", "saved_rstd"), floor_ulps=32),
    Case("rmsnorm_forward", ("inp", "rstd", "inp"), ("inp", "rstd"), make_rmsnorm, RMS_SIZES[1:2],   # in place
         fp32=("rstd", "saved_rstd"), floor_ulps=32),
    Case("fused_residual_rmsnorm_forward", ("residual", "out", "rstd", "inp1", "inp2"),
         ("residual", "out", "rstd"), make_rmsnorm, RMS_SIZES, fp32=("rstd", "saved_rstd"),
         k=ROUNDED_RESIDUAL, floor_ulps=32),
    Case("rmsnorm_backward", ("dinp", "dout", "inp", "saved_rstd"), ("dinp",), make_rmsnorm, RMS_SIZES,
         fp32=("rstd", "saved_rstd"), floor_ulps=64),
    Case("rmsnorm_backward", ("dinp", "dout", "inp", "saved_rstd"), ("dinp",), make_rmsnorm, RMS_SIZES[2:],
         kwargs=dict(accumulate=False), fp32=("rstd", "saved_rstd"), floor_ulps=64),      # QK-norm: overwrite
    Case("rmsnorm_backward", ("dout", "dout", "inp", "saved_rstd"), ("dout",), make_rmsnorm, RMS_SIZES[1:2],
         kwargs=dict(accumulate=False), fp32=("rstd", "saved_rstd"), floor_ulps=64),      # in place
    Case("rope_forward", ("out", "inp", "cos", "sin"), ("out",), make_rope, ROPE_SIZES, fp32=("cos", "sin"),
         floor_ulps=16),
    Case("rope_forward", ("inp", "inp", "cos", "sin"), ("inp",), make_rope, ROPE_SIZES[1:],   # in place
         fp32=("cos", "sin"), floor_ulps=16),
    Case("rope_backward", ("dinp", "dout", "cos", "sin"), ("dinp",), make_rope, ROPE_SIZES, fp32=("cos", "sin"),
         floor_ulps=16),
    Case("relu2_forward", ("out", "inp"), ("out",), make_elementwise, EW_SIZES, floor_ulps=8),
    Case("relu2_backward", ("dinp", "inp", "dout"), ("dinp",), make_elementwise, EW_SIZES, floor_ulps=8),
    Case("relu2_backward", ("dout", "inp", "dout"), ("dout",), make_elementwise, EW_SIZES[1:],   # in place
         floor_ulps=8),
    Case("encoder_forward", ("out", "inp", "wte", None), ("out",), test_gpu_ops.make_encoder,     # no wpe
         test_gpu_ops.ENC_SIZES[1:]),
    Case("encoder_backward", ("dwte", None, "dout", "inp"), ("dwte",), test_gpu_ops.make_encoder,
         test_gpu_ops.ENC_SIZES[1:], gpu_kwargs=dict(seed=1234), stochastic=True, floor_ulps=64),
    Case("gqa_attention_forward", ("out", "att", "q", "k", "v"), ("out", "att"), make_gqa, GQA_SIZES,
         k=BF16_INTERMEDIATES, floor_ulps=64, cublaslt=True),
    Case("gqa_attention_backward", ("dq", "dk", "dv", "datt", "dout", "q", "k", "v", "saved_att"),
         ("dq", "dk", "dv"), make_gqa, GQA_SIZES, k=BF16_INTERMEDIATES, floor_ulps=256, cublaslt=True),
    # bf16 only (tensor cores); the default budget holds, as for GPT-2's fused attention (test_gpu_ops)
    Case("gqa_flash_attention_forward", ("out", "lse", "q", "k", "v"), ("out", "lse"), make_gqa_flash,
         GQA_FLASH_SIZES, fp32=FLASH_FP32, floor_ulps=64, dtypes=("bfloat16",)),
    Case("gqa_flash_attention_forward", ("out", "lse", "q", "k", "v"), ("out", "lse"), make_gqa_flash,
         GQA_FLASH_SIZES[:1], gpu_kwargs=dict(tile=128), fp32=FLASH_FP32, floor_ulps=64, dtypes=("bfloat16",)),
    Case("gqa_flash_attention_backward", ("dq", "dk", "dv", "delta", "dout", "q", "k", "v", "saved_out", "saved_lse"),
         ("dq", "dk", "dv", "delta"), make_gqa_flash, GQA_FLASH_SIZES, fp32=FLASH_FP32, floor_ulps=256,
         dtypes=("bfloat16",)),
    Case("gqa_flash_attention_backward", ("dq", "dk", "dv", "delta", "dout", "q", "k", "v", "saved_out", "saved_lse"),
         ("dq", "dk", "dv", "delta"), make_gqa_flash, GQA_FLASH_SIZES[:1], gpu_kwargs=dict(tile=128),
         fp32=FLASH_FP32, floor_ulps=256, dtypes=("bfloat16",)),
    # softcap 15 (nanochat): logits ~N(0, 2) mostly in tanh's linear part, ~N(0, 30) mostly saturated
    Case("fused_classifier", ("logits", "losses", "logits", "targets", 1.0 / 16, 50257), ("logits", "losses"),
         make_classifier, (dict(B=2, T=8, V=50257, Vp=50304, scale=2.0),), kwargs=dict(softcap=15.0),
         fp32=("losses",), floor_ulps=32),
    Case("fused_classifier", ("logits", "losses", "logits", "targets", 1.0 / 15, 1000), ("logits", "losses"),
         make_classifier, (dict(B=3, T=5, V=1000, Vp=1024, scale=30.0), dict(B=3, T=5, V=997, Vp=1000, scale=2.0)),
         kwargs=dict(softcap=15.0), fp32=("losses",), floor_ulps=32),
    Case("softcap_forward", ("out", "logits", 15.0), ("out",), make_classifier,
         (dict(B=3, T=5, V=997, Vp=1000, scale=30.0),), floor_ulps=8),
    Case("softcap_forward", ("logits", "logits", 15.0), ("logits",), make_classifier,          # in place
         (dict(B=3, T=5, V=997, Vp=1000, scale=2.0),), floor_ulps=8),
    Case("fused_classifier", (None, "losses", "logits", "targets", 1.0, 997), ("losses",),   # losses only
         make_classifier, (dict(B=3, T=5, V=997, Vp=1000, scale=30.0),), kwargs=dict(softcap=15.0),
         fp32=("losses",), floor_ulps=32),
]


PARAMS = [p for case in CASES for p in _params_of(case)]


@pytest.mark.parametrize("case,size,dtype_name", PARAMS)
def test_gpu_matches_reference(backend, case, size, dtype_name):
    check_case(backend, case, size, dtype_name)


@pytest.mark.parametrize("case,size,dtype_name", PARAMS)
def test_results_do_not_depend_on_block_or_thread_order(emulator, case, size, dtype_name):
    """Emulator only: blocks and threads run last to first give the same bits as in order."""
    test_gpu_ops.test_results_do_not_depend_on_block_or_thread_order(emulator, case, size, dtype_name)


def test_rope_backward_inverts_forward(backend):
    """The rotation is orthogonal: the backward (its transpose) undoes the forward, in float32."""
    import cupy as cp
    from llmpy.gpu import rope
    rng = np.random.default_rng(3)
    x = _normal(rng, 2, 7, 2, 32).astype(np.float32)
    cos, sin = rope.rope_tables(7, 32)
    y, back = cp.asarray(x), cp.empty(x.shape, dtype=np.float32)
    rope.rope_forward(y, cp.asarray(x), cos, sin)
    rope.rope_backward(back, y, cos, sin)
    np.testing.assert_allclose(back.get(), x, atol=1e-5)


# -------------------------------------------------------------------------------------------------
# Muon: Newton-Schulz in bf16 through batched GEMMs, against llmpy.cpu's in float64. The budget's
# low-precision run is the same iteration with every product rounded to bf16 (what the GPU does, up to
# summation order and the side the Gram matrix is taken on).


def _bf16(x):
    return np.asarray(x, dtype=np.float32).astype(STORAGE["bfloat16"]).astype(np.float32)


def newton_schulz_bf16(g, steps=5):
    """nanochat's zeropower_via_newtonschulz5 with every intermediate rounded to bf16 (fp32 math)."""
    a, b, c = llmpy.cpu.muon.NS_COEFFS
    x = _bf16(g)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.swapaxes(-1, -2)
    x = _bf16(x / (np.sqrt((x * x).sum((-2, -1), keepdims=True)) + 1e-7))
    for _ in range(steps):
        A = _bf16(x @ x.swapaxes(-1, -2))
        B = _bf16(b * A + c * (A @ A))
        x = _bf16(a * x + B @ x)
    return x.swapaxes(-1, -2) if tall else x


@pytest.mark.parametrize("shape", [(3, 48, 80), (2, 96, 32), (64, 64)], ids=["wide", "tall", "square"])
def test_newton_schulz_matches_reference(backend, shape):
    import cupy as cp
    from llmpy.gpu import muon
    from llmpy.testing import error_budget
    g = _bf16(np.random.default_rng(11).standard_normal(shape) * 1e-3)       # bf16 gradients
    out = cp.empty(shape, dtype=STORAGE["bfloat16"])
    muon.newton_schulz(out, cp.asarray(g.astype(STORAGE["bfloat16"])))
    got = out.get().astype(np.float64)
    exact = np.empty(shape)
    llmpy.cpu.newton_schulz(exact, g.astype(np.float64))
    error_budget(got, exact, newton_schulz_bf16(g), k=2.0, floor=1e-3, name="newton_schulz")
    # what the iteration is for: the singular values pulled from ~0 into the quintic's band [0.68, 1.2]
    # (all of them for the rectangular stacks; a square Gaussian matrix has one too small for 5 steps)
    sv, sv_got = np.linalg.svd(exact, compute_uv=False), np.linalg.svd(got, compute_uv=False)
    assert np.abs(sv_got - sv).max() < 0.05
    assert np.mean((sv > 0.6) & (sv < 1.25)) >= (0.98 if shape[-1] == shape[-2] else 1.0)


def test_newton_schulz_in_place_from_float32(backend):
    """G may be out (bf16), or float32: both give the bf16 input's result."""
    import cupy as cp
    from llmpy.gpu import muon
    g = _bf16(np.random.default_rng(14).standard_normal((2, 24, 40)))
    x = cp.asarray(g.astype(STORAGE["bfloat16"]))
    out = cp.empty(g.shape, dtype=STORAGE["bfloat16"])
    muon.newton_schulz(out, cp.asarray(g))
    muon.newton_schulz(x, x)
    assert out.get().tobytes() == x.get().tobytes()


def muon_bf16(param, buf, grad, *, lr, beta):
    """llmpy.cpu.muon_update in float32 with the bf16-rounded Newton-Schulz: the budget's low precision."""
    buf = beta * buf + (1 - beta) * grad
    u = (1 - beta) * grad + beta * buf
    scale = max(1.0, param.shape[-2] / param.shape[-1]) ** 0.5
    return param - lr * scale * newton_schulz_bf16(u)


@pytest.mark.parametrize("dtype_name", list(STORAGE))
@pytest.mark.parametrize("shape", [(2, 40, 64), (72, 24)], ids=["wide", "tall"])
def test_muon_update_matches_reference(backend, dtype_name, shape):
    import cupy as cp
    from llmpy.gpu import muon
    from llmpy.testing import error_budget
    rng = np.random.default_rng(12)
    dtype = STORAGE[dtype_name]
    param = _bf16(rng.standard_normal(shape) * 0.05).astype(np.float64)
    buf = rng.standard_normal(shape) * 1e-3
    grad = _bf16(rng.standard_normal(shape) * 1e-3).astype(np.float64)
    kw = dict(lr=0.02, beta=0.95)
    exact_p, exact_buf = param.copy(), buf.copy()
    llmpy.cpu.muon_update(exact_p, exact_buf, grad, **kw)
    lowp_p = muon_bf16(param.astype(np.float32), buf.astype(np.float32), grad.astype(np.float32), **kw)
    d_param, d_grad = cp.asarray(param.astype(dtype)), cp.asarray(grad.astype(dtype))
    d_buf = cp.asarray(buf.astype(np.float32))
    master = cp.asarray(param.astype(np.float32)) if dtype_name == "bfloat16" else None
    muon.muon_update(d_param, d_buf, d_grad, master=master, seed=5, **kw)
    np.testing.assert_allclose(d_buf.get(), exact_buf, rtol=1e-5, atol=1e-9)
    new = (master if master is not None else d_param).get().astype(np.float64)
    # the step is lr * scale * X, |X| ~ 1/sqrt(min(rows, cols)) per element: floor 1e-3 of lr
    error_budget(new - param, exact_p - param, lowp_p - param, k=2.0, floor=1e-3 * kw["lr"], name="muon step")
    if master is not None:       # bf16 params: master rounded stochastically, within one bf16 ulp
        p16 = d_param.get().astype(np.float64)
        assert np.all(np.abs(p16 - new) <= np.abs(new) * 2.0 ** -7)


def test_muon_update_graph_scalars(backend):
    """lr, grad_scale and the seed read from device memory give the by-value launch's bits."""
    import cupy as cp
    from llmpy.gpu import muon
    rng = np.random.default_rng(13)
    shape = (2, 16, 32)
    base = {"param": rng.standard_normal(shape) * 0.05, "buf": rng.standard_normal(shape) * 1e-3,
            "grad": rng.standard_normal(shape) * 1e-3}

    def run(**kw):
        d = {k: cp.asarray(v.astype(STORAGE["bfloat16"] if k != "buf" else np.float32)) for k, v in base.items()}
        master = cp.asarray(base["param"].astype(np.float32))
        muon.muon_update(d["param"], d["buf"], d["grad"], master=master, **kw)
        return [a.get().tobytes() for a in (d["param"], d["buf"], master)]

    by_value = run(lr=0.02, grad_scale=0.5, seed=9)
    on_device = run(lr=1.0, grad_scale=1.0, seed=0, scalars=cp.asarray(np.array([0.02, 0.5], np.float32)),
                    seed_ptr=cp.asarray(np.array([9], np.uint32)))
    assert by_value == on_device


# -------------------------------------------------------------------------------------------------
# GPT-2 124M's own sizes (C = 768, heads of 64, T = 1024), bf16: slow on the emulator
# (tens of seconds each), milliseconds on a GPU

GPT2_SIZES = {"rmsnorm_": dict(N=2 * 1024, C=768), "rope_": dict(B=2, T=1024, H=12, D=64, maxT=1024),
              "relu2_": dict(shape=(2, 1024, 3072)),
              "gqa_flash": dict(B=1, T=1024, NH=6, NKV=2)}     # 16 key tiles, groups of 3
GPT2_SIZE_CASES = [dataclasses.replace(c, sizes=(size,), dtypes=("bfloat16",))
                   for prefix, size in GPT2_SIZES.items() for c in CASES
                   if c.op.startswith(prefix) and c.args[0] not in c.args[1:] and not c.kwargs and not c.gpu_kwargs]


@pytest.mark.slow
@pytest.mark.parametrize("case,size,dtype_name", [p for c in GPT2_SIZE_CASES for p in _params_of(c)])
def test_gpu_matches_reference_at_gpt2_size(backend, case, size, dtype_name):
    check_case(backend, case, size, dtype_name)


@pytest.mark.slow
def test_muon_update_at_gpt2_size(backend):
    """One Muon step on GPT-2 124M's attention projection (768 x 768, two layers), bf16 with master weights."""
    test_muon_update_matches_reference(backend, "bfloat16", (2, 768, 768))


def test_muon_update_replays_in_a_cuda_graph(backend):
    """Three Muon steps with a changing lr and seed, captured once and replayed (lr, grad_scale and the seed
    from device memory, buffers from a preallocated workspace: nothing allocated while capturing), give the
    bits of three eager steps that take them by value."""
    import cupy as cp
    from llmpy.gpu import muon
    from llmpy.gpu.graph import StepGraph
    rng = np.random.default_rng(15)
    shape = (2, 24, 40)
    base = {"param": rng.standard_normal(shape) * 0.05, "buf": rng.standard_normal(shape) * 1e-3,
            "grad": rng.standard_normal(shape) * 1e-3}
    steps = [(0.02, 9), (0.015, 10), (0.01, 11)]               # (lr, seed) per step

    def state():
        d = {k: cp.asarray(v.astype(STORAGE["bfloat16"] if k != "buf" else np.float32)) for k, v in base.items()}
        d["master"] = cp.asarray(base["param"].astype(np.float32))
        return d

    eager = state()
    for lr, seed in steps:
        muon.muon_update(eager["param"], eager["buf"], eager["grad"], master=eager["master"], lr=lr, seed=seed)

    graphed = state()
    scalars, seed_ptr = cp.zeros(2, dtype=np.float32), cp.zeros(1, dtype=np.uint32)
    workspace = cp.empty(muon.workspace_size(shape), dtype=STORAGE["bfloat16"])
    scratch = cp.empty(muon.scratch_size(shape), dtype=np.float32)
    graph = StepGraph(log=lambda msg: None)
    for lr, seed in steps:
        scalars.set(np.array([lr, 1.0], np.float32))
        seed_ptr.set(np.array([seed], np.uint32))
        graph.run("muon", lambda: muon.muon_update(graphed["param"], graphed["buf"], graphed["grad"],
                                                   master=graphed["master"], lr=0.0, seed=0, scalars=scalars,
                                                   seed_ptr=seed_ptr, workspace=workspace, scratch=scratch))
    assert graph.disabled is None and (graph.eager_runs, graph.captures, graph.replays) == (1, 1, 2)
    graph.close()
    for k in ("param", "buf", "master"):
        assert eager[k].get().tobytes() == graphed[k].get().tobytes(), k

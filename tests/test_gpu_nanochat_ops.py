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

import inspect

import numpy as np
import pytest

import llmpy.cpu
import test_gpu_ops
from test_gpu_ops import STORAGE, Case, _normal, _params_of, check_case

# -------------------------------------------------------------------------------------------------
# Local references, used only while llmpy.cpu lacks the op (the issue-17 CPU branch brings them)


def _rmsnorm_forward(out, rstd, inp):
    r = 1.0 / np.sqrt((inp * inp).mean(-1) + 1e-6)
    rstd[...] = r
    out[...] = inp * r[..., None]


def _fused_residual_rmsnorm_forward(residual, normed, rstd, inp1, inp2):
    np.add(inp1, inp2, out=residual)
    _rmsnorm_forward(normed, rstd, residual)


def _rmsnorm_backward(dinp, dout, inp, rstd):
    r = rstd[..., None]
    n = inp * r
    dinp += (dout - n * (dout * n).mean(-1, keepdims=True)) * r


def _rotate(out, inp, cos, sin):
    D2 = inp.shape[-1] // 2
    T = inp.shape[1]
    c, s = cos[None, :T, None, :], sin[None, :T, None, :]
    x1, x2 = inp[..., :D2].copy(), inp[..., D2:].copy()
    out[..., :D2] = x1 * c + x2 * s
    out[..., D2:] = x2 * c - x1 * s


def _rope_backward(dinp, dout, cos, sin):
    _rotate(dinp, dout, cos, -sin)


def _relu2_forward(out, inp):
    out[...] = np.maximum(inp, 0) ** 2


def _relu2_backward(dinp, inp, dout):
    dinp[...] = 2 * np.maximum(inp, 0) * dout


def _with_softcap(fused_classifier):
    """fused_classifier with nanochat's softcap, from GPT-2's: cap the logits, then chain the gradient."""
    def capped(dlogits, losses, logits, targets, dloss, V, softcap=0.0):
        if not softcap:
            return fused_classifier(dlogits, losses, logits, targets, dloss, V)
        t = np.tanh(logits[..., :V] / softcap)
        z = np.zeros_like(logits)
        z[..., :V] = softcap * t
        fused_classifier(dlogits if dlogits is None else z, losses, z, targets, dloss, V)
        if dlogits is not None:
            dlogits[...] = z
            dlogits[..., :V] *= 1 - t * t
    return capped


LOCAL_REFERENCES = {"rmsnorm_forward": _rmsnorm_forward, "rmsnorm_backward": _rmsnorm_backward,
                    "fused_residual_rmsnorm_forward": _fused_residual_rmsnorm_forward,
                    "rope_forward": _rotate, "rope_backward": _rope_backward,
                    "relu2_forward": _relu2_forward, "relu2_backward": _relu2_backward}


@pytest.fixture(autouse=True)
def _references(monkeypatch):
    for name, fn in LOCAL_REFERENCES.items():
        if not hasattr(llmpy.cpu, name):
            monkeypatch.setattr(llmpy.cpu, name, fn, raising=False)
    if "softcap" not in inspect.signature(llmpy.cpu.fused_classifier).parameters:
        monkeypatch.setattr(llmpy.cpu, "fused_classifier", _with_softcap(llmpy.cpu.fused_classifier))


def rope_tables(maxT, D, base=10000.0):
    inv_freq = base ** (-np.arange(0, D, 2) / D)
    angle = np.outer(np.arange(maxT), inv_freq)
    return np.cos(angle), np.sin(angle)


# -------------------------------------------------------------------------------------------------
# Inputs


def make_rmsnorm(rng, N, C):
    inp = _normal(rng, N, C, scale=2.0, mean=0.5)
    return {"out": _normal(rng, N, C), "rstd": rng.random(N),
            "saved_rstd": 1.0 / np.sqrt((inp * inp).mean(-1) + 1e-6), "inp": inp,
            "inp1": _normal(rng, N, C), "inp2": _normal(rng, N, C, scale=0.5), "residual": _normal(rng, N, C),
            "dout": _normal(rng, N, C), "dinp": _normal(rng, N, C)}


def make_rope(rng, B, T, H, D, maxT):
    cos, sin = rope_tables(maxT, D)
    return {"out": _normal(rng, B, T, H, D), "inp": _normal(rng, B, T, H, D), "cos": cos, "sin": sin,
            "dout": _normal(rng, B, T, H, D), "dinp": _normal(rng, B, T, H, D)}


def make_elementwise(rng, shape):
    return {"out": _normal(rng, *shape), "inp": _normal(rng, *shape, scale=2.0),
            "dout": _normal(rng, *shape), "dinp": _normal(rng, *shape)}


def make_classifier(rng, B, T, V, Vp, scale):
    logits = _normal(rng, B, T, Vp, scale=scale)
    logits[..., V:] = 0.0                              # padded wte / lm_head rows are 0
    return {"logits": logits, "losses": rng.random((B, T)),
            "targets": rng.integers(0, V, size=(B, T)).astype(np.int32)}


RMS_SIZES = (dict(N=64, C=768), dict(N=21, C=40), dict(N=48, C=64))     # last: QK-norm rows, D = 64
ROPE_SIZES = (dict(B=2, T=16, H=3, D=64, maxT=32), dict(B=1, T=5, H=2, D=16, maxT=5))
EW_SIZES = (dict(shape=(4, 16, 3072)), dict(shape=(37,)), dict(shape=(3, 5, 7)))
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
    # softcap 15 (nanochat): logits ~N(0, 2) mostly in tanh's linear part, ~N(0, 30) mostly saturated
    Case("fused_classifier", ("logits", "losses", "logits", "targets", 1.0 / 16, 50257), ("logits", "losses"),
         make_classifier, (dict(B=2, T=8, V=50257, Vp=50304, scale=2.0),), kwargs=dict(softcap=15.0),
         fp32=("losses",), floor_ulps=32),
    Case("fused_classifier", ("logits", "losses", "logits", "targets", 1.0 / 15, 1000), ("logits", "losses"),
         make_classifier, (dict(B=3, T=5, V=1000, Vp=1024, scale=30.0), dict(B=3, T=5, V=997, Vp=1000, scale=2.0)),
         kwargs=dict(softcap=15.0), fp32=("losses",), floor_ulps=32),
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
    cos, sin = (cp.asarray(t.astype(np.float32)) for t in rope_tables(7, 32))
    y, back = cp.asarray(x), cp.empty(x.shape, dtype=np.float32)
    rope.rope_forward(y, cp.asarray(x), cos, sin)
    rope.rope_backward(back, y, cos, sin)
    np.testing.assert_allclose(back.get(), x, atol=1e-5)
    assert STORAGE["float32"] == np.float32


# -------------------------------------------------------------------------------------------------
# Muon: Newton-Schulz in bf16 through batched GEMMs. The budget's low-precision run is the same
# iteration in NumPy with every product rounded to bf16 (what the GPU does, up to summation order);
# the reference is the iteration in float64.

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def _bf16(x):
    return x.astype(STORAGE["bfloat16"]).astype(np.float32)


def newton_schulz_reference(g, steps=5, rnd=None):
    """nanochat's zeropower_via_newtonschulz5 on each (rows, cols) matrix of g: the wide orientation
    (transposed when rows > cols), X / (||X||_F + 1e-7), then X = a X + (b A + c A A) X, A = X X^T.
    rnd rounds each result (None: float64 throughout)."""
    rnd = rnd or (lambda v: v)
    a, b, c = NS_COEFFS
    x = rnd(g if rnd is None else g.astype(np.float32))
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.swapaxes(-1, -2)
    x = rnd(x / (np.sqrt((x * x).sum((-2, -1), keepdims=True)) + 1e-7))
    for _ in range(steps):
        A = rnd(x @ x.swapaxes(-1, -2))
        B = rnd(b * A + c * (A @ A))
        x = rnd(a * x + B @ x)
    return x.swapaxes(-1, -2) if tall else x


def muon_reference(param, buf, grad, *, lr, momentum, weight_decay, rnd=None):
    """(new param, new momentum buffer) of one Nesterov Muon step (float64 unless rnd rounds NS)."""
    buf = momentum * buf + (1 - momentum) * grad
    u = (1 - momentum) * grad + momentum * buf
    x = newton_schulz_reference(u, rnd=rnd)
    scale = max(1.0, param.shape[-2] / param.shape[-1]) ** 0.5
    return param - lr * (scale * x + weight_decay * param), buf


@pytest.mark.parametrize("shape", [(3, 48, 80), (2, 96, 32), (64, 64)], ids=["wide", "tall", "square"])
def test_newton_schulz_matches_reference(backend, shape):
    import cupy as cp
    from llmpy.gpu import muon
    from llmpy.testing import error_budget
    g = np.random.default_rng(11).standard_normal(shape)
    x0 = _bf16(g / np.sqrt((g * g).sum((-2, -1), keepdims=True)))        # what muon_update hands it
    x = cp.asarray(x0.astype(STORAGE["bfloat16"]))
    muon.newton_schulz(x)
    got = x.get().astype(np.float64)
    exact = newton_schulz_reference(x0.astype(np.float64))
    lowp = newton_schulz_reference(x0, rnd=_bf16)
    error_budget(got, exact, lowp, k=2.0, floor=1e-3, name="newton_schulz")
    # what the iteration is for: singular values pulled from ~0 towards 1 (the quintic's band)
    sv = np.linalg.svd(exact, compute_uv=False)
    assert sv.min() > 0.3 and sv.max() < 1.3
    sv_got = np.linalg.svd(got, compute_uv=False)
    assert sv_got.min() > 0.3 and sv_got.max() < 1.3


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
    kw = dict(lr=0.02, momentum=0.95, weight_decay=0.1)
    exact_p, exact_buf = muon_reference(param, buf, grad, **kw)
    lowp_p, _ = muon_reference(param.astype(np.float32), buf.astype(np.float32), grad.astype(np.float32),
                               rnd=_bf16, **kw)
    d_param, d_grad = cp.asarray(param.astype(dtype)), cp.asarray(grad.astype(dtype))
    d_buf = cp.asarray(buf.astype(np.float32))
    master = cp.asarray(param.astype(np.float32)) if dtype_name == "bfloat16" else None
    muon.muon_update(d_param, d_buf, d_grad, master=master, seed=5, **kw)
    np.testing.assert_allclose(d_buf.get(), exact_buf, rtol=1e-5, atol=1e-9)
    new = (master if master is not None else d_param).get().astype(np.float64)
    # the step is lr * X with X ~ 1/sqrt(min(rows, cols)) per element: floor 1e-3 of it
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

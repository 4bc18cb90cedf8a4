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

"""layernorm_forward/backward and fused_residual_forward: derivative, accumulation, PyTorch parity."""
import numpy as np
import pytest

from llmpy.cpu import layernorm as ref
from llmpy.testing import assert_close, assert_matches_torch, numerical_grad

B, T, C = 2, 3, 5


def _inputs(rng, dtype=np.float64, C=C):
    x = rng.standard_normal((B, T, C)).astype(dtype) * 2 + 0.5
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    return x, w, b


def test_forward_saves_mean_and_rstd(rng):
    x, w, b = _inputs(rng)
    out, mean, rstd = np.empty_like(x), np.empty((B, T)), np.empty((B, T))
    ref.layernorm_forward(out, mean, rstd, x, w, b)
    assert_close(mean, x.mean(-1), atol=1e-12, name="mean")
    assert_close(rstd, 1 / np.sqrt(x.var(-1) + 1e-5), atol=1e-12, name="rstd")   # biased variance
    assert_close(out, (x - mean[..., None]) * rstd[..., None] * w + b, atol=1e-12, name="out")


def test_reference_backward_is_the_derivative(rng):
    x, w, b = _inputs(rng)
    dout = rng.standard_normal(x.shape)
    out, mean, rstd = np.empty_like(x), np.empty((B, T)), np.empty((B, T))

    def loss():
        ref.layernorm_forward(out, mean, rstd, x, w, b)
        return (out * dout).sum()

    loss()                                                       # mean, rstd for the backward
    dx0, dw0, db0 = rng.standard_normal(x.shape), rng.standard_normal(C), rng.standard_normal(C)
    dx, dw, db = dx0.copy(), dw0.copy(), db0.copy()              # all three accumulate
    ref.layernorm_backward(dx, dw, db, dout, x, w, mean, rstd)
    assert_close(dx - dx0, numerical_grad(loss, x), atol=1e-7, name="dinp")
    assert_close(dw - dw0, numerical_grad(loss, w), atol=1e-7, name="dweight")
    assert_close(db - db0, numerical_grad(loss, b), atol=1e-7, name="dbias")


def test_fused_residual_forward(rng):
    x1, w, b = _inputs(rng, np.float32)
    x2 = rng.standard_normal(x1.shape, dtype=np.float32)
    residual, normed = np.empty_like(x1), np.empty_like(x1)
    mean, rstd = np.empty((B, T), np.float32), np.empty((B, T), np.float32)
    ref.fused_residual_forward(residual, normed, mean, rstd, x1, x2, w, b)
    out2, mean2, rstd2 = np.empty_like(x1), np.empty_like(mean), np.empty_like(rstd)
    ref.layernorm_forward(out2, mean2, rstd2, x1 + x2, w, b)
    assert_close(residual, x1 + x2, name="residual")
    assert_close(normed, out2, name="normed")
    assert_close(mean, mean2, name="mean")
    assert_close(rstd, rstd2, name="rstd")


def test_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x, w, b = _inputs(rng, np.float32, C=64)
    dout = rng.standard_normal(x.shape, dtype=np.float32)
    out = np.empty_like(x)
    mean, rstd = np.empty((B, T), np.float32), np.empty((B, T), np.float32)
    ref.layernorm_forward(out, mean, rstd, x, w, b)
    dx, dw, db = np.zeros_like(x), np.zeros_like(w), np.zeros_like(b)
    ref.layernorm_backward(dx, dw, db, dout, x, w, mean, rstd)

    assert_matches_torch(lambda x_t, w_t, b_t: torch.nn.functional.layer_norm(x_t, (64,), w_t, b_t, eps=1e-5),
                         dict(inp=x, weight=w, bias=b), dout, dict(out=out, dinp=dx, dweight=dw, dbias=db),
                         atol=1e-5, rtol=1e-5)
    assert out.dtype == dx.dtype == np.float32

"""matmul_forward/backward: the backward is the derivative of the forward, and both match PyTorch."""
import numpy as np
import pytest

from llmpy.cpu import matmul as ref
from llmpy.testing import assert_close, assert_matches_torch, numerical_grad

B, T, C, OC = 2, 3, 5, 4


@pytest.mark.parametrize("with_bias", [True, False])
def test_reference_backward_is_the_derivative(rng, with_bias):
    x, w = rng.standard_normal((B, T, C)), rng.standard_normal((OC, C))
    b = rng.standard_normal(OC) if with_bias else None
    dout = rng.standard_normal((B, T, OC))
    out = np.empty((B, T, OC))

    def loss():
        ref.matmul_forward(out, x, w, b)
        return (out * dout).sum()

    dx = np.full_like(x, np.nan)                                    # overwritten
    dw0 = rng.standard_normal(w.shape)                              # accumulated onto
    db0 = rng.standard_normal(OC) if with_bias else None
    dw, db = dw0.copy(), (db0.copy() if with_bias else None)
    ref.matmul_backward(dx, dw, db, dout, x, w)
    assert_close(dx, numerical_grad(loss, x), atol=1e-8, name="dinp")
    assert_close(dw - dw0, numerical_grad(loss, w), atol=1e-8, name="dweight")
    if with_bias:
        assert_close(db - db0, numerical_grad(loss, b), atol=1e-8, name="dbias")


def test_matches_torch(rng, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(ref, "DWEIGHT_BLOCK", 10 * 32)   # dweight in blocks of 10 rows, the last short
    x = rng.standard_normal((B, T, 32), dtype=np.float32)
    w = rng.standard_normal((48, 32), dtype=np.float32)
    b = rng.standard_normal(48, dtype=np.float32)
    dout = rng.standard_normal((B, T, 48), dtype=np.float32)
    out = np.empty_like(dout)
    dx, dw, db = np.empty_like(x), np.zeros_like(w), np.zeros_like(b)
    ref.matmul_forward(out, x, w, b)
    ref.matmul_backward(dx, dw, db, dout, x, w)

    assert_matches_torch(torch.nn.functional.linear, dict(inp=x, weight=w, bias=b), dout,
                         dict(out=out, dinp=dx, dweight=dw, dbias=db), atol=1e-4, rtol=1e-5)
    assert out.dtype == dx.dtype == np.float32

"""rmsnorm_forward/backward and fused_residual_rmsnorm_forward: derivative, accumulation, PyTorch parity."""
import numpy as np
import pytest

from llmpy.cpu import rmsnorm as ref
from llmpy.testing import assert_close, assert_matches_torch, numerical_grad

B, T, C = 2, 3, 5


def test_forward_saves_rstd(rng):
    x = rng.standard_normal((B, T, C)) * 2 + 0.5
    out, rstd = np.empty_like(x), np.empty((B, T))
    ref.rmsnorm_forward(out, rstd, x)
    assert_close(rstd, 1 / np.sqrt((x * x).mean(-1) + 1e-6), atol=1e-12, name="rstd")
    assert_close(out, x * rstd[..., None], atol=1e-12, name="out")
    ref.rmsnorm_forward(x, rstd, x)                                    # in place
    assert_close(x, out, atol=0, name="in place")


def test_backward_is_the_derivative_and_accumulates(rng):
    x, dout = rng.standard_normal((B, T, C)) * 2 + 0.5, rng.standard_normal((B, T, C))
    out, rstd = np.empty_like(x), np.empty((B, T))

    def loss():
        ref.rmsnorm_forward(out, rstd, x)
        return (out * dout).sum()

    loss()
    dx0 = rng.standard_normal(x.shape)
    dx = dx0.copy()
    ref.rmsnorm_backward(dx, dout, x, rstd)
    assert_close(dx - dx0, numerical_grad(loss, x), atol=1e-8, name="dinp")
    loss()                                                             # rstd of the unperturbed x
    ref.rmsnorm_backward(dout, dout, x, rstd, accumulate=False)        # overwrite, in place over dout
    assert_close(dout, dx - dx0, atol=1e-14, name="accumulate=False")


def test_on_strided_head_views(rng):
    """QK-norm normalises (B, T, H, D) head views of a wider row: strides must not matter."""
    wide = rng.standard_normal((B, T, 3, 4))
    heads = wide[:, :, :2]                                             # not contiguous
    out, rstd = np.empty(heads.shape), np.empty(heads.shape[:-1])
    ref.rmsnorm_forward(out, rstd, heads)
    out2, rstd2 = np.empty(heads.shape), np.empty(heads.shape[:-1])
    ref.rmsnorm_forward(out2, rstd2, heads.copy())
    assert_close(out, out2, atol=0, name="out")


def test_fused_residual_forward(rng):
    x1, x2 = rng.standard_normal((2, B, T, C), dtype=np.float32)
    residual, normed, rstd = np.empty_like(x1), np.empty_like(x1), np.empty((B, T), np.float32)
    ref.fused_residual_rmsnorm_forward(residual, normed, rstd, x1, x2)
    out2, rstd2 = np.empty_like(x1), np.empty_like(rstd)
    ref.rmsnorm_forward(out2, rstd2, x1 + x2)
    assert_close(residual, x1 + x2, name="residual")
    assert_close(normed, out2, name="normed")
    assert_close(rstd, rstd2, name="rstd")


def test_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((B, T, 64), dtype=np.float32)
    dout = rng.standard_normal(x.shape, dtype=np.float32)
    out, rstd = np.empty_like(x), np.empty((B, T), np.float32)
    ref.rmsnorm_forward(out, rstd, x)
    dx = np.zeros_like(x)
    ref.rmsnorm_backward(dx, dout, x, rstd)
    assert_matches_torch(lambda x_t: torch.nn.functional.rms_norm(x_t, (64,), eps=1e-6),
                         dict(inp=x), dout, dict(out=out, dinp=dx), atol=1e-5, rtol=1e-5)
    assert out.dtype == dx.dtype == rstd.dtype == np.float32

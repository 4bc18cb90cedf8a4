"""gelu_forward/backward: the backward is the derivative of the forward, and both match PyTorch."""
import numpy as np
import pytest

from llmpy.cpu import gelu as ref
from llmpy.testing import assert_close, numerical_grad


def test_reference_backward_is_the_derivative(rng):
    x, dout = 2.0 * rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 5))
    out = np.empty_like(x)

    def loss():
        ref.gelu_forward(out, x)
        return (out * dout).sum()

    dx = np.full_like(x, np.nan)                      # overwritten
    ref.gelu_backward(dx, x, dout)
    assert_close(dx, numerical_grad(loss, x), atol=1e-8, name="dinp")


def test_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x = 3.0 * rng.standard_normal((4, 7, 48), dtype=np.float32)
    dout = rng.standard_normal(x.shape, dtype=np.float32)
    out = np.empty_like(x)
    ref.gelu_forward(out, x)
    dx = dout.copy()
    ref.gelu_backward(dx, x, dx)                      # dinp may alias dout (the model does this)

    x_t = torch.tensor(x, requires_grad=True)
    out_t = torch.nn.functional.gelu(x_t, approximate="tanh")
    out_t.backward(torch.from_numpy(dout))
    assert_close(out, out_t.detach().numpy(), atol=2e-6, rtol=1e-6, name="out")
    assert_close(dx, x_t.grad.numpy(), atol=2e-6, rtol=1e-6, name="dinp")
    assert out.dtype == dx.dtype == np.float32


def test_float32_is_accurate_in_the_tails():
    # where tanh(u) rounds to -1 or 1 the derivative must not lose its precision
    x = np.linspace(-12, 12, 4001, dtype=np.float32)
    out, dx = np.empty_like(x), np.empty_like(x)
    ref.gelu_forward(out, x)
    ref.gelu_backward(dx, x, np.ones_like(x))
    x64 = x.astype(np.float64)
    out64, dx64 = np.empty_like(x64), np.empty_like(x64)
    ref.gelu_forward(out64, x64)
    ref.gelu_backward(dx64, x64, np.ones_like(x64))
    assert_close(out, out64, atol=1e-7, rtol=1e-6, name="out")
    assert_close(dx, dx64, atol=5e-7, name="dinp")

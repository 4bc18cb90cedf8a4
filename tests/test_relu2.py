"""relu2_forward/backward: the definition and its derivative."""
import numpy as np

from llmpy.cpu import relu2 as ref
from llmpy.testing import assert_close, numerical_grad


def test_forward_and_backward(rng):
    x = rng.standard_normal((3, 7))
    x[np.abs(x) < 1e-3] = 0.5                                    # keep finite differences off the kink
    dout = rng.standard_normal(x.shape)
    out = np.empty_like(x)
    ref.relu2_forward(out, x)
    assert_close(out, np.where(x > 0, x * x, 0.0), atol=0, name="out")

    def loss():
        ref.relu2_forward(out, x)
        return (out * dout).sum()

    dx = np.full_like(x, np.nan)
    ref.relu2_backward(dx, x, dout)
    assert_close(dx, numerical_grad(loss, x), atol=1e-8, name="dinp")
    ref.relu2_backward(dout, x, dout)                            # in place over dout
    assert_close(dout, dx, atol=0, name="in place")
    x32 = x.astype(np.float32)
    ref.relu2_forward(x32, x32)
    assert x32.dtype == np.float32

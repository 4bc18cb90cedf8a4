"""residual_forward is an elementwise sum that keeps the dtype."""
import numpy as np

from llmpy.cpu import residual as ref
from llmpy.testing import assert_close


def test_residual_forward(rng):
    a, b = rng.standard_normal((2, 2, 5, 8), dtype=np.float32)
    out = np.full_like(a, np.nan)                     # overwritten, whatever was there
    ref.residual_forward(out, a, b)
    assert_close(out, a + b, name="out")
    assert out.dtype == np.float32

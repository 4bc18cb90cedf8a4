"""rope_tables/forward/backward: the spec's formula, inverse rotation, relative positions, derivative."""
import numpy as np
import pytest

from llmpy.cpu import rope as ref
from llmpy.testing import assert_close, numerical_grad

B, T, H, D = 2, 5, 3, 8


def test_tables_follow_the_spec():
    cos, sin = ref.rope_tables(T, D, dtype=np.float64)
    t, i = 3, 2
    angle = t * 10000.0 ** (-2 * i / D)
    assert cos.shape == sin.shape == (T, D // 2)
    assert_close(cos[t, i], np.cos(angle), atol=1e-15, name="cos")
    assert_close(sin[t, i], np.sin(angle), atol=1e-15, name="sin")
    with pytest.raises(ValueError, match="even"):
        ref.rope_tables(T, 7)


def test_forward_matches_the_halves_formula_and_runs_in_place(rng):
    x = rng.standard_normal((B, T, H, D))
    cos, sin = ref.rope_tables(T, D, dtype=np.float64)
    out = np.empty_like(x)
    ref.rope_forward(out, x, cos, sin)
    c, s = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    assert_close(out, np.concatenate([x1 * c + x2 * s, -x1 * s + x2 * c], -1), atol=1e-14, name="out")
    ref.rope_forward(x, x, cos, sin)
    assert_close(x, out, atol=0, name="in place")


def test_scores_depend_only_on_distance(rng):
    """q(t).k(t') after RoPE is a function of t - t' alone: the point of the rotation."""
    q, k = rng.standard_normal((2, D))
    cos, sin = ref.rope_tables(8, D, dtype=np.float64)
    qs, ks = np.empty((1, 8, 1, D)), np.empty((1, 8, 1, D))
    ref.rope_forward(qs, np.broadcast_to(q, (1, 8, 1, D)), cos, sin)
    ref.rope_forward(ks, np.broadcast_to(k, (1, 8, 1, D)), cos, sin)
    assert_close(qs[0, 5, 0] @ ks[0, 2, 0], qs[0, 4, 0] @ ks[0, 1, 0], atol=1e-12, name="shift by 1")


def test_backward_is_the_derivative(rng):
    x, dout = rng.standard_normal((B, T, H, D)), rng.standard_normal((B, T, H, D))
    cos, sin = ref.rope_tables(T + 3, D, dtype=np.float64)            # longer tables: rows [:T] used
    out = np.empty_like(x)

    def loss():
        ref.rope_forward(out, x, cos, sin)
        return (out * dout).sum()

    dx = np.full_like(x, np.nan)
    ref.rope_backward(dx, dout, cos, sin)
    assert_close(dx, numerical_grad(loss, x), atol=1e-8, name="dinp")
    ref.rope_backward(dout, dout, cos, sin)                            # in place
    assert_close(dout, dx, atol=0, name="in place")

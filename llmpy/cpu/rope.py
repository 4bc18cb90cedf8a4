"""Rotary position embedding (RoPE) in NumPy: the reference for cuda/rope.cu.

Su et al., https://arxiv.org/abs/2104.09864, in the "halves" layout of nanochat and GPT-NeoX: the
head vector x (D channels, D even) is split as x1 = x[:D/2], x2 = x[D/2:], and pair i = (x1[i], x2[i])
is rotated by the angle t * inv_freq[i] at position t, inv_freq[i] = base^(-2i/D), base 10000:
  y = cat(x1 cos + x2 sin, -x1 sin + x2 cos).
(nanochat's sign convention; it rotates by -angle relative to the usual complex form, which leaves
q.k depending only on the distance between positions either way.) The backward is the inverse
rotation, the same formula with -sin. Tables cos, sin are (T, D/2), computed once per sequence length.
"""
import numpy as np

BASE = 10000.0


def rope_tables(T: int, D: int, base: float = BASE, dtype=np.float32):
    """(cos, sin), each (T, D/2): cos/sin of t * base^(-2i/D), computed in float64, then cast."""
    if D % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {D}")
    inv_freq = base ** (-np.arange(0, D, 2, dtype=np.float64) / D)
    angle = np.outer(np.arange(T, dtype=np.float64), inv_freq)
    return np.cos(angle).astype(dtype), np.sin(angle).astype(dtype)


def _rotate(out, inp, cos, sin):
    """out = the rotation of inp (..., T, H, D) by (cos, sin) (T, D/2); out may alias inp."""
    h = inp.shape[-1] // 2
    c, s = cos[:inp.shape[-3], None, :], sin[:inp.shape[-3], None, :]   # (T, 1, D/2): broadcast over H
    x1, x2 = inp[..., :h], inp[..., h:]
    y1 = x1 * c
    y1 += x2 * s
    y2 = x2 * c
    y2 -= x1 * s
    out[..., :h] = y1        # both halves are computed before either is written: out may be inp
    out[..., h:] = y2


def rope_forward(out, inp, cos, sin):
    """RoPE of every head: inp, out (B, T, H, D) (any strides); cos, sin (>= T, D/2) from rope_tables.

    Overwrites out; out may be the same array as inp (in place).
    """
    _rotate(out, inp, cos, sin)


def rope_backward(dinp, dout, cos, sin):
    """Gradient of rope_forward (the inverse rotation): dinp, dout (B, T, H, D).

    dinp is OVERWRITTEN; it may be the same array as dout (in place).
    """
    _rotate(dinp, dout, cos, -sin)

"""GELU (tanh approximation) in NumPy: the reference for cuda/gelu.cu.

gelu(x) = 0.5 x (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi): Hendrycks & Gimpel,
https://arxiv.org/abs/1606.08415, and torch.nn.functional.gelu(approximate="tanh"),
https://pytorch.org/docs/stable/generated/torch.nn.GELU.html.
Both directions are evaluated through sigmoid(2u) = 0.5 (1 + tanh u), the same function with full
float32 precision in the tails. The (B, T, 4C) activations are walked in chunks with small scratch
arrays, so the chain of in-place ufuncs stays in cache and makes no full-size temporaries.
"""
import numpy as np

GELU_K = float(np.sqrt(2.0 / np.pi))
GELU_A = 0.044715
CHUNK = 1 << 15   # elements per chunk: the backward's six float32 chunk arrays fit in L2


def _chunks(*arrays):
    """Yield matching 1-D slices of CHUNK elements of the (contiguous) arrays."""
    flats = [a.reshape(-1, copy=False) for a in arrays]
    for i in range(0, flats[0].size, CHUNK):
        yield [f[i:i + CHUNK] for f in flats]


def gelu_forward(out, inp):
    """out = gelu(inp), elementwise. out, inp: same shape, float dtype, contiguous; out must not alias inp.

    Overwrites out.
    """
    # 0.5 x (1 + tanh u) = x sigmoid(2u) = x / (1 + exp(-2u)): the same value with full relative
    # precision where tanh(u) rounds to -1. -2u is clipped to +-60 so exp cannot overflow.
    for y, x in _chunks(out, inp):
        np.multiply(x, x, out=y)
        y *= -2.0 * GELU_K * GELU_A
        y += -2.0 * GELU_K
        y *= x                         # -2u = -2k (x + a x^3)
        np.clip(y, -60.0, 60.0, out=y)
        np.exp(y, out=y)
        y += 1.0
        np.divide(x, y, out=y)


def gelu_backward(dinp, inp, dout):
    """dinp = gelu'(inp) * dout, elementwise. Same shapes, contiguous; dinp may be the same array as dout.

    Overwrites dinp.
    """
    # gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) u'   with t = tanh(u), u' = k (1 + 3 a x^2).
    # With s = sigmoid(2u) = 0.5 (1 + t) and 1 - s = sigmoid(-2u) this is s (1 + 2 x u' (1 - s)).
    # Both sigmoids come from e = exp(-2u), s = 1 / (1 + e), 1 - s = e s, so they keep full relative
    # precision where tanh(u) rounds to +-1 (the tanh form loses ~1e-6 there in float32).
    n = min(CHUNK, inp.size)
    e_buf, s_buf, w_buf = (np.empty(n, dtype=inp.dtype) for _ in range(3))
    for dx, x, dy in _chunks(dinp, inp, dout):
        e, s, w = e_buf[:x.size], s_buf[:x.size], w_buf[:x.size]
        np.multiply(x, x, out=e)
        np.multiply(e, 6.0 * GELU_K * GELU_A, out=w)
        w += 2.0 * GELU_K
        w *= x                         # 2 x u'
        e *= -2.0 * GELU_K * GELU_A
        e += -2.0 * GELU_K
        e *= x                         # -2u
        np.clip(e, -60.0, 60.0, out=e)
        np.exp(e, out=e)
        np.add(e, 1.0, out=s)
        np.divide(1.0, s, out=s)       # s = sigmoid(2u)
        e *= s                         # 1 - s = sigmoid(-2u)
        w *= e
        w += 1.0
        w *= s                         # gelu'(x)
        np.multiply(w, dy, out=dx)

"""Squared ReLU in NumPy: the reference for cuda/relu2.cu.

relu2(x) = max(x, 0)^2, the MLP activation of nanochat and modded-nanogpt (So et al., "Primer",
https://arxiv.org/abs/2109.08668); its derivative is 2 max(x, 0).
"""
import numpy as np


def relu2_forward(out, inp):
    """out = max(inp, 0)^2, elementwise. Same shape; out may be the same array as inp. Overwrites out."""
    np.maximum(inp, 0.0, out=out)
    np.square(out, out=out)


def relu2_backward(dinp, inp, dout):
    """dinp = 2 max(inp, 0) * dout, elementwise. Same shapes; dinp may be the same array as dout.

    Overwrites dinp.
    """
    r = np.maximum(inp, 0.0)
    r *= 2.0
    np.multiply(r, dout, out=dinp)

"""RMSNorm without weights over the last axis in NumPy: the reference for cuda/rmsnorm.cu.

y = x * rstd with rstd = 1 / sqrt(mean(x^2) + 1e-6) per row: Zhang & Sennrich,
https://arxiv.org/abs/1910.07467, without the learned gain, as nanochat's `F.rms_norm(x, (C,))`,
https://pytorch.org/docs/stable/generated/torch.nn.functional.rms_norm.html (eps given explicitly).
The nanochat model (llmpy/nanochat.py) uses it on the residual stream (before attention, MLP and the
head, fused with the residual add like GPT-2's layernorm), after the embedding, and as QK-norm over the
head dimension of q and k. rstd is saved per row for the backward.

Gradient semantics (as layernorm_backward): rmsnorm_backward ACCUMULATES into dinp by default, because
on the residual stream its dinp is the residual gradient where two branches meet; accumulate=False
overwrites dinp instead (QK-norm and the embedding norm), and then dinp may be dout itself.
"""
import numpy as np

EPS = 1e-6


def rmsnorm_forward(out, rstd, inp):
    """out = inp * rstd per row, rstd = 1 / sqrt(mean(inp^2) + 1e-6).

    out, inp (..., C), any row-major strides (QK-norm passes head views); rstd (...), float32 when
    training. Overwrites out and rstd; out may be the same array as inp.
    """
    C = inp.shape[-1]
    np.einsum("...c,...c->...", inp, inp, out=rstd)      # sum of squares, no (..., C) temporary
    rstd /= C
    rstd += EPS
    np.sqrt(rstd, out=rstd)
    np.divide(1.0, rstd, out=rstd)
    np.multiply(inp, rstd[..., None], out=out)


def fused_residual_rmsnorm_forward(residual, normed, rstd, inp1, inp2):
    """residual = inp1 + inp2, then normed = rmsnorm(residual) as rmsnorm_forward.

    residual, normed, inp1, inp2 (..., C); rstd (...). Overwrites residual, normed and rstd.
    """
    np.add(inp1, inp2, out=residual)
    rmsnorm_forward(normed, rstd, residual)


def rmsnorm_backward(dinp, dout, inp, rstd, *, accumulate=True):
    """Gradient of rmsnorm_forward, given its input and saved rstd.

    dinp, dout, inp (..., C), any strides; rstd (...). accumulate=True: dinp += (the residual gradient);
    False: dinp = (OVERWRITTEN; dinp may then be dout).
    """
    # With n = x rstd: dx = rstd (dy - n mean_c(dy n))   (the layernorm formula without the mean terms)
    C = inp.shape[-1]
    r = rstd[..., None]
    n = np.multiply(inp, r)
    dyn_mean = np.einsum("...c,...c->...", dout, n)[..., None] / C
    n *= dyn_mean
    np.subtract(dout, n, out=n)
    n *= r
    if accumulate:
        dinp += n
    else:
        dinp[...] = n

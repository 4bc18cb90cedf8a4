"""LayerNorm over the last axis in NumPy: the reference for cuda/layernorm.cu.

y = (x - mean) * rstd * weight + bias with mean = E[x], rstd = 1 / sqrt(Var[x] + 1e-5), the variance
biased (divided by C): Ba et al., https://arxiv.org/abs/1607.06450, and torch.nn.functional.layer_norm,
https://pytorch.org/docs/stable/generated/torch.nn.LayerNorm.html.
Rows are (..., C); mean and rstd are saved per row for the backward.
"""
import numpy as np

EPS = 1e-5


def layernorm_forward(out, mean, rstd, inp, weight, bias):
    """Normalise each row of inp, then scale and shift.

    out, inp (..., C); mean, rstd (...) (float32 when training); weight, bias (C,).
    Overwrites out, mean and rstd; out must not alias inp.
    """
    C = inp.shape[-1]
    np.mean(inp, axis=-1, out=mean)
    np.subtract(inp, mean[..., None], out=out)           # x - mean, reused below
    np.einsum("...c,...c->...", out, out, out=rstd)      # sum of squares, no (..., C) temporary
    rstd /= C
    rstd += EPS
    np.sqrt(rstd, out=rstd)
    np.divide(1.0, rstd, out=rstd)
    out *= rstd[..., None]
    out *= weight
    out += bias


def fused_residual_forward(residual, normed, mean, rstd, inp1, inp2, weight, bias):
    """residual = inp1 + inp2, then normed = LayerNorm(residual) as layernorm_forward.

    residual, normed, inp1, inp2 (..., C); mean, rstd (...); weight, bias (C,).
    Overwrites residual, normed, mean and rstd.
    """
    np.add(inp1, inp2, out=residual)
    layernorm_forward(normed, mean, rstd, residual, weight, bias)


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    """Gradients of layernorm_forward, given what it saved.

    dinp, dout, inp (..., C); dweight, dbias, weight (C,); mean, rstd (...).
    ALL THREE ACCUMULATE: dinp += (dinp is the residual-stream gradient), dweight +=, dbias +=.
    """
    # With n = (x - mean) rstd and g = weight * dout (the gradient at n):
    #   dx = rstd (g - mean_c(g) - n mean_c(g n)),  dweight = sum_rows(n dout),  dbias = sum_rows(dout)
    C = inp.shape[-1]
    x, dy = inp.reshape(-1, C), dout.reshape(-1, C)                 # (N, C) rows
    mean2, rstd2 = mean.reshape(-1, 1), rstd.reshape(-1, 1)         # (N, 1)
    norm = np.subtract(x, mean2)
    norm *= rstd2                                                    # n
    dbias += dy.sum(axis=0)
    dweight += np.einsum("nc,nc->c", norm, dy)
    g = np.multiply(dy, weight)
    g_mean = g.mean(axis=1, keepdims=True)                           # (N, 1)
    gn_mean = np.einsum("nc,nc->n", g, norm)[:, None] / C            # (N, 1)
    g -= g_mean
    norm *= gn_mean
    g -= norm
    g *= rstd2
    dx = dinp.reshape(-1, C, copy=False)
    dx += g

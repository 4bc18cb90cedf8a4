"""Muon optimizer step in NumPy: the reference for the GPU's batched-GEMM Muon (llmpy/gpu/muon.py).

Muon (Jordan et al., https://kellerjordan.github.io/posts/muon/), as nanochat's `Muon` and
modded-nanogpt's: for a weight matrix W (rows x cols) with gradient g,
  buf = lerp(buf, g, 1 - beta)                      (momentum beta = 0.95: buf = beta buf + (1 - beta) g)
  u   = lerp(g, buf, beta) with Nesterov, else buf  (u = (1 - beta) g + beta buf)
  O   = NewtonSchulz5(u)                            (an approximate orthogonalisation, U V^T of u's SVD)
  W  -= lr * max(1, rows / cols)^0.5 * O
NewtonSchulz5: X = u / (||u||_F + 1e-7) (spectral norm <= 1), working on u^T when rows > cols so the
Gram matrix A = X X^T is the smaller one; then five times A = X X^T, X = a X + (b A + c A A) X with the
quintic coefficients (a, b, c) = (3.4445, -4.7750, 2.0315), which push every singular value into about
[0.7, 1.2] rather than exactly 1 (faster to converge, and good enough for the update). The GPU runs it
in bf16; here it runs in the arrays' dtype (float32 when training, float64 in tests).
Muon applies no weight decay (nanochat's Muon has none); gradient clipping enters as grad_scale on g.
Parameters are stacks of same-shape matrices (L, rows, cols); each matrix is orthogonalised on its own,
with np.matmul batching the L products.
"""
import numpy as np

NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


def newton_schulz(out, G, steps=NS_STEPS):
    """out = NewtonSchulz5(G) for each matrix of the stack G (..., rows, cols). Overwrites out (may be G)."""
    a, b, c = NS_COEFFS
    X = G.swapaxes(-1, -2) if G.shape[-2] > G.shape[-1] else G
    norm = np.sqrt(np.einsum("...ij,...ij->...", X, X))[..., None, None]
    X = X / (norm + NS_EPS)
    for _ in range(steps):
        A = np.matmul(X, X.swapaxes(-1, -2))
        B = np.matmul(A, A)
        B *= c
        B += b * A
        Y = np.matmul(B, X)
        Y += a * X
        X = Y
    out[...] = X.swapaxes(-1, -2) if G.shape[-2] > G.shape[-1] else X


def muon_update(param, momentum, grad, *, lr, beta=0.95, nesterov=True, grad_scale=1.0, steps=NS_STEPS):
    """One Muon step on a stack of matrices, in place.

    param, momentum, grad: (..., rows, cols), same shape, contiguous. momentum is the buffer `buf`
    (OVERWRITTEN with its new value); param is updated in place; grad is read only (scaled by grad_scale).
    """
    dt = param.dtype.type
    g = grad * dt(grad_scale)
    momentum += (g - momentum) * dt(1.0 - beta)             # lerp(buf, g, 1 - beta)
    if nesterov:
        g += (momentum - g) * dt(beta)                      # lerp(g, buf, beta)
    else:
        g[...] = momentum
    newton_schulz(g, g, steps)
    rows, cols = param.shape[-2:]
    g *= dt(lr * max(1.0, rows / cols) ** 0.5)
    param -= g

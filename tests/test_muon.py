"""newton_schulz and muon_update: the spec's iteration (written here in PyTorch), singular values pushed
towards 1, the transpose for tall matrices, momentum with Nesterov, the rows/cols scale."""
import numpy as np
import pytest

from llmpy.cpu import muon as ref
from llmpy.testing import assert_close


def torch_newton_schulz(G, steps=5):
    """NewtonSchulz5 from the spec (nanochat / modded-nanogpt), in torch, fp32."""
    import torch
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.mT if G.size(-2) > G.size(-1) else G
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if G.size(-2) > G.size(-1) else X


@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 16, 6), (2, 6, 16)])
def test_newton_schulz_matches_torch_and_orthogonalises(rng, shape):
    torch = pytest.importorskip("torch")
    G = rng.standard_normal(shape, dtype=np.float32)
    out = np.empty_like(G)
    ref.newton_schulz(out, G)
    assert_close(out, torch_newton_schulz(torch.from_numpy(G)).numpy(), atol=2e-6, rtol=1e-5, name="NS5")
    s = np.linalg.svd(out.astype(np.float64), compute_uv=False)
    assert s.min() > 0.6 and s.max() < 1.25, f"singular values {s.min():.3f}..{s.max():.3f}"
    # and it approximates U V^T: the same singular vectors as G
    u, _, vt = np.linalg.svd(G.astype(np.float64), full_matrices=False)
    cos = np.abs(np.einsum("bij,bij->b", out, u @ vt)) / (np.linalg.norm(out, axis=(1, 2)) *
                                                             np.linalg.norm(u @ vt, axis=(1, 2)))
    assert cos.min() > 0.95, cos


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_update_matches_torch_over_steps(rng, nesterov):
    torch = pytest.importorskip("torch")
    p = rng.standard_normal((2, 12, 4), dtype=np.float32)
    buf = np.zeros_like(p)
    pt, buft = torch.from_numpy(p.copy()), torch.zeros(p.shape)
    for step in range(3):
        g = rng.standard_normal(p.shape, dtype=np.float32)
        ref.muon_update(p, buf, g, lr=0.02, nesterov=nesterov, grad_scale=0.5)
        gt = torch.from_numpy(g) * 0.5
        buft.lerp_(gt, 1 - 0.95)
        u = gt.lerp(buft, 0.95) if nesterov else buft
        pt -= 0.02 * max(1, 12 / 4) ** 0.5 * torch_newton_schulz(u)
        assert_close(buf, buft.numpy(), atol=1e-6, name=f"momentum, step {step}")
        assert_close(p, pt.numpy(), atol=1e-6, rtol=1e-5, name=f"param, step {step}")


def test_update_size_follows_the_shape_scale(rng):
    """An orthogonal update has spectral norm ~1; Muon scales it by lr * max(1, rows/cols)^0.5."""
    for rows, cols in ((32, 8), (8, 32)):
        p = np.zeros((1, rows, cols))
        ref.muon_update(p, np.zeros_like(p), rng.standard_normal(p.shape), lr=0.1)
        top = np.linalg.svd(p[0], compute_uv=False).max()
        assert 0.6 < top / (0.1 * max(1, rows / cols) ** 0.5) < 1.25, (rows, cols, top)

"""adamw_update matches torch.optim.AdamW and the spec's formula; global_norm_squared is a sum of squares."""
import numpy as np
import pytest

from llmpy.cpu import adamw as ref
from llmpy.testing import assert_close

HP = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _spec_step(p, m, v, g, t, grad_scale):
    """The spec's formula, written out in float64 (llm.c's order of operations)."""
    g = grad_scale * g
    m = HP["beta1"] * m + (1 - HP["beta1"]) * g
    v = HP["beta2"] * v + (1 - HP["beta2"]) * g * g
    mhat, vhat = m / (1 - HP["beta1"] ** t), v / (1 - HP["beta2"] ** t)
    return p - HP["lr"] * (mhat / (np.sqrt(vhat) + HP["eps"]) + HP["weight_decay"] * p), m, v


@pytest.mark.parametrize("grad_scale", [1.0, 0.5])
def test_matches_spec_formula_float64(rng, grad_scale):
    p, g = rng.standard_normal((2, 3, 7))
    m, v = 0.1 * rng.standard_normal(p.shape), rng.random(p.shape)
    p_ref, m_ref, v_ref = _spec_step(p, m, v, g, 3, grad_scale)
    ref.adamw_update(p, m, v, g, t=3, grad_scale=grad_scale, **HP)
    assert_close(p, p_ref, atol=1e-14, name="param")
    assert_close(m, m_ref, atol=1e-15, name="m")
    assert_close(v, v_ref, atol=1e-15, name="v")


# 2 * CHUNK + 123 elements: takes the multi-threaded path with a short last chunk
@pytest.mark.parametrize("n", [37, 2 * ref.CHUNK + 123])
def test_matches_torch_over_steps(rng, n):
    torch = pytest.importorskip("torch")
    p = rng.standard_normal(n, dtype=np.float32)
    p_t = torch.tensor(p, requires_grad=True)
    opt = torch.optim.AdamW([p_t], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                            weight_decay=HP["weight_decay"], foreach=False, fused=False)
    m, v = np.zeros_like(p), np.zeros_like(p)
    grad_scale = 0.5
    for t in range(1, 6):                                  # t is 1-based
        g = rng.standard_normal(n, dtype=np.float32)
        ref.adamw_update(p, m, v, g, t=t, grad_scale=grad_scale, **HP)
        p_t.grad = torch.from_numpy(g * np.float32(grad_scale))   # torch has no grad scale: pre-scale
        opt.step()
    state = opt.state[p_t]
    assert_close(p, p_t.detach().numpy(), atol=1e-6, name="param")
    assert_close(m, state["exp_avg"].numpy(), atol=1e-7, name="m")
    assert_close(v, state["exp_avg_sq"].numpy(), atol=1e-7, name="v")
    assert p.dtype == m.dtype == v.dtype == np.float32


def test_master_weights(rng):
    p0, g = rng.standard_normal((2, 50), dtype=np.float32)
    p_plain, m_plain, v_plain = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    ref.adamw_update(p_plain, m_plain, v_plain, g, t=1, **HP)

    param = np.full_like(p0, 123.0)              # stale: the old value must be read from master
    master, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    ref.adamw_update(param, m, v, g, t=1, master=master, seed=7, **HP)
    assert_close(master, p_plain, name="master gets the update")
    assert_close(param, master, name="param equals master")
    assert_close(m, m_plain, name="m")
    assert_close(v, v_plain, name="v")


def test_global_norm_squared(rng):
    g = rng.standard_normal((3, ref.NORM_CHUNK + 5), dtype=np.float32)   # crosses chunk boundaries
    out = np.full(1, np.nan, np.float32)
    ref.global_norm_squared(out, g)
    assert_close(out[0], np.sum(g.astype(np.float64) ** 2), rtol=1e-6, name="sum of squares")
    assert out.dtype == np.float32

"""fused_classifier: losses and dlogits are cross-entropy and its gradient over the first V columns."""
import numpy as np
import pytest

from llmpy.cpu import classifier as ref
from llmpy.testing import assert_close, numerical_grad

B, T, V, VP = 2, 3, 5, 8


def _inputs(rng, dtype=np.float64):
    logits = (3.0 * rng.standard_normal((B, T, VP))).astype(dtype)
    logits[..., V:] = 50.0                     # padded columns: huge, and must be ignored
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    return logits, targets


def test_reference_backward_is_the_derivative(rng):
    logits, targets = _inputs(rng)
    dloss = 1.0 / (B * T)

    def loss():
        losses = np.zeros((B, T))
        ref.fused_classifier(None, losses, logits, targets, dloss, V)
        return dloss * losses.sum()

    losses0 = rng.standard_normal((B, T))
    losses = losses0.copy()                    # accumulated onto
    dlogits = np.full_like(logits, np.nan)     # overwritten, padded columns included
    ref.fused_classifier(dlogits, losses, logits, targets, dloss, V)
    assert_close(dlogits, numerical_grad(loss, logits), atol=1e-9, name="dlogits")
    assert np.all(dlogits[..., V:] == 0.0), "padded columns of dlogits must be 0"
    x = logits[..., :V]
    nll = np.log(np.exp(x).sum(-1)) - np.take_along_axis(x, targets[..., None], -1)[..., 0]
    assert_close(losses - losses0, nll, atol=1e-12, name="losses accumulate")


def test_in_place_and_loss_only_agree(rng):
    logits, targets = _inputs(rng, np.float32)
    dloss = 0.25
    losses_a, losses_b = np.ones((B, T), np.float32), np.ones((B, T), np.float32)
    dlogits = np.empty_like(logits)
    ref.fused_classifier(dlogits, losses_a, logits, targets, dloss, V)
    ref.fused_classifier(None, losses_b, logits, targets, dloss, V)
    assert_close(losses_b, losses_a, name="loss only")
    ref.fused_classifier(logits, losses_b, logits, targets, dloss, V)       # in place
    assert_close(logits, dlogits, name="in place dlogits")
    assert_close(losses_b - 1.0, 2.0 * (losses_a - 1.0), atol=1e-6, name="second call accumulates")


def test_matches_torch(rng, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(ref, "CHUNK_ELEMENTS", 2 * 37)   # several row chunks, the last one short
    B_, T_, V_, VP_ = 3, 5, 37, 40
    logits = rng.standard_normal((B_, T_, VP_), dtype=np.float32) * 4
    logits[..., V_:] = 0.0
    targets = rng.integers(0, V_, (B_, T_)).astype(np.int32)
    dloss = 1.0 / (B_ * T_)
    losses, dlogits = np.zeros((B_, T_), np.float32), np.empty_like(logits)
    ref.fused_classifier(dlogits, losses, logits, targets, dloss, V_)

    x_t = torch.tensor(logits[..., :V_], requires_grad=True)
    target_t = torch.from_numpy(targets).long().reshape(-1)
    loss_t = torch.nn.functional.cross_entropy(x_t.reshape(-1, V_), target_t, reduction="none")
    (loss_t.sum() * dloss).backward()
    assert_close(losses.reshape(-1), loss_t.detach().numpy(), atol=1e-5, rtol=1e-6, name="losses")
    assert_close(dlogits[..., :V_], x_t.grad.numpy(), atol=1e-7, rtol=1e-5, name="dlogits")
    assert np.all(dlogits[..., V_:] == 0.0)
    assert losses.dtype == dlogits.dtype == np.float32


# -------------------------------------------------------------------------------------------------
# softcap (nanochat: 15 tanh(logits / 15)) fused into the classifier


@pytest.mark.parametrize("in_place", [False, True])
def test_softcap_classifier_matches_torch(rng, in_place):
    torch = pytest.importorskip("torch")
    B, T, V, Vp = 2, 3, 11, 16
    logits = (rng.standard_normal((B, T, Vp)) * 20).astype(np.float32)   # well into tanh's saturation
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    dloss = 1.0 / (B * T)
    x_t = torch.tensor(logits[..., :V], requires_grad=True)
    z = 15 * torch.tanh(x_t / 15)
    loss_t = torch.nn.functional.cross_entropy(z.reshape(-1, V), torch.from_numpy(targets).long().reshape(-1),
                                               reduction="none")
    loss_t.sum().mul(dloss).backward()

    losses = np.zeros((B, T), np.float32)
    dlogits = logits if in_place else np.full_like(logits, np.nan)
    ref.fused_classifier(dlogits, losses, logits.copy() if not in_place else logits, targets, dloss, V, softcap=15.0)
    assert_close(losses.reshape(-1), loss_t.detach().numpy(), atol=1e-5, rtol=1e-5, name="losses")
    assert_close(dlogits[..., :V], x_t.grad.numpy(), atol=1e-7, rtol=1e-5, name="dlogits")
    assert np.all(dlogits[..., V:] == 0)

    capped = np.empty_like(x_t.detach().numpy())
    ref.softcap_forward(capped, x_t.detach().numpy(), 15.0)
    assert_close(capped, z.detach().numpy(), atol=1e-6, name="softcap_forward")
    losses2 = np.zeros((B, T), np.float32)
    ref.fused_classifier(None, losses2, capped, targets, dloss, V)           # loss of capped logits, no cap
    assert_close(losses2, losses, atol=1e-6, name="losses from capped logits")

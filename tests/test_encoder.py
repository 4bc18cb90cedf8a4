"""encoder_forward/backward: the backward is the derivative of the forward, and both match PyTorch."""
import numpy as np
import pytest

from llmpy.cpu import encoder as ref
from llmpy.testing import assert_close, numerical_grad

B, T, C, VP, MAXT = 2, 3, 4, 7, 5
TOKENS = np.array([[1, 4, 1], [6, 1, 0]], dtype=np.int32)   # token 1 three times: rows must sum


def test_reference_backward_is_the_derivative(rng):
    wte, wpe = rng.standard_normal((VP, C)), rng.standard_normal((MAXT, C))
    dout = rng.standard_normal((B, T, C))
    out = np.empty((B, T, C))

    def loss():
        ref.encoder_forward(out, TOKENS, wte, wpe)
        return (out * dout).sum()

    dwte0, dwpe0 = rng.standard_normal((VP, C)), rng.standard_normal((MAXT, C))   # accumulate onto these
    dwte, dwpe = dwte0.copy(), dwpe0.copy()
    ref.encoder_backward(dwte, dwpe, dout, TOKENS)
    assert_close(dwte - dwte0, numerical_grad(loss, wte), atol=1e-8, name="dwte")
    assert_close(dwpe - dwpe0, numerical_grad(loss, wpe), atol=1e-8, name="dwpe")
    assert_close(dwpe[T:], dwpe0[T:], name="dwpe rows >= T untouched")


def test_matches_torch(rng):
    torch = pytest.importorskip("torch")
    wte = rng.standard_normal((VP, C), dtype=np.float32)
    wpe = rng.standard_normal((MAXT, C), dtype=np.float32)
    dout = rng.standard_normal((B, T, C), dtype=np.float32)
    out = np.empty((B, T, C), np.float32)
    dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
    ref.encoder_forward(out, TOKENS, wte, wpe)
    ref.encoder_backward(dwte, dwpe, dout, TOKENS)

    wte_t, wpe_t = (torch.tensor(a, requires_grad=True) for a in (wte, wpe))
    out_t = torch.nn.functional.embedding(torch.from_numpy(TOKENS).long(), wte_t) + wpe_t[:T]
    out_t.backward(torch.from_numpy(dout))
    assert_close(out, out_t.detach().numpy(), atol=1e-6, name="out")
    assert_close(dwte, wte_t.grad.numpy(), atol=1e-5, name="dwte")
    assert_close(dwpe, wpe_t.grad.numpy(), atol=1e-5, name="dwpe")
    assert out.dtype == np.float32


def test_without_position_embedding(rng):
    """wpe None: a plain token embedding (rotary models); the backward scatters into dwte only."""
    wte = rng.standard_normal((7, 3))
    inp = np.array([[1, 4, 1], [0, 6, 4]], dtype=np.int32)
    out = np.empty((2, 3, 3))
    ref.encoder_forward(out, inp, wte, None)
    assert_close(out, wte[inp], atol=0, name="out")
    dout = rng.standard_normal(out.shape)
    dwte = np.ones_like(wte)
    ref.encoder_backward(dwte, None, dout, inp)
    want = np.ones_like(wte)
    np.add.at(want, inp.reshape(-1), dout.reshape(-1, 3))
    assert_close(dwte, want, atol=1e-14, name="dwte")

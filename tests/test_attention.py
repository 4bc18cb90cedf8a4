"""attention_forward/backward: causal softmax, derivative of the forward, and PyTorch parity."""
import numpy as np
import pytest

from llmpy.cpu import attention as ref
from llmpy.testing import assert_close, numerical_grad


def _buffers(B, T, NH, HS, dtype):
    C = NH * HS
    return dict(out=np.empty((B, T, C), dtype), qkvr=np.empty((3, B, NH, T, HS), dtype),
                att=np.empty((B, NH, T, T), dtype), dinp=np.full((B, T, 3 * C), np.nan, dtype),
                dqkvr=np.empty((3, B, NH, T, HS), dtype), datt=np.empty((B, NH, T, T), dtype),
                scratch=np.empty((B, NH, T, HS), dtype))


@pytest.mark.parametrize("NH", [2, 3])
def test_reference_backward_is_the_derivative(rng, NH):
    B, T, HS = 2, 5, 2                                   # odd T
    C = NH * HS
    x, dout = rng.standard_normal((B, T, 3 * C)), rng.standard_normal((B, T, C))
    buf = _buffers(B, T, NH, HS, np.float64)

    def loss():
        ref.attention_forward(buf["out"], buf["qkvr"], buf["att"], x)
        return (buf["out"] * dout).sum()

    loss()
    att = buf["att"]
    assert np.all(np.triu(att, 1) == 0.0), "att above the diagonal must be exactly 0"
    assert_close(att.sum(-1), np.ones((B, NH, T)), atol=1e-12, name="rows sum to 1")
    ref.attention_backward(buf["dinp"], buf["dqkvr"], buf["datt"], buf["scratch"], dout, buf["qkvr"], att)
    assert_close(buf["dinp"], numerical_grad(loss, x), atol=1e-8, name="dinp")


def test_matches_torch(rng):
    torch = pytest.importorskip("torch")
    B, T, NH, HS = 2, 7, 3, 8
    C = NH * HS
    x = rng.standard_normal((B, T, 3 * C), dtype=np.float32)
    dout = rng.standard_normal((B, T, C), dtype=np.float32)
    buf = _buffers(B, T, NH, HS, np.float32)
    ref.attention_forward(buf["out"], buf["qkvr"], buf["att"], x)
    ref.attention_backward(buf["dinp"], buf["dqkvr"], buf["datt"], buf["scratch"], dout,
                           buf["qkvr"], buf["att"])

    x_t = torch.tensor(x, requires_grad=True)
    q, k, v = (t.reshape(B, T, NH, HS).transpose(1, 2) for t in x_t.split(C, dim=-1))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    out_t = y.transpose(1, 2).reshape(B, T, C)
    out_t.backward(torch.from_numpy(dout))
    scores = (q @ k.transpose(-1, -2)) / HS ** 0.5
    att_t = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)

    assert_close(buf["qkvr"][1], k.detach().numpy(), name="qkvr holds k as (B, NH, T, HS)")
    assert_close(buf["att"], att_t.detach().numpy(), atol=1e-6, name="att")
    assert_close(buf["out"], out_t.detach().numpy(), atol=1e-5, rtol=1e-5, name="out")
    assert_close(buf["dinp"], x_t.grad.numpy(), atol=1e-5, rtol=1e-5, name="dinp")
    assert buf["out"].dtype == buf["dinp"].dtype == np.float32


def test_flash_reference_matches_torch(rng):
    """The fused variant's contract (flash_attention_forward/backward): the same attention, a
    log-sum-exp per row, and the gradient recomputed from it, against PyTorch's SDPA and logsumexp."""
    torch = pytest.importorskip("torch")
    B, T, NH, HS = 2, 9, 3, 4
    C = NH * HS
    x = rng.standard_normal((B, T, 3 * C))
    dout = rng.standard_normal((B, T, C))
    out, lse = np.empty((B, T, C)), np.empty((B, NH, T))
    x_before = x.copy()
    ref.flash_attention_forward(out, lse, x)
    dinp, delta = np.full((B, T, 3 * C), np.nan), np.empty((B, NH, T))
    ref.flash_attention_backward(dinp, delta, dout, x, out, lse)
    assert np.array_equal(x, x_before), "the input is read only"

    x_t = torch.tensor(x, requires_grad=True)
    q, k, v = (t.reshape(B, T, NH, HS).transpose(1, 2) for t in x_t.split(C, dim=-1))
    out_t = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
    out_t.backward(torch.from_numpy(dout))
    scores = (q @ k.transpose(-1, -2)) / HS ** 0.5
    lse_t = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).logsumexp(-1)
    assert_close(out, out_t.detach().numpy(), atol=1e-12, name="out")
    assert_close(lse, lse_t.detach().numpy(), atol=1e-12, name="lse")
    assert_close(dinp, x_t.grad.numpy(), atol=1e-12, name="dinp")
    assert_close(delta, (dout * out).reshape(B, T, NH, HS).sum(-1).transpose(0, 2, 1), atol=1e-12, name="delta")


# -------------------------------------------------------------------------------------------------
# grouped-query attention (separate q, k, v; NKV kv heads shared by groups of NH / NKV query heads)


def _gqa_case(rng, B, T, NH, NKV, HS, dtype):
    q = rng.standard_normal((B, T, NH, HS)).astype(dtype)
    k, v = rng.standard_normal((2, B, T, NKV, HS)).astype(dtype)
    return q, k, v, rng.standard_normal((B, T, NH, HS)).astype(dtype)


@pytest.mark.parametrize("NH,NKV", [(4, 2), (3, 1), (2, 2)])
def test_gqa_backward_is_the_derivative(rng, NH, NKV):
    B, T, HS = 2, 5, 2
    q, k, v, dout = _gqa_case(rng, B, T, NH, NKV, HS, np.float64)
    out, att = np.empty((B, T, NH, HS)), np.empty((B, NH, T, T))

    def loss():
        ref.gqa_attention_forward(out, att, q, k, v)
        return (out * dout).sum()

    loss()
    assert np.all(np.triu(att, 1) == 0.0), "att above the diagonal must be exactly 0"
    grads = [np.full_like(a, np.nan) for a in (q, k, v)]
    ref.gqa_attention_backward(*grads, np.empty_like(att), dout, q, k, v, att)
    for name, x, g in zip("qkv", (q, k, v), grads):
        assert_close(g, numerical_grad(loss, x), atol=1e-8, name="d" + name)


@pytest.mark.parametrize("NH,NKV", [(4, 2), (4, 1), (3, 3)])
def test_gqa_matches_torch_and_flash_contract(rng, NH, NKV):
    torch = pytest.importorskip("torch")
    B, T, HS = 2, 7, 8
    q, k, v, dout = _gqa_case(rng, B, T, NH, NKV, HS, np.float32)
    out, att = np.empty((B, T, NH, HS), np.float32), np.empty((B, NH, T, T), np.float32)
    ref.gqa_attention_forward(out, att, q, k, v)
    dq, dk, dv = (np.empty_like(a) for a in (q, k, v))
    ref.gqa_attention_backward(dq, dk, dv, np.empty_like(att), dout, q, k, v, att)

    leaves = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
    y = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves), is_causal=True,
                                                         enable_gqa=True).transpose(1, 2)
    y.backward(torch.from_numpy(dout))
    assert_close(out, y.detach().numpy(), atol=1e-5, rtol=1e-5, name="out")
    for name, got, leaf in zip("qkv", (dq, dk, dv), leaves):
        assert_close(got, leaf.grad.numpy(), atol=1e-5, rtol=1e-5, name="d" + name)

    fout, lse = np.empty_like(out), np.empty((B, NH, T), np.float32)
    ref.gqa_flash_attention_forward(fout, lse, q, k, v)
    fgrads = [np.empty_like(a) for a in (q, k, v)]
    ref.gqa_flash_attention_backward(*fgrads, np.empty_like(lse), dout, q, k, v, fout, lse)
    assert_close(fout, out, atol=1e-6, name="flash out")
    for name, got, want in zip("qkv", fgrads, (dq, dk, dv)):
        assert_close(got, want, atol=1e-5, rtol=1e-5, name="flash d" + name)


def test_gqa_with_all_kv_heads_equals_packed_attention(rng):
    """NKV = NH is GPT-2's multi-head attention: the packed-qkv op gives the same numbers."""
    B, T, NH, HS = 1, 6, 2, 4
    q, k, v, dout = _gqa_case(rng, B, T, NH, NH, HS, np.float64)
    out, att = np.empty((B, T, NH, HS)), np.empty((B, NH, T, T))
    ref.gqa_attention_forward(out, att, q, k, v)
    buf = _buffers(B, T, NH, HS, np.float64)
    ref.attention_forward(buf["out"], buf["qkvr"], buf["att"],
                          np.concatenate([a.reshape(B, T, -1) for a in (q, k, v)], -1))
    assert_close(out.reshape(B, T, -1), buf["out"], atol=1e-14, name="out")

"""Causal multi-head self-attention in NumPy: the reference for cuda/attention.cu.

softmax(q k^T / sqrt(HS) + causal mask) v per head (Vaswani et al., https://arxiv.org/abs/1706.03762;
torch.nn.functional.scaled_dot_product_attention(is_causal=True),
https://pytorch.org/docs/stable/generated/torch.nn.functional.scaled_dot_product_attention.html).
The layout follows llm.c's non-cuDNN path: q, k, v are permuted to (B, NH, T, HS) and saved as qkvr,
the probabilities are saved as att (B, NH, T, T) with an exactly-zero upper triangle. The products are
batched np.matmul calls over (B, NH), one small BLAS GEMM per head.
"""
import functools
import math

import numpy as np


@functools.cache
def _future(T):
    """(T, T) bool, True strictly above the diagonal: the keys a query may not see."""
    return np.triu(np.ones((T, T), dtype=bool), k=1)


def _heads(x, NH):
    """View (B, T, NH*HS) as (B, NH, T, HS) without copying."""
    B, T, C = x.shape
    return x.reshape(B, T, NH, C // NH).transpose(0, 2, 1, 3)


def attention_forward(out, qkvr, att, inp):
    """Causal self-attention from packed q|k|v.

    inp (B, T, 3C): q, k, v side by side, each C = NH heads of HS channels.
    qkvr (3, B, NH, T, HS): overwritten with the permuted q, k, v (saved for the backward).
    att (B, NH, T, T): overwritten with the softmax probabilities; the upper triangle is 0.
    out (B, T, C): overwritten with the heads' outputs, concatenated.
    """
    B, T = inp.shape[:2]
    NH, HS = qkvr.shape[2], qkvr.shape[4]
    qkvr[...] = inp.reshape(B, T, 3, NH, HS).transpose(2, 0, 3, 1, 4)
    q, k, v = qkvr
    np.matmul(q, k.swapaxes(-1, -2), out=att)            # (B, NH, T, T) unscaled scores
    att *= 1.0 / math.sqrt(HS)
    np.copyto(att, -np.inf, where=_future(T))            # exp(-inf) = 0: an exact zero triangle
    att -= att.max(axis=-1, keepdims=True)               # the diagonal is always finite
    np.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    np.matmul(att, v, out=_heads(out, NH))               # (B, NH, T, HS) written into (B, T, C)


def attention_backward(dinp, dqkvr, datt, scratch, dout, qkvr, att):
    """Gradient of attention_forward with respect to its packed input.

    dinp (B, T, 3C): OVERWRITTEN with d(q|k|v). dout (B, T, C); qkvr and att as saved by the forward.
    dqkvr (3, B, NH, T, HS), datt (B, NH, T, T) and scratch (B, NH, T, HS) are scratch, overwritten.
    """
    B, T = dinp.shape[:2]
    NH, HS = qkvr.shape[2], qkvr.shape[4]
    scratch[...] = _heads(dout, NH)                          # dy per head (B, NH, T, HS)
    _softmax_attention_backward(dqkvr, datt, scratch, qkvr, att)
    dinp.reshape(B, T, 3, NH, HS, copy=False)[...] = dqkvr.transpose(1, 3, 0, 2, 4)


def _softmax_attention_backward(dqkv, datt, dy, qkv, att, rowdot=None):
    """dq, dk, dv (dqkv: three (B, NH, T, HS) outputs) of y = att v, att = softmax(q k^T / sqrt(HS)),
    from dy. datt (B, NH, T, T) is scratch. rowdot (B, NH, T): sum_j att_j datt_j, computed from datt
    when None (the fused variant passes rowsum(dout * out), the same number)."""
    q, k, v = qkv
    dq, dk, dv = dqkv
    np.matmul(dy, v.swapaxes(-1, -2), out=datt)              # d att
    np.matmul(att.swapaxes(-1, -2), dy, out=dv)
    # softmax backward, in place: dscore_j = p_j (datt_j - sum_i p_i datt_i), times the scale.
    # p is 0 above the diagonal, so those entries come out exactly 0.
    if rowdot is None:
        rowdot = np.einsum("...j,...j->...", att, datt)
    datt -= rowdot[..., None]
    datt *= att
    datt *= 1.0 / math.sqrt(q.shape[-1])
    np.matmul(datt, k, out=dq)
    np.matmul(datt.swapaxes(-1, -2), q, out=dk)


# -------------------------------------------------------------------------------------------------
# The fused (flash) variant's contract, for cuda/flash_attention.cu: the same attention, reading q, k, v
# from inp in place and saving one log-sum-exp per row instead of qkvr and att.


def _scaled_logits(inp, NH):
    """(q.k / sqrt(HS) with -inf above the diagonal (B, NH, T, T), the q, k, v views (3, B, NH, T, HS))."""
    B, T, C3 = inp.shape
    HS = C3 // 3 // NH
    qkvr = inp.reshape(B, T, 3, NH, HS).transpose(2, 0, 3, 1, 4)
    logits = np.matmul(qkvr[0], qkvr[1].swapaxes(-1, -2)) * (1.0 / math.sqrt(HS))
    np.copyto(logits, -np.inf, where=_future(T))
    return logits, qkvr


def flash_attention_forward(out, lse, inp):
    """inp (B, T, 3C) read only; out (B, T, C) and lse (B, NH, T) overwritten (lse: the natural log of
    each row's softmax denominator over the scaled logits q.k / sqrt(HS))."""
    NH = lse.shape[1]
    logits, qkvr = _scaled_logits(inp, NH)
    top = logits.max(axis=-1, keepdims=True)                 # the diagonal is always finite
    lse[...] = top[..., 0] + np.log(np.exp(logits - top).sum(axis=-1))
    np.matmul(np.exp(logits - lse[..., None]), qkvr[2], out=_heads(out, NH))


def flash_attention_backward(dinp, delta, dout, inp, out, lse):
    """Gradient of flash_attention_forward from what it saved: dinp (B, T, 3C) OVERWRITTEN; delta
    (B, NH, T) overwritten with rowsum(dout * out) per head, which equals sum_j p_j datt_j of the
    softmax backward (scratch on the GPU). The probabilities are recomputed as exp(logits - lse)."""
    B, T = dinp.shape[:2]
    NH = lse.shape[1]
    HS = dinp.shape[2] // 3 // NH
    delta[...] = np.einsum("bthd,bthd->bht", dout.reshape(B, T, NH, HS), out.reshape(B, T, NH, HS))
    logits, qkvr = _scaled_logits(inp, NH)
    att = np.exp(logits - lse[..., None])                    # exactly 0 above the diagonal
    dqkv = dinp.reshape(B, T, 3, NH, HS).transpose(2, 0, 3, 1, 4)    # views into dinp
    _softmax_attention_backward(dqkv, logits, _heads(dout, NH), qkvr, att, rowdot=delta)   # logits: scratch


# -------------------------------------------------------------------------------------------------
# Grouped-query attention (nanochat's model, llmpy/nanochat.py): q, k, v arrive as separate tensors,
# q (B, T, NH, HS) and k, v (B, T, NKV, HS) with NKV dividing NH (NKV = NH: multi-head, 1: multi-query).
# Query head h reads kv head h // G, G = NH / NKV (torch's enable_gqa, i.e. repeat_interleave of k, v).
# k and v are never copied per query head: the G query heads of a group are stacked along the row axis,
# (B, NKV, G*T, HS), so one GEMM per (batch, kv head) covers the group and dk, dv's sum over the group
# is the GEMM's own contraction. The probabilities att (B, NH, T, T) are the same array viewed as
# (B, NKV, G*T, T).


def _group_rows(x, NKV):
    """(B, T, NH, HS) -> (B, NKV, G*T, HS), rows ordered (g, t): a copy (q or dout, never k or v)."""
    B, T, NH, HS = x.shape
    return x.reshape(B, T, NKV, NH // NKV, HS).transpose(0, 2, 3, 1, 4).reshape(B, NKV, -1, HS)


def _ungroup_rows(dst, x):
    """Write (B, NKV, G*T, HS) back into dst (B, T, NH, HS), the inverse of _group_rows."""
    B, T, NH, HS = dst.shape
    NKV = x.shape[1]
    dst.reshape(B, T, NKV, NH // NKV, HS, copy=False)[...] = \
        x.reshape(B, NKV, NH // NKV, T, HS).transpose(0, 3, 1, 2, 4)


def _kv_heads(x):
    """(B, T, NKV, HS) -> (B, NKV, T, HS) view."""
    return x.transpose(0, 2, 1, 3)


def _gqa_logits(q, k):
    """Scaled causal logits (B, NH, T, T) with -inf above the diagonal, and q grouped (B, NKV, G*T, HS)."""
    B, T, NH, HS = q.shape
    NKV = k.shape[2]
    qg = _group_rows(q, NKV)
    logits = np.matmul(qg, _kv_heads(k).swapaxes(-1, -2)).reshape(B, NH, T, T)
    logits *= 1.0 / math.sqrt(HS)
    np.copyto(logits, -np.inf, where=_future(T))
    return logits, qg


def gqa_attention_forward(out, att, q, k, v):
    """Causal grouped-query attention, scale 1 / sqrt(HS).

    q (B, T, NH, HS); k, v (B, T, NKV, HS); any strides, read only.
    att (B, NH, T, T): overwritten with the softmax probabilities (upper triangle exactly 0).
    out (B, T, NH, HS), contiguous: overwritten with the heads' outputs ((B, T, NH*HS) as a view).
    """
    B, T, NH, HS = q.shape
    NKV = k.shape[2]
    logits, _ = _gqa_logits(q, k)
    att[...] = logits
    att -= att.max(axis=-1, keepdims=True)                   # the diagonal is always finite
    np.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    y = np.matmul(att.reshape(B, NKV, -1, T), _kv_heads(v))  # (B, NKV, G*T, HS)
    _ungroup_rows(out, y)


def _gqa_backward(dq, dk, dv, datt, att, dout, q, k, v, rowdot=None):
    """dq, dk, dv (OVERWRITTEN) of out = softmax(q k^T / sqrt(HS)) v from dout; att (B, NH, T, T) the
    probabilities, datt (B, NH, T, T) scratch; rowdot (B, NH, T) = sum_j att_j datt_j, computed when None."""
    B, T, NH, HS = q.shape
    NKV = k.shape[2]
    att_g, datt_g = att.reshape(B, NKV, -1, T), datt.reshape(B, NKV, -1, T)
    dy = _group_rows(dout, NKV)
    np.matmul(dy, _kv_heads(v).swapaxes(-1, -2), out=datt_g)                 # d att
    _kv_heads(dv)[...] = np.matmul(att_g.swapaxes(-1, -2), dy)              # sums over the group's rows
    if rowdot is None:
        rowdot = np.einsum("...j,...j->...", att, datt)
    datt -= rowdot[..., None]
    datt *= att                                                              # 0 above the diagonal
    datt *= 1.0 / math.sqrt(HS)
    _ungroup_rows(dq, np.matmul(datt_g, _kv_heads(k)))
    _kv_heads(dk)[...] = np.matmul(datt_g.swapaxes(-1, -2), _group_rows(q, NKV))


def gqa_attention_backward(dq, dk, dv, datt, dout, q, k, v, att):
    """Gradient of gqa_attention_forward: dq (B, T, NH, HS), dk, dv (B, T, NKV, HS) OVERWRITTEN (dk, dv
    summed over each kv head's query group); dout (B, T, NH, HS); att as saved by the forward;
    datt (B, NH, T, T) scratch."""
    _gqa_backward(dq, dk, dv, datt, att, dout, q, k, v)


def gqa_flash_attention_forward(out, lse, q, k, v):
    """The fused variant's contract: out as gqa_attention_forward; lse (B, NH, T) overwritten with the
    log of each row's softmax denominator over the scaled logits; no T x T array is saved."""
    B, T, NH, HS = q.shape
    logits, _ = _gqa_logits(q, k)
    top = logits.max(axis=-1, keepdims=True)
    lse[...] = top[..., 0] + np.log(np.exp(logits - top).sum(axis=-1))
    y = np.matmul(np.exp(logits - lse[..., None]).reshape(B, k.shape[2], -1, T), _kv_heads(v))
    _ungroup_rows(out, y)


def gqa_flash_attention_backward(dq, dk, dv, delta, dout, q, k, v, out, lse):
    """Gradient of gqa_flash_attention_forward from what it saved: dq, dk, dv OVERWRITTEN; delta (B, NH, T)
    overwritten with rowsum(dout * out) per head; the probabilities are recomputed as exp(logits - lse)."""
    delta[...] = np.einsum("bthd,bthd->bht", dout, out)
    logits, _ = _gqa_logits(q, k)
    att = np.exp(logits - lse[..., None])
    _gqa_backward(dq, dk, dv, logits, att, dout, q, k, v, rowdot=delta)     # logits: scratch

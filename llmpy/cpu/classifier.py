"""Fused softmax + cross-entropy + logits gradient in NumPy: the reference for cuda/classifier.cu.

For each (b, t) row over the first V (real) columns of the padded logits:
loss = -log softmax(logits)[target] and dlogits = (softmax(logits) - onehot(target)) * dloss, as
torch.nn.functional.cross_entropy(reduction="none"),
https://pytorch.org/docs/stable/generated/torch.nn.functional.cross_entropy.html.
Rows are processed in chunks so the max, exp and sum passes over the 50257 columns stay in cache.

With softcap = c > 0 (nanochat's model: c = 15) the loss is taken over z = c tanh(logits / c), fused:
the logits stay raw and dlogits is the gradient with respect to them, dz * (1 - tanh^2), as torch's
tanh backward (1 - y^2). softcap_forward applies the same cap on its own, for logits that are read
rather than trained on (sampling, evaluation).
"""
import numpy as np

CHUNK_ELEMENTS = 1 << 18   # rows per chunk = this // V: ~1 MiB of float32, about one core's L2


def softcap_forward(out, inp, softcap):
    """out = softcap * tanh(inp / softcap), elementwise; out may be the same array as inp. Overwrites out."""
    np.divide(inp, softcap, out=out)        # x / c, not x * (1 / c): the same rounding as torch
    np.tanh(out, out=out)
    out *= softcap


def fused_classifier(dlogits, losses, logits, targets, dloss, V, *, softcap=0.0):
    """Per-token cross-entropy and its gradient, fused.

    logits (B, T, Vp), only the first V columns real; targets (B, T) int32 in [0, V); dloss: float,
    the weight of each token's loss (1 / (B*T*grad_accum) when training).
    losses (B, T) ACCUMULATES += -log softmax(logits)[target].
    dlogits (B, T, Vp) is OVERWRITTEN with (softmax - onehot) * dloss in columns < V and 0 in the padded
    columns; it may be the same array as logits (in place), or None to compute only the losses.
    softcap > 0: the loss of softcap * tanh(logits / softcap), dlogits with respect to the raw logits.
    """
    dloss = float(dloss)          # a Python float stays weakly typed: float32 math stays float32
    Vp = logits.shape[-1]
    logits2 = logits.reshape(-1, Vp)
    losses1 = losses.reshape(-1, copy=False)
    targets1 = targets.reshape(-1)
    n_rows = logits2.shape[0]
    step = max(1, CHUNK_ELEMENTS // V)
    if dlogits is None:
        work_buf = np.empty((min(step, n_rows), V), dtype=logits.dtype)
    else:
        dlogits2 = dlogits.reshape(-1, Vp, copy=False)
        dlogits2[:, V:] = 0.0
    if softcap > 0:
        tanh_buf = np.empty((min(step, n_rows), V), dtype=logits.dtype)   # kept for the derivative
    for r0 in range(0, n_rows, step):
        r1 = min(r0 + step, n_rows)
        x = logits2[r0:r1, :V]
        work = work_buf[:r1 - r0] if dlogits is None else dlogits2[r0:r1, :V]
        rows = np.arange(r1 - r0)
        tgt = targets1[r0:r1]
        if softcap > 0:
            th = tanh_buf[:r1 - r0]
            np.divide(x, softcap, out=th)
            np.tanh(th, out=th)
            x = np.multiply(th, softcap, out=work)               # the capped logits z
        np.subtract(x, x.max(axis=1, keepdims=True), out=work)   # shift by the row max: exp <= 1
        shifted_target = work[rows, tgt]                         # read before exp (work may be logits)
        np.exp(work, out=work)
        total = work.sum(axis=1)
        # -log p_target = log(sum exp) - shifted logit of the target
        losses1[r0:r1] += np.log(total) - shifted_target
        if dlogits is not None:
            work *= (dloss / total)[:, None]
            work[rows, tgt] -= dloss
            if softcap > 0:                                      # dz/dx = 1 - tanh^2
                np.multiply(th, th, out=th)
                np.subtract(1.0, th, out=th)
                work *= th

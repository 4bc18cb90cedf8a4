"""Token + position embedding in NumPy: the reference for cuda/encoder.cu.

GPT-2's input layer (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"):
out[b, t] = wte[inp[b, t]] + wpe[t]. Works in any float dtype (float32 to train, float64 to test).
wpe None (dwpe None in the backward) is a plain token embedding, for models with rotary positions
(llmpy/nanochat.py).
"""
import numpy as np


def encoder_forward(out, inp, wte, wpe):
    """out = wte[inp] + wpe[:T]: look up token and position embeddings and add them.

    out (B, T, C) float; inp (B, T) int32 token ids in [0, V); wte (Vp, C); wpe (maxT, C), T <= maxT,
    or None (no position embedding). Overwrites out.
    """
    T = inp.shape[1]
    np.take(wte, inp, axis=0, out=out)   # gather rows: (B, T, C)
    if wpe is not None:
        out += wpe[:T]                  # broadcasts over B


def encoder_backward(dwte, dwpe, dout, inp, *, seed=0):
    """Scatter dout back to the embedding rows that produced it.

    dwte (Vp, C); dwpe (maxT, C) or None (no position embedding); dout (B, T, C); inp (B, T) int32.
    ACCUMULATES: dwte[inp[b, t]] += dout[b, t] and dwpe[t] += sum_b dout[b, t].
    seed, which seeds the GPU's stochastic rounding of bf16 gradients, is accepted for the same
    signature; float32 sums need no rounding.
    """
    del seed
    T, C = inp.shape[1], dout.shape[-1]
    if dwpe is not None:
        dwpe[:T] += dout.sum(axis=0)
    # A token may occur many times. Sort the (b, t) rows by token and sum each token's run with
    # reduceat, then add once per distinct token: deterministic, and faster than np.add.at.
    tokens = inp.reshape(-1)
    order = np.argsort(tokens, kind="stable")
    distinct, starts = np.unique(tokens[order], return_index=True)
    dwte[distinct] += np.add.reduceat(dout.reshape(-1, C)[order], starts, axis=0)

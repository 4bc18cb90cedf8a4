"""Autoregressive sampling from a GPT model, llm.c-style: a fixed-seed xorshift coin per token. GPT-2 and
the GPU engines run without a KV cache (a forward over the whole sequence per token); models that offer
one (nanochat's CPU model, `model.kv_cache(max_len).feed(tokens)`) feed each new token once.

With temperature 1 and no top-k this draws exactly as llm.c's trainer does: the first index whose running
sum of probabilities exceeds a uniform coin. The coins come from llmpy.rng.XorShiftStar, so a given seed,
model and prompt always produce the same tokens.
"""
from __future__ import annotations

import numpy as np

from llmpy.errors import LlmpyError


def sample_index(logits: np.ndarray, coin: float, *, temperature: float = 1.0, top_k: int = 0) -> int:
    """Index drawn from softmax(logits / temperature), restricted to the top_k largest when top_k > 0.
    logits: float (V,) on the host; coin: uniform in [0, 1)."""
    z = logits.astype(np.float64) / max(temperature, 1e-8)
    if 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    cdf = np.cumsum(p)
    idx = int(np.searchsorted(cdf, coin * cdf[-1], side="right"))
    return min(idx, z.size - 1)


def generate(model, prompt: list[int], num_tokens: int, rng, *, temperature: float = 1.0, top_k: int = 0,
             max_len: int | None = None, on_token=None) -> list[int]:
    """Extend `prompt` (non-empty token ids) by num_tokens tokens and return all tokens.

    Each step runs a batch-1 forward over the sequence so far, padded up to a multiple of 64 tokens
    (causal attention makes the padding invisible to earlier positions, and few distinct shapes keep
    the activation cache small). rng: llmpy.rng.XorShiftStar. on_token(id) is called as tokens arrive.
    """
    cfg = model.config
    max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
    tokens = list(prompt)
    if getattr(model, "kv_cache", None) is not None:   # with a KV cache (llmpy/nanochat.py): only new tokens
        return _generate_cached(model.kv_cache(max_len), tokens, num_tokens, rng, max_len,
                                dict(temperature=temperature, top_k=top_k), on_token)
    pad = min(64, max_len)
    for _ in range(num_tokens):
        if len(tokens) >= max_len:
            break
        n = len(tokens)
        T = min(-(-n // pad) * pad, max_len)
        buf = np.zeros((1, T), dtype=np.int32)
        buf[0, :n] = tokens
        logits = model.forward(model.xp.asarray(buf))
        row = logits[0, n - 1, :cfg.vocab_size]
        row = np.asarray(row.get() if hasattr(row, "get") else row, dtype=np.float32)
        if not np.isfinite(row).all():   # a cumulative sum over NaN would pick an arbitrary token
            raise LlmpyError(f"the model's next-token scores after {n} tokens are not finite (NaN/Inf); "
                             "the model is damaged or diverged")
        tok = sample_index(row, rng.random_f32(), temperature=temperature, top_k=top_k)
        tokens.append(tok)
        if on_token is not None:
            on_token(tok)
    return tokens


def _generate_cached(cache, tokens: list[int], num_tokens: int, rng, max_len: int, how: dict, on_token):
    """generate() through a KV cache: the prompt in one feed, then one token per feed."""
    row = cache.feed(tokens)
    for _ in range(num_tokens):
        if len(tokens) >= max_len:
            break
        tok = sample_index(np.asarray(row, dtype=np.float32), rng.random_f32(), **how)
        tokens.append(tok)
        if on_token is not None:
            on_token(tok)
        if len(tokens) < max_len:
            row = cache.feed([tok])
    return tokens

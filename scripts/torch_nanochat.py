"""PyTorch nanochat GPT holding llmpy's weights: the reference side of scripts/bench_train.py for
`-e nanochat:dN[:kvK]`.

PlainNanoChat is the spec of llmpy/nanochat.py in plain torch.nn (nn.Linear's (out, in) layout, no
biases, so llmpy's tensors load without transposes): embedding, weightless RMSNorm (F.rms_norm, eps 1e-6),
per block RoPE (base 10000) then QK-norm on q and k, causal attention with n_kv_head key/value heads
shared by groups of query heads, ReLU² MLP, untied lm_head and the 15 tanh(x / 15) softcap. wte and
lm_head keep the padded Vp rows; the loss reads the first V logits. Attention "sdpa" is
F.scaled_dot_product_attention(is_causal=True, enable_gqa=True) (flash attention on the GPU); "eager"
is the masked softmax. torch.compile-friendly.

optimizers(...) returns what llmpy's --optimizer trains with: AdamW on every tensor (weight decay on all,
they are all matrices), or Muon (momentum 0.95, Nesterov, 5 quintic Newton-Schulz iterations, step
scaled by max(1, rows/cols)^0.5; bf16 on the GPU, float32 on the CPU as llmpy.cpu) on the block
matrices and AdamW on wte and lm_head.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmpy.model import carve
from llmpy.nanochat import MATRICES, NanoChatConfig, param_shapes

NS_COEFFS = (3.4445, -4.7750, 2.0315)
LAYER_TENSORS = {"c_q": "q", "c_k": "k", "c_v": "v", "attn_proj": "proj", "c_fc": "fc", "mlp_proj": "fcproj"}


def _norm(x):
    return F.rms_norm(x, (x.shape[-1],), eps=1e-6)


class NanoChatBlock(nn.Module):
    def __init__(self, cfg: NanoChatConfig, attn: str):
        super().__init__()
        C, D = cfg.n_embd, cfg.head_dim
        self.NH, self.NKV, self.D, self.attn = cfg.n_head, cfg.n_kv_head, D, attn
        self.q = nn.Linear(C, cfg.n_head * D, bias=False)
        self.k = nn.Linear(C, cfg.n_kv_head * D, bias=False)
        self.v = nn.Linear(C, cfg.n_kv_head * D, bias=False)
        self.proj = nn.Linear(C, C, bias=False)
        self.fc = nn.Linear(C, 4 * C, bias=False)
        self.fcproj = nn.Linear(4 * C, C, bias=False)

    @staticmethod
    def _rotate(x, cos, sin):
        half = x.shape[-1] // 2
        a, b = x[..., :half], x[..., half:]
        return torch.cat((a * cos + b * sin, b * cos - a * sin), dim=-1)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        h = _norm(x)
        q = _norm(self._rotate(self.q(h).view(B, T, self.NH, self.D), cos, sin)).transpose(1, 2)
        k = _norm(self._rotate(self.k(h).view(B, T, self.NKV, self.D), cos, sin)).transpose(1, 2)
        v = self.v(h).view(B, T, self.NKV, self.D).transpose(1, 2)
        if self.attn == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.NKV != self.NH)
        else:
            group = self.NH // self.NKV
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            scores = (q @ k.transpose(-2, -1)) * self.D ** -0.5
            future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            y = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.fcproj(F.relu(self.fc(_norm(x))).square())


class PlainNanoChat(nn.Module):
    def __init__(self, cfg: NanoChatConfig, *, attn: str = "sdpa"):
        super().__init__()
        self.V = cfg.vocab_size
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(NanoChatBlock(cfg, attn) for _ in range(cfg.n_layer))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        D = cfg.head_dim
        freq = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
        angle = torch.outer(torch.arange(cfg.sequence_len, dtype=torch.float64), freq)
        self.register_buffer("cos", angle.cos().float()[:, None, :], persistent=False)   # (T, 1, D/2)
        self.register_buffer("sin", angle.sin().float()[:, None, :], persistent=False)

    def forward(self, idx, targets):
        T = idx.shape[1]
        cos, sin = self.cos[:T], self.sin[:T]
        x = _norm(self.wte(idx))
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(_norm(x))[..., :self.V].float()
        logits = 15.0 * torch.tanh(logits / 15.0)
        return F.cross_entropy(logits.reshape(-1, self.V), targets.reshape(-1))

    @torch.no_grad()
    def load_flat(self, cfg: NanoChatConfig, flat: np.ndarray) -> "PlainNanoChat":
        """Copy llmpy's flat float32 parameters (llmpy/nanochat.py's order) in."""
        p = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in carve(flat, param_shapes(cfg)).items()}
        self.wte.weight.copy_(p["wte"])
        self.lm_head.weight.copy_(p["lm_head"])
        for i, block in enumerate(self.blocks):
            for name, attr in LAYER_TENSORS.items():
                getattr(block, attr).weight.copy_(p[name][i])
        return self


class Muon(torch.optim.Optimizer):
    """nanochat's Muon for 2-D weights: see the module docstring. ns_dtype: bf16 on the GPU."""

    def __init__(self, params, *, lr: float, beta: float = 0.95, ns_dtype=torch.float32):
        super().__init__(params, dict(lr=lr, beta=beta))
        self.ns_dtype = ns_dtype

    def _orthogonalise(self, g):
        a, b, c = NS_COEFFS
        x = g.to(self.ns_dtype)
        wide = x.shape[0] > x.shape[1]
        if wide:
            x = x.T
        x = x / (x.norm() + 1e-7)
        for _ in range(5):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        return (x.T if wide else x).to(g.dtype)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta = group["beta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - beta)
                update = p.grad.lerp(buf, beta)
                rows, cols = p.shape
                p.add_(self._orthogonalise(update), alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)


def optimizers(model: PlainNanoChat, optimizer: str, *, lr: float, muon_lr: float, weight_decay: float,
               cuda: bool, **adamw_kw) -> list:
    """The torch optimizers matching llmpy's --optimizer (adamw or muon) for this model."""
    matrices = [getattr(block, LAYER_TENSORS[name]).weight for block in model.blocks for name in MATRICES]
    if optimizer == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **adamw_kw)]
    muon = Muon(matrices, lr=muon_lr, ns_dtype=torch.bfloat16 if cuda else torch.float32)
    rest = [model.wte.weight, model.lm_head.weight]
    return [muon, torch.optim.AdamW(rest, lr=lr, weight_decay=weight_decay, **adamw_kw)]

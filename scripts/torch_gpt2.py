"""PyTorch GPT-2 models holding llmpy's weights: the reference side of scripts/bench_train.py.

Two models, both built from llmpy's flat float32 parameter buffer (llm.c's tensor order), so the two
implementations start a benchmark from the same checkpoint:

  hf_gpt2(...)     Hugging Face transformers' GPT2LMHeadModel (vocabulary V, dropout 0), the model most
                   PyTorch users train; attention "eager" (materialized softmax, as llmpy) or "sdpa".
  PlainGPT2(...)   GPT-2 in plain torch.nn with nn.Linear's (out, in) layout, so llmpy's tensors load
                   without transposes; wte keeps the padded Vp rows (matmuls tile evenly, as llm.c's
                   train_gpt2.py with padding) and the loss reads only the first V logits. Attention is
                   F.scaled_dot_product_attention(is_causal=True) ("sdpa": flash attention on the GPU)
                   or the explicit masked softmax ("eager"). torch.compile-friendly (no Python branches
                   on tensor values).

Both return the mean cross-entropy of next-token prediction for (inp, targets), like llmpy's
GPT.forward + fused_classifier. Parameters that are matrices (p.dim() >= 2: wte, wpe and the four
projections) take weight decay, as llmpy.model.DECAYED.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmpy.model import GPTConfig, carve, param_shapes

# -------------------------------------------------------------------------------------------------
# Plain torch GPT-2


class Block(nn.Module):
    def __init__(self, C: int, NH: int, attn: str):
        super().__init__()
        self.NH, self.attn = NH, attn
        self.ln1, self.ln2 = nn.LayerNorm(C, eps=1e-5), nn.LayerNorm(C, eps=1e-5)
        self.qkv, self.attproj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.fc, self.fcproj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.NH, C // self.NH).permute(2, 0, 3, 1, 4)
        if self.attn == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:   # (B, NH, T, T) probabilities materialized, as llmpy's attention_forward
            s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(C // self.NH))
            future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            y = torch.softmax(s.masked_fill(future, float("-inf")), dim=-1) @ v
        x = x + self.attproj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.fcproj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class PlainGPT2(nn.Module):
    """GPT-2 with llm.c's parameter layout; forward(inp, targets) -> mean loss over the first V logits."""

    def __init__(self, cfg: GPTConfig, *, attn: str = "sdpa"):
        super().__init__()
        C, self.V = cfg.channels, cfg.vocab_size
        self.wte = nn.Embedding(cfg.padded_vocab_size, C)
        self.wpe = nn.Embedding(cfg.max_seq_len, C)
        self.blocks = nn.ModuleList(Block(C, cfg.num_heads, attn) for _ in range(cfg.num_layers))
        self.lnf = nn.LayerNorm(C, eps=1e-5)

    def forward(self, inp, targets):
        T = inp.shape[1]
        x = self.wte(inp) + self.wpe(torch.arange(T, device=inp.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lnf(x) @ self.wte.weight.T           # tied LM head, (B, T, Vp)
        return F.cross_entropy(logits[..., :self.V].float().flatten(0, 1), targets.flatten())

    @torch.no_grad()
    def load_flat(self, cfg: GPTConfig, flat: np.ndarray):
        """Copy llmpy's flat float32 parameters (llm.c order) into this model."""
        p = carve(np.asarray(flat, dtype=np.float32), param_shapes(cfg))
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        self.wte.weight.copy_(t(p["wte"]))
        self.wpe.weight.copy_(t(p["wpe"]))
        self.lnf.weight.copy_(t(p["lnfw"]))
        self.lnf.bias.copy_(t(p["lnfb"]))
        for l, blk in enumerate(self.blocks):
            for mod, w, b in ((blk.ln1, "ln1w", "ln1b"), (blk.qkv, "qkvw", "qkvb"),
                              (blk.attproj, "attprojw", "attprojb"), (blk.ln2, "ln2w", "ln2b"),
                              (blk.fc, "fcw", "fcb"), (blk.fcproj, "fcprojw", "fcprojb")):
                mod.weight.copy_(t(p[w][l]))
                mod.bias.copy_(t(p[b][l]))
        return self


# -------------------------------------------------------------------------------------------------
# Hugging Face GPT2LMHeadModel

HF_CONV1D = {"qkvw": "attn.c_attn.weight", "attprojw": "attn.c_proj.weight", "fcw": "mlp.c_fc.weight",
             "fcprojw": "mlp.c_proj.weight"}          # Conv1D stores (in, out): transposed vs llm.c
HF_LAYER = {"ln1w": "ln_1.weight", "ln1b": "ln_1.bias", "qkvb": "attn.c_attn.bias",
            "attprojb": "attn.c_proj.bias", "ln2w": "ln_2.weight", "ln2b": "ln_2.bias",
            "fcb": "mlp.c_fc.bias", "fcprojb": "mlp.c_proj.bias", **HF_CONV1D}


class HFLoss(nn.Module):
    """GPT2LMHeadModel returning the mean loss of (inp, targets) (its own `labels=` would shift them)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inp, targets):
        logits = self.model(input_ids=inp).logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def hf_gpt2(cfg: GPTConfig, flat: np.ndarray, *, attn: str = "eager") -> HFLoss:
    import transformers
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.channels, n_layer=cfg.num_layers,
        n_head=cfg.num_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
        layer_norm_epsilon=1e-5, bos_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1,
        attn_implementation=attn)
    model = transformers.GPT2LMHeadModel(hf_cfg).float()
    p = carve(np.asarray(flat, dtype=np.float32), param_shapes(cfg))
    sd = {"transformer.wte.weight": p["wte"][:cfg.vocab_size], "transformer.wpe.weight": p["wpe"],
          "transformer.ln_f.weight": p["lnfw"], "transformer.ln_f.bias": p["lnfb"]}
    for name, key in HF_LAYER.items():
        for l in range(cfg.num_layers):
            sd[f"transformer.h.{l}.{key}"] = p[name][l].T if name in HF_CONV1D else p[name][l]
    with torch.no_grad():
        for key, value in sd.items():
            model.get_parameter(key).copy_(torch.from_numpy(np.ascontiguousarray(value)))
    return HFLoss(model.train())


def adamw(model: nn.Module, *, lr: float, weight_decay: float, **kw) -> torch.optim.AdamW:
    """torch.optim.AdamW with llm.c's betas and eps; weight decay on matrices only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, **kw)

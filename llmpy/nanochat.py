"""nanochat's GPT: the modern decoder, a second model family beside GPT-2 (llmpy/model.py).

The model (as nanochat's `gpt.py`; the spec of issue 17):
  - config: n_layer, n_head, n_kv_head (divides n_head; 1 = multi-query), n_embd, vocab_size,
    sequence_len; head dim D = n_embd / n_head, even.
  - x = norm(wte[idx]); per block x = x + attn(norm(x)), x = x + mlp(norm(x)); logits = lm_head(norm(x)),
    then logits = 15 tanh(logits / 15); loss = mean cross-entropy. norm is RMSNorm without weights over
    the last axis, x / sqrt(mean(x^2) + 1e-6) (llmpy/cpu/rmsnorm.py).
  - attn: q = c_q(x) (n_head heads), k = c_k(x), v = c_v(x) (n_kv_head heads); RoPE on q and k
    (llmpy/cpu/rope.py, base 10000, halves layout); then QK-norm (norm over D) on q and k; causal softmax
    attention, each group of n_head / n_kv_head query heads sharing one k/v head, scale 1/sqrt(D)
    (llmpy/cpu/attention.py, gqa_*); c_proj.
  - mlp: c_proj(relu(c_fc(x))^2), hidden 4 n_embd. No linear layer has a bias; lm_head is its own matrix.

Init (nanochat's `init_weights`): wte ~ N(0, 1); lm_head ~ N(0, 0.001); c_q, c_k, c_v, c_fc ~ N(0, s^2)
with s = min(1, sqrt(fan_out / fan_in)) / sqrt(fan_in); both output projections (attn.c_proj, mlp.c_proj)
zero, so every block starts as the identity. Draws come from llmpy's torch-compatible MT19937(42) in the
order wte, then per layer c_q, c_k, c_v, c_fc, then lm_head.

Layout: parameters live in one flat buffer (`param_shapes`): wte and lm_head padded to Vp rows (a
multiple of 128, zero rows that never receive a gradient), the per-layer matrices stacked (L, out, in),
which is also how Muon batches them. q, k and v are three matmuls into separate buffers, so every
attention kernel reads contiguous (B, T, heads, D) tensors.

Gradient write semantics as GPT-2's (llmpy/model.py): parameter gradients ACCUMULATE over micro-steps,
activation gradients are OVERWRITTEN, except on the residual stream, where rmsnorm_backward adds.

Optimizers (`optimizer="adamw" | "muon"`): AdamW on every tensor (all are matrices, so all get weight
decay), or Muon (llmpy/cpu/muon.py) on the six per-layer matrix stacks and AdamW on wte and lm_head.
Muon's learning rate is `muon_lr` times the schedule's factor lr / peak_lr. Both keep their state in the
flat m and v of llm.c's state file: Muon's momentum in m, v zero, so checkpoints and exact resume are
unchanged. Under ZeRO-1 (llmpy/dist/zero.py) the AdamW tensors shard as GPT-2's do (a piece of every
layer per rank); Muon needs whole matrices, so its stacks shard by layer (rank r owns layers r, r + N, ...:
it gets those layers' averaged gradients from one reduce-scatter per N layers, orthogonalises and updates
whole matrices, and one all-gather per N layers brings every rank the result), as nanochat's DistMuon
and modded-nanogpt's parameter banks do; n_layer must divide by the number of processes.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from llmpy.cpu.rope import rope_tables
from llmpy.errors import LlmpyError
from llmpy.model import FlatParamModel, carve

SOFTCAP = 15.0
VOCAB_ALIGN = 128          # Vp: the classifier matmul tiles evenly (as GPT-2's padded vocabulary)
MATRICES = ("c_q", "c_k", "c_v", "attn_proj", "c_fc", "mlp_proj")   # per-layer stacks: Muon's tensors
ADAMW_ONLY = ("wte", "lm_head")                                     # AdamW under either optimizer


@dataclass(frozen=True)
class NanoChatConfig:
    n_layer: int = 12            # L
    n_head: int = 6              # query heads
    n_kv_head: int = 6           # key/value heads, dividing n_head (1: multi-query attention)
    n_embd: int = 768            # C
    vocab_size: int = 50257      # V, the GPT-2 tokenizer's (llmpy's data)
    sequence_len: int = 1024     # the longest T (RoPE tables are built for it)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"{f.name} must be positive, got {getattr(self, f.name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head dim n_embd / n_head = {self.head_dim} is odd; RoPE rotates pairs")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_ALIGN) * VOCAB_ALIGN

    # GPT-2's names, which the trainer and the sampler read
    num_layers = property(lambda self: self.n_layer)
    num_heads = property(lambda self: self.n_head)
    channels = property(lambda self: self.n_embd)
    max_seq_len = property(lambda self: self.sequence_len)

    @staticmethod
    def from_depth(depth: int, *, n_kv_head: int = 0, vocab_size: int = 50257,
                   sequence_len: int = 1024) -> "NanoChatConfig":
        """nanochat's depth dial: n_embd = 64 depth, n_head = ceil(n_embd / 128) (head dim 128 when 128
        divides n_embd), n_kv_head = n_head unless given."""
        n_embd = 64 * depth
        n_head = max(1, -(-n_embd // 128))
        return NanoChatConfig(depth, n_head, n_kv_head or n_head, n_embd, vocab_size, sequence_len)


def param_shapes(cfg: NanoChatConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter tensor, in flat-buffer order."""
    L, C, Vp, D = cfg.n_layer, cfg.n_embd, cfg.padded_vocab_size, cfg.head_dim
    return {
        "wte": (Vp, C),
        "c_q": (L, cfg.n_head * D, C), "c_k": (L, cfg.n_kv_head * D, C), "c_v": (L, cfg.n_kv_head * D, C),
        "attn_proj": (L, C, C),
        "c_fc": (L, 4 * C, C), "mlp_proj": (L, C, 4 * C),
        "lm_head": (Vp, C),
    }


def num_parameters(cfg: NanoChatConfig) -> int:
    return sum(math.prod(s) for s in param_shapes(cfg).values())


def flops_per_token(cfg: NanoChatConfig, T: int) -> int:
    """Training FLOPs per token, nanochat's estimate: 6 per weight outside the embedding table (it is a
    gather) + 12 L C T for attention's two T x T products, forward and backward."""
    return 6 * (num_parameters(cfg) - cfg.padded_vocab_size * cfg.n_embd) + 12 * cfg.n_layer * cfg.n_embd * T


def init_params(cfg: NanoChatConfig) -> np.ndarray:
    """nanochat's init (module docstring) into a flat float32 buffer; padded rows are zero."""
    from llmpy.rng import MT19937, normal_
    out = np.zeros(num_parameters(cfg), dtype=np.float32)
    p, gen = carve(out, param_shapes(cfg)), MT19937(42)

    def linear(w):                       # (out, in): nanochat's fan-in std, shrunk for wide-to-narrow
        fan_out, fan_in = w.shape
        normal_(w.reshape(-1), 0.0, min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in), gen)

    normal_(p["wte"][:cfg.vocab_size].reshape(-1), 0.0, 1.0, gen)
    for layer in range(cfg.n_layer):
        for name in ("c_q", "c_k", "c_v", "c_fc"):
            linear(p[name][layer])
    normal_(p["lm_head"][:cfg.vocab_size].reshape(-1), 0.0, 0.001, gen)
    return out


def act_shapes(cfg: NanoChatConfig, B: int, T: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every activation the backward needs, for a (B, T) batch."""
    L, C, NH, NKV, D = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    return {
        "emb": (B, T, C), "x0": (B, T, C), "x0_rstd": (B, T),      # wte[tok], and its norm: the residual
        "ln1": (L, B, T, C), "ln1_rstd": (L, B, T),
        "q": (L, B, T, NH * D), "k": (L, B, T, NKV * D), "v": (L, B, T, NKV * D),   # q, k after RoPE
        "qn": (L, B, T, NH * D), "q_rstd": (L, B, T, NH),           # after QK-norm
        "kn": (L, B, T, NKV * D), "k_rstd": (L, B, T, NKV),
        "att": (L, B, NH, T, T),
        "atty": (L, B, T, C), "attproj": (L, B, T, C), "residual2": (L, B, T, C),
        "ln2": (L, B, T, C), "ln2_rstd": (L, B, T),
        "fch": (L, B, T, 4 * C), "fch_act": (L, B, T, 4 * C), "fcproj": (L, B, T, C),
        "residual3": (L, B, T, C),
        "lnf": (B, T, C), "lnf_rstd": (B, T),
        "logits": (B, T, cfg.padded_vocab_size),                    # raw in training, overwritten by dlogits
        "losses": (B, T),
    }


def grad_act_shapes(cfg: NanoChatConfig, B: int, T: int) -> dict[str, tuple[int, ...]]:
    """Scratch for activation gradients during backward (reused across layers)."""
    C, NH, NKV, D = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    return {"dresidual": (B, T, C), "dbtc": (B, T, C), "dbtc2": (B, T, C), "dbt4c": (B, T, 4 * C),
            "dq": (B, T, NH * D), "dk": (B, T, NKV * D), "dv": (B, T, NKV * D), "datt": (B, NH, T, T)}


class NanoChat(FlatParamModel):
    """nanochat's GPT on a backend `ops` (llmpy.cpu): flat parameters, gradients and optimizer state, and
    the methods the trainer calls on llmpy.model.GPT."""

    unstacked = ADAMW_ONLY    # under ZeRO-1 one piece each; the block matrices are (L, rows, cols) stacks

    def __init__(self, config: NanoChatConfig, ops, *, params=None, optimizer: str = "adamw",
                 muon_lr: float = 0.02, peak_lr: float = 3e-4):
        if optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be 'adamw' or 'muon', got {optimizer!r}")
        self._init_flat(config, ops, param_shapes(config), np.float32, params)
        self.optimizer, self.muon_lr, self.peak_lr = optimizer, muon_lr, peak_lr
        cos, sin = rope_tables(config.sequence_len, config.head_dim)   # host tables, uploaded once
        self.cos, self.sin = self.xp.asarray(cos), self.xp.asarray(sin)

    # ---- buffers ---------------------------------------------------------------------------------
    def _buffers(self, key, shapes: dict) -> dict:
        if key not in self._acts:
            self._acts[key] = {k: self.xp.zeros(s, dtype=self.dtype) for k, s in shapes.items()}
        return self._acts[key]

    def acts(self, B: int, T: int) -> dict:
        """Activation views for a (B, T) batch, allocated once per shape."""
        return self._buffers((B, T), act_shapes(self.config, B, T))

    def _heads(self, x, H):
        """(B, T, H*D) -> (B, T, H, D) view."""
        return x.reshape(*x.shape[:-1], H, self.config.head_dim)

    # ---- forward ---------------------------------------------------------------------------------
    def _forward(self, inp):
        """Raw (uncapped) logits (B, T, Vp) for int32 tokens inp (B, T); fills the activations."""
        ops, p, cfg = self.ops, self.p, self.config
        B, T = inp.shape
        if T > cfg.sequence_len:
            raise ValueError(f"sequence length {T} exceeds the model's sequence_len {cfg.sequence_len}")
        NH, NKV = cfg.n_head, cfg.n_kv_head
        a, hd = self.acts(B, T), self._heads
        ops.encoder_forward(a["emb"], inp, p["wte"], None)
        ops.rmsnorm_forward(a["x0"], a["x0_rstd"], a["emb"])
        ops.rmsnorm_forward(a["ln1"][0], a["ln1_rstd"][0], a["x0"])
        for l in range(cfg.n_layer):
            residual = a["x0"] if l == 0 else a["residual3"][l - 1]
            for name, H in (("q", NH), ("k", NKV)):                 # projection, RoPE in place, QK-norm
                ops.matmul_forward(a[name][l], a["ln1"][l], p["c_" + name][l], None)
                ops.rope_forward(hd(a[name][l], H), hd(a[name][l], H), self.cos, self.sin)
                ops.rmsnorm_forward(hd(a[name + "n"][l], H), a[name + "_rstd"][l], hd(a[name][l], H))
            ops.matmul_forward(a["v"][l], a["ln1"][l], p["c_v"][l], None)
            ops.gqa_attention_forward(hd(a["atty"][l], NH), a["att"][l], hd(a["qn"][l], NH),
                                      hd(a["kn"][l], NKV), hd(a["v"][l], NKV))
            ops.matmul_forward(a["attproj"][l], a["atty"][l], p["attn_proj"][l], None)
            ops.fused_residual_rmsnorm_forward(a["residual2"][l], a["ln2"][l], a["ln2_rstd"][l], residual,
                                               a["attproj"][l])
            ops.matmul_forward(a["fch"][l], a["ln2"][l], p["c_fc"][l], None)
            ops.relu2_forward(a["fch_act"][l], a["fch"][l])
            ops.matmul_forward(a["fcproj"][l], a["fch_act"][l], p["mlp_proj"][l], None)
            last = l + 1 == cfg.n_layer     # the residual add is fused with the next norm (ln1, or lnf)
            ops.fused_residual_rmsnorm_forward(a["residual3"][l], a["lnf"] if last else a["ln1"][l + 1],
                                               a["lnf_rstd"] if last else a["ln1_rstd"][l + 1],
                                               a["residual2"][l], a["fcproj"][l])
        ops.matmul_forward(a["logits"], a["lnf"], p["lm_head"], None)
        return a["logits"]

    def forward(self, inp):
        """Softcapped logits (B, T, Vp) for int32 tokens inp (B, T) (only the first V columns are real):
        what sampling and evaluation read. Training (forward_backward) fuses the cap into the classifier."""
        logits = self._forward(self.xp.asarray(inp))
        self.ops.softcap_forward(logits, logits, SOFTCAP)
        return logits

    def loss(self, targets) -> float:
        """Mean cross-entropy of the last forward() (capped logits) against int32 targets (B, T)."""
        a = self.acts(*targets.shape)
        a["losses"].fill(0)
        self.ops.fused_classifier(None, a["losses"], a["logits"], self.xp.asarray(targets), 1.0 / targets.size,
                                  self.config.vocab_size)
        return float(a["losses"].sum()) / targets.size

    # ---- backward --------------------------------------------------------------------------------
    def backward(self, inp, targets, dloss: float):
        """Backward of the last _forward(inp) (raw logits): losses ACCUMULATE into acts['losses'],
        parameter gradients ACCUMULATE into self.grads; dloss is 1 / (B * T * grad_accum_steps)."""
        ops, p, cfg = self.ops, self.p, self.config
        if self.grads is None:
            self.zero_grad()
        g, hd = self.g, self._heads
        B, T = inp.shape
        NH, NKV = cfg.n_head, cfg.n_kv_head
        a, d = self.acts(B, T), self._buffers(("grad", B, T), grad_act_shapes(cfg, B, T))
        if self._train_shape != (B, T):
            self._train_shape = (B, T)
            a["losses"].fill(0)
        dlogits = a["logits"]
        ops.fused_classifier(dlogits, a["losses"], a["logits"], targets, dloss, cfg.vocab_size, softcap=SOFTCAP)
        dres, dbtc = d["dresidual"], d["dbtc"]
        dres.fill(0)
        ops.matmul_backward(dbtc, g["lm_head"], None, dlogits, a["lnf"], p["lm_head"])
        ops.rmsnorm_backward(dres, dbtc, a["residual3"][-1], a["lnf_rstd"])
        for l in reversed(range(cfg.n_layer)):
            residual = a["x0"] if l == 0 else a["residual3"][l - 1]
            # MLP branch; dres holds d(residual3[l])
            ops.matmul_backward(d["dbt4c"], g["mlp_proj"][l], None, dres, a["fch_act"][l], p["mlp_proj"][l])
            ops.relu2_backward(d["dbt4c"], a["fch"][l], d["dbt4c"])
            ops.matmul_backward(dbtc, g["c_fc"][l], None, d["dbt4c"], a["ln2"][l], p["c_fc"][l])
            ops.rmsnorm_backward(dres, dbtc, a["residual2"][l], a["ln2_rstd"][l])
            # attention branch; dres holds d(residual2[l])
            ops.matmul_backward(dbtc, g["attn_proj"][l], None, dres, a["atty"][l], p["attn_proj"][l])
            ops.gqa_attention_backward(hd(d["dq"], NH), hd(d["dk"], NKV), hd(d["dv"], NKV), d["datt"],
                                       hd(dbtc, NH), hd(a["qn"][l], NH), hd(a["kn"][l], NKV),
                                       hd(a["v"][l], NKV), a["att"][l])
            for name, H in (("q", NH), ("k", NKV)):                 # QK-norm and RoPE backward, in place
                dx = hd(d["d" + name], H)
                ops.rmsnorm_backward(dx, dx, hd(a[name][l], H), a[name + "_rstd"][l], accumulate=False)
                ops.rope_backward(dx, dx, self.cos, self.sin)
            # d ln1 = dq Wq + dk Wk + dv Wv: three matmuls into two scratch rows, summed
            ops.matmul_backward(dbtc, g["c_q"][l], None, d["dq"], a["ln1"][l], p["c_q"][l])
            ops.matmul_backward(d["dbtc2"], g["c_k"][l], None, d["dk"], a["ln1"][l], p["c_k"][l])
            ops.residual_forward(dbtc, dbtc, d["dbtc2"])
            ops.matmul_backward(d["dbtc2"], g["c_v"][l], None, d["dv"], a["ln1"][l], p["c_v"][l])
            ops.residual_forward(dbtc, dbtc, d["dbtc2"])
            ops.rmsnorm_backward(dres, dbtc, residual, a["ln1_rstd"][l])
        # dres holds d(x0); through the embedding norm into the table
        ops.rmsnorm_backward(dbtc, dres, a["emb"], a["x0_rstd"], accumulate=False)
        ops.encoder_backward(g["wte"], None, dbtc, inp)

    def forward_backward(self, inp, targets, dloss: float, *, seed: int = 0):
        """One training micro-step: forward(inp) on raw logits, then backward with the fused softcap."""
        del seed   # only the GPU's stochastic rounding would use it; this model trains in fp32
        inp = self.xp.asarray(inp)
        self._forward(inp)
        self.backward(inp, self.xp.asarray(targets), dloss)

    # ---- optimizer -------------------------------------------------------------------------------
    def update(self, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, t: int,
               grad_scale: float = 1.0, seeds=None):
        """One optimizer step (t is 1-based). AdamW: every tensor, weight decay on all (all are matrices).
        Muon: the per-layer matrices at muon_lr * lr / peak_lr (the schedule's factor), AdamW on wte and
        lm_head. grad_scale (clipping) multiplies every gradient. seeds: accepted for GPT's signature."""
        del seeds
        m, v = self._moments()
        for name in self.shapes:
            self.tensor_update(name, self.p[name], m[name], v[name], self.g[name], lr=lr, beta1=beta1,
                               beta2=beta2, eps=eps, weight_decay=weight_decay, t=t, grad_scale=grad_scale)

    @staticmethod
    def whole_matrix_tensors(optimizer: str) -> tuple:
        return MATRICES if optimizer == "muon" else ()

    def tensor_update(self, name: str, param, m, v, grad, *, lr, beta1, beta2, eps, weight_decay, t,
                      grad_scale=1.0, master=None, seed=0):
        """Muon on the block matrices (param: whole layers of the stack, any shape holding them) at
        muon_lr times the schedule's factor; AdamW (weight decay on every tensor) on the others."""
        if name not in self.whole_matrix_tensors(self.optimizer):
            super().tensor_update(name, param, m, v, grad, lr=lr, beta1=beta1, beta2=beta2, eps=eps, t=t,
                                  weight_decay=weight_decay, grad_scale=grad_scale, master=master, seed=seed)
            return
        shape = (-1,) + tuple(self.shapes[name][1:])
        gpu = self._muon_buffers() | ({} if master is None else dict(master=master.reshape(shape), seed=seed))
        self.ops.muon_update(param.reshape(shape), m.reshape(shape), grad.reshape(shape),
                             lr=self.muon_lr * lr / self.peak_lr, grad_scale=grad_scale, **gpu)

    def _muon_buffers(self) -> dict:
        """Preallocated scratch for the backend's muon_update (the GPU engine's arena); none on the CPU."""
        return {}

    def load_optimizer_state(self, state: dict):
        """Restore m and v from a state file, refusing one written by the other optimizer."""
        self.check_optimizer_state(state)
        super().load_optimizer_state(state)

    def check_optimizer_state(self, state: dict):
        """LlmpyError if the state file was written by the other optimizer: Muon leaves v zero on the
        block matrices, AdamW does not (once it has taken a step, which wte's v shows)."""
        v = carve(np.asarray(state["v"], dtype=np.float32), self.shapes)
        stepped = bool(v["wte"].any())
        muon_state = stepped and not any(v[name].any() for name in MATRICES)
        if stepped and muon_state != (self.optimizer == "muon"):
            written = "muon" if muon_state else "adamw"
            raise LlmpyError(f"--optimizer {self.optimizer}: the checkpoint's optimizer state was written by "
                             f"{written}; resume with --optimizer {written}")

    # ---- sampling with a KV cache ------------------------------------------------------------------
    def kv_cache(self, max_len: int) -> "KVCache":
        """A key/value cache for generating up to max_len tokens (llmpy.sample.generate uses it)."""
        return KVCache(self, max_len)


class KVCache:
    """Incremental decoding: each call feeds new tokens through the model, attending to the k and v of
    every earlier position kept here (after RoPE and QK-norm), so a generated token costs one position's
    work instead of a forward over the whole sequence. Multi-query / grouped-query attention shrinks the
    cache by n_head / n_kv_head. Batch 1, NumPy (the CPU backend)."""

    def __init__(self, model: NanoChat, max_len: int):
        cfg = model.config
        self.model, self.pos = model, 0
        self.max_len = min(max_len, cfg.sequence_len)
        shape = (cfg.n_layer, self.max_len, cfg.n_kv_head, cfg.head_dim)
        self.k, self.v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def feed(self, tokens) -> np.ndarray:
        """Run the new tokens at positions pos, pos+1, ...; returns the softcapped logits (V,) after the
        last of them."""
        m, cfg = self.model, self.model.config
        ops, p = m.ops, m.p
        n, pos = len(tokens), self.pos
        if pos + n > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; {pos} + {n} tokens do not fit")
        NH, NKV, D, C = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_embd
        cos, sin = m.cos[pos:pos + n], m.sin[pos:pos + n]

        def norm(x):                                 # a new array; rstd is not needed without a backward
            out = np.empty_like(x)
            ops.rmsnorm_forward(out, np.empty(x.shape[:-1], np.float32), x)
            return out

        def linear(x, w):
            out = np.empty(x.shape[:-1] + (w.shape[0],), np.float32)
            ops.matmul_forward(out, x, w, None)
            return out

        emb = np.empty((1, n, C), np.float32)
        ops.encoder_forward(emb, np.asarray(tokens, np.int32)[None], p["wte"], None)
        x = norm(emb)
        G = NH // NKV
        future = np.triu(np.ones((n, pos + n), bool), k=pos + 1)     # new row i sees positions <= pos + i
        for l in range(cfg.n_layer):
            h = norm(x)
            heads = {}
            for name, H in (("q", NH), ("k", NKV)):
                t = linear(h, p["c_" + name][l]).reshape(1, n, H, D)
                ops.rope_forward(t, t, cos, sin)
                heads[name] = norm(t)[0]
            self.k[l, pos:pos + n] = heads["k"]
            self.v[l, pos:pos + n] = linear(h, p["c_v"][l]).reshape(n, NKV, D)
            q = heads["q"].reshape(n, NKV, G, D)
            s = np.einsum("ikgd,jkd->kgij", q, self.k[l, :pos + n]) / np.float32(math.sqrt(D))
            s[..., future] = -np.inf
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            y = np.einsum("kgij,jkd->ikgd", s, self.v[l, :pos + n]).reshape(1, n, C)
            x = x + linear(y, p["attn_proj"][l])
            f = linear(norm(x), p["c_fc"][l])
            ops.relu2_forward(f, f)
            x = x + linear(f, p["mlp_proj"][l])
        logits = linear(norm(x)[:, -1:], p["lm_head"])[0, 0, :cfg.vocab_size]
        ops.softcap_forward(logits, logits, SOFTCAP)
        self.pos += n
        return logits

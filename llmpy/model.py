"""GPT-2: configuration, the parameter and activation tables, and forward/backward on a backend.

The model is written once and runs on any backend module that exports the op functions of
`llmpy.cpu` (NumPy). `forward()` reads like llm.c's `gpt2_forward`, one op call per line, and
`backward()` walks the same calls in reverse.

Gradient write semantics (the same in every backend, and in every op's docstring):
  - parameter gradients ACCUMULATE (+=), so gradient accumulation over micro-steps is a loop;
  - activation gradients are OVERWRITTEN (=), except on the residual stream, where the branches
    meet: layernorm_backward adds its dinp into the residual gradient.

Parameters live in one flat buffer in llm.c's tensor order (`param_shapes`), which makes the
checkpoint a single write and AdamW a loop over 16 named views.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

# -------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class GPTConfig:
    max_seq_len: int = 1024         # maxT, rows of wpe
    vocab_size: int = 50257         # V, real GPT-2 vocabulary
    padded_vocab_size: int = 50304  # Vp, V rounded up to a multiple of 128 (tiles matmuls evenly)
    num_layers: int = 12            # L
    num_heads: int = 12             # NH
    channels: int = 768             # C

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"GPTConfig.{f.name} must be positive, got {getattr(self, f.name)}")
        if self.channels % self.num_heads:
            raise ValueError(f"channels {self.channels} not divisible by num_heads {self.num_heads}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size {self.padded_vocab_size} < vocab_size {self.vocab_size}")

    @property
    def head_size(self) -> int:
        return self.channels // self.num_heads

    @staticmethod
    def from_descriptor(desc: str) -> "GPTConfig":
        """llm.c's model descriptors: 'd12' or 'gpt2:d12' (GPT-2 depth), 'gpt3:c768' (GPT-3 width)."""
        name = desc.split(":", 1)[1] if desc.startswith(("gpt2:", "gpt3:")) else desc
        if desc.startswith("gpt3:"):
            if not name.startswith("c") or not name[1:].isdigit() or int(name[1:]) not in GPT3_SHAPES:
                raise ValueError(f"unknown GPT-3 descriptor {desc!r}; known: "
                                 + ", ".join(f"gpt3:c{c}" for c in GPT3_SHAPES))
            c = int(name[1:])
            layers, head_size = GPT3_SHAPES[c]
            return GPTConfig(2048, 50257, 50304, layers, c // head_size, c)
        if not name.startswith("d") or not name[1:].isdigit() or int(name[1:]) not in GPT2_SHAPES:
            raise ValueError(f"unknown model descriptor {desc!r}; use a .bin file or one of "
                             + ", ".join(f"d{d}" for d in GPT2_SHAPES))
        depth = int(name[1:])
        channels, heads = GPT2_SHAPES[depth]
        return GPTConfig(1024, 50257, 50304, depth, heads, channels)


GPT2_SHAPES = {6: (384, 6), 12: (768, 12), 24: (1024, 16), 36: (1280, 20), 48: (1600, 25),
               60: (1920, 30), 72: (2880, 30), 84: (3456, 36)}          # depth -> (C, NH)
GPT3_SHAPES = {384: (6, 64), 768: (12, 64), 1024: (24, 64), 1536: (24, 96), 2048: (24, 128),
               2560: (32, 80), 4096: (32, 128), 12288: (96, 128)}         # C -> (L, head size)

# -------------------------------------------------------------------------------------------------
# Parameter and activation tables

# the tensors that get weight decay: the 2-D matrices (both embeddings included), never biases or LN
DECAYED = ("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw")


def param_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter tensor, in llm.c's checkpoint order (tensor-major over layers)."""
    Vp, maxT, L, C = cfg.padded_vocab_size, cfg.max_seq_len, cfg.num_layers, cfg.channels
    return {
        "wte": (Vp, C), "wpe": (maxT, C),
        "ln1w": (L, C), "ln1b": (L, C),
        "qkvw": (L, 3 * C, C), "qkvb": (L, 3 * C),
        "attprojw": (L, C, C), "attprojb": (L, C),
        "ln2w": (L, C), "ln2b": (L, C),
        "fcw": (L, 4 * C, C), "fcb": (L, 4 * C),
        "fcprojw": (L, C, 4 * C), "fcprojb": (L, C),
        "lnfw": (C,), "lnfb": (C,),
    }


def num_parameters(cfg: GPTConfig) -> int:
    """Total parameter count including the padded vocabulary rows (124,475,904 for d12)."""
    return sum(math.prod(s) for s in param_shapes(cfg).values())


def carve(flat, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Named views into one flat NumPy or CuPy buffer, laid out back to back in table order."""
    views, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        views[name] = flat[offset:offset + n].reshape(shape)
        offset += n
    if offset != flat.size:
        raise ValueError(f"buffer has {flat.size} elements, tables need {offset}")
    return views


def act_shapes(cfg: GPTConfig, B: int, T: int, *, flash: bool = False) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every activation the backward pass needs, for a (B, T) batch. With flash (the
    fused attention of llmpy/gpu/flash_attention.py) attention saves one log-sum-exp per row, att_lse,
    instead of qkvr and the T x T att."""
    L, C, NH, Vp = cfg.num_layers, cfg.channels, cfg.num_heads, cfg.padded_vocab_size
    HS = cfg.head_size
    shapes = {
        "encoded": (B, T, C),                                   # wte[tok] + wpe[t]: residual into layer 0
        "ln1": (L, B, T, C), "ln1_mean": (L, B, T), "ln1_rstd": (L, B, T),
        "qkv": (L, B, T, 3 * C),                                # QKV projection output
        "qkvr": (L, 3, B, NH, T, HS),                           # q, k, v permuted per head
        "att": (L, B, NH, T, T),                                # softmax probabilities (causal)
        "atty": (L, B, T, C),                                   # attention output, heads re-joined
        "attproj": (L, B, T, C),
        "residual2": (L, B, T, C),                              # residual after the attention branch
        "ln2": (L, B, T, C), "ln2_mean": (L, B, T), "ln2_rstd": (L, B, T),
        "fch": (L, B, T, 4 * C),                                # MLP pre-activation
        "fch_gelu": (L, B, T, 4 * C),
        "fcproj": (L, B, T, C),
        "residual3": (L, B, T, C),                              # residual after the MLP branch
        "lnf": (B, T, C), "lnf_mean": (B, T), "lnf_rstd": (B, T),
        "logits": (B, T, Vp),                                   # overwritten in place by dlogits
        "losses": (B, T),                                       # per-token loss, summed over micro-steps
    }
    if flash:
        del shapes["qkvr"], shapes["att"]
        shapes["att_lse"] = (L, B, NH, T)
    return shapes


def grad_act_shapes(cfg: GPTConfig, B: int, T: int, *, flash: bool = False) -> dict[str, tuple[int, ...]]:
    """Scratch for activation gradients during backward (reused across layers)."""
    C, NH, HS = cfg.channels, cfg.num_heads, cfg.head_size
    shapes = {
        "dresidual": (B, T, C),                                 # gradient flowing along the residual stream
        "dbtc": (B, T, C),                                      # dlnf / dln2 / datty / dln1
        "dbt4c": (B, T, 4 * C),                                 # dfch_gelu, then dfch in place
        "dqkv": (B, T, 3 * C),
    }
    if flash:
        shapes["datt_delta"] = (B, NH, T)                       # rowsum(datty * atty) per head
    else:
        shapes.update(dqkvr=(3, B, NH, T, HS), datt=(B, NH, T, T), dscratch=(B, NH, T, HS))
    return shapes


# activations kept in float32 whatever the model dtype (llm.c keeps LN statistics and losses in fp32),
# and the fused attention's per-row statistics
FP32_ACTS = ("ln1_mean", "ln1_rstd", "ln2_mean", "ln2_rstd", "lnf_mean", "lnf_rstd", "losses", "att_lse",
             "datt_delta")


def act_dtype(name: str, dtype) -> np.dtype:
    """Storage dtype of the activation (or activation gradient) `name` in a model of `dtype`."""
    return np.dtype(np.float32 if name in FP32_ACTS else dtype)


# -------------------------------------------------------------------------------------------------
# The model


class FlatParamModel:
    """What every model family shares (GPT here, llmpy/nanochat.py's NanoChat): parameters, gradients and
    the optimizer moments m, v as flat buffers (`params`, `grads` with views `g`), per-shape activation
    dicts in `_acts`, and the methods the trainer calls besides forward/backward/update.
    A subclass calls _init_flat and provides acts(B, T) with a "losses" entry."""

    checkpoint_dtype = "fp32"   # CPU models are saved in float32
    unstacked: tuple = ()       # tensors that are one piece each under ZeRO-1; the rest are (L, ...) stacks
    optimizer = "adamw"

    def _init_flat(self, config, ops, shapes: dict, dtype, params):
        """The flat parameter buffer (a copy of `params` when given) and its views `p`; empty state."""
        self.config, self.ops, self.xp = config, ops, ops.xp
        self.dtype = np.dtype(dtype)
        self.shapes = shapes
        self.num_parameters = sum(math.prod(s) for s in shapes.values())
        self.params = self.xp.zeros(self.num_parameters, dtype=self.dtype)
        if params is not None:
            self.params[...] = self.xp.asarray(params, dtype=self.dtype)
        self.p = carve(self.params, self.shapes)
        self.grads = None       # allocated lazily: inference needs no gradient memory
        self.m = self.v = None  # optimizer moments (float32), allocated on the first update
        self.norm = self.xp.zeros(1, dtype=np.float32)
        self._acts = {}
        self._train_shape = None

    # ---- the optimizer, tensor by tensor (ZeRO-1 runs it on this rank's pieces: llmpy/dist/zero.py) ---
    def decays(self, name: str) -> bool:
        """Whether AdamW's weight decay applies to tensor `name`."""
        return True

    @staticmethod
    def whole_matrix_tensors(optimizer: str) -> tuple:
        """The tensors whose optimizer works on whole per-layer matrices (Muon's): ZeRO-1 gives each rank
        whole layers of them instead of a piece of every layer. Static, so the layout can be checked from
        the config before a model is built (llmpy.families.zero_layout)."""
        return ()

    def tensor_update(self, name: str, param, m, v, grad, *, lr, beta1, beta2, eps, weight_decay, t,
                      grad_scale=1.0, master=None, seed=0):
        """The optimizer step of tensor `name` on (a piece of) it, in place: AdamW with the family's
        weight-decay rule."""
        self.ops.adamw_update(param, m, v, grad, lr=lr, beta1=beta1, beta2=beta2, eps=eps, t=t,
                              grad_scale=grad_scale, weight_decay=weight_decay if self.decays(name) else 0.0,
                              master=master, seed=seed)

    def _moments(self) -> tuple[dict, dict]:
        """Views of m and v per tensor, allocated (zero) on first use."""
        if self.m is None:
            self.m = self.xp.zeros(self.num_parameters, dtype=np.float32)
            self.v = self.xp.zeros(self.num_parameters, dtype=np.float32)
        return carve(self.m, self.shapes), carve(self.v, self.shapes)

    def zero_grad(self):
        """Zero the parameter gradients and the training losses (micro-step 0 of every optimizer step)."""
        if self.grads is None:
            self.grads = self.xp.zeros(self.num_parameters, dtype=self.dtype)
            self.g = carve(self.grads, self.shapes)
        else:
            self.grads.fill(0)
        if self._train_shape is not None:
            self.acts(*self._train_shape)["losses"].fill(0)

    def mean_loss(self, num_tokens: int) -> float:
        """Per-token losses summed over the micro-steps since zero_grad, divided by num_tokens."""
        return float(self.acts(*self._train_shape)["losses"].sum()) / num_tokens

    def grad_norm(self) -> float:
        """Global L2 norm of all parameter gradients."""
        self.ops.global_norm_squared(self.norm, self.grads)
        return float(np.sqrt(float(self.norm[0])))

    # ---- state in and out --------------------------------------------------------------------------
    def params_f32(self) -> np.ndarray:
        """The parameters as a host float32 array (what a checkpoint stores)."""
        return np.asarray(self.params, dtype=np.float32)

    def optimizer_state(self) -> dict:
        """AdamW moments as host float32 arrays (zeros before the first update)."""
        if self.m is None:
            zeros = np.zeros(self.num_parameters, dtype=np.float32)
            return {"m": zeros, "v": zeros}
        return {"m": np.asarray(self.m), "v": np.asarray(self.v)}

    def load_optimizer_state(self, state: dict):
        """Restore AdamW moments from a loaded state file (llmpy.checkpoint.load_state)."""
        self.m = self.xp.asarray(state["m"], dtype=np.float32).copy()
        self.v = self.xp.asarray(state["v"], dtype=np.float32).copy()

    def synchronize(self):
        """Wait for queued device work (nothing to wait for on the CPU)."""

    def mfu(self, tokens_per_step: int, ms: float, T: int) -> float:
        """Model FLOPs utilisation in percent, or -1 where the device's peak is unknown (the CPU)."""
        return -1.0

    def memory_report(self) -> str:
        nbytes = self.params.nbytes * 2 + sum(a.nbytes for acts in self._acts.values()
                                               for a in acts.values())
        return f"memory: {nbytes / 2**20:.1f} MiB in parameters, gradients and activations"

    def close(self):
        """Release buffers (the GPU engine returns its pool memory here)."""
        self._acts.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class GPT(FlatParamModel):
    """GPT-2 on a backend `ops` (llmpy.cpu or llmpy.gpu): flat parameters, gradients and AdamW state.

    params/grads are flat buffers with named views `p`/`g` (llm.c's order). Activations are allocated
    per batch shape on first use, so generation at B=1 does not disturb the training buffers.
    """

    recompute_gelu = False   # -r 1 (GPU engine): one shared GELU buffer, recomputed in backward
    gelu_fusion = 0          # -ge: 1 fuses GELU into the fc matmul's epilogue, 2 also its backward
    flash_attention = False  # --flash-attention (GPU engine, bf16, head size 64): the fused attention ops
    layer_grads_done = None  # callable(l): layer l's parameter gradients are complete (the GPU engine's
                             # data parallelism reduces them there while backward goes on, llm.c style)
    unstacked = ("wte", "wpe", "lnfw", "lnfb")   # the rest are (L, ...) stacks

    def decays(self, name: str) -> bool:
        return name in DECAYED     # the 2-D matrices; not biases or layernorm parameters

    def __init__(self, config: GPTConfig, ops, *, dtype="float32", params=None):
        self._init_flat(config, ops, param_shapes(config), dtype, params)

    # ---- buffers ---------------------------------------------------------------------------------
    def acts(self, B: int, T: int) -> dict:
        """Activation views for a (B, T) batch, allocated once per shape."""
        if (B, T) not in self._acts:
            shapes = act_shapes(self.config, B, T, flash=self.flash_attention)
            self._acts[(B, T)] = {k: self.xp.zeros(s, dtype=act_dtype(k, self.dtype))
                                  for k, s in shapes.items()}
        return self._acts[(B, T)]

    def _grad_acts(self, B: int, T: int) -> dict:
        key = ("grad", B, T)
        if key not in self._acts:
            shapes = grad_act_shapes(self.config, B, T, flash=self.flash_attention)
            self._acts[key] = {k: self.xp.zeros(s, dtype=act_dtype(k, self.dtype))
                               for k, s in shapes.items()}
        return self._acts[key]

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, inp):
        """Logits for int32 tokens inp (B, T), T <= maxT. Fills the activations; returns the logits view
        (B, T, Vp) (only the first V columns are real)."""
        ops, p, cfg = self.ops, self.p, self.config
        B, T = inp.shape
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's max_seq_len {cfg.max_seq_len}")
        a = self.acts(B, T)
        ops.encoder_forward(a["encoded"], inp, p["wte"], p["wpe"])
        ops.layernorm_forward(a["ln1"][0], a["ln1_mean"][0], a["ln1_rstd"][0], a["encoded"],
                              p["ln1w"][0], p["ln1b"][0])
        for l in range(cfg.num_layers):
            residual = a["encoded"] if l == 0 else a["residual3"][l - 1]
            ops.matmul_forward(a["qkv"][l], a["ln1"][l], p["qkvw"][l], p["qkvb"][l])
            if self.flash_attention:
                ops.flash_attention_forward(a["atty"][l], a["att_lse"][l], a["qkv"][l])
            else:
                ops.attention_forward(a["atty"][l], a["qkvr"][l], a["att"][l], a["qkv"][l])
            ops.matmul_forward(a["attproj"][l], a["atty"][l], p["attprojw"][l], p["attprojb"][l])
            ops.fused_residual_forward(a["residual2"][l], a["ln2"][l], a["ln2_mean"][l], a["ln2_rstd"][l],
                                       residual, a["attproj"][l], p["ln2w"][l], p["ln2b"][l])
            if self.gelu_fusion >= 1:
                ops.matmul_forward(a["fch_gelu"][l], a["ln2"][l], p["fcw"][l], p["fcb"][l], gelu_aux=a["fch"][l])
            else:
                ops.matmul_forward(a["fch"][l], a["ln2"][l], p["fcw"][l], p["fcb"][l])
                ops.gelu_forward(a["fch_gelu"][l], a["fch"][l])
            ops.matmul_forward(a["fcproj"][l], a["fch_gelu"][l], p["fcprojw"][l], p["fcprojb"][l])
            if l + 1 < cfg.num_layers:   # the residual add is fused with the next layer's ln1
                ops.fused_residual_forward(a["residual3"][l], a["ln1"][l + 1], a["ln1_mean"][l + 1],
                                           a["ln1_rstd"][l + 1], a["residual2"][l], a["fcproj"][l],
                                           p["ln1w"][l + 1], p["ln1b"][l + 1])
            else:                        # ... or with the final layernorm
                ops.fused_residual_forward(a["residual3"][l], a["lnf"], a["lnf_mean"], a["lnf_rstd"],
                                           a["residual2"][l], a["fcproj"][l], p["lnfw"], p["lnfb"])
        ops.matmul_forward(a["logits"], a["lnf"], p["wte"], None)   # weight tying: no separate lm_head
        return a["logits"]

    def loss(self, targets) -> float:
        """Mean cross-entropy of the last forward against int32 targets (B, T); logits are kept."""
        a = self.acts(*targets.shape)
        a["losses"].fill(0)
        self.ops.fused_classifier(None, a["losses"], a["logits"], targets, 1.0 / targets.size,
                                  self.config.vocab_size)
        return float(a["losses"].sum()) / targets.size

    # ---- backward --------------------------------------------------------------------------------
    def backward(self, inp, targets, dloss: float, *, seed: int = 0):
        """Backward of the last forward(inp): per-token losses ACCUMULATE into acts['losses'] (zero them at
        micro-step 0), dlogits = dloss * (softmax - onehot) overwrite the logits, parameter gradients
        ACCUMULATE into self.grads. dloss is 1 / (B * T * grad_accum_steps)."""
        ops, p, cfg = self.ops, self.p, self.config
        if self.grads is None:
            self.zero_grad()
        g = self.g
        B, T = inp.shape
        a, d = self.acts(B, T), self._grad_acts(B, T)
        if self._train_shape != (B, T):     # the training batch shape, whose losses mean_loss reads
            self._train_shape = (B, T)
            a["losses"].fill(0)
        dlogits = a["logits"]
        ops.fused_classifier(dlogits, a["losses"], a["logits"], targets, dloss, cfg.vocab_size)
        dresidual = d["dresidual"]
        dresidual.fill(0)
        ops.matmul_backward(d["dbtc"], g["wte"], None, dlogits, a["lnf"], p["wte"])
        ops.layernorm_backward(dresidual, g["lnfw"], g["lnfb"], d["dbtc"], a["residual3"][-1], p["lnfw"],
                               a["lnf_mean"], a["lnf_rstd"])
        for l in reversed(range(cfg.num_layers)):
            residual = a["encoded"] if l == 0 else a["residual3"][l - 1]
            # MLP branch; dresidual holds d(residual3[l])
            if self.recompute_gelu:
                ops.gelu_forward(a["fch_gelu"][l], a["fch"][l])
            if self.gelu_fusion >= 2:   # dGELU applied in the matmul's epilogue
                ops.matmul_backward(d["dbt4c"], g["fcprojw"][l], g["fcprojb"][l], dresidual, a["fch_gelu"][l],
                                    p["fcprojw"][l], gelu_aux=a["fch"][l])
            else:
                ops.matmul_backward(d["dbt4c"], g["fcprojw"][l], g["fcprojb"][l], dresidual, a["fch_gelu"][l],
                                    p["fcprojw"][l])
                ops.gelu_backward(d["dbt4c"], a["fch"][l], d["dbt4c"])
            ops.matmul_backward(d["dbtc"], g["fcw"][l], g["fcb"][l], d["dbt4c"], a["ln2"][l], p["fcw"][l])
            ops.layernorm_backward(dresidual, g["ln2w"][l], g["ln2b"][l], d["dbtc"], a["residual2"][l],
                                   p["ln2w"][l], a["ln2_mean"][l], a["ln2_rstd"][l])
            # attention branch; dresidual now holds d(residual2[l])
            ops.matmul_backward(d["dbtc"], g["attprojw"][l], g["attprojb"][l], dresidual, a["atty"][l],
                                p["attprojw"][l])
            if self.flash_attention:
                ops.flash_attention_backward(d["dqkv"], d["datt_delta"], d["dbtc"], a["qkv"][l], a["atty"][l],
                                             a["att_lse"][l])
            else:
                ops.attention_backward(d["dqkv"], d["dqkvr"], d["datt"], d["dscratch"], d["dbtc"],
                                       a["qkvr"][l], a["att"][l])
            ops.matmul_backward(d["dbtc"], g["qkvw"][l], g["qkvb"][l], d["dqkv"], a["ln1"][l], p["qkvw"][l])
            ops.layernorm_backward(dresidual, g["ln1w"][l], g["ln1b"][l], d["dbtc"], residual, p["ln1w"][l],
                                   a["ln1_mean"][l], a["ln1_rstd"][l])
            if self.layer_grads_done is not None:
                self.layer_grads_done(l)
        ops.encoder_backward(g["wte"], g["wpe"], dresidual, inp, seed=seed)

    def forward_backward(self, inp, targets, dloss: float, *, seed: int = 0):
        """One training micro-step: forward(inp) then backward (the GPU engine replays it as a graph)."""
        inp = self.xp.asarray(inp)
        self.forward(inp)
        self.backward(inp, self.xp.asarray(targets), dloss, seed=seed)

    # ---- optimizer -------------------------------------------------------------------------------
    def update(self, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, t: int,
               grad_scale: float = 1.0, seeds=None):
        """One AdamW step (t is 1-based) over the 16 tensors; weight decay only on the 2-D matrices.
        seeds: one uint32 per tensor for stochastic rounding (ignored by fp32 backends)."""
        m, v = self._moments()
        for i, name in enumerate(self.shapes):
            self.tensor_update(name, self.p[name], m[name], v[name], self.g[name], lr=lr, beta1=beta1,
                               beta2=beta2, eps=eps, t=t, grad_scale=grad_scale, weight_decay=weight_decay,
                               seed=0 if seeds is None else int(seeds[i]))


"""The GPU training engine for nanochat's GPT (llmpy/nanochat.py), beside GPT-2's (llmpy/gpu/engine.py).

`NanoChatGPU` runs `NanoChat`'s forward and backward unchanged on the `llmpy.gpu` ops and adds what GPT-2's
`GPUGPT` adds (and shares its `ArenaEngine` pieces: upload, token staging, close):
  - one `Arena` for params and grads (bf16 or fp32), the optimizer state m, v (fp32; under Muon m holds the
    block matrices' momentum and v stays zero there, as on the CPU) and the fp32 master weights, every
    activation of the training (B, T) shape (rstd and losses fp32), the activation gradients, the RoPE
    tables, the ops' scratch (grouped-query attention's permuted heads, Newton-Schulz's bf16 workspace and
    norm partials, the global norm's partials, the encoder's buckets), the token buffers, the optimizer's
    step values and the cuBLASLt workspace. Nothing is allocated inside a training step;
  - AdamW (every tensor; all are matrices, so all decay) or Muon on the six per-layer stacks with AdamW on
    wte and lm_head, updating the master weights and rounding stochastically into bf16 with one seed per
    tensor (the first 8 of the 16 the trainer draws; resume re-derives them from rng_state_last_update);
  - CUDA graphs (`StepGraph`): one of each micro-step's forward + backward (less the encoder backward,
    whose launcher groups token ids on the host and whose seed changes each micro-step: it runs after the
    replay, as in GPT-2's engine), one of the optimizer update, which reads lr, the clipping scale, AdamW's
    bias corrections, Muon's lr and the 8 seeds from arena buffers staged before each replay.
The materialised attention only (the fused kernels are written for head size 64; nanochat's is 128).
Sampling runs a forward per token (no KV cache: that is the CPU model's). Under ZeRO-1
(optimizer_state=False) the arena holds no m, v or master: llmpy/dist/zero.py keeps this rank's share and
calls `tensor_update` per piece (Muon on whole layers, with the arena's Newton-Schulz scratch).
Tests: tests/test_gpu_nanochat_engine.py, tests/test_dist.py.
"""
from __future__ import annotations

import numpy as np

from llmpy.errors import LlmpyError
from llmpy.gpu import engine
from llmpy.gpu.engine import F32, I32, LT_WORKSPACE_BYTES, U32, ArenaEngine, _ArenaOps, engine_options, storage_dtype
from llmpy.gpu.mfu import mfu_percent
from llmpy.model import carve
from llmpy.nanochat import (ADAMW_ONLY, MATRICES, NanoChat, NanoChatConfig, act_shapes, flops_per_token,
                            grad_act_shapes, num_parameters, param_shapes)

NUM_TENSORS = len(param_shapes(NanoChatConfig(1, 1, 1, 2, 1, 1)))   # 8: one update launch and seed each


def act_dtype(name: str, dtype) -> np.dtype:
    """Activations are stored in the model's dtype, except the norms' rstd and the losses (fp32)."""
    return F32 if name.endswith("rstd") or name == "losses" else np.dtype(dtype)


def buffer_specs(cfg: NanoChatConfig, B: int, T: int, *, dtype, master_weights: bool, optimizer_state=True):
    """Every buffer a (B, T) training step touches, as Arena specs (name, shape, dtype), in order.
    optimizer_state=False (ZeRO-1) leaves out m, v and master: llmpy/dist/zero.py keeps this rank's share."""
    from llmpy.gpu import attention, encoder, global_norm, muon
    dtype, n = np.dtype(dtype), num_parameters(cfg)
    shapes = param_shapes(cfg)
    specs = [("params", (n,), dtype), ("grads", (n,), dtype)]
    if optimizer_state:
        specs += [("adam_m", (n,), F32), ("adam_v", (n,), F32)] + ([("master", (n,), F32)] if master_weights else [])
    specs += [(f"act.{k}", s, act_dtype(k, dtype)) for k, s in act_shapes(cfg, B, T).items()]
    specs += [(f"dact.{k}", s, dtype) for k, s in grad_act_shapes(cfg, B, T).items()]
    gqa = (B, T, cfg.n_head, cfg.n_kv_head, cfg.head_dim, dtype)
    specs += [("rope_cos", (cfg.sequence_len, cfg.head_dim // 2), F32),
              ("rope_sin", (cfg.sequence_len, cfg.head_dim // 2), F32),
              ("gqa_workspace", (max(attention.gqa_workspace_size(*gqa, backward=b) for b in (False, True)),), dtype),
              ("muon_workspace", (max(muon.workspace_size(shapes[k]) for k in MATRICES),), np.dtype(storage_dtype("bf16"))),
              ("muon_scratch", (max(muon.scratch_size(shapes[k]) for k in MATRICES),), F32),
              ("norm_scratch", (global_norm.norm_blocks(n),), F32),
              ("encoder_buckets", (encoder.workspace_size(B, T),), I32),
              ("inp", (B, T), I32), ("targets", (B, T), I32), ("adamw_scalars", (4,), F32),
              ("muon_scalars", (2,), F32), ("seeds", (NUM_TENSORS,), U32), ("norm", (1,), F32),
              ("lt_workspace", (LT_WORKSPACE_BYTES,), np.dtype(np.uint8))]
    return specs


class _NanoChatArenaOps(_ArenaOps):
    """GPT-2's arena ops plus grouped-query attention's workspace from the arena at the training shape."""

    def gqa_attention_forward(self, out, att, q, k, v):
        ws = self.buffers["gqa_workspace"] if self._train(q.reshape(*q.shape[:2], -1)) else None
        self.base.gqa_attention_forward(out, att, q, k, v, workspace=ws)

    def gqa_attention_backward(self, dq, dk, dv, datt, dout, q, k, v, att):
        ws = self.buffers["gqa_workspace"] if self._train(q.reshape(*q.shape[:2], -1)) else None
        self.base.gqa_attention_backward(dq, dk, dv, datt, dout, q, k, v, att, workspace=ws)


def build_engine(cfg: NanoChatConfig, params, tcfg, *, log=print, inference=False) -> "NanoChatGPU":
    """The engine llmpy/families.py builds for `--device cuda`, with GPT-2's precision options (inference:
    no optimizer state, for sampling and evaluation)."""
    import llmpy.gpu as ops
    opts = engine_options(tcfg, int(engine.device_description()[1].removeprefix("sm_")), inference=inference)
    if opts["flash_attention"]:
        log("flash attention: the nanochat engine uses the materialised attention")
    return NanoChatGPU(cfg, ops, params=params, dtype=opts["dtype"], batch_size=opts["batch_size"],
                       seq_len=opts["seq_len"], master_weights=opts["master_weights"],
                       cuda_graph=opts["cuda_graph"], tf32=opts["tf32"], optimizer=tcfg.optimizer,
                       muon_lr=tcfg.muon_lr, peak_lr=tcfg.learning_rate,
                       optimizer_state=opts["optimizer_state"], log=log)


class NanoChatGPU(ArenaEngine, NanoChat):
    """nanochat's GPT on one GPU with llm.c's training state; use as `with NanoChatGPU(...) as model:`.

    dtype 'bf16' (params, grads, activations; fp32 m, v, master, rstd, losses) or 'fp32'; batch_size and
    seq_len: the training shape the arena is planned for; params: host float32 (N,) or None (zeros)."""

    def __init__(self, config: NanoChatConfig, ops, *, dtype="bf16", params=None, batch_size: int, seq_len: int,
                 master_weights=True, cuda_graph=True, tf32=False, optimizer="adamw", muon_lr=0.02,
                 peak_lr=3e-4, optimizer_state=True, log=print):
        import cupy as cp

        from llmpy.gpu.arena import Arena
        from llmpy.gpu.graph import StepGraph
        if seq_len > config.sequence_len:
            raise LlmpyError(f"-t/--seq-len {seq_len} exceeds the model's sequence_len {config.sequence_len}")
        if optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be 'adamw' or 'muon', got {optimizer!r}")
        self.config, self.xp, self.log = config, cp, log
        self.optimizer, self.muon_lr, self.peak_lr = optimizer, muon_lr, peak_lr
        self.dtype = storage_dtype(dtype)
        self.shapes, self.num_parameters = param_shapes(config), num_parameters(config)
        self.B, self.T = batch_size, seq_len
        self.master_weights = bool(master_weights) and self.dtype != F32
        self._acts, self._train_shape, self._closed, self.lt, self._prev_lt = {}, None, False, None, None
        self.graph = StepGraph(log=log) if cuda_graph else None
        self.update_graph = StepGraph(log=log) if cuda_graph else None
        self.reduce_graph = None   # no per-layer reduction inside the backward (reduces_in_backward)
        self._open(Arena(buffer_specs(config, batch_size, seq_len, dtype=self.dtype,
                                      master_weights=self.master_weights, optimizer_state=optimizer_state)),
                   ops, params, tf32)

    # the CPU model's KV cache is NumPy; the engine samples as GPT-2's does (llmpy/sample.py): a forward
    # over the sequence so far, padded to a multiple of 64 positions, per generated token
    kv_cache = None

    def _bind(self, ops, tf32: bool):
        """Arena views (zeroed) for every buffer; the RoPE tables; the engine's cuBLASLt handle."""
        from llmpy.cpu.rope import rope_tables
        from llmpy.gpu import cublaslt
        a, B, T = self.arena, self.B, self.T
        a.zero_all()
        self.params, self.grads, self.norm = a["params"], a["grads"], a["norm"]
        self.m, self.v, self.master = (a.views.get(k) for k in ("adam_m", "adam_v", "master"))
        self.p, self.g = carve(self.params, self.shapes), carve(self.grads, self.shapes)
        self.cos, self.sin = a["rope_cos"], a["rope_sin"]
        cos, sin = rope_tables(self.config.sequence_len, self.config.head_dim)
        self.cos.set(np.ascontiguousarray(cos, np.float32))
        self.sin.set(np.ascontiguousarray(sin, np.float32))
        self._acts[(B, T)] = {k[4:]: v for k, v in a.views.items() if k.startswith("act.")}
        self._acts[("grad", B, T)] = {k[5:]: v for k, v in a.views.items() if k.startswith("dact.")}
        self._train_shape = (B, T)
        buffers = {k: v for k, v in a.views.items() if "." not in k}
        self.ops = _NanoChatArenaOps(ops, buffers, (B, T))
        self._captured_ops = _NanoChatArenaOps(ops, buffers, (B, T), capture=True)
        self._prev_lt = cublaslt.default_handle()
        self.lt = cublaslt.CublasLt(a["lt_workspace"], tf32=tf32)
        cublaslt.set_default_handle(self.lt)

    def _buffers(self, key, shapes: dict) -> dict:
        """Other shapes than the training one (evaluation, sampling) take pool memory."""
        if key not in self._acts:
            grad = key[0] == "grad"
            self._acts[key] = {k: self.xp.zeros(s, dtype=self.dtype if grad else act_dtype(k, self.dtype))
                               for k, s in shapes.items()}
        return self._acts[key]

    # ---- forward / backward ------------------------------------------------------------------------
    def forward(self, inp):
        return NanoChat.forward(self, self._stage("inp", inp))

    def loss(self, targets) -> float:
        return NanoChat.loss(self, self._stage("targets", targets))

    def forward_backward(self, inp, targets, dloss: float, *, seed: int = 0):
        """One micro-step: forward on raw logits, backward with the fused softcap (losses and parameter
        grads ACCUMULATE). Everything but the encoder backward runs as one body, replayed from a CUDA
        graph when on; the encoder backward follows with this micro-step's rounding seed."""
        inp_d, tgt_d = self._stage("inp", inp), self._stage("targets", targets)
        train_shape = tuple(inp_d.shape) == (self.B, self.T)

        def body():
            ops, self.ops = self.ops, self._captured_ops
            try:
                self._forward(inp_d)
                NanoChat.backward(self, inp_d, tgt_d, dloss)
            finally:
                self.ops = ops

        if self.graph is not None and train_shape:
            self.graph.run(("micro-step", float(dloss)), body)
        else:
            body()
        dx0 = self._acts[("grad",) + tuple(inp_d.shape)]["dbtc"]   # d(wte[tok]), left there by backward
        self.ops.encoder_backward(self.g["wte"], None, dx0, inp_d, seed=seed)

    # ---- optimizer ---------------------------------------------------------------------------------
    def _muon_buffers(self) -> dict:
        """The arena's Newton-Schulz scratch for muon_update (ZeRO-1's per-layer steps use it too)."""
        return dict(workspace=self.arena["muon_workspace"], scratch=self.arena["muon_scratch"])

    def _slices(self, name: str) -> int:
        """Per-layer stacks are updated as L slices (llm.c's geometry); it shapes the rounding noise."""
        return 1 if name in ADAMW_ONLY else self.config.n_layer

    def update(self, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, t: int,
               grad_scale: float = 1.0, seeds=None):
        """One optimizer step (as NanoChat.update) on the master weights when kept; seeds[i] (the first 8
        of the trainer's 16) seeds tensor i's stochastic rounding into bf16. With CUDA graphs the
        launches replay a capture that reads the step's values from the arena."""
        from llmpy.gpu.adamw import step_scalars
        seeds = np.zeros(NUM_TENSORS, np.int64) if seeds is None else np.asarray(seeds, dtype=np.int64)
        if seeds.ndim != 1 or seeds.size < NUM_TENSORS or seeds.min() < 0 or seeds.max() >= 2**32:
            raise ValueError(f"seeds: expected at least {NUM_TENSORS} uint32 values, got {seeds!r}")
        seeds = seeds[:NUM_TENSORS]
        muon_lr = self.muon_lr * lr / self.peak_lr
        kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, t=t, grad_scale=grad_scale, weight_decay=weight_decay)
        if self.update_graph is None:
            self._step(kw, muon_lr, seeds)
            return
        a = self.arena
        a["adamw_scalars"].set(step_scalars(lr=lr, beta1=beta1, beta2=beta2, t=t, grad_scale=grad_scale))
        a["muon_scalars"].set(np.array([muon_lr, grad_scale], np.float32))
        a["seeds"].set(seeds.astype(U32))      # all on the current stream, before the replay reads them
        key = ("update", self.optimizer, float(beta1), float(beta2), float(eps), float(weight_decay))
        self.update_graph.run(key, lambda: self._step(kw, muon_lr, seeds, device=True))

    def _step(self, kw: dict, muon_lr: float, seeds, *, device=False):
        """The 8 launches; device=True: the step values come from the arena (graph capture)."""
        a, m, v, master = self.arena, self._views(self.m), self._views(self.v), self._views(self.master)
        for i, name in enumerate(self.shapes):
            seed_ptr = a["seeds"][i:i + 1] if device else None
            if name in self.whole_matrix_tensors(self.optimizer):
                self.ops.muon_update(self.p[name], m[name], self.g[name], lr=muon_lr, grad_scale=kw["grad_scale"],
                                     master=master[name], seed=int(seeds[i]), seed_ptr=seed_ptr,
                                     scalars=a["muon_scalars"] if device else None,
                                     workspace=a["muon_workspace"], scratch=a["muon_scratch"])
            else:
                self.ops.adamw_update(self.p[name], m[name], v[name], self.g[name], **kw, master=master[name],
                                      seed=int(seeds[i]), num_slices=self._slices(name), seed_ptr=seed_ptr,
                                      scalars=a["adamw_scalars"] if device else None)

    def init_from_master(self, seeds):
        """params = stochastic_round(master) per tensor, with the update's seeds (the first 8 of the
        trainer's 16, as update() takes them) and geometry (resume).
        Muon's apply kernel rounds with AdamW's hash and geometry, one slice per layer (cuda/muon.cu)."""
        from llmpy.gpu.adamw import init_from_master
        master = self._views(self.master)
        for i, name in enumerate(self.shapes):
            init_from_master(self.p[name], master[name], seed=int(seeds[i]), num_slices=self._slices(name))

    # ---- state in and out --------------------------------------------------------------------------
    def load_optimizer_state(self, state: dict):
        """Restore m, v and master (refusing the other optimizer's state, as NanoChat does); with master
        weights, regenerate the params from them with the seeds of the last update."""
        self.check_optimizer_state(state)
        super().load_optimizer_state(state)

    def close(self):
        self.cos = self.sin = None     # arena views too
        super().close()

    def mfu(self, tokens_per_step: int, ms: float, T: int) -> float:
        return mfu_percent(flops_per_token(self.config, T), tokens_per_step, ms, self.peak_tflops)

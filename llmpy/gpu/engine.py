"""The GPU training engine: llm.c's train_gpt2.cu model state around the backend-generic `GPT`.

`GPUGPT` runs `llmpy.model.GPT`'s forward and backward unchanged on the `llmpy.gpu` ops, and adds
what mixed-precision training on one GPU needs:
  - one `Arena` allocation for params and grads (bf16 or fp32), AdamW m and v and the master weights
    (fp32), the activations of the training (B, T) shape, the ops' scratch buffers, the token buffers
    and the cuBLASLt workspace. Other shapes (B=1 sampling, say) take activations from CuPy's pool;
  - AdamW with fp32 master weights and per-tensor stochastic-rounding seeds, and on resume llm.c's
    "init from master", so a resumed run continues bit for bit (llmc-facts.md §2.3, §6.12);
  - optional CUDA graphs (`StepGraph`, llmpy/gpu/graph.py): one of each micro-step's forward + backward,
    one of the AdamW update, whose per-step values (lr, the clipping scale, the bias corrections of
    step t, the 16 rounding seeds) are staged into device buffers before each replay. Between them the
    global gradient norm runs eagerly and is read back: the loop logs it and needs it on the host for
    the clipping scale and llm.c's z-score skip, as llm.c's own step does. Under data parallelism the
    last micro-step of a step has a graph of its own, with the per-layer gradient reductions on a
    forked comm stream inside it (llmpy/dist/overlap.py);
  - MFU from llm.c's GPU table (llmpy/gpu/mfu.py), a memory report, and close() / `with`, which give
    every byte back to the pool, also after an exception.

`train_setup(cfg, log=...)` is what llmpy/train.py calls for `--device cuda`: it prints the device,
picks the precision and returns `(ops, make_model)`. Tests: tests/test_gpu_engine.py.
"""
from __future__ import annotations

import warnings

import numpy as np

from llmpy.errors import LlmpyError
from llmpy.gpu.mfu import flops_per_token, mfu_percent, peak_tflops
from llmpy.model import (DECAYED, GPT, GPTConfig, act_dtype, act_shapes, carve, grad_act_shapes,
                         num_parameters, param_shapes)
from llmpy.rng import XorShiftStar

F32, I32, U32 = np.dtype(np.float32), np.dtype(np.int32), np.dtype(np.uint32)
NUM_TENSORS = 16                       # parameter tensors: one AdamW launch and one seed each
LT_WORKSPACE_BYTES = 32 * 1024 * 1024  # cuBLASLt workspace (llm.c: 32 MiB), carved from the arena


def storage_dtype(name: str) -> np.dtype:
    """'bf16' -> ml_dtypes.bfloat16, 'fp32' -> float32: the dtype of params, grads and activations."""
    if name in ("fp32", "float32"):
        return F32
    if name in ("bf16", "bfloat16"):
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    raise ValueError(f"unknown GPU dtype {name!r}; expected 'bf16' or 'fp32'")


# -------------------------------------------------------------------------------------------------
# Pure planning: what goes into the arena, the resume seeds, the options from a TrainConfig


def buffer_specs(config: GPTConfig, B: int, T: int, *, dtype, master_weights: bool, recompute: bool,
                 flash: bool = False, scratch=(),
                 optimizer_state: bool = True) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """Every buffer a (B, T) training step touches, as Arena specs (name, shape, dtype), in order.

    params/grads: dtype; AdamW m, v and master weights: fp32; activations as `act_shapes` (LN statistics
    and losses fp32) prefixed 'act.', with recompute one layer's GELU output shared by all layers
    (llm.c -r 1), with flash the fused attention's (no T x T buffers); activation gradients prefixed
    'dact.' (fp32 for the fused attention's delta); then `scratch` (the ops' own (name, shape,
    dtype) scratch specs), the token buffers and AdamW's step values that graph replays read, the norm
    and the cuBLASLt workspace. optimizer_state=False leaves out m, v and master: under ZeRO-1 each rank
    keeps only its shard of them (llmpy/dist/zero.py).
    """
    dtype, n = np.dtype(dtype), num_parameters(config)
    specs = [("params", (n,), dtype), ("grads", (n,), dtype)]
    if optimizer_state:
        specs += [("adam_m", (n,), F32), ("adam_v", (n,), F32)] + ([("master", (n,), F32)] if master_weights else [])
    for name, shape in act_shapes(config, B, T, flash=flash).items():
        if recompute and name == "fch_gelu":
            shape = shape[1:]
        specs.append((f"act.{name}", shape, act_dtype(name, dtype)))
    specs += [(f"dact.{name}", shape, act_dtype(name, dtype))
              for name, shape in grad_act_shapes(config, B, T, flash=flash).items()]
    specs += [(name, tuple(shape), np.dtype(dt)) for name, shape, dt in scratch]
    specs += [("inp", (B, T), I32), ("targets", (B, T), I32), ("adamw_scalars", (4,), F32),
              ("adamw_seeds", (NUM_TENSORS,), U32), ("norm", (1,), F32),
              ("lt_workspace", (LT_WORKSPACE_BYTES,), np.dtype(np.uint8))]
    return specs


def adamw_seeds(rng_state: int) -> list[int]:
    """The 16 per-tensor rounding seeds the training loop draws right after saving
    rng_state_last_update; resume redraws them to round master -> params as that update did."""
    rng = XorShiftStar(rng_state)
    return [rng.random_u32() for _ in range(NUM_TENSORS)]


AMPERE_SM = 80   # sm_80: bf16 and TF32 tensor-core matmuls (and the fused attention's cp.async/mma.sync)


def engine_options(cfg, sm: int = 90, *, inference: bool = False) -> dict:
    """GPUGPT keyword arguments from a TrainConfig, on a GPU of compute capability sm (80: sm_80): llm.c's
    defaults are bf16 with fp32 master weights; --dtype fp32 trains in fp32 (TF32 matmuls unless -f 0),
    where a master copy would be a duplicate. --dtype auto is fp32 below sm_80 (a T4, say), which has no
    bf16 matmuls; --dtype bf16 there is an error. The arena holds the optimizer state unless ZeRO-1 keeps
    it (-z 1) or the engine is for inference (sampling, evaluation)."""
    if cfg.dtype == "bf16" and sm < AMPERE_SM:
        raise LlmpyError(f"--dtype bf16: this GPU (sm_{sm}) has no bf16 matmuls, which need sm_{AMPERE_SM} "
                         "or newer; use --dtype fp32")
    dtype = "bf16" if cfg.dtype == "bf16" or (cfg.dtype == "auto" and sm >= AMPERE_SM) else "fp32"
    return dict(dtype=dtype, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                master_weights=bool(cfg.master_weights) and dtype == "bf16",
                recompute=cfg.recompute >= 1, gelu_fusion=cfg.gelu_fusion,
                cuda_graph=bool(cfg.cuda_graph), tf32=bool(cfg.tf32) and dtype == "fp32" and sm >= AMPERE_SM,
                flash_attention=int(cfg.flash_attention), optimizer_state=cfg.zero_stage != 1 and not inference)


# -------------------------------------------------------------------------------------------------
# Set-up for llmpy/train.py


def device_description() -> tuple[str, str]:
    """(name, 'sm_XY') of the current CUDA device."""
    import cupy as cp
    dev = cp.cuda.Device()
    name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"]
    return (name.decode() if isinstance(name, bytes) else name), f"sm_{dev.compute_capability}"


def train_setup(cfg, *, log=print, inference=False):
    """Import the GPU backend, print the device and the precision, and return (ops, make_model), where
    make_model(gpt_config, host_f32_params) builds the GPUGPT the loop trains (inference: without the
    optimizer state, for sampling and evaluation)."""
    import llmpy.gpu as ops
    name, sm = device_description()
    log(f"device: cuda ({name}, {sm})")
    opts = engine_options(cfg, int(sm.removeprefix("sm_")), inference=inference)
    if opts["dtype"] == "bf16":
        log("precision: bf16 params, grads and activations, fp32 AdamW state, "
            + ("fp32 master weights (-w 1)" if opts["master_weights"] else "no master weights (-w 0)"))
    else:
        why = f" (--dtype auto: {sm} has no bf16 matmuls)" if cfg.dtype == "auto" else ""
        log(f"precision: fp32, TF32 matmuls {'on' if opts['tf32'] else 'off'} (-f {cfg.tf32}){why}")
    log(f"cuda graph: {'on' if opts['cuda_graph'] else 'off'}; recompute: {cfg.recompute}; "
        f"gelu fusion: {cfg.gelu_fusion}; flash attention: {cfg.flash_attention}")

    def make_model(config: GPTConfig, params) -> GPUGPT:
        return GPUGPT(config, ops, params=params, log=log, **opts)

    return ops, make_model


# -------------------------------------------------------------------------------------------------
# The ops as the model calls them


class _ArenaOps:
    """llmpy.gpu as GPUGPT's forward/backward see it. At the training shape the ops that would
    allocate scratch get arena buffers (so nothing allocates inside a step and the step can be
    captured), and the encoder backward gets the host copy of the tokens (no device-to-host copy).
    With capture=True the encoder backward is left out: the engine runs it after the replay, because
    its launcher groups token ids on the host and its seed changes every micro-step, and a graph
    would freeze both."""

    def __init__(self, ops, buffers: dict, train_rows: tuple[int, int], *, capture=False, flash_tile=64):
        self.base, self.buffers, self.train_rows, self.capture = ops, buffers, train_rows, capture
        self.flash_tile = flash_tile   # the fused attention's query rows per block (--flash-attention 2: 128)
        self.inp_host = None   # the NumPy tokens last staged into buffers['inp'], if they came from the host

    def __getattr__(self, name):
        return getattr(self.base, name)

    def _train(self, a) -> bool:
        return tuple(a.shape[:-1]) == self.train_rows

    def layernorm_backward(self, dinp, dweight, dbias, dout, inp, weight, mean, rstd):
        scratch = self.buffers["ln_scratch"] if self._train(inp) else None
        self.base.layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, scratch=scratch)

    def matmul_backward(self, dinp, dweight, dbias, dout, inp, weight, **kw):
        if dbias is not None and self._train(dout):
            # the op's two parts, bias reduction first as inside matmul_backward, so that the reduction
            # can use arena scratch (matmul_backward has no scratch argument to pass it through)
            from llmpy.gpu.bias import matmul_bias_backward
            matmul_bias_backward(dbias, dout, scratch=self.buffers["bias_scratch"])
            dbias = None
        self.base.matmul_backward(dinp, dweight, dbias, dout, inp, weight, **kw)

    def attention_forward(self, out, qkvr, att, inp, **kw):
        # q k^T into the backward's datt, free during the forward, so that the softmax writes only att's
        # causal part: the arena zeroed the upper triangle once and nothing else writes it (SLOW-3)
        if self._train(inp) and "preatt" in self.buffers:
            kw.setdefault("preatt", self.buffers["preatt"])
        self.base.attention_forward(out, qkvr, att, inp, **kw)

    def flash_attention_forward(self, out, lse, inp):
        self.base.flash_attention_forward(out, lse, inp, tile=self.flash_tile)

    def flash_attention_backward(self, dinp, delta, dout, inp, out, lse):
        self.base.flash_attention_backward(dinp, delta, dout, inp, out, lse, tile=self.flash_tile)

    def global_norm_squared(self, out, grad):
        self.base.global_norm_squared(out, grad, scratch=self.buffers["norm_scratch"])

    def encoder_backward(self, dwte, dwpe, dout, inp, *, seed=0):
        if self.capture:
            return
        kw = {}
        if inp.data.ptr == self.buffers["inp"].data.ptr:
            kw = dict(workspace=self.buffers["encoder_buckets"], inp_host=self.inp_host)
        self.base.encoder_backward(dwte, dwpe, dout, inp, seed=seed, **kw)


def _op_scratch(config: GPTConfig, B: int, T: int, dtype) -> list:
    """(name, shape, dtype) of the scratch the ops want for a (B, T) step, sized by their own helpers."""
    from llmpy.gpu import bias, encoder, global_norm, layernorm
    BT, C = B * T, config.channels
    bias_need = max(bias.scratch_size(BT, oc, dtype) for oc in (3 * C, C, 4 * C))   # qkv, proj, fc
    return [("ln_scratch", (layernorm.backward_scratch_size(BT, C),), F32),
            ("bias_scratch", (max(bias_need, 1),), F32),
            ("norm_scratch", (global_norm.norm_blocks(num_parameters(config)),), F32),
            ("encoder_buckets", (encoder.workspace_size(B, T),), I32)]


# -------------------------------------------------------------------------------------------------
# The model


class ArenaEngine:
    """What a one-GPU engine over an `Arena` shares (GPUGPT here, llmpy/gpu/nanochat_engine.py's
    NanoChatGPU): parameter upload into bf16 + master, token staging into the arena's fixed buffers,
    parameters out, the memory report, and close() / `with`. The engine provides the attributes these
    read: config (vocab_size), dtype, num_parameters, B, T, arena, params, grads, m, v, master, norm,
    ops (_ArenaOps), _captured_ops, _acts, p, g, graph, update_graph, reduce_graph (a StepGraph or
    None each), lt, _prev_lt, _closed."""

    def _open(self, arena, ops, params, tf32: bool):
        """Allocate the arena (one clear line when it does not fit), bind the views (the engine's _bind),
        upload the params; on any error everything allocated so far is given back."""
        import cupy as cp
        self.arena = arena
        try:
            arena.open()
        except cp.cuda.memory.OutOfMemoryError:
            raise LlmpyError(f"out of GPU memory: the training buffers need {arena.nbytes / 2**30:.2f} "
                             f"GiB (B={self.B}, T={self.T}); lower -b or -t") from None
        try:
            self._bind(ops, tf32)
            if params is not None:
                self.load_params(params)
            self.peak_tflops = peak_tflops(device_description()[0], "fp32" if self.dtype == F32 else "bf16")
        except BaseException:
            self.close()
            raise

    def load_params(self, params):
        """Upload host float32 parameters (N,), rounded to nearest into bf16; the master weights are
        the widened bf16 values, as llm.c's first update initialises them."""
        host = np.ascontiguousarray(params, dtype=np.float32).reshape(-1)
        if host.size != self.num_parameters:
            raise ValueError(f"params has {host.size} elements, the model has {self.num_parameters}")
        stored = host.astype(self.dtype)            # bf16: round to nearest even
        _upload(self.params, stored)
        if self.master is not None:
            _upload(self.master, stored.astype(np.float32))

    def _stage(self, name: str, tokens):
        """Tokens (B, T), NumPy or CuPy -> the int32 device array the kernels read. The training shape
        goes into the arena's fixed buffer (what a graph replay reads), other shapes into a new array."""
        cp, host = self.xp, isinstance(tokens, np.ndarray)
        if host and tokens.size:
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.config.vocab_size:   # llm.c checks on the host too
                raise ValueError(f"{name}: token ids must be in [0, {self.config.vocab_size}), "
                                 f"got [{lo}, {hi}]")
        if tuple(tokens.shape) != (self.B, self.T):
            return cp.ascontiguousarray(cp.asarray(tokens, dtype=np.int32))
        buf = self.arena[name]
        if host:
            tokens = np.array(tokens, dtype=np.int32, order="C")  # a copy: the caller may reuse its array
            buf.set(tokens)                             # on the current stream
            if name == "inp":
                self.ops.inp_host = tokens
        elif tokens.data.ptr != buf.data.ptr:
            cp.copyto(buf, tokens, casting="same_kind")
            if name == "inp":
                self.ops.inp_host = None                # the encoder backward reads it back if needed
        return buf

    @property
    def checkpoint_dtype(self) -> str:
        return "fp32" if self.dtype == F32 else "bf16"

    def params_f32(self) -> np.ndarray:
        """The live parameters as host float32 (for bf16 exactly the bf16 values, which is what llm.c's
        bf16 model file holds; the master weights go to the state file)."""
        return _download(self.params).astype(np.float32)

    def _views(self, flat) -> dict:
        return carve(flat, self.shapes) if flat is not None else dict.fromkeys(self.shapes)

    def grad_norm(self) -> float:
        self.ops.global_norm_squared(self.norm, self.grads)
        return float(np.sqrt(float(self.norm.get()[0])))

    def optimizer_state(self) -> dict:
        return {"m": _download(self.m), "v": _download(self.v),
                "master": None if self.master is None else _download(self.master)}

    def load_optimizer_state(self, state: dict):
        """Restore m, v and master from a state file (llmpy.checkpoint.load_state); with master weights,
        regenerate the params from them with the seeds of the last update, as llm.c's resume does."""
        n = self.num_parameters
        _upload(self.m, _host_f32(state["m"], n, "m"))
        _upload(self.v, _host_f32(state["v"], n, "v"))
        master = state.get("master")
        if self.master is None:
            if master is not None:
                self.log("state file has master weights but this run keeps none: ignoring them")
            return
        if master is None:
            raise LlmpyError("the state file has no master weights; resume with -w 0 (as llm.c requires)")
        if state.get("rng_state_last_update") is None:
            raise LlmpyError("the state file has no rng_state_last_update: cannot restore the params "
                             "from the master weights bit-exactly")
        _upload(self.master, _host_f32(master, n, "master"))
        self.init_from_master(adamw_seeds(int(state["rng_state_last_update"])))

    # ---- device ------------------------------------------------------------------------------------
    def synchronize(self):
        self.xp.cuda.Device().synchronize()

    def memory_report(self) -> str:
        cp, mib = self.xp, 2.0**-20
        groups = {"params": ("params",), "grads": ("grads",), "AdamW m+v": ("adam_m", "adam_v"),
                  "master": ("master",), "activations": ("act.", "dact."), "cuBLASLt": ("lt_workspace",)}
        sizes = {g: sum(s.nbytes for s in self.arena.layout.slots if s.name.startswith(prefixes))
                 for g, prefixes in groups.items()}
        free, total = cp.cuda.runtime.memGetInfo()
        parts = ", ".join(f"{g} {b * mib:.1f}" for g, b in sizes.items() if b)
        return (f"memory: arena {self.arena.nbytes * mib:.1f} MiB ({parts}); "
                f"pool {cp.get_default_memory_pool().used_bytes() * mib:.1f} MiB in use; "
                f"device {(total - free) * mib:.0f} / {total * mib:.0f} MiB")

    def close(self):
        """Release all device memory, so the pool is back where it was before the model; idempotent."""
        if self._closed:
            return
        self._closed = True
        from llmpy.gpu import cublaslt
        try:
            self.synchronize()
        finally:
            for graph in (self.graph, self.update_graph, self.reduce_graph):
                if graph is not None:
                    graph.close()
            self._acts.clear()
            self.params = self.grads = self.m = self.v = self.master = self.norm = None
            self.p, self.g = {}, {}
            if isinstance(getattr(self, "ops", None), _ArenaOps):
                self.ops = self.ops.base
            self._captured_ops = None
            if self.lt is not None:
                if cublaslt.default_handle() is self.lt:
                    cublaslt.set_default_handle(self._prev_lt)
                self.lt.close()
            self.lt = self._prev_lt = None
            self.arena.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            self.close()
            return
        # the traceback's frames still reference arena views (the locals of forward/backward) until the
        # exception is handled, so the arena's "views outlived it" warning would be noise: the blocks
        # go back to the pool as soon as the exception is dropped
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self.close()


class GPUGPT(ArenaEngine, GPT):
    """GPT-2 on one GPU with llm.c's training state; use as `with GPUGPT(...) as model:`.

    dtype 'bf16' (params, grads, activations; fp32 m, v and master) or 'fp32'. batch_size/seq_len: the
    training shape the arena is planned for. params: host float32 (N,) or None (zeros). recompute and
    gelu_fusion take effect when model.py provides the hooks (GPT.recompute_gelu / GPT.gelu_fusion).
    flash_attention: 1 (or True) the fused attention kernels, 2 the same with 128-row query tiles
    (llmpy/gpu/flash_attention.py, tile=128); bf16 with head size 64 only, otherwise the engine
    says so and keeps llm.c's materialised path. optimizer_state=False (ZeRO-1): no m, v or master
    in the arena; llmpy/dist/zero.py's ShardedOptimizer keeps this rank's shard of them and runs the update.
    """

    reduces_in_backward = True   # forward_backward(reducer=...): llmpy/dist/overlap.py

    def __init__(self, config: GPTConfig, ops, *, dtype="bf16", params=None, batch_size: int,
                 seq_len: int, master_weights=True, recompute=True, gelu_fusion=0, cuda_graph=True,
                 tf32=False, flash_attention=False, optimizer_state=True, log=print):
        import cupy as cp

        from llmpy.gpu.arena import Arena
        from llmpy.gpu.flash_attention import supports as flash_supports
        from llmpy.gpu.graph import StepGraph
        if seq_len > config.max_seq_len:
            raise LlmpyError(f"sequence length {seq_len} exceeds the model's max_seq_len "
                             f"{config.max_seq_len}")
        self.config, self.xp, self.log = config, cp, log
        self.dtype = storage_dtype(dtype)
        self.shapes, self.num_parameters = param_shapes(config), num_parameters(config)
        self.B, self.T = batch_size, seq_len
        self.master_weights = bool(master_weights) and self.dtype != F32
        self.recompute_gelu = bool(recompute) and hasattr(GPT, "recompute_gelu")
        self.gelu_fusion = int(gelu_fusion) if hasattr(GPT, "gelu_fusion") else 0
        if recompute and not self.recompute_gelu:
            log("recompute: off (model.py keeps every layer's GELU output)")
        if gelu_fusion and not self.gelu_fusion:
            log(f"gelu fusion: -ge {gelu_fusion} needs model.py support; using 0")
        if int(flash_attention) not in (0, 1, 2):
            raise LlmpyError(f"--flash-attention {flash_attention}: expected 0 (materialised), 1 (fused, "
                             "64-row tiles) or 2 (fused, 128-row query tiles)")
        self.flash_attention = bool(flash_attention) and flash_supports(self.dtype, config.head_size)
        self.flash_tile = 128 if int(flash_attention) == 2 else 64
        if flash_attention and not self.flash_attention:
            log(f"flash attention: needs bf16 and head size 64 (have {np.dtype(self.dtype).name}, "
                f"{config.head_size}); using the materialised attention")
        self._acts, self._closed, self.lt, self._prev_lt = {}, False, None, None
        self.graph = StepGraph(log=log) if cuda_graph else None
        self.update_graph = StepGraph(log=log) if cuda_graph else None
        self.reduce_graph = StepGraph(log=log) if cuda_graph else None   # last micro-step, data parallel
        scratch = _op_scratch(config, batch_size, seq_len, self.dtype)
        self._open(Arena(buffer_specs(config, batch_size, seq_len, dtype=self.dtype, scratch=scratch,
                                      master_weights=self.master_weights, recompute=self.recompute_gelu,
                                      flash=self.flash_attention, optimizer_state=optimizer_state)),
                   ops, params, tf32)

    def _bind(self, ops, tf32: bool):
        """Arena views (zeroed) for every buffer; the engine's cuBLASLt handle becomes the default."""
        from llmpy.gpu import cublaslt
        a, B, T = self.arena, self.B, self.T
        a.zero_all()
        self.params, self.grads = a["params"], a["grads"]
        self.m, self.v, self.master = (a.views.get(k) for k in ("adam_m", "adam_v", "master"))
        self.p, self.g = carve(self.params, self.shapes), carve(self.grads, self.shapes)
        self.norm = a["norm"]
        acts = {k[4:]: v for k, v in a.views.items() if k.startswith("act.")}
        if self.recompute_gelu:   # every layer's view is the one shared buffer (stride 0 over layers)
            one = acts["fch_gelu"]
            acts["fch_gelu"] = self.xp.lib.stride_tricks.as_strided(
                one, shape=(self.config.num_layers,) + one.shape, strides=(0,) + one.strides)
        self._acts[(B, T)] = acts
        self._acts[("grad", B, T)] = {k[5:]: v for k, v in a.views.items() if k.startswith("dact.")}
        self._train_shape = (B, T)
        buffers = {k: v for k, v in a.views.items() if "." not in k}
        if "dact.datt" in a.views:                     # the materialised attention's q k^T scratch
            buffers["preatt"] = a["dact.datt"]
        self.ops = _ArenaOps(ops, buffers, (B, T), flash_tile=self.flash_tile)
        self._captured_ops = _ArenaOps(ops, buffers, (B, T), capture=True, flash_tile=self.flash_tile)
        self._prev_lt = cublaslt.default_handle()
        self.lt = cublaslt.CublasLt(a["lt_workspace"], tf32=tf32)
        cublaslt.set_default_handle(self.lt)

    # ---- forward / backward ------------------------------------------------------------------------
    def forward(self, inp):
        return super().forward(self._stage("inp", inp))

    def loss(self, targets) -> float:
        return super().loss(self._stage("targets", targets))

    def backward(self, inp, targets, dloss: float, *, seed: int = 0):
        super().backward(self._stage("inp", inp), self._stage("targets", targets), dloss, seed=seed)

    def forward_backward(self, inp, targets, dloss: float, *, seed: int = 0, reducer=None):
        """One micro-step: forward, then backward (losses and parameter grads ACCUMULATE). With a CUDA
        graph, at the training shape, all but the encoder backward replays the captured step; the
        encoder backward follows eagerly with this micro-step's seed (the same order as eager).
        reducer (llmpy/dist/overlap.py, data parallelism's last micro-step): its layer(l) is called as
        soon as layer l's gradients are complete, to reduce them on its stream during the backward;
        with graphs this micro-step is a graph of its own, which joins the reducer's stream at its end."""
        self.layer_grads_done = None if reducer is None else reducer.layer
        try:
            if self.graph is None or tuple(inp.shape) != (self.B, self.T):
                self.forward(inp)
                self.backward(inp, targets, dloss, seed=seed)
                return
            self._graphed_micro_step(inp, targets, dloss, seed, reducer)
        finally:
            self.layer_grads_done = None

    def _graphed_micro_step(self, inp, targets, dloss: float, seed: int, reducer):
        inp_d, tgt_d = self._stage("inp", inp), self._stage("targets", targets)

        def body():
            ops, self.ops = self.ops, self._captured_ops
            try:
                GPT.forward(self, inp_d)
                GPT.backward(self, inp_d, tgt_d, dloss, seed=seed)
                if reducer is not None:
                    reducer.join()       # a capture must end with its forked streams joined
            finally:
                self.ops = ops

        if reducer is None:
            self.graph.run(("micro-step", float(dloss)), body)
        else:
            self.reduce_graph.run(("micro-step", float(dloss), id(reducer)), body)
        dresidual = self._acts[("grad", self.B, self.T)]["dresidual"]
        self.ops.encoder_backward(self.g["wte"], self.g["wpe"], dresidual, inp_d, seed=seed)

    # ---- optimizer ---------------------------------------------------------------------------------
    def _slices(self, name: str) -> int:
        """AdamW launches per-layer stacks as L slices (llm.c's grid); part of the rounding geometry."""
        return 1 if name in self.unstacked else self.config.num_layers

    def update(self, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, t: int,
               grad_scale: float = 1.0, seeds=None):
        """One AdamW step over the 16 tensors (weight decay on the 2-D ones), reading and writing the
        fp32 master weights when kept; seeds[i] seeds tensor i's stochastic rounding into bf16.
        grad_scale is the clipping factor (1, or clip / norm). With CUDA graphs on, the 16 launches
        replay a capture that reads lr, grad_scale, t's bias corrections and the seeds from the arena."""
        from llmpy.gpu.adamw import step_scalars
        seeds = np.zeros(NUM_TENSORS, U32) if seeds is None else np.asarray(seeds, dtype=np.int64)
        if seeds.shape != (NUM_TENSORS,) or seeds.min() < 0 or seeds.max() >= 2**32:
            raise ValueError(f"seeds: expected {NUM_TENSORS} uint32 values, got {seeds!r}")
        kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, t=t, grad_scale=grad_scale)
        if self.update_graph is None:
            self._adamw(kw, weight_decay, seeds)
            return
        scalars, seeds_d = self.arena["adamw_scalars"], self.arena["adamw_seeds"]
        scalars.set(step_scalars(lr=lr, beta1=beta1, beta2=beta2, t=t, grad_scale=grad_scale))
        seeds_d.set(seeds.astype(U32))     # both on the current stream, before the replay reads them
        key = ("adamw", float(beta1), float(beta2), float(eps), float(weight_decay))
        self.update_graph.run(key, lambda: self._adamw(kw, weight_decay, seeds, scalars, seeds_d))

    def _adamw(self, kw: dict, weight_decay: float, seeds, scalars=None, seeds_d=None):
        """The 16 launches; with scalars/seeds_d (device) the by-value step values are not used."""
        m, v, master = self._views(self.m), self._views(self.v), self._views(self.master)
        for i, name in enumerate(self.shapes):
            self.ops.adamw_update(self.p[name], m[name], v[name], self.g[name], **kw,
                                  weight_decay=weight_decay if name in DECAYED else 0.0,
                                  master=master[name], seed=int(seeds[i]), num_slices=self._slices(name),
                                  scalars=scalars, seed_ptr=None if seeds_d is None else seeds_d[i:i + 1])

    def init_from_master(self, seeds):
        """params = stochastic_round(master) per tensor, with AdamW's seeds and geometry (resume)."""
        from llmpy.gpu.adamw import init_from_master
        master = self._views(self.master)
        for i, name in enumerate(self.shapes):
            init_from_master(self.p[name], master[name], seed=int(seeds[i]), num_slices=self._slices(name))

    # ---- state in and out --------------------------------------------------------------------------
    def mfu(self, tokens_per_step: int, ms: float, T: int) -> float:
        return mfu_percent(flops_per_token(self.config, T), tokens_per_step, ms, self.peak_tflops)



def _upload(dev, host: np.ndarray):
    """Copy a host array into a device array of the same dtype and size as raw bytes (bf16 then needs
    nothing from CuPy's dtype-aware copy paths)."""
    if host.dtype != dev.dtype or host.size != dev.size:
        raise ValueError(f"upload: host {host.dtype} x {host.size} into device {dev.dtype} x {dev.size}")
    dev.reshape(-1).view(np.uint8).set(np.ascontiguousarray(host).reshape(-1).view(np.uint8))


def _download(dev) -> np.ndarray:
    """A device array as a host array of the same dtype and shape (raw bytes, like _upload)."""
    return dev.reshape(-1).view(np.uint8).get().view(dev.dtype).reshape(dev.shape)


def _host_f32(arr, n: int, name: str) -> np.ndarray:
    host = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
    if host.size != n:
        raise LlmpyError(f"state file: {name} has {host.size} values, the model has {n} parameters")
    return host

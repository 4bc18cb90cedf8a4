"""The training loop: llm.c's train_gpt2cu schedule, on the CPU (NumPy) or GPU backend.

Per step s = 0..S (S = -x, or one epoch): validation, HellaSwag, sampling and checkpointing run at the
top of the iteration (so the checkpoint at step s holds the model after s updates), then one optimizer
step made of grad_accum micro-steps. Output matches llm.c: one stdout line per step, `main.log` lines
(`s:%d trl:%.4f lr:%.6f norm:%.2f`, `s:%d tel:%.4f`) and, in addition, full-precision `metrics.jsonl`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from llmpy import checkpoint, families
from llmpy.data import DataLoader, find_val_split
from llmpy.errors import LlmpyError
from llmpy.model import GPT, GPTConfig
from llmpy.dist.comm import RankAgreedError
from llmpy.dist.zero import check_zero_layout
from llmpy.rng import XorShiftStar, init_params
from llmpy.rundir import Interrupted, OutputDir, SignalStop, config_record, new_run_dir, os_error, report_run


def flag(short: str, default, help: str, **kw):
    """A TrainConfig field carrying its llm.c short flag and help text (the CLI is derived from these)."""
    return field(default=default, metadata={"short": short, "help": help, **kw})


@dataclass(frozen=True)
class TrainConfig:
    # data and model
    train_data: str = flag("-i", "", "train token shards (glob); empty: the embedded default corpus")
    val_data: str = flag("-j", "", "val token shards (glob); empty: the default corpus's val split, or the "
                                   "shards beside -i with 'val' for 'train' in their names")
    model: str = flag("-e", "", "model .bin (llm.c v3/v5) or descriptor d6|d12|d24|d36|d48|gpt3:cN "
                                "(empty: d12); nanochat: a directory with config.json + model.safetensors "
                                "or nanochat:dN[:kvK]")
    output_dir: str = flag("-o", "", "output dir for main.log, metrics.jsonl, checkpoints and loss.png; one run "
                                     "at a time (empty: nothing is written, or runs/<time> for the embedded corpus)")
    # checkpoints
    checkpoint_every: int = flag("-n", 0, "write a checkpoint every N steps (0: never)")
    checkpoints_keep: int = flag("-nk", 0, "keep only the last N checkpoints (0: all)")
    major_checkpoint_every: int = flag("-nm", 0, "never delete checkpoints at multiples of N")
    resume: int = flag("-y", 0, "1: resume the run in -o from its newest readable checkpoint (none yet: "
                                "start at step 0)", choices=(0, 1))
    # batch
    batch_size: int = flag("-b", 4, "micro-batch size B")
    seq_len: int = flag("-t", 1024, "sequence length T (<= the model's max_seq_len)")
    total_batch_size: int = flag("-d", -1, "tokens per optimizer step (-1: B*T); sets grad accumulation")
    # optimization
    max_steps: int = flag("-x", -1, "number of optimizer steps, positive (-1: one epoch)")
    lr_schedule: str = flag("-k", "cosine", "learning-rate schedule", choices=("cosine", "linear", "constant",
                                                                               "wsd"))
    learning_rate: float = flag("-l", 3e-4, "peak learning rate (positive)")
    warmup_steps: int = flag("-u", 0, "linear warmup steps")
    final_lr_frac: float = flag("-q", 1.0, "final learning rate as a fraction of the peak")
    weight_decay: float = flag("-c", 0.0, "AdamW weight decay (2-D weights only)")
    optimizer: str = flag("", "adamw", "adamw, or muon for nanochat models (Muon on the block matrices, "
                                       "AdamW on wte and lm_head)", choices=("adamw", "muon"))
    muon_lr: float = flag("", 0.02, "Muon's peak learning rate (the -k schedule scales it like -l)")
    skip_loss_z: float = flag("-sl", 0.0, "skip the update when the loss z-score exceeds this (0: off)")
    skip_norm_z: float = flag("-sg", 0.0, "skip the update when the grad-norm z-score exceeds this (0: off)")
    # evaluation
    val_every: int = flag("-v", 20, "validate every N steps (0: never)")
    val_max_steps: int = flag("-m", 20, "validation batches, positive (-1: the whole val split; -v 0 turns "
                                        "validation off)")
    sample_every: int = flag("-s", 20, "generate a sample every N steps (<= 0: never)")
    gen_len: int = flag("-g", 64, "tokens per generated sample")
    hellaswag: int = flag("-h", 0, "1: evaluate HellaSwag at every validation", choices=(0, 1))
    overfit_single_batch: int = flag("-a", 0, "1: train on the first val batch only (no shuffle)", choices=(0, 1))
    # numerics and device
    tf32: int = flag("-f", 1, "1: allow TF32 matmuls in fp32 mode (GPU)", choices=(0, 1))
    master_weights: int = flag("-w", 1, "1: keep fp32 master weights (GPU bf16)", choices=(0, 1))
    gelu_fusion: int = flag("-ge", 0, "0: separate GELU, 1: fused into the forward matmul, 2: also backward",
                            choices=(0, 1, 2))
    zero_stage: int = flag("-z", 0, "ZeRO stage: 0 all-reduces gradients, 1 also shards the optimizer state "
                           "over the ranks", choices=(0, 1, 2, 3))
    recompute: int = flag("-r", 1, "0: keep GELU outputs, 1: recompute GELU in backward (GPU)", choices=(0, 1))
    log_gpu_every: int = flag("-lg", -1, "print device memory use every N steps (-1: never)")
    device: str = flag("", "auto", "where to train", choices=("auto", "cpu", "cuda"))
    dtype: str = flag("", "auto", "parameter/activation type: auto (bf16 on GPUs of sm_80+, else fp32)",
                      choices=("auto", "fp32", "bf16"))
    cuda_graph: int = flag("", 1, "1: capture the GPU step in a CUDA graph and replay it", choices=(0, 1))
    flash_attention: int = flag("", 0, "1: fused (flash) attention kernels on the GPU, bf16 with head size 64; "
                                       "2: the same with 128-row query tiles (0: llm.c's materialised attention)",
                                choices=(0, 1, 2))
    seed: int = flag("", 1337, "seed for sampling during training, 1..2**64-1 (llm.c: 1337)")
    # several processes (llmpy/dist/init.py): `mpiexec -n N`, or one process per rank started by a scheduler
    init_method: str = flag("-pi", "mpi", "how the ranks meet: mpi (mpiexec), tcp (-ps) or fs (-pf)",
                            choices=("mpi", "tcp", "fs"))
    num_processes: int = flag("-pn", 1, "number of processes (tcp, fs; mpiexec sets it under mpi)")
    process_rank: int = flag("-pr", 0, "this process's rank (tcp, fs)")
    gpus_per_node: int = flag("-pg", 8, "GPUs per machine: local GPU = rank % N (tcp, fs)")
    server_addr: str = flag("-ps", "", "HOST[:PORT] where rank 0 serves the NCCL id (tcp; port 12345 if omitted)")
    fs_path: str = flag("-pf", "", "a folder every rank shares, for the NCCL id file (fs)")


BETA1, BETA2, EPS = 0.9, 0.95, 1e-8   # AdamW as in llm.c's trainer
GRAD_CLIP = 1.0                       # global norm; the scale is applied inside AdamW
OUTLIER_WINDOW = 128                  # llm.c's outlier detector window

# -------------------------------------------------------------------------------------------------
# The embedded default: `llmpy train` with no -i trains for a few minutes on the built-in corpus


def embedded_preset(device: str) -> dict:
    """Defaults for a run on the embedded corpus: a few minutes on this device, falling losses, samples."""
    if device == "cuda":   # GPT-2 124M at full context
        return dict(model="d12", batch_size=8, seq_len=1024, max_steps=300, learning_rate=6e-4, warmup_steps=30,
                    final_lr_frac=0.1, weight_decay=0.1, val_every=50, val_max_steps=10, sample_every=100,
                    checkpoint_every=100, checkpoints_keep=1)
    return dict(model="d6", batch_size=4, seq_len=128, max_steps=250, learning_rate=1e-3, warmup_steps=20,
                final_lr_frac=0.1, weight_decay=0.1, val_every=50, val_max_steps=10, sample_every=125,
                checkpoint_every=50, checkpoints_keep=1)


def with_embedded_defaults(cfg: TrainConfig, explicit: set, *, log=None) -> TrainConfig:
    """cfg with the embedded preset filled in for every field the user did not set explicitly
    (only when no -i is given), and without -o a new folder runs/<time>, so the run keeps what it trained
    (one process only: the ranks of a multi-process launch could not agree on the time). log: print, on
    rank 0 of an mpiexec launch only."""
    if cfg.train_data:
        return cfg
    from llmpy.dist.init import launched_rank, launched_world_size
    if log is None:
        log = print if launched_rank() == 0 else _quiet
    device = resolve_device(cfg.device)
    preset = {k: v for k, v in embedded_preset(device).items() if k not in explicit}
    if "output_dir" not in explicit and launched_world_size() == 1 and cfg.num_processes == 1:
        preset["output_dir"] = new_run_dir()
    flags = " ".join(f"{_flag_name(k)} {v}" for k, v in preset.items())
    log(f"preset: embedded corpus on {device}: {flags} (flags you give override these)")
    return dataclasses.replace(cfg, **preset)


def _flag_name(field_name: str) -> str:
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == field_name)
    return f.metadata["short"] or "--" + field_name.replace("_", "-")


def _flag_label(field_name: str) -> str:
    """'-b/--batch-size' (or '--seed' for a flag without a short form), as errors name flags."""
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == field_name)
    long = "--" + field_name.replace("_", "-")
    return f"{f.metadata['short']}/{long}" if f.metadata["short"] else long


# -------------------------------------------------------------------------------------------------
# Schedules and small helpers


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """llm.c's schedules (cosine, linear, constant, wsd) with linear warmup (s+1)/W and final fraction -q."""
    lr_max, warmup = cfg.learning_rate, cfg.warmup_steps
    lr_min = lr_max * cfg.final_lr_frac
    if cfg.lr_schedule == "constant":
        return lr_max
    if step < warmup:
        return lr_max * (step + 1) / warmup
    if cfg.lr_schedule == "wsd":
        decay_start = int(0.8 * total_steps)
        if step < decay_start:
            return lr_max
        r = (step - decay_start) / max(total_steps - decay_start, 1)
        return lr_min + (1.0 - math.sqrt(r)) * (lr_max - lr_min)
    r = min(max((step - warmup) / max(total_steps - warmup, 1), 0.0), 1.0)
    if cfg.lr_schedule == "linear":
        return lr_max - r * (lr_max - lr_min)
    return lr_min + 0.5 * (1.0 + math.cos(math.pi * r)) * (lr_max - lr_min)   # cosine


class OutlierDetector:
    """z-score of each new value against the previous 128 (NaN until the window is full), as llm.c."""

    def __init__(self):
        self.window = deque(maxlen=OUTLIER_WINDOW)

    def update(self, x: float) -> float:
        z = float("nan")
        if len(self.window) == OUTLIER_WINDOW:
            w = np.asarray(self.window, dtype=np.float64)
            mean, var = w.mean(), (w * w).mean() - w.mean() ** 2
            z = 0.0 if var <= 0 else (x - mean) / math.sqrt(var)
        self.window.append(float(x))
        return z


class RunLog:
    """main.log in llm.c's format plus metrics.jsonl; both append-only, opened per write (crash-safe).
    A fresh run starts them empty because llmpy.rundir moved an earlier run's files out of -o."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def write(self, line: str, record: dict):
        if not self.out_dir:
            return
        for name, text in (("main.log", line), ("metrics.jsonl", json.dumps(record))):
            path = os.path.join(self.out_dir, name)
            try:
                with open(path, "a") as f:
                    f.write(text + "\n")
            except OSError as e:
                raise os_error(e, path) from None


# -------------------------------------------------------------------------------------------------
# Set-up: backend, model, data


def resolve_device(requested: str) -> str:
    """'auto' -> 'cuda' when CuPy sees a GPU, else 'cpu'; 'cuda' without a GPU is a clear error."""
    if requested == "cpu":
        return "cpu"
    try:
        import cupy
        has_gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception as e:  # ImportError, or CUDA driver errors on GPU-less machines
        has_gpu, why = False, f"{type(e).__name__}: {e}".splitlines()[0]
    else:
        why = "no CUDA device found"
    if has_gpu:
        return "cuda"
    if requested == "cuda":
        raise LlmpyError(f"--device cuda: no usable GPU ({why}); install llmpy[cuda12] or llmpy[cuda13] "
                         "on a machine with an NVIDIA GPU, or use --device cpu")
    return "cpu"


def inference_config(device: str, batch_size: int, seq_len: int) -> TrainConfig:
    """The engine settings of sampling and evaluation (llmpy/commands.py, llmpy/families.py): planned for
    (batch_size, seq_len), no master weights, no CUDA graph."""
    return TrainConfig(device=device, batch_size=batch_size, seq_len=seq_len, master_weights=0, cuda_graph=0)


def model_factory(cfg: TrainConfig, device: str, *, log=print, inference: bool = False):
    """make_model(gpt_config, host_float32_params) -> GPT on `device` ('cpu' or 'cuda'): the NumPy model,
    or the GPU engine set up from cfg (precision, graph, batch shape; inference: no optimizer state)."""
    if device == "cuda":
        from llmpy.gpu.engine import train_setup   # imports cupy; only here
        return train_setup(cfg, log=log, inference=inference)[1]
    if cfg.dtype == "bf16":
        raise LlmpyError("--dtype bf16 is a GPU mode; the CPU path trains in fp32")
    import llmpy.cpu as ops
    return lambda gpt_cfg, params: GPT(gpt_cfg, ops, params=params)


# which numeric flags take which values (the choices of 0/1 and other small flags live in TrainConfig)
POSITIVE = ("batch_size", "seq_len", "gen_len", "learning_rate", "muon_lr")
NON_NEGATIVE = ("checkpoint_every", "checkpoints_keep", "major_checkpoint_every", "warmup_steps", "weight_decay",
                "skip_loss_z", "skip_norm_z", "val_every")
POSITIVE_OR_MINUS_ONE = ("max_steps", "val_max_steps", "total_batch_size", "log_gpu_every")


def check_config(cfg: TrainConfig):
    """Flag checks that need no files; each error names its flag. Runs before anything is read or written."""
    for f in dataclasses.fields(cfg):
        value, choices = getattr(cfg, f.name), f.metadata.get("choices")
        if isinstance(value, float) and not math.isfinite(value):
            raise LlmpyError(f"{_flag_label(f.name)} must be a finite number, got {value}")
        if choices and value not in choices:
            raise LlmpyError(f"{_flag_label(f.name)} must be one of {', '.join(map(str, choices))}, got {value!r}")
    for name in POSITIVE:
        if getattr(cfg, name) <= 0:
            raise LlmpyError(f"{_flag_label(name)} must be positive, got {getattr(cfg, name)}")
    for name in NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            raise LlmpyError(f"{_flag_label(name)} must be >= 0, got {getattr(cfg, name)}")
    for name in POSITIVE_OR_MINUS_ONE:
        if getattr(cfg, name) <= 0 and getattr(cfg, name) != -1:
            raise LlmpyError(f"{_flag_label(name)} must be positive or -1, got {getattr(cfg, name)}"
                             + ("; -v 0 turns validation off" if name == "val_max_steps" else ""))
    if cfg.total_batch_size > 0 and cfg.total_batch_size % (cfg.batch_size * cfg.seq_len):
        raise LlmpyError(f"-d/--total-batch-size {cfg.total_batch_size} is not a multiple of B*T = "
                         f"{cfg.batch_size * cfg.seq_len}")
    if cfg.resume and not cfg.output_dir:
        raise LlmpyError("-y/--resume 1 needs -o/--output-dir")
    if not 0.0 <= cfg.final_lr_frac <= 1.0:
        raise LlmpyError(f"-q/--final-lr-frac must be in [0, 1], got {cfg.final_lr_frac}")
    if not 0 < cfg.seed < 2 ** 64:   # a zero xorshift state stays zero: every sample would be token 0
        raise LlmpyError(f"--seed must be in 1..2**64-1, got {cfg.seed}")


# -------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, *, log=print) -> dict:
    """Run training as configured. Returns {'losses': [...], 'val_losses': {...}, 'steps': S}.

    Flags, data (token ids against the model's vocabulary), the model, a checkpoint to resume and -o are
    all checked before the model is built and before anything in -o is written; then -o is locked for
    this run (llmpy.rundir) and SIGTERM/SIGINT stop the run at a step boundary with a final checkpoint."""
    check_config(cfg)
    if cfg.output_dir:
        OutputDir(cfg.output_dir).check()
    device = resolve_device(cfg.device)
    from llmpy.dist.init import init_processes
    comm = init_processes(cfg, device, log=log)
    try:
        return _train_processes(cfg, device, comm, log if comm.rank == 0 else _quiet)
    except BaseException as e:
        if not isinstance(e, Interrupted):   # a signal: every rank stopped at the same step, checkpointed
            comm.fail(e)   # several processes: a failing rank ends the job instead of leaving the others waiting
        raise
    finally:
        comm.close()


def _quiet(*args, **kwargs):
    """The log of ranks other than 0 (llm.c prints and writes main.log on rank 0 only)."""


def _train_processes(cfg: TrainConfig, device: str, comm, log) -> dict:
    out = OutputDir(cfg.output_dir) if cfg.output_dir else None
    if device == "cpu":
        log("device: cpu" + (" (auto: no usable GPU)" if cfg.device == "auto" else ""))
    make_model = model_factory(cfg, device, log=log)

    # data: the embedded corpus unless -i is given
    train_pat, val_pat = cfg.train_data, cfg.val_data
    if not train_pat:
        from llmpy.corpus import prepare_default
        if comm.rank > 0:
            comm.barrier()     # rank 0 prepares the embedded corpus, the others then reuse its files
        train_pat, default_val = prepare_default(log=log)
        if comm.rank == 0:
            comm.barrier()
        val_pat = val_pat or default_val
    elif not val_pat:
        val_pat = find_val_split(train_pat, log)
    if cfg.hellaswag:   # fail before training, not at the first evaluation
        from llmpy.hellaswag import DEFAULT_PATH, read_eval_file
        if cfg.batch_size < 4:
            raise LlmpyError(f"-h/--hellaswag 1 needs -b/--batch-size >= 4, got {cfg.batch_size}")
        read_eval_file(DEFAULT_PATH)
    if cfg.overfit_single_batch:
        if not val_pat:
            raise LlmpyError("-a/--overfit-single-batch 1 reads the val data: give -j/--val-data")
        train_pat = val_pat

    # model: -y resumes from the newest readable DONE_ checkpoint of this run, else -e
    load = lambda spec: families.load_checked(spec, cfg, device, load_gpt=load_model_spec)  # noqa: E731
    resume = None
    if cfg.resume:
        out.check_resume(config_record(cfg))
        resume = checkpoint.find_resume_point(cfg.output_dir, comm, load=load, zero_stage=cfg.zero_stage,
                                              optimizer=cfg.optimizer, log=log)
    if resume is not None:
        gpt_cfg, params = resume.gpt_cfg, resume.params
    else:
        gpt_cfg, params = comm.agree(load, cfg.model or "d12")   # a bad -e or flag: one line, every rank
    if cfg.seq_len > gpt_cfg.max_seq_len:
        raise LlmpyError(f"-t/--seq-len {cfg.seq_len} exceeds the model's max_seq_len {gpt_cfg.max_seq_len}")
    check_zero_layout(cfg.zero_stage, families.zero_layout(gpt_cfg, cfg.optimizer), comm)   # -z 1 splits evenly
    plan = plan_data(cfg, gpt_cfg, train_pat, val_pat, comm, log)

    # -o: from here on this run owns it (rank 0 holds the lock and claims the folder for every rank)
    run = (cfg, device, make_model, gpt_cfg, params, plan, resume, comm)
    if out is None:
        return _build_and_train(*run, signals=False, log=log)
    if comm.rank > 0:   # writes nothing in -o before the loop's first collective, which rank 0 joins after
        return _build_and_train(*run, signals=True, log=log)   # claiming -o
    checkpoints_seen = checkpoint.done_steps(cfg.output_dir)
    out.lock()
    try:
        if checkpoint.done_steps(cfg.output_dir) != checkpoints_seen:
            raise LlmpyError(f"-o {cfg.output_dir}: another run wrote checkpoints there while this one started; "
                             "run the command again")
        out.remove_temp_files(log)
        out.claim(config_record(cfg), resume=bool(cfg.resume), log=log)
        result = _build_and_train(*run, signals=True, log=log)
        report_run(cfg.output_dir, resume_command=_resume_command(cfg), log=log)
        return result
    finally:
        out.release()


def _resume_command(cfg: TrainConfig) -> str:
    """How to resume this run: exact for the embedded preset (no -i), else 'the same flags'."""
    o = shlex.quote(cfg.output_dir)
    if not cfg.train_data:
        return f"llmpy train -o {o} -y 1 -x {2 * cfg.max_steps}"
    return f"llmpy train <the same flags> -o {o} -y 1"


def _build_and_train(cfg, device, make_model, gpt_cfg, params, plan, resume, comm, *, signals: bool, log) -> dict:
    # NumPy's overflow warnings would only add lines: the loop itself stops on a non-finite loss or norm
    with families.build(gpt_cfg, params, cfg, make_model, device=device, log=log) as model, \
            SignalStop(enabled=signals) as stop, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _train_loop(cfg, model, plan, resume, comm, stop, log)


def load_model_spec(model_spec: str):
    """(GPTConfig, host float32 params) from a .bin checkpoint (v3 fp32 or v5 bf16, refused when it holds
    NaN/Inf) or a descriptor with llm.c's random init."""
    if model_spec.endswith(".bin"):
        return checkpoint.load_model(model_spec)
    try:
        gpt_cfg = GPTConfig.from_descriptor(model_spec)
    except ValueError as e:
        raise LlmpyError(f"-e {model_spec}: {e}") from None
    return gpt_cfg, init_params(gpt_cfg)


@dataclass
class DataPlan:
    train_loader: DataLoader
    val_loader: DataLoader | None
    tokens_per_step: int
    grad_accum: int
    total_steps: int
    val_batches: int


def plan_data(cfg: TrainConfig, gcfg: GPTConfig, train_pat: str, val_pat: str, comm, log) -> DataPlan:
    """The loaders (every shard validated, token ids against the model's vocabulary) and the step counts."""
    B, T, P, rank = cfg.batch_size, cfg.seq_len, comm.size, comm.rank
    # each rank reads its B rows of every P*B-row global batch; all ranks shuffle with one seed, so the
    # global batches are those of one process with P*B rows (llm.c seeds 42 + rank: llmc-facts.md Q5)
    train_loader = DataLoader(train_pat, B, T, process_rank=rank, num_processes=P,
                              shuffle=not cfg.overfit_single_batch, shuffle_seed=42, vocab_size=gcfg.vocab_size)
    val_loader = DataLoader(val_pat, B, T, process_rank=rank, num_processes=P, shuffle=False,
                            vocab_size=gcfg.vocab_size) if val_pat else None
    tokens_per_step = cfg.total_batch_size if cfg.total_batch_size > 0 else B * T * P
    if tokens_per_step % (B * T * P):
        raise LlmpyError(f"-d/--total-batch-size {tokens_per_step} is not a multiple of B*T*processes = "
                         f"{B * T * P}")
    grad_accum = tokens_per_step // (B * T * P)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else train_loader.num_tokens // tokens_per_step
    if total_steps <= 0:
        raise LlmpyError(f"-i {train_pat}: {train_loader.num_tokens} tokens is less than one step of "
                         f"{tokens_per_step}; lower -b/-t/-d or give -x")
    val_batches = 0
    if val_loader is not None and cfg.val_every > 0:
        val_batches = val_loader.num_tokens // (B * T) if cfg.val_max_steps < 0 else cfg.val_max_steps
    log(f"tokens/step: {tokens_per_step:,} (B={B} x T={T} x accum={grad_accum}"
        + (f" x {P} processes" if P > 1 else "") + f"); steps: {total_steps}; "
        f"train tokens: {train_loader.num_tokens:,}; val batches: {val_batches}")
    return DataPlan(train_loader, val_loader, tokens_per_step, grad_accum, total_steps, val_batches)


def _train_loop(cfg: TrainConfig, model: GPT, plan: DataPlan, resume: checkpoint.ResumePoint | None, comm,
                stop: SignalStop, log) -> dict:
    """Everything after set-up: state and the step loop (the model is closed by the caller)."""
    from llmpy.dist.zero import DataParallel
    gcfg = model.config
    B, T, rank = cfg.batch_size, cfg.seq_len, comm.rank
    log(f"model: L={gcfg.num_layers} NH={gcfg.num_heads} C={gcfg.channels} maxT={gcfg.max_seq_len} "
        f"V={gcfg.vocab_size} Vp={gcfg.padded_vocab_size}, {model.num_parameters:,} parameters")
    dp = DataParallel(model, comm, cfg.zero_stage, log=log)
    train_loader, val_loader, val_batches = plan.train_loader, plan.val_loader, plan.val_batches
    tokens_per_step, grad_accum, total_steps = plan.tokens_per_step, plan.grad_accum, plan.total_steps

    # training state; -y 1 restores it from the state file
    rng = XorShiftStar(13371337)
    rng_state_last_update = rng.state
    start_step = 0
    resume_step = saved_step = resume.step if resume is not None else None
    if resume is not None:
        state = resume.state
        dp.load_optimizer_state(state)
        rng.state, rng_state_last_update = state["rng_state"], state["rng_state_last_update"]
        train_loader.load_state_dict(state["loader_state"])
        start_step = state["step"]
        resume.state = state = None   # m and v: the backend holds its own copy
    runlog = RunLog(cfg.output_dir if rank == 0 else "")

    def stop_if_signalled(step, *, agree: bool):
        """At a step boundary after SIGTERM/SIGINT: the checkpoint of `step` (unless on disk), then stop.
        Several processes agree first (one host sum per step, at the top of the loop: `agree`), so that
        every rank stops at the same step."""
        if not stop.enabled:
            return
        signum = stop.signum
        if comm.size > 1:
            if not agree or comm.sum_host(1.0 if signum else 0.0) == 0:
                return
            signum = signum or signal.SIGTERM
        if signum is None:
            return
        log(f"{signal.Signals(signum).name}: stopping at step {step}")
        if step != saved_step:
            save_checkpoint(cfg, model, step, rng.state, rng_state_last_update, train_loader, log, dp)
        e = Interrupted(f"stopped by {signal.Signals(signum).name} at step {step}; its checkpoint is "
                        f"{checkpoint.saved_model_path(cfg.output_dir, step)}: resume with the same command and -y 1",
                        signum)
        e.quiet = rank != 0     # every rank stops; rank 0 says so
        raise e
    tokenizer = _tokenizer(log) if cfg.sample_every > 0 and rank == 0 else None
    loss_z, norm_z = OutlierDetector(), OutlierDetector()
    losses, val_losses, times = [], {}, []
    tok_per_s_ema = 0.0

    for step in range(start_step, total_steps + 1):
        last = step == total_steps
        stop_if_signalled(step, agree=True)
        if val_loader is not None and cfg.val_every > 0 and (step % cfg.val_every == 0 or last):
            val_loss = dp.average(evaluate(model, val_loader, val_batches))
            val_losses[step] = val_loss
            log(f"val loss {val_loss:.6f}")
            runlog.write(f"s:{step} tel:{val_loss:.4f}", {"step": step, "split": "val", "loss": val_loss})
        if cfg.hellaswag and ((step > 0 and cfg.val_every > 0 and step % cfg.val_every == 0) or last):
            acc = dp.hellaswag(B, T, log=log)
            runlog.write(f"s:{step} eval:{acc:.4f}", {"step": step, "split": "hellaswag", "acc": acc})
        if rank == 0 and cfg.sample_every > 0 and ((step > 0 and step % cfg.sample_every == 0) or last):
            _print_sample(model, tokenizer, cfg, log)
        if (cfg.output_dir and cfg.checkpoint_every > 0 and step != resume_step
                and ((step > 0 and step % cfg.checkpoint_every == 0) or last)):
            save_checkpoint(cfg, model, step, rng.state, rng_state_last_update, train_loader, log, dp)
            saved_step = step
        if last:
            break
        stop_if_signalled(step, agree=False)

        # ---- one optimizer step ----
        t0 = time.perf_counter()
        model.zero_grad()
        for micro in range(grad_accum):
            if cfg.overfit_single_batch:
                train_loader.reset()
            inp, tgt = train_loader.next_batch()
            dp.forward_backward(inp, tgt, 1.0 / (B * T * grad_accum), seed=rng.random_u32(),
                                last=micro == grad_accum - 1)
        dp.reduce_gradients()
        loss = dp.mean_loss(B * T * grad_accum)
        zl = loss_z.update(loss)
        lr = learning_rate(cfg, step, total_steps)
        norm = dp.grad_norm()
        if not (math.isfinite(loss) and math.isfinite(norm)):   # stop before the update spreads it
            raise RankAgreedError(f"step {step + 1}: {'loss' if not math.isfinite(loss) else 'gradient norm'} is "
                                  f"{loss if not math.isfinite(loss) else norm}; stopped before updating the model"
                                  + (f" (last checkpoint: step {saved_step})" if saved_step is not None else "")
                                  + "; a lower -l/--learning-rate may help", rank=rank)
        zn = norm_z.update(norm)
        skip = (cfg.skip_loss_z and math.isfinite(zl) and zl > cfg.skip_loss_z) or \
               (cfg.skip_norm_z and math.isfinite(zn) and zn > cfg.skip_norm_z)
        if skip:
            log(f"skipping update at step {step + 1}: loss z {zl:.2f}, norm z {zn:.2f}")
        else:
            rng_state_last_update = rng.state
            seeds = [rng.random_u32() for _ in range(16)]
            dp.update(lr=lr, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=cfg.weight_decay,
                      t=step + 1, grad_scale=1.0 / norm if norm > GRAD_CLIP else 1.0, seeds=seeds)
        model.synchronize()
        ms = (time.perf_counter() - t0) * 1000
        times.append(ms)
        tok_per_s = tokens_per_step / (ms / 1000)
        k = len(times) - 1   # llm.c: the raw value at first, then an EMA with bias correction
        if k > 0:
            tok_per_s_ema = 0.95 * tok_per_s_ema + 0.05 * tok_per_s
        tps = tok_per_s if k == 0 else tok_per_s_ema / (1 - 0.95 ** k)
        losses.append(loss)
        mfu = model.mfu(tokens_per_step, ms, T)
        log(f"step {step + 1:4d}/{total_steps} | loss {loss:7.6f}{_z(zl)}| norm {norm:6.4f}{_z(zn)}| "
            f"lr {lr:.2e} | {ms:.2f} ms | " + (f"{mfu:.1f}% bf16 MFU | " if mfu > 0 else "")
            + f"{tps:.0f} tok/s")
        runlog.write(f"s:{step} trl:{loss:.4f} lr:{lr:.6f} norm:{norm:.2f}",
                     {"step": step, "split": "train", "loss": loss, "lr": lr, "norm": norm, "ms": ms,
                      "tok_per_s": tok_per_s, "skipped": bool(skip)})
        if cfg.log_gpu_every > 0 and (step + 1) % cfg.log_gpu_every == 0:
            log(dp.memory_report())

    if len(times) > 1:
        log(f"total average iteration time: {sum(times[1:]) / (len(times) - 1):.2f} ms")
    return {"losses": losses, "val_losses": val_losses, "steps": total_steps}


def _z(z: float) -> str:
    """' (+1.23z) ' once the outlier window is full, else one space (no '(+nanz)' on early steps)."""
    return f" ({z:+.2f}z)" if math.isfinite(z) else " "


def evaluate(model: GPT, loader: DataLoader, num_batches: int) -> float:
    """Mean loss over the first num_batches batches of the (unshuffled) loader, which is reset first."""
    loader.reset()
    total = 0.0
    show = num_batches >= 50 and sys.stderr.isatty()
    for i in range(num_batches):
        inp, tgt = loader.next_batch()
        model.forward(inp)
        total += model.loss(tgt)
        if show:
            print(f"\rvalidating {i + 1}/{num_batches}", end="", file=sys.stderr, flush=True)
    if show:
        print(file=sys.stderr)
    return total / max(num_batches, 1)


def save_checkpoint(cfg, model, step, rng_state, rng_state_last_update, loader, log, dp):
    """model_ (rank 0) and every rank's state_, a barrier, then DONE_ (rank 0), each written atomically;
    then prune by -nk/-nm (each rank its own files)."""
    comm = dp.comm
    state = dp.optimizer_state()
    checkpoint.write_checkpoint(cfg.output_dir, step, model.config, model.params_f32() if comm.rank == 0 else None,
                                dtype=model.checkpoint_dtype, m=state["m"], v=state["v"],
                                master=state.get("master"), rng_state=rng_state,
                                rng_state_last_update=rng_state_last_update, loader_state=loader.state_dict(),
                                rank=comm.rank, num_processes=comm.size, zero_stage=dp.zero_stage,
                                optimizer=cfg.optimizer, done=False)
    comm.barrier()
    if comm.rank == 0:
        checkpoint.mark_done(cfg.output_dir, step)
    checkpoint.prune_checkpoints(cfg.output_dir, step, cfg.checkpoint_every, cfg.checkpoints_keep,
                                 cfg.major_checkpoint_every, rank=comm.rank)
    log(f"checkpoint: {checkpoint.saved_model_path(cfg.output_dir, step)}")


def _tokenizer(log):
    from llmpy.tokenizer import Tokenizer
    try:
        return Tokenizer.gpt2()
    except LlmpyError as e:
        log(f"tokenizer unavailable ({e}); samples print token ids")
        return None


def _print_sample(model, tokenizer, cfg: TrainConfig, log):
    """llm.c-style sample: start from EOT, draw gen_len-1 tokens with a fixed-seed coin, print as we go."""
    from llmpy.sample import generate
    eot = model.config.vocab_size - 1 if tokenizer is None else tokenizer.eot_token
    log("generating:\n---")

    def show(tok):
        piece = tokenizer.decode([tok]) if tokenizer is not None else f"{tok} "
        print(piece, end="", flush=True)

    generate(model, [eot], cfg.gen_len - 1, XorShiftStar(cfg.seed), max_len=cfg.seq_len, on_token=show)
    print(flush=True)
    log("---")

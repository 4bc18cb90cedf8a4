"""Whole-training-step benchmark: llmpy against PyTorch, side by side, same weights, same batch.

    python scripts/bench_train.py --device cpu --quick --out out/bench            # tiny model, seconds
    python scripts/bench_train.py --device cpu -e d12 -B 4 -T 64 --threads 2 --out out/bench
    python scripts/bench_train.py --device cuda -e d12 -B 8 -T 1024 --out out/bench
    python scripts/bench_train.py --device cuda -B 64 --variants graph,flash128,torch --out out/bench
    python scripts/bench_train.py --device cpu -e nanochat:d4 --optimizer muon --threads 2 --out out/bench

One step is what llmpy/train.py does per optimizer step: zero grads, forward, backward (loss and
gradients), global gradient norm with clipping at 1.0, AdamW (betas 0.9/0.95, eps 1e-8, weight decay
0.1 on matrices). Both sides start from llmpy.rng.init_params (llm.c's init) and train on one fixed
random batch; their per-step losses are printed side by side and the first (same weights, same batch)
must agree.

  cpu   llmpy: llmpy.model.GPT on llmpy.cpu (NumPy, float32), each phase timed with perf_counter.
        torch: transformers' GPT2LMHeadModel (eager attention, dropout 0; --torch-model plain for a
        plain-torch GPT-2) with torch.optim.AdamW (its CPU default implementation), float32.
        Both get --threads threads: NumPy's BLAS through OMP/OPENBLAS/MKL_NUM_THREADS, set before NumPy
        is imported, and torch.set_num_threads. Peak memory: tracemalloc (NumPy's allocations) over
        llmpy's set-up and first step; torch (run first) the growth of the process's peak RSS.
  cuda  llmpy: llmpy.gpu.engine.GPUGPT (bf16, fp32 master weights, the trainer's defaults), in the
        --variants asked for (default: all), each in a fresh engine, all before PyTorch's (a slow or
        failing torch.compile cannot hide llmpy's numbers; the JSON is rewritten after every variant):
          eager     no CUDA graph (-cg 0)          graph     the captured step (the trainer's default)
          flash     graph, --flash-attention 1     flash128  graph, --flash-attention 2 (128-row tiles)
          ge2       graph, -ge 2 (GELU fused into the fc matmuls, forward and backward)
        Each step is train.py's: forward_backward on the host NumPy tokens the loader would give, so the
        token upload and the encoder backward's host bucketing overlap the GPU's work as in training
        (review WRONG-1). GPU busy time: the same step queued behind long matmuls, sized from the host's
        enqueue time (no sync), so the GPU never waits for the host; its events bracket device work only.
        Host overhead = wall - busy.
        torch: PlainGPT2, torch.compile, bf16 autocast, flash attention (SDPA), fused AdamW.
        Peak memory: CuPy's pool / torch.cuda.max_memory_allocated.

nanochat (`-e nanochat:dN[:kvK]` or a nanochat checkpoint directory): llmpy's NanoChat (cpu) or NanoChatGPU
(cuda: eager and graph; the fused attention and -ge are GPT-2's) against scripts/torch_nanochat.py's
PlainNanoChat, with --optimizer adamw (every tensor) or muon (the block matrices; AdamW on wte and
lm_head) on both sides; FLOPs per token by nanochat's count (llmpy.nanochat.flops_per_token).

Reported: ms/step (median of --steps after --warmup), tok/s, MFU (6N + 6LCT FLOPs per token,
perf-anchors.md §8; against the GEMM rate measured here, and on the GPU also llm.c's nominal bf16 peak),
peak memory, llmpy's forward/backward/optimizer split and llmpy/torch. Writes DIR/bench_train_<device>.json.
Timings are only comparable on an otherwise idle machine.
"""
from __future__ import annotations

import os
import sys


def _threads_from_argv(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return None


# BLAS reads its thread count once, when NumPy is imported: set it first.
if __name__ == "__main__" and _threads_from_argv(sys.argv[1:]):
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = _threads_from_argv(sys.argv[1:])

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import benchutil as bu  # noqa: E402
from llmpy import families  # noqa: E402
from llmpy.model import GPTConfig, num_parameters  # noqa: E402
from llmpy.nanochat import NanoChat, NanoChatConfig  # noqa: E402

LR, WEIGHT_DECAY, BETA1, BETA2, EPS, GRAD_CLIP = 3e-4, 0.1, 0.9, 0.95, 1e-8, 1.0
TINY = GPTConfig(max_seq_len=64, vocab_size=1000, padded_vocab_size=1024, num_layers=2, num_heads=4,
                 channels=128)
LOSS_RTOL = {"cpu": 1e-4, "cuda": 2e-2}   # first-step loss: fp32 on both sides / bf16 on both sides
MUON_LR = 0.02                             # nanochat's --muon-lr default


def flops_per_token(cfg, T: int) -> int:
    """llm.c's count for GPT-2 (perf-anchors.md §8): 6 N (every weight, forward + backward) + 6 L C T
    (attention); nanochat's own for its model."""
    if isinstance(cfg, NanoChatConfig):
        from llmpy.nanochat import flops_per_token as nanochat_flops
        return nanochat_flops(cfg, T)
    return 6 * num_parameters(cfg) + 6 * cfg.num_layers * cfg.channels * T


def describe_model(cfg) -> str:
    if isinstance(cfg, NanoChatConfig):
        return (f"nanochat L={cfg.n_layer} C={cfg.n_embd} NH={cfg.n_head} NKV={cfg.n_kv_head} "
                f"D={cfg.head_dim} Vp={cfg.padded_vocab_size}")
    return f"model L={cfg.num_layers} C={cfg.channels} NH={cfg.num_heads} Vp={cfg.padded_vocab_size}"


def mfu(fpt: int, tokens_per_step: int, ms: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation, percent: achieved model FLOP/s over the peak (llm.c's definition)."""
    return 100 * fpt * tokens_per_step / (ms / 1e3) / (peak_tflops * 1e12)


def summarize(times_ms: list[float], tokens: int, fpt: int, peak_tflops: float | None) -> dict:
    ms = bu.median(times_ms)
    r = {"ms_per_step": ms, "ms_all": times_ms, "tok_per_s": tokens / ms * 1e3}
    if peak_tflops:
        r["mfu_pct"] = mfu(fpt, tokens, ms, peak_tflops)
    return r


def rss_mb() -> float:
    """Current resident set size (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


# -------------------------------------------------------------------------------------------------
# llmpy


def build_model(cfg, params, args, device: str, B: int, T: int, options: dict | None = None):
    """The model llmpy's trainer builds for cfg (llmpy.families.build: GPT-2 or nanochat with --optimizer),
    on the CPU or as the GPU engine with the trainer's defaults plus `options` (TrainConfig fields)."""
    from llmpy.train import TrainConfig
    tcfg = dataclasses.replace(TrainConfig(), batch_size=B, seq_len=T, device=device, optimizer=args.optimizer,
                               muon_lr=MUON_LR, learning_rate=LR, **(options or {}))
    quiet = lambda *a: None  # noqa: E731
    if device == "cuda":
        import llmpy.gpu as ops
        from llmpy.gpu.engine import GPUGPT, engine_options
        make_gpt = lambda c, p: GPUGPT(c, ops, params=p, log=quiet, **engine_options(tcfg))  # noqa: E731
    else:
        import llmpy.cpu as ops
        from llmpy.model import GPT
        make_gpt = lambda c, p: GPT(c, ops, params=p)  # noqa: E731
    return families.build(cfg, params, tcfg, make_gpt, device=device, log=quiet)


def bench_llmpy_cpu(cfg, params, inp, tgt, args, fpt, peak) -> dict:
    tracemalloc.start()   # NumPy reports its buffers to tracemalloc: set-up + first step = the peak
    model = build_model(cfg, params, args, "cpu", *inp.shape)
    losses = [llmpy_step(model, inp, tgt, 1, seed=1, split=True)[0]]
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    for i in range(1, args.warmup):
        losses.append(llmpy_step(model, inp, tgt, i + 1, seed=i + 1, split=True)[0])
    times, phases = [], {"forward": [], "backward": [], "optimizer": []}
    for i in range(args.steps):
        t = args.warmup + i + 1
        loss, s = llmpy_step(model, inp, tgt, t, seed=t, split=True)
        losses.append(loss)
        times.append((s[4] - s[0]) * 1e3)
        for name, (a, b) in zip(phases, ((0, 1), (1, 3), (3, 4))):   # the loss read-back ends the backward
            phases[name].append((s[b] - s[a]) * 1e3)
    r = summarize(times, inp.size, fpt, peak)
    r.update(losses=losses, phases_ms={k: bu.median(v) for k, v in phases.items()},
             peak_memory_mb=peak_bytes / 2**20, memory_method="tracemalloc peak (NumPy buffers)",
             impl="llmpy.cpu (NumPy float32)")
    return r


class Blocker:
    """Queues matmuls that keep the GPU busy for a given time, so the work enqueued right after them
    runs back to back, never waiting for the host: its event-timed span is GPU busy time."""

    def __init__(self):
        import cupy as cp
        self.cp = cp
        self.a = cp.ones((4096, 4096), dtype=np.float32)
        self.c = cp.empty_like(self.a)
        start, end = cp.cuda.Event(), cp.cuda.Event()
        cp.matmul(self.a, self.a, out=self.c)
        start.record()
        for _ in range(5):
            cp.matmul(self.a, self.a, out=self.c)
        end.record()
        end.synchronize()
        self.ms_per_gemm = cp.cuda.get_elapsed_time(start, end) / 5

    def __call__(self, ms: float):
        for _ in range(max(1, math.ceil(ms / self.ms_per_gemm))):
            self.cp.matmul(self.a, self.a, out=self.c)


def llmpy_step(model, inp, tgt, t: int, seed: int, *, split: bool = False) -> tuple[float, list[float]]:
    """One optimizer step as llmpy/train.py runs it: forward_backward on the tokens as given (NumPy, as
    the loader hands them over; the GPU engine stages them itself), the loss read back, the clipped
    norm and AdamW. split=True (the CPU, where the phases are synchronous) calls forward and backward
    separately to time each. Returns (loss, [start, forward done (= start unless split), forward and
    backward enqueued, loss read back, step done])."""
    B, T = inp.shape
    stamps = [time.perf_counter()]
    model.zero_grad()
    if split and isinstance(model, NanoChat):   # the raw-logits forward its backward continues (softcap fused)
        model._forward(inp)
        stamps.append(time.perf_counter())
        model.backward(inp, tgt, 1.0 / (B * T))
    elif split:
        model.forward(inp)
        stamps.append(time.perf_counter())
        model.backward(inp, tgt, 1.0 / (B * T), seed=seed)
    else:
        model.forward_backward(inp, tgt, 1.0 / (B * T), seed=seed)
        stamps.append(stamps[0])
    stamps.append(time.perf_counter())
    loss = model.mean_loss(B * T)
    stamps.append(time.perf_counter())
    norm = model.grad_norm()
    model.update(lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=WEIGHT_DECAY, t=t,
                 grad_scale=1.0 / norm if norm > GRAD_CLIP else 1.0, seeds=[seed + i for i in range(16)])
    model.synchronize()
    stamps.append(time.perf_counter())
    return loss, stamps


def gpu_busy_step(model, inp, tgt, t: int, blocker: Blocker, enqueue_ms: float) -> dict:
    """The device work of one step queued behind the blocker, so that none of it waits for the host
    (the host enqueues, stages the tokens and buckets them for the encoder backward meanwhile): CUDA
    events around each phase measure GPU time only. enqueue_ms: the host's time to enqueue forward and
    backward (llmpy_step's stamps, no sync in between)."""
    cp = model.xp
    B, T = inp.shape
    ev = [cp.cuda.Event() for _ in range(6)]
    model.zero_grad()
    blocker(1.5 * enqueue_ms + 5.0)
    ev[0].record()
    model.forward_backward(inp, tgt, 1.0 / (B * T), seed=t)
    ev[1].record()
    blocker(2.0)
    ev[2].record()
    model.ops.global_norm_squared(model.norm, model.grads)   # grad_norm() without reading it back
    ev[3].record()
    blocker(5.0)
    ev[4].record()
    model.update(lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=WEIGHT_DECAY, t=t, grad_scale=1.0,
                 seeds=list(range(16)))
    ev[5].record()
    ev[5].synchronize()
    span = lambda i, j: cp.cuda.get_elapsed_time(ev[i], ev[j])  # noqa: E731
    r = {"forward+backward": span(0, 1), "optimizer": span(2, 3) + span(4, 5)}
    r["busy"] = sum(r.values())
    return r


# --variants on the GPU: name -> (result key, GPUGPT options on top of the trainer's defaults)
GPU_VARIANTS = {
    "eager": ("llmpy_eager", dict(cuda_graph=0)),
    "graph": ("llmpy", {}),
    "flash": ("llmpy_flash", dict(flash_attention=1)),
    "flash128": ("llmpy_flash128", dict(flash_attention=2)),
    "ge2": ("llmpy_ge2", dict(gelu_fusion=2)),
}
CPU_VARIANTS = {"eager": ("llmpy", {})}   # llmpy.cpu: NumPy, nothing to choose
GPT2_ONLY = ("flash", "flash128", "ge2")   # the nanochat engine runs the materialised attention, no -ge


def bench_llmpy_gpu(cfg, params, inp, tgt, args, fpt, peaks, options: dict) -> dict:
    """One llmpy variant: GPUGPT with the trainer's defaults plus `options` (TrainConfig fields), timed
    on the host NumPy tokens inp/tgt, as train.py feeds it."""
    import cupy as cp
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    with build_model(cfg, params, args, "cuda", *inp.shape, options) as model:
        losses, times, enqueue = [], [], []
        for i in range(args.warmup + args.steps):
            loss, s = llmpy_step(model, inp, tgt, i + 1, seed=i + 1)
            losses.append(loss)
            if i >= args.warmup:
                times.append((s[4] - s[0]) * 1e3)
                enqueue.append((s[2] - s[0]) * 1e3)
        blocker = Blocker()
        busy = [gpu_busy_step(model, inp, tgt, args.warmup + args.steps + k + 1, blocker, bu.median(enqueue))
                for k in range(3)]
        graph = model.graph is not None
        mode = ("graph" if graph else "eager") + (f", flash attention (tile {model.flash_tile})"
                                                  if getattr(model, "flash_attention", False) else "")
        if isinstance(cfg, NanoChatConfig):
            mode += f", {args.optimizer}"
        if getattr(model, "gelu_fusion", 0):
            mode += f", -ge {model.gelu_fusion}"
        failed = [f"{what}: {g.disabled}" for what, g in (("step", model.graph), ("update", model.update_graph))
                  if graph and getattr(g, "disabled", None)]
        if failed:
            mode += f"; partly eager (capture failed: {'; '.join(failed)})"
        r = summarize(times, inp.size, fpt, peaks.get("gemm_tflops"))
        busy_ms = bu.median([b["busy"] for b in busy])
        r.update(losses=losses, impl=f"llmpy.gpu ({model.dtype.name}, {mode})", options=options,
                 phases_ms={k: bu.median([b[k] for b in busy]) for k in busy[0] if k != "busy"},
                 gpu_busy_ms=busy_ms, host_overhead_ms=r["ms_per_step"] - busy_ms,
                 host_enqueue_ms=bu.median(enqueue), peak_memory_mb=pool.total_bytes() / 2**20,
                 memory_method="CuPy pool bytes held after the run (arena + temporaries)",
                 arena_mb=model.arena.nbytes / 2**20)
        if peaks.get("nominal_tflops"):
            r["mfu_nominal_pct"] = mfu(fpt, inp.size, r["ms_per_step"], peaks["nominal_tflops"])
    pool.free_all_blocks()
    return r


# -------------------------------------------------------------------------------------------------
# PyTorch


def bench_torch(cfg, params, inp, tgt, args, fpt, peaks) -> dict:
    import torch
    import torch_gpt2 as tg
    cuda = args.device == "cuda"
    dev = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(args.threads)
    rss0 = rss_mb()
    fused = {"fused": True} if cuda else {}
    if isinstance(cfg, NanoChatConfig):
        import torch_nanochat as tn
        model = tn.PlainNanoChat(cfg, attn=args.torch_attn).load_flat(cfg, params).to(dev)
        opts = tn.optimizers(model, args.optimizer, lr=LR, muon_lr=MUON_LR, weight_decay=WEIGHT_DECAY, cuda=cuda,
                             betas=(BETA1, BETA2), eps=EPS, **fused)
    else:
        if args.torch_model == "hf":
            model = tg.hf_gpt2(cfg, params, attn=args.torch_attn)
        else:
            model = tg.PlainGPT2(cfg, attn=args.torch_attn).load_flat(cfg, params)
        model = model.to(dev)
        opts = [tg.adamw(model, lr=LR, weight_decay=WEIGHT_DECAY, **fused)]
    step_model = torch.compile(model) if cuda else model
    x, y = (torch.from_numpy(a.astype(np.int64)).to(dev) for a in (inp, tgt))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()

    def step():
        stamps = [time.perf_counter()]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = step_model(x, y)
        stamps.append(time.perf_counter())
        loss.backward()
        stamps.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
        sync()
        stamps.append(time.perf_counter())
        return float(loss.detach()), stamps

    losses, times, phases = [], [], {"forward": [], "backward": [], "optimizer": []}
    for i in range(args.warmup + args.steps):
        loss, s = step()
        losses.append(loss)
        if i >= args.warmup:
            times.append((s[3] - s[0]) * 1e3)
            for k, name in enumerate(phases):
                phases[name].append((s[k + 1] - s[k]) * 1e3)
    r = summarize(times, inp.size, fpt, peaks.get("gemm_tflops"))
    r.update(losses=losses, impl=describe_torch(args, cfg), torch_version=torch.__version__)
    if cuda:
        r.update(peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20,
                 memory_method="torch.cuda.max_memory_allocated")
        if peaks.get("nominal_tflops"):
            r["mfu_nominal_pct"] = mfu(fpt, inp.size, r["ms_per_step"], peaks["nominal_tflops"])
    else:   # host-side phases are only meaningful without asynchronous execution
        r.update(phases_ms={k: bu.median(v) for k, v in phases.items()},
                 peak_memory_mb=maxrss_mb() - rss0,
                 memory_method="growth of the process's peak RSS over torch's set-up and run")
    del opts, model, step_model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return r


def describe_torch(args, cfg=None) -> str:
    model = "transformers GPT2LMHeadModel" if args.torch_model == "hf" else "plain torch GPT-2"
    opt = "AdamW"
    if isinstance(cfg, NanoChatConfig):
        model = "plain torch nanochat (scripts/torch_nanochat.py)"
        opt = "Muon + AdamW" if args.optimizer == "muon" else "AdamW"
    if args.device == "cuda":
        return f"{model}, torch.compile, bf16 autocast, {args.torch_attn} attention, fused {opt}"
    return f"{model}, eager, float32, {args.torch_attn} attention, {opt} (default), {args.threads} threads"


# -------------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny model (--tiny), 2 warm-up + 3 timed steps")
    p.add_argument("-e", "--model", default="d12", help="llm.c descriptor: d6, d12, d24, ... (default d12); "
                                                        "nanochat:dN[:kvK] or a nanochat directory")
    p.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw",
                   help="nanochat models: adamw, or muon on the block matrices (both sides)")
    p.add_argument("--tiny", action="store_true", help=f"a tiny config instead of -e: {TINY}")
    p.add_argument("-B", type=int, default=0, help="batch size (default: 4 on cpu, 8 on cuda)")
    p.add_argument("-T", type=int, default=0, help="sequence length (default: 64 on cpu, 1024 on cuda)")
    p.add_argument("--steps", type=int, default=0,
                   help="timed steps (default: 10 on cpu, 20 on cuda; quick: 3)")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps first (default: 2 on cpu, 5 on cuda)")
    p.add_argument("--threads", type=int, default=0, help="cpu threads for NumPy's BLAS and torch "
                                                          "(default: OMP_NUM_THREADS, else all cores)")
    p.add_argument("--torch-model", choices=("hf", "plain"), default="",
                   help="reference model (default: hf on cpu, plain on cuda)")
    p.add_argument("--torch-attn", choices=("eager", "sdpa"), default="",
                   help="reference attention (default: eager on cpu, sdpa = flash on cuda)")
    p.add_argument("--variants", default="",
                   help="comma-separated runs: cuda " + ",".join([*GPU_VARIANTS, "torch"]) + "; cpu eager,torch "
                        "(default: all; llmpy's run first on cuda, in this order)")
    p.add_argument("--no-torch", action="store_true", help="time llmpy only (drops torch from --variants)")
    p.add_argument("--no-flash", action="store_true", help="cuda: drop flash and flash128 from --variants")
    p.add_argument("--seed", type=int, default=0, help="seed of the random batch")
    p.add_argument("--out", required=True, help="output directory for bench_train_<device>.json")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.B = args.B or (8 if cuda else 4)
    args.T = args.T or (1024 if cuda else 64)
    args.steps = args.steps or (3 if args.quick else 20 if cuda else 10)
    args.warmup = args.warmup or (2 if args.quick else 5 if cuda else 2)
    args.threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count())
    args.torch_model = args.torch_model or ("plain" if cuda else "hf")
    args.torch_attn = args.torch_attn or ("sdpa" if cuda else "eager")
    args.tiny = args.tiny or args.quick
    nanochat = families.is_nanochat(args.model) and not args.tiny
    if args.optimizer == "muon" and not nanochat:
        p.error("--optimizer muon: nanochat models only (-e nanochat:dN)")
    if nanochat and not cuda and args.torch_model == "hf":
        args.torch_model = "plain"       # transformers has no nanochat model: the plain torch one
    known = [*(GPU_VARIANTS if cuda else CPU_VARIANTS), "torch"]
    asked = [v for v in args.variants.split(",") if v] or known
    bad = [v for v in asked if v not in known]
    if bad:
        p.error(f"--variants: unknown {', '.join(bad)} on {args.device} (choose from {', '.join(known)})")
    dropped = ({"torch"} if args.no_torch else set()) | ({"flash", "flash128"} if args.no_flash else set())
    if nanochat:
        dropped |= set(GPT2_ONLY) - set(args.variants.split(","))   # asked for by name: said below
    args.variants = [v for v in known if v in asked and v not in dropped]   # the table's order
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        cfg = TINY
    elif families.is_nanochat(args.model):
        cfg, params = families.load_nanochat(args.model, flag="-e")
    else:
        cfg = GPTConfig.from_descriptor(args.model)
    B, T = args.B, min(args.T, cfg.max_seq_len)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = bu.run_metadata(args.device, argv)
    if args.device == "cpu" and os.environ.get("OPENBLAS_NUM_THREADS") != str(args.threads):
        print(f"bench_train: NumPy's BLAS threads are set by the environment before NumPy loads: run as a "
              f"script with --threads {args.threads} (OPENBLAS_NUM_THREADS is "
              f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')})")
    if not isinstance(cfg, NanoChatConfig):
        from llmpy.rng import init_params
        params = init_params(cfg)
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, cfg.vocab_size, (B, T + 1), dtype=np.int32)
    inp, tgt = np.ascontiguousarray(tokens[:, :-1]), np.ascontiguousarray(tokens[:, 1:])
    fpt = flops_per_token(cfg, T)

    # the device's GEMM rate (the MFU denominator here) and, on the GPU, llm.c's nominal peak
    if args.device == "cuda":
        import cupy as cp
        import ml_dtypes
        gemm = bu.measure_gemm_rate(cp, 8192, ml_dtypes.bfloat16, timer=bu.GpuTimer())
        peaks = {"gemm_tflops": gemm["tflops"], "gemm": gemm,
                 "nominal_tflops": bu.nominal_bf16_tflops(meta["device"])}
    else:
        gemm = bu.measure_gemm_rate(np, 1024 if args.quick else 2048, np.float32,
                                    timer=lambda fn, **kw: bu.time_cpu(fn, **kw))
        peaks = {"gemm_tflops": gemm["tflops"], "gemm": gemm}
    print(f"device: {meta['device']}; {describe_model(cfg)}, {params.size:,} params; B={B} T={T}; "
          f"{fpt / 1e9:.4f} GFLOP/token; threads {args.threads}; "
          f"measured GEMM peak {gemm['tflops']:.3f} TFLOP/s")
    print("bench_train: timings are only comparable on an otherwise idle machine")

    result = {**meta, "threads": args.threads if args.device == "cpu" else None,
              "config": dataclasses.asdict(cfg), "num_parameters": params.size, "B": B, "T": T,
              "family": "nanochat" if isinstance(cfg, NanoChatConfig) else "gpt2", "optimizer": args.optimizer,
              "steps": args.steps, "warmup": args.warmup, "flops_per_token": fpt, "peaks": peaks}
    path = out / f"bench_train_{args.device}.json"
    llmpy_runs = [v for v in args.variants if v != "torch"]
    if "torch" in args.variants and args.device == "cpu":   # first on the CPU: its peak RSS is then its own
        result["torch"] = bench_torch(cfg, params, inp, tgt, args, fpt, peaks)
        report("torch", result["torch"])
    for name in llmpy_runs:
        key, options = (GPU_VARIANTS if args.device == "cuda" else CPU_VARIANTS)[name]
        if isinstance(cfg, NanoChatConfig) and name in GPT2_ONLY:
            print(f"llmpy {name}: skipped (GPT-2's engine only; the nanochat engine runs eager and graph)")
            continue
        if name.startswith("flash"):
            import ml_dtypes
            from llmpy.gpu.flash_attention import supports
            if not supports(ml_dtypes.bfloat16, cfg.head_size):
                print(f"llmpy {name}: skipped (the fused attention needs head size 64, not {cfg.head_size})")
                continue
        if args.device == "cuda":
            result[key] = bench_llmpy_gpu(cfg, params, inp, tgt, args, fpt, peaks, options)
        else:
            result[key] = bench_llmpy_cpu(cfg, params, inp, tgt, args, fpt, peaks["gemm_tflops"])
        report(f"llmpy {name}", result[key])
        bu.write_json(path, result)           # what has run so far survives a later failure or time limit
    if "torch" in args.variants and args.device == "cuda":   # after llmpy's (review COSMETIC-2)
        result["torch"] = bench_torch(cfg, params, inp, tgt, args, fpt, peaks)
        report("torch", result["torch"])

    ok = True
    ran = [(name, key) for name, (key, _) in (GPU_VARIANTS if args.device == "cuda" else CPU_VARIANTS).items()
           if key in result]
    if "torch" in result and ran:
        b, torch_ms = result["torch"]["losses"], result["torch"]["ms_per_step"]
        main = "llmpy" if "llmpy" in result else ran[0][1]       # the trainer's default where it ran
        a = result[main]["losses"]
        print(f"\nstep  {main:14s} torch loss")
        for i, (la, lb) in enumerate(zip(a, b)):
            print(f"{i + 1:4d}  {la:14.6f} {lb:10.6f}")
        result["first_step_loss"] = {"torch": b[0]}
        result["ratios_ms_over_torch"] = {}
        for name, key in ran:   # same weights, same batch: every variant's first loss is torch's
            first = result[key]["losses"][0]
            agree = math.isclose(first, b[0], rel_tol=LOSS_RTOL[args.device])
            ok = ok and agree
            result["first_step_loss"][key] = first
            result["ratios_ms_over_torch"][name] = result[key]["ms_per_step"] / torch_ms
            print(f"llmpy {name:9s} first-step loss {first:.6f} ({'agrees' if agree else 'DISAGREES'} with torch's "
                  f"{b[0]:.6f}); ms/step llmpy / torch = {result['ratios_ms_over_torch'][name]:.3f}")
        result["first_step_loss"].update(llmpy=a[0], abs_diff=abs(a[0] - b[0]), match=ok)
        result["ratio_ms_llmpy_over_torch"] = result[main]["ms_per_step"] / torch_ms
    result["process_peak_rss_mb"] = maxrss_mb()
    bu.write_json(path, result)
    print(f"wrote {path}")
    return 0 if ok else 1


def report(name: str, r: dict):
    line = f"{name:12s} {r['ms_per_step']:9.2f} ms/step  {r['tok_per_s']:10.0f} tok/s"
    if "mfu_pct" in r:
        line += f"  MFU {r['mfu_pct']:5.1f}% (measured GEMM peak)"
    if "mfu_nominal_pct" in r:
        line += f"  {r['mfu_nominal_pct']:5.1f}% (nominal bf16)"
    if "peak_memory_mb" in r:
        line += f"  peak mem {r['peak_memory_mb']:.0f} MiB"
    print(line)
    if "phases_ms" in r:
        print(" " * 13 + "  ".join(f"{k} {v:.2f} ms" for k, v in r["phases_ms"].items()))
    if "gpu_busy_ms" in r:
        print(" " * 13 + f"GPU busy {r['gpu_busy_ms']:.2f} ms, host overhead {r['host_overhead_ms']:.2f} ms")
    print(" " * 13 + r["impl"])


if __name__ == "__main__":
    sys.exit(main())

"""Data-parallel training step on the CPU: 1 and N MPI ranks, and the share of the step spent in collectives.

    python scripts/bench_dist.py --quick --out out/bench                       # tiny model, seconds
    python scripts/bench_dist.py -e d6 -B 4 -T 128 --ranks 1,2 --zero 0,1 --out out/bench

Each configuration runs as `mpiexec -n N python scripts/bench_dist.py --worker ...` (one process when
N = 1; mpiexec is the venv's, from the `dist` extra). A step is the trainer's (llmpy/train.py): zero
grads, forward + backward of B rows on every rank, DataParallel.reduce_gradients, the mean loss, the
global grad norm and AdamW (under -z 1 the sharded update and the all-gather). Weak scaling: every rank
has B rows, so N ranks train N*B rows per step. Each step starts after a barrier; rank 0 times it with
perf_counter, and the collectives are timed where they are called (a blocking MPI collective also
waits for the slowest rank, so "comm" includes load imbalance). BLAS gets --threads threads per rank.
Reported per configuration: median ms/step, ms in collectives and their share, global tok/s, and the
speed-up over one rank. Writes DIR/bench_dist_cpu.json. Timings mean something only on an idle machine
with at least N free cores.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchutil import REPO, run_metadata

TIMED = ("all_reduce", "reduce_scatter", "all_gather", "sum_host", "mean_host", "barrier")


class TimedComm:
    """A Communicator whose collectives add their wall time to .seconds."""

    def __init__(self, comm):
        self.comm, self.seconds = comm, 0.0

    def __getattr__(self, name):
        attr = getattr(self.comm, name)
        if name not in TIMED:
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed


def model_config(args):
    from llmpy.model import GPTConfig
    if args.quick:
        return GPTConfig(max_seq_len=64, vocab_size=1000, padded_vocab_size=1024, num_layers=2, num_heads=2,
                         channels=64)
    return GPTConfig.from_descriptor(args.model)


def worker(args) -> None:
    import numpy as np

    import llmpy.cpu as cpu
    from llmpy.dist.init import init_processes
    from llmpy.dist.zero import DataParallel
    from llmpy.model import GPT, num_parameters
    from llmpy.rng import init_params
    from llmpy.train import TrainConfig
    cfg = model_config(args)
    comm = init_processes(TrainConfig(), "cpu", log=lambda *a: None)
    timed = TimedComm(comm)
    params = np.empty(num_parameters(cfg), dtype=np.float32)
    init_params(cfg, params)
    model = GPT(cfg, cpu, params=params)
    dp = DataParallel(model, timed, args.zero, log=lambda *a: None)
    tokens = np.random.default_rng(1000 + comm.rank).integers(0, cfg.vocab_size, size=(args.B, args.T + 1))
    inp, tgt = tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32)
    rows = []
    for step in range(args.warmup + args.steps):
        comm.barrier()
        timed.seconds = 0.0
        t0 = time.perf_counter()
        model.zero_grad()
        model.forward_backward(inp, tgt, 1.0 / (args.B * args.T))
        dp.reduce_gradients()
        loss = dp.mean_loss(args.B * args.T)
        norm = dp.grad_norm()
        dp.update(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, t=step + 1,
                  grad_scale=1.0 / norm if norm > 1.0 else 1.0)
        if step >= args.warmup:
            rows.append((time.perf_counter() - t0, timed.seconds))
    if comm.rank == 0:
        ms = statistics.median(r[0] for r in rows) * 1e3
        comm_ms = statistics.median(r[1] for r in rows) * 1e3
        print(json.dumps({"ranks": comm.size, "zero": args.zero, "ms": ms, "comm_ms": comm_ms,
                          "comm_share": comm_ms / ms, "tok_per_s": comm.size * args.B * args.T / (ms / 1e3),
                          "last_loss": loss, "params": model.num_parameters}))


def launch(args, ranks: int, zero: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), HYDRA_LAUNCHER="fork", OMP_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--zero", str(zero), "-e", args.model,
           "-B", str(args.B), "-T", str(args.T), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--quick"] if args.quick else []
    if ranks > 1:
        cmd = [os.path.join(os.path.dirname(sys.executable), "mpiexec"), "-n", str(ranks), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode:
        sys.exit(f"bench_dist: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-e", "--model", default="d6", help="model descriptor (default d6)")
    p.add_argument("-B", type=int, default=4, help="rows per rank")
    p.add_argument("-T", type=int, default=128)
    p.add_argument("--ranks", default="1,2", help="comma-separated process counts")
    p.add_argument("--zero", default="0,1", help="comma-separated ZeRO stages")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="BLAS threads per rank")
    p.add_argument("--quick", action="store_true", help="a tiny model, 2 rows of 32 tokens, 3 steps")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default="", help="folder for bench_dist_cpu.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.B, args.T, args.steps = 2, 32, 3
    if args.worker:
        args.zero = int(args.zero)
        worker(args)
        return
    results = []
    print(f"{'ranks':>5} {'zero':>4} {'ms/step':>9} {'comm ms':>8} {'comm %':>7} {'tok/s':>9} {'speed-up':>8}")
    for zero in (int(z) for z in args.zero.split(",")):
        base = None
        for ranks in (int(n) for n in args.ranks.split(",")):
            row = launch(args, ranks, zero)
            base = base or row["tok_per_s"]
            row["speedup"] = row["tok_per_s"] / base
            results.append(row)
            print(f"{ranks:5d} {zero:4d} {row['ms']:9.1f} {row['comm_ms']:8.1f} {100 * row['comm_share']:6.1f}% "
                  f"{row['tok_per_s']:9.0f} {row['speedup']:7.2f}x")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = run_metadata("cpu")
        with open(os.path.join(args.out, "bench_dist_cpu.json"), "w") as f:
            json.dump([{**meta, "blas_threads": str(args.threads), **row} for row in results], f, indent=1)


if __name__ == "__main__":
    main()

"""Crash test: kill a training run with SIGKILL at random moments (often in the middle of a checkpoint
write), resume it with `-y 1` each time, and check that it logs exactly the losses of an uninterrupted run
and ends on the same model bytes.

    python scripts/crash_test.py --kills 12 --seed 7          # about half a minute on two cores

A tiny GPT-2 (2 layers, C=32) trains on a learnable token pattern for --steps steps, checkpointing every
--every steps; the kills land 0.8-2 s after each start (Python's start-up included), so some hit the
start, some the loop, some a checkpoint. Prints one line; exit status 0 when every train loss logged by
any of the runs (a resumed run logs the steps it replays again) equals the uninterrupted run's loss at
that step, every step was logged, and the final model files are identical; 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def make_inputs(folder: Path) -> tuple[str, str, str]:
    """A tiny model file and train/val shards of a repeating pattern (the pattern makes the loss fall)."""
    from llmpy.checkpoint import save_model
    from llmpy.data import write_shard
    from llmpy.model import GPTConfig, num_parameters
    from llmpy.rng import init_params
    cfg = GPTConfig(max_seq_len=64, vocab_size=50257, padded_vocab_size=50304, num_layers=2, num_heads=2,
                    channels=32)
    flat = np.empty(num_parameters(cfg), dtype=np.float32)
    init_params(cfg, flat)
    save_model(str(folder / "tiny.bin"), cfg, flat, dtype="fp32")
    pattern = np.random.default_rng(0).integers(0, 2000, size=97)
    for i, n in enumerate((1500, 1200, 1700)):
        write_shard(str(folder / f"train_{i:02d}.bin"), np.resize(np.roll(pattern, 7 * i), n).astype(np.uint16))
    write_shard(str(folder / "val_00.bin"), np.resize(pattern, 800).astype(np.uint16))
    return str(folder / "tiny.bin"), str(folder / "train_*.bin"), str(folder / "val_00.bin")


def train_argv(inputs, out: Path, steps: int, every: int, *extra) -> list[str]:
    model, train, val = inputs
    return [sys.executable, "-m", "llmpy", "train", "--device", "cpu", "-e", model, "-i", train, "-j", val,
            "-b", "2", "-t", "32", "-x", str(steps), "-v", "5", "-m", "2", "-s", "0", "-l", "3e-3", "-u", "2",
            "-q", "0.1", "-o", str(out), "-n", str(every), *extra]


def train_losses(out: Path) -> list[tuple[int, float]]:
    """Every (step, loss) row logged, in order (a resumed run logs the steps it replays again)."""
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=12, help="SIGKILLs to deliver (fewer if the run ends first)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=5, help="checkpoint every N steps (-n)")
    p.add_argument("--seed", type=int, default=7, help="seed of the kill times")
    args = p.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    folder = Path(tempfile.mkdtemp(prefix="llmpy-crash-"))
    inputs = make_inputs(folder)
    whole, killed = folder / "whole", folder / "killed"
    subprocess.run(train_argv(inputs, whole, args.steps, args.every), env=env, check=True, capture_output=True)
    rng, kills, resume = random.Random(args.seed), 0, ()
    while True:
        job = subprocess.Popen(train_argv(inputs, killed, args.steps, args.every, *resume), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        resume = ("-y", "1")
        if kills < args.kills:
            time.sleep(rng.uniform(0.8, 2.0))
            if job.poll() is None:
                job.send_signal(signal.SIGKILL)
                job.wait()
                kills += 1
                continue
        err = job.communicate()[1].decode(errors="replace")
        if job.returncode != 0:
            print(f"crash test: the resumed run failed (exit {job.returncode}):\n{err[-2000:]}")
            return 1
        break
    final = f"model_{args.steps:08d}.bin"
    expected, logged = dict(train_losses(whole)), train_losses(killed)
    same_losses = {s for s, _ in logged} == set(expected) and all(loss == expected[s] for s, loss in logged)
    same_model = (killed / final).read_bytes() == (whole / final).read_bytes()
    print(f"crash test: {kills} SIGKILLs over {args.steps} steps (checkpoint every {args.every}); train losses "
          f"{'identical' if same_losses else 'DIFFER'}; final model {'identical' if same_model else 'DIFFERS'} "
          f"({folder})")
    return 0 if same_losses and same_model else 1


if __name__ == "__main__":
    sys.exit(main())

"""The training loop and CLI: schedules (llm.c §7.2), exact resume, logs, and one-line errors for bad input.

Runs the real `llmpy train` on a tiny model over synthetic token shards written with llmpy.data.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from llmpy.cli import main
from llmpy.data import write_shard
from llmpy.model import GPTConfig, num_parameters
from llmpy.train import TrainConfig, learning_rate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_tiny_model(path):
    """A d2-sized random model file (C=32, V=50257 keeps the real tokenizer usable) via the CLI's writer."""
    from llmpy.checkpoint import save_model
    from llmpy.rng import init_params
    cfg = GPTConfig(max_seq_len=64, vocab_size=50257, padded_vocab_size=50304, num_layers=2, num_heads=2,
                    channels=32)
    flat = np.empty(num_parameters(cfg), dtype=np.float32)
    init_params(cfg, flat)
    save_model(str(path), cfg, flat, dtype="fp32")
    return str(path)


@pytest.fixture
def shards(tmp_path):
    """Three train shards and one val shard of structured tokens (a learnable repeating pattern)."""
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, 2000, size=97)
    for i, n in enumerate((1500, 1200, 1700)):
        start = rng.integers(0, 97)
        write_shard(str(tmp_path / f"train_{i:02d}.bin"), np.resize(np.roll(pattern, start), n).astype(np.uint16))
    write_shard(str(tmp_path / "val_00.bin"), np.resize(pattern, 800).astype(np.uint16))
    return str(tmp_path / "train_*.bin"), str(tmp_path / "val_00.bin")


def run_cli(args, tmp_path):
    """`llmpy train` in a subprocess (so exit codes and stderr are exactly what a user sees)."""
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "llmpy", *args], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)


def train_args(model, shards, out, steps, *extra):
    train, val = shards
    return ["train", "--device", "cpu", "-e", model, "-i", train, "-j", val, "-b", "2", "-t", "32", "-x",
            str(steps), "-v", "3", "-m", "2", "-s", "0", "-l", "3e-3", "-u", "2", "-q", "0.1", "-c", "0.1",
            "-o", str(out), *extra]


def logged(out_dir, split):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r["loss"]) for r in rows if r["split"] == split]


# -------------------------------------------------------------------------------------------------


def test_schedules_match_llmc():
    cfg = TrainConfig(learning_rate=1.0, warmup_steps=10, final_lr_frac=0.1)
    S = 110
    assert learning_rate(cfg, 0, S) == pytest.approx(0.1)                 # warmup (s+1)/W
    assert learning_rate(cfg, 9, S) == pytest.approx(1.0)
    assert learning_rate(cfg, 10, S) == pytest.approx(1.0)                # cosine starts at the peak
    assert learning_rate(cfg, 60, S) == pytest.approx(0.1 + 0.5 * 0.9)    # halfway: midpoint
    assert learning_rate(cfg, 110, S) == pytest.approx(0.1)               # ends at lr * q
    lin = TrainConfig(learning_rate=1.0, warmup_steps=10, final_lr_frac=0.1, lr_schedule="linear")
    assert learning_rate(lin, 60, S) == pytest.approx(1.0 - 0.5 * 0.9)
    const = TrainConfig(learning_rate=0.5, warmup_steps=10, lr_schedule="constant")
    assert learning_rate(const, 0, S) == 0.5                              # constant: no warmup
    wsd = TrainConfig(learning_rate=1.0, warmup_steps=10, final_lr_frac=0.0, lr_schedule="wsd")
    assert learning_rate(wsd, 87, S) == 1.0                               # stable until int(0.8 S) = 88
    r = (99 - 88) / (110 - 88)
    assert learning_rate(wsd, 99, S) == pytest.approx(1.0 - math.sqrt(r))


def test_train_logs_falling_losses_in_llmc_format(tmp_path, shards):
    model = write_tiny_model(tmp_path / "tiny.bin")
    out = tmp_path / "run"
    r = run_cli(train_args(model, shards, out, 6), tmp_path)
    assert r.returncode == 0, r.stderr
    step_lines = [line for line in r.stdout.splitlines() if line.startswith("step ")]
    assert len(step_lines) == 6
    assert step_lines[0].startswith("step    1/6 | loss ")
    float(step_lines[0][20:28])   # llm.c's CI checker reads the loss at these columns
    log = (out / "main.log").read_text().splitlines()
    assert log[0].startswith("s:0 tel:")
    assert any(line.startswith("s:0 trl:") and " lr:" in line and " norm:" in line for line in log)
    train_losses = [loss for _, loss in logged(out, "train")]
    assert train_losses[-1] < train_losses[0]


def test_resume_is_exact_with_shuffled_multishard_data(tmp_path, shards):
    """A run 'crashes' after its step-4 checkpoint (we drop the later DONE_ marker); -y 1 must replay
    steps 4..7 with exactly the logged losses and rewrite a byte-identical step-8 model."""
    model = write_tiny_model(tmp_path / "tiny.bin")
    out = tmp_path / "run"
    args = train_args(model, shards, out, 8, "-n", "4")
    r = run_cli(args, tmp_path)
    assert r.returncode == 0, r.stderr
    first, first_val = logged(out, "train"), logged(out, "val")
    assert [s for s, _ in first] == list(range(8))
    final_model = (out / "model_00000008.bin").read_bytes()
    (out / "DONE_00000008").unlink()            # as if the run died before finishing step 8's checkpoint
    (out / "model_00000008.bin").unlink()

    r = run_cli(args + ["-y", "1"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout and "model_00000004.bin" in r.stdout
    replay = logged(out, "train")[8:]
    assert replay == first[4:], "resumed losses must equal the uninterrupted run's exactly"
    assert (out / "model_00000008.bin").read_bytes() == final_model
    assert logged(out, "val")[len(first_val):] == [v for v in first_val if v[0] >= 4]


def test_keep_last_checkpoints(tmp_path, shards):
    model = write_tiny_model(tmp_path / "tiny.bin")
    out = tmp_path / "keep"
    r = run_cli(train_args(model, shards, out, 6, "-n", "2", "-nk", "1"), tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p for p in os.listdir(out) if p.startswith("DONE_")) == ["DONE_00000006"]


@pytest.mark.parametrize("case,args,needle", [
    ("nonpositive -b", ["-b", "0"], "-b/--batch-size"),
    ("-t beyond maxT", ["-t", "128"], "-t/--seq-len 128 exceeds"),
    ("empty glob", ["-i", "nothing_here_*.bin"], "nothing_here_*.bin"),
    ("missing model", ["-e", "missing.bin"], "missing.bin"),
    ("bad descriptor", ["-e", "d13"], "-e d13"),
    ("bad int", ["-x", "ten"], "-x/--max-steps"),
])
def test_bad_input_is_one_line_without_traceback(tmp_path, shards, case, args, needle):
    model = write_tiny_model(tmp_path / "tiny.bin")
    base = ["train", "--device", "cpu", "-e", model, "-i", shards[0], "-j", shards[1], "-b", "2", "-t", "32",
            "-x", "1", "-s", "0"]
    r = run_cli(base + args, tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("damage,needle", [("truncate", "bytes"), ("magic", "magic"), ("count", "bytes")])
def test_malformed_files_are_named(tmp_path, shards, damage, needle):
    model = write_tiny_model(tmp_path / "tiny.bin")
    shard = tmp_path / "val_00.bin"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[:-7]
    elif damage == "magic":
        data[0:4] = np.int32(12345).tobytes()
    else:
        data[8:12] = np.int32(10).tobytes()   # header count no longer matches the file size
    shard.write_bytes(bytes(data))
    r = run_cli(["train", "--device", "cpu", "-e", model, "-i", shards[0], "-j", str(shard), "-b", "2", "-t",
                 "32", "-x", "1"], tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert str(shard) in r.stderr and needle in r.stderr.lower(), r.stderr
    broken = tmp_path / "broken.bin"
    broken.write_bytes((tmp_path / "tiny.bin").read_bytes()[:5000])
    r = run_cli(["train", "--device", "cpu", "-e", str(broken), "-i", shards[0], "-x", "1"], tmp_path)
    assert r.returncode != 0 and str(broken) in r.stderr and "Traceback" not in r.stderr


def test_cuda_without_gpu_says_so(tmp_path, shards, monkeypatch):
    from llmpy import train as train_mod
    if train_mod.resolve_device("auto") == "cuda":
        pytest.skip("a GPU is present")
    assert main(["train", "--device", "cuda", "-i", shards[0], "-x", "1"]) == 1

"""The benchmark and plotting scripts in scripts/ still run: each one's --quick CPU mode, end to end.

What this proves: the scripts import, call llmpy the way the trainer does, write their JSON and PNGs,
and (bench_kernels) every op family's baseline agrees with llmpy.cpu, (bench_train) llmpy's first-step
loss agrees with PyTorch's. Not timings: those are only meaningful on an idle machine. Each script runs
in a subprocess, as a user would run it, with one BLAS thread (multi-threaded BLAS on a busy CI
machine is erratic and slow).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
FAMILIES = ("encoder", "layernorm", "fused_residual", "residual", "matmul", "attention", "gelu",
            "classifier", "adamw", "global_norm")


def run_script(name: str, *args: str, timeout: float = 120) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(SCRIPTS / name), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, \
        f"{name} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_bench_kernels_quick_covers_every_op_family(tmp_path):
    run_script("bench_kernels.py", "--device", "cpu", "--quick", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "bench_kernels.json").read_text())
    timed = [r for r in rows if "ms" in r and r["op"] != "peak"]
    assert {r["op"] for r in timed} == set(FAMILIES)
    for r in timed:
        assert r["check_ok"], r
        assert r["ms"] > 0 and r["baseline_ms"] > 0 and r["pct_peak"] > 0
        assert ("gbps" in r) != ("tflops" in r)
        assert {"direction", "shape", "backend", "device", "commit", "date", "command"} <= r.keys()
    assert {(r["op"], r["direction"]) for r in timed} >= {("gelu", "forward"), ("gelu", "backward"),
                                                         ("matmul", "forward"), ("matmul", "backward")}
    assert {r["direction"] for r in rows if r["op"] == "peak"} == {"copy", "gemm"}
    assert list(tmp_path.glob("*.png"))


def test_matmul_sweep_quick(tmp_path):
    run_script("bench_matmul_sweep.py", "--device", "cpu", "--quick", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "matmul_sweep.json").read_text())
    assert len({r["impl"] for r in rows}) == 2
    assert {r["direction"] for r in rows} == {"forward", "backward"}
    assert all(r["ms"] > 0 and r["flops"] > 0 for r in rows)
    assert (tmp_path / "matmul_sweep.png").stat().st_size > 0


def test_bench_train_quick_llmpy_and_torch(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    run_script("bench_train.py", "--device", "cpu", "--quick", "--threads", "1", "--out", str(tmp_path))
    result = json.loads((tmp_path / "bench_train_cpu.json").read_text())
    for impl in ("llmpy", "torch"):
        assert result[impl]["ms_per_step"] > 0 and result[impl]["tok_per_s"] > 0
        assert result[impl]["peak_memory_mb"] > 0
        assert len(result[impl]["losses"]) == result["warmup"] + result["steps"]
    assert set(result["llmpy"]["phases_ms"]) == {"forward", "backward", "optimizer"}
    assert result["first_step_loss"]["match"], result["first_step_loss"]
    assert result["ratio_ms_llmpy_over_torch"] > 0
    assert result["flops_per_token"] > 0 and result["commit"] and result["command"]


def test_plot_log_synthetic(tmp_path):
    for run, scale in (("run_a", 1.0), ("run_b", 1.1)):
        d = tmp_path / run
        d.mkdir()
        lines = [f"s:{s} trl:{scale * (5 - s / 10):.4f} lr:0.000300 norm:1.00" for s in range(30)]
        lines += [f"s:{s} tel:{scale * (5.1 - s / 10):.4f}" for s in range(0, 30, 10)] + ["s:29 eval:0.2500"]
        (d / "main.log").write_text("\n".join(lines) + "\n")
    out = tmp_path / "loss.png"
    stdout = run_script("plot_log.py", str(tmp_path / "run_a"), str(tmp_path / "run_b" / "main.log"),
                        "--out", str(out), "--smooth", "5")
    assert "run_a: 30 train, 3 val points" in stdout
    assert out.stat().st_size > 0


def _gpu_check(tmp_path, *args, gpu_name="NVIDIA Fake H100 80GB HBM3", **env_extra):
    """scripts/gpu_check.sh with a stand-in nvidia-smi (printing gpu_name, or failing when None) and no
    compute-sanitizer on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + (f"echo '{gpu_name}'\n" if gpu_name else "exit 9\n"))
    smi.chmod(0o755)
    path = f"{bin_dir}:/usr/bin:/bin"
    env = {**os.environ, "PATH": path, "PYTHON": sys.executable, **env_extra}
    return subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_gpu_check_records_each_step_and_refuses_bad_input(tmp_path):
    out = tmp_path / "res"
    proc = _gpu_check(tmp_path, "--only", "sanitizer", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["device"] == "NVIDIA Fake H100 80GB HBM3"
    assert summary["command"] == f"bash scripts/gpu_check.sh --only sanitizer --out {out}"
    assert summary["steps"] == {"sanitizer": {"exit": "skipped", "seconds": 0, "log": "sanitizer.log",
                                              "command": "compute-sanitizer not on PATH"}}
    assert summary["commit"] and summary["date"]
    # a copy without .git (the rented GPU machine) is told its commit
    proc = _gpu_check(tmp_path, "--only", "sanitizer", "--out", str(out), LLMPY_COMMIT="0123abc")
    assert proc.returncode == 0 and json.loads((out / "gpu_check.json").read_text())["commit"] == "0123abc"

    # a step that fails (here: no device behind the stand-in nvidia-smi) fails the whole check
    proc = _gpu_check(tmp_path, "--only", "kernels", "--quick", "--out", str(out))
    assert proc.returncode == 1 and "failed: kernels" in proc.stdout, proc.stdout + proc.stderr
    step = json.loads((out / "gpu_check.json").read_text())["steps"]["kernels"]
    assert step["exit"] != 0 and (out / "kernels.log").read_text().strip()

    proc = _gpu_check(tmp_path, "--only", "tests,bogus")
    assert proc.returncode == 2 and "unknown step 'bogus'" in proc.stderr
    proc = _gpu_check(tmp_path, "--fast")
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr
    proc = _gpu_check(tmp_path, "--only", "tests", gpu_name=None)
    assert proc.returncode == 2 and "no NVIDIA GPU" in proc.stderr


def test_bench_speed_to_loss_quick(tmp_path):
    run_script("bench_speed_to_loss.py", "--quick", "--out", str(tmp_path))
    result = json.loads((tmp_path / "speed_to_loss.json").read_text())
    runs, meta = result["runs"], result["meta"]
    assert set(runs) == {"nanochat-adamw", "nanochat-muon", "gpt2"}
    for name, r in runs.items():
        steps = [s for s, _ in r["val"]]
        assert steps == list(range(0, meta["steps"] + 1, 3)), name
        assert r["val"][-1][1] < r["val"][0][1], f"{name}: val loss must fall"
    # nanochat's lm_head starts at std 0.001: its first val loss is that of uniform logits, ln V
    assert abs(runs["nanochat-muon"]["val"][0][1] - math.log(meta["vocab"])) < 0.01
    assert runs["nanochat-adamw"]["val"][0] == runs["nanochat-muon"]["val"][0]      # same model, same data
    params = meta["params"]
    assert abs(params["gpt2"] - params["nanochat-adamw"]) < 0.3 * params["nanochat-adamw"]
    assert set(result["step_time_interleaved"]) == {"nanochat", "nanochat-muon", "gpt2"}
    assert (tmp_path / "speed_to_loss.png").stat().st_size > 10_000

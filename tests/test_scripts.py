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

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
FAMILIES = ("encoder", "layernorm", "fused_residual", "residual", "matmul", "attention", "gelu",
            "classifier", "adamw", "global_norm", "rmsnorm", "rope", "relu2", "muon")


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


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_bench_train_nanochat_follows_plain_torch_step_for_step(tmp_path, optimizer):
    """bench_train's nanochat mode: llmpy's NanoChat against scripts/torch_nanochat.py, same weights and
    batch, the same optimizer on both sides: every logged loss agrees (a step with Muon or AdamW on the
    llmpy side is the torch side's), not only the first."""
    pytest.importorskip("torch")
    run_script("bench_train.py", "--device", "cpu", "-e", "nanochat:d1", "-B", "2", "-T", "32", "--steps", "2",
               "--warmup", "2", "--threads", "1", "--optimizer", optimizer, "--out", str(tmp_path))
    result = json.loads((tmp_path / "bench_train_cpu.json").read_text())
    assert result["family"] == "nanochat" and result["optimizer"] == optimizer
    assert result["num_parameters"] == 2 * 50304 * 64 + 12 * 64 * 64
    assert "Muon" in result["torch"]["impl"] if optimizer == "muon" else "AdamW" in result["torch"]["impl"]
    ours, theirs = result["llmpy"]["losses"], result["torch"]["losses"]
    assert len(ours) == len(theirs) == 4 and ours[-1] < ours[0]
    np.testing.assert_allclose(ours, theirs, rtol=2e-5)
    assert result["first_step_loss"]["match"]


def test_crash_test_resumes_exactly_after_sigkills():
    """scripts/crash_test.py (SIGKILL, -y 1, repeat): every replayed loss and the final model as the
    uninterrupted run's; exits 1 otherwise (run_script asserts 0)."""
    out = run_script("crash_test.py", "--kills", "2", "--steps", "150", "--every", "5", timeout=300)
    assert "train losses identical; final model identical" in out, out
    assert int(out.split("crash test: ")[1].split(" SIGKILLs")[0]) >= 1, out


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


# -------------------------------------------------------------------------------------------------
# scripts/first_contact.py (gpu_check.sh --first-contact): the plumbing, with stand-in steps


def _fake_wheel(folder: Path, package: str) -> Path:
    """A minimal pure-Python wheel providing package.bindings.cublasLt (nvmath-python's module path)."""
    import zipfile
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{package}-0.1-py3-none-any.whl"
    info = f"{package}-0.1.dist-info"
    files = {f"{package}/__init__.py": "", f"{package}/bindings/__init__.py": "",
             f"{package}/bindings/cublasLt.py": "VERSION = 1\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def _first_contact(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / "first_contact.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_first_contact_plan_fits_nine_minutes():
    proc = _first_contact("--plan")
    assert proc.returncode == 0, proc.stderr
    steps = [line.split()[1] for line in proc.stdout.splitlines() if line[:2].strip().isdigit()]
    assert steps == ["wheels", "env", "gates", "engine", "ops_first", "bench", "ops"]   # review §3.3's order
    sys.path.insert(0, str(SCRIPTS))
    import first_contact
    plan = first_contact.plan(Path("work"))
    assert sum(s.cap for s in plan if s.when == "always") <= first_contact.BUDGET_S == 540
    assert "= 540 s <= 540 s" in proc.stdout
    bench = next(s for s in plan if s.name == "bench").command
    assert bench[bench.index("-B") + 1] == "64" and bench[bench.index("-T") + 1] == "1024"
    gpu_check = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--first-contact", "--plan"], cwd=REPO,
                               env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                               timeout=60)
    assert gpu_check.returncode == 0 and gpu_check.stdout == proc.stdout


def test_first_contact_dry_run_installs_wheels_enforces_caps_and_writes_the_summary(tmp_path):
    """The whole mode on the CPU: the carried wheel is installed and imported for real, each step's command
    is a stand-in; the engine's stand-in overruns its 2-second cap and is recorded as timed out, which
    brings the per-op tests forward (ops_first) and leaves ops out. Results: at most 6 files."""
    wheels, out = tmp_path / "whl", tmp_path / "out"
    _fake_wheel(wheels, "fake_nvmath")
    proc = _first_contact("--dry-run", "--out", str(out), "--wheels", str(wheels), "--site", str(tmp_path / "site"),
                          "--require", "fake_nvmath.bindings.cublasLt", "--cap", "engine=2",
                          "--stand-in-sleep", "engine=30")
    assert proc.returncode == 1, proc.stdout + proc.stderr           # a step timed out
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == ["wheels", "env", "gates", "engine", "ops_first", "bench", "ops"]
    assert summary["nvmath"]["imports"] and "fake_nvmath-0.1-py3-none-any.whl" in summary["nvmath"]["detail"]
    assert (tmp_path / "site" / "fake_nvmath" / "bindings" / "cublasLt.py").is_file()
    engine = steps["engine"]
    assert engine["status"] == "timeout" and engine["exit"] in (124, 137) and 2 <= engine["seconds"] < 20
    assert engine["cap_s"] == engine["limit_s"] == 2
    assert [steps[n]["status"] for n in ("env", "gates", "ops_first", "bench")] == ["passed"] * 4
    assert steps["ops"]["status"] == "not run" and steps["ops"]["reason"] == "ops_first ran"
    assert steps["gates"]["tests"]["tests"] == 1 and steps["gates"]["limit_s"] == 90
    assert summary["tok_per_s"] == {"llmpy": 1000, "llmpy_flash": 2000, "torch": 3000}
    assert summary["dry_run"] and summary["commit"] and summary["date"] and "--dry-run" in summary["command"]
    assert sorted(p.name for p in out.iterdir()) == sorted(summary["files"])
    assert len(summary["files"]) <= 6 and set(summary["files"]) >= {"summary.json", "log.txt", "tests.xml"}
    log = (out / "log.txt").read_text()
    assert "dry run: gates would run: " in log and "tests/test_cuda_emu.py" in log
    import xml.etree.ElementTree as ET
    suites = [s.get("name") for s in ET.parse(out / "tests.xml").getroot()]
    assert suites == ["gates", "ops_first"]                        # the timed-out engine wrote none


def test_first_contact_stops_loudly_without_nvmath(tmp_path):
    wheels, out = tmp_path / "whl", tmp_path / "out"
    _fake_wheel(wheels, "not_nvmath")                              # installs, but is not the module
    proc = _first_contact("--dry-run", "--out", str(out), "--wheels", str(wheels), "--site", str(tmp_path / "site"),
                          "--require", "fake_nvmath.bindings.cublasLt")
    assert proc.returncode == 2 and "fake_nvmath.bindings.cublasLt does not import" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["nvmath"]["imports"] and summary["error"].startswith("stopped:")
    assert [s["status"] for s in summary["steps"]] == ["failed"] + ["not run"] * 6
    proc = _first_contact("--cap", "bogus=3")
    assert proc.returncode == 2 and "--cap bogus=3: expected STEP=SECONDS" in proc.stderr


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

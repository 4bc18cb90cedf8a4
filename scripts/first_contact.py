"""First GPU contact: the pre-flight review's ordered, time-boxed checks (gpu-review.md §3.3) as one
command that fits a 10-minute limit and leaves at most 6 result files.

    bash scripts/gpu_check.sh --first-contact [--out DIR]    # on the GPU machine: runs this script
    python scripts/first_contact.py --plan                   # the steps and their caps; runs nothing
    python scripts/first_contact.py --dry-run --out DIR      # the plumbing anywhere: stand-in steps

Every step runs under `timeout min(cap, budget left)`; the budget is 540 s (9 minutes), so a hang costs
its cap and never the run. The order puts what decides the most first:
  wheels     nvmath-python must import; if not, the wheels carried in .whl/ (and .whl/fallback/) are
             installed into a site folder on PYTHONPATH. Still not: the run stops here, loudly (exit 2),
             because every cuBLASLt test would skip and the rest would fail
  env        nvidia-smi, versions, and every kernel instantiation compiled by CuPy with its registers
             and local memory (a spill shows here first)
  gates      the hardware's mma/ldmatrix layouts, cuBLASLt on every plan and epilogue, graph capture
  engine     GPT-2 124M bf16 and fp32 steps against the CPU, flash, graph = eager bitwise, resume, memory
  ops_first  only if gates or engine failed: the per-op tests, to localise it before the benchmark
  bench      bench_train at B=64, T=1024: llmpy's variants (eager, graph, flash, flash128, ge2), then
             torch.compile; its JSON is rewritten after each, so a cut-off keeps what ran
  ops        the per-op tests with whatever the budget has left (unless ops_first ran)
pytest gets --timeout per test where pytest-timeout is installed.

Results, in --out (default: $OUT when set, else scripts/results/<gpu>/first_contact): summary.json
(device, date, commit, command, each step's status, time, cap and test counts, tok/s), log.txt (every
step's output), tests.xml (the pytest steps' JUnit reports, one <testsuite> each) and
bench_train_cuda.json. Exit status: 0 all passed, 1 a step failed or timed out, 2 nvmath-python
missing, no GPU, or bad arguments.

--dry-run replaces each step's command by a stand-in that prints the real command and writes the
file the step would (a JUnit report, a benchmark JSON with made-up numbers); the wheel installation
and the import check run for real. With --cap and --stand-in-sleep a test makes a step overrun.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 540                      # 9 minutes: one 10-minute command with room for start-up
REQUIRED_MODULE = "nvmath.bindings.cublasLt"
SITE = Path("/tmp/llmpy-site")      # where carried wheels go (no write access to site-packages needed)
PER_TEST_TIMEOUT_S = 90             # pytest-timeout, per test: one hang costs this, not the step
BENCH_JSON = "bench_train_cuda.json"
STATUSES = ("passed", "failed", "timeout", "not run")


@dataclasses.dataclass
class Step:
    name: str
    cap: int                        # seconds; 0: what the budget has left
    why: str
    command: list[str]
    when: str = "always"            # "always", "if_gates_failed" or "unless_ops_first_ran"
    junit: bool = False             # a pytest step: its JUnit report goes into tests.xml


def pytest_command(junit: Path, *files: str) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
           f"--junitxml={junit}"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["-p", "pytest_timeout", f"--timeout={PER_TEST_TIMEOUT_S}"]
    return cmd + [f"tests/{f}" for f in files]


def plan(work: Path, *, wheels: str = ".whl", site: Path = SITE, require: str = REQUIRED_MODULE) -> list[Step]:
    """The steps, in order (gpu-review.md §3.3). The fixed caps add up to BUDGET_S."""
    py = sys.executable
    return [
        Step("wheels", 30, f"{require} must import; if not, install {wheels}/*.whl (review CRASH-1)",
             [py, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(site), f"{wheels}/*.whl"]),
        Step("env", 60, "nvidia-smi, versions; every kernel compiled, registers and local memory",
             [py, "scripts/first_contact.py", "--env-report"]),
        Step("gates", 90, "mma/ldmatrix layouts on the hardware, cuBLASLt plans and epilogues, capture",
             pytest_command(work / "gates.xml", "test_cuda_emu.py", "test_gpu_matmul.py", "test_arena.py"),
             junit=True),
        Step("engine", 140, "124M bf16/fp32 steps vs CPU, flash, graph = eager, resume, memory",
             pytest_command(work / "engine.xml", "test_gpu_engine.py"), junit=True),
        Step("ops_first", 120, "per-op tests first, to localise a gates/engine failure",
             pytest_command(work / "ops_first.xml", "test_gpu_ops.py"), when="if_gates_failed", junit=True),
        Step("bench", 220, "tok/s at B=64 T=1024: llmpy eager, graph, flash, flash128, ge2, then torch.compile",
             [py, "scripts/bench_train.py", "--device", "cuda", "-B", "64", "-T", "1024", "--steps", "10",
              "--warmup", "3", "--out", str(work / "bench")]),
        Step("ops", 0, "every op against NumPy, then nanochat's ops and engine and 1-rank NCCL, with the time left",
             pytest_command(work / "ops.xml", "test_gpu_ops.py", "test_gpu_nanochat_ops.py",
                            "test_gpu_nanochat_model.py", "test_gpu_nanochat_engine.py", "test_dist.py"),
             when="unless_ops_first_ran", junit=True),
    ]


def print_plan(steps: list[Step], budget: int):
    fixed = [s.cap for s in steps if s.when == "always"]
    print(f"first contact: {len(steps)} steps, budget {budget} s; each runs under `timeout` min(cap, budget left)")
    print(f"{'#':>2}  {'step':10s} {'cap':>6}  {'when':22s} why / command")
    for i, s in enumerate(steps, 1):
        cap = f"{s.cap} s" if s.cap else "rest"
        print(f"{i:2d}  {s.name:10s} {cap:>6}  {s.when:22s} {s.why}\n{'':44s}{shlex.join(s.command)}")
    print(f"caps of the steps that always run: {' + '.join(map(str, fixed))} = {sum(fixed)} s <= {budget} s; "
          "ops_first and ops share what the budget has left")


# -------------------------------------------------------------------------------------------------
# Running


def run_logged(cmd: list[str], limit: float, log, env: dict) -> tuple[int, float]:
    """cmd under coreutils `timeout` (TERM at `limit` seconds, KILL 5 s later), its output to the console
    and the log as it comes. Returns (exit status, seconds); 124 or 137 means the limit was hit."""
    t0 = time.monotonic()
    proc = subprocess.Popen(["timeout", "--kill-after=5", f"{max(limit, 1):.0f}", *cmd], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    for line in proc.stdout:
        sys.stdout.write(line)
        log.write(line)
    rc = proc.wait()
    return rc, time.monotonic() - t0


def imports(module: str, env: dict) -> tuple[bool, str]:
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True,
                          timeout=120)
    return proc.returncode == 0, (proc.stderr.strip().splitlines() or [""])[-1]


def install_wheels(wheels: Path, site: Path, module: str, env: dict, log) -> tuple[bool, str]:
    """Make `module` import: as is, else after installing wheels/*.whl into site (on PYTHONPATH), else
    after also installing wheels/fallback/*.whl (newer cuda-core/cuda-pathfinder than the machine's)."""
    ok, why = imports(module, env)
    if ok:
        return True, f"{module} imports"
    for group in (sorted(wheels.glob("*.whl")), sorted((wheels / "fallback").glob("*.whl"))):
        if not group:
            continue
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, group)]
        log.write(f"$ {shlex.join(cmd)}\n")
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        log.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            return False, f"installing {', '.join(p.name for p in group)} failed: {proc.stderr.strip()[-300:]}"
        ok, why = imports(module, env)
        if ok:
            return True, f"{module} imports after installing {', '.join(p.name for p in group)} into {site}"
    return False, f"{module} does not import ({why}); wheels looked for in {wheels}"


def junit_counts(path: Path) -> dict | None:
    """Test counts and up to 20 failing test ids from a pytest JUnit report."""
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failing = []
    for suite in root.iter("testsuite"):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failing.append(f"{case.get('classname')}::{case.get('name')}")
    return {**counts, "failing": failing[:20]}


def merge_junit(reports: dict[str, Path], path: Path) -> bool:
    """One <testsuites> with each step's <testsuite>, named after the step."""
    merged = ET.Element("testsuites")
    for step, report in reports.items():
        if report.is_file():
            for suite in ET.parse(report).getroot().iter("testsuite"):
                suite.set("name", step)
                merged.append(suite)
    if not len(merged):
        return False
    ET.ElementTree(merged).write(path, encoding="utf-8", xml_declaration=True)
    return True


def bench_summary(path: Path) -> dict:
    """tok/s, ms/step and the comparisons out of bench_train's JSON (whatever variants it reached)."""
    if not path.is_file():
        return {}
    r = json.loads(path.read_text())
    runs = {k: v for k, v in r.items() if isinstance(v, dict) and "tok_per_s" in v}
    return {"tok_per_s": {k: round(v["tok_per_s"]) for k, v in runs.items()},
            "ms_per_step": {k: round(v["ms_per_step"], 2) for k, v in runs.items()},
            "gpu_busy_ms": {k: round(v["gpu_busy_ms"], 2) for k, v in runs.items() if "gpu_busy_ms" in v},
            "ratios_ms_over_torch": r.get("ratios_ms_over_torch", {}),
            "first_step_loss_match": (r.get("first_step_loss") or {}).get("match")}


def gpu_device() -> str | None:
    """The first GPU's name from nvidia-smi, or None."""
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    name = proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else ""
    return name or None


def default_out(device: str) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    slug = "".join(c if c.isalnum() else "-" for c in device.lower().replace("nvidia ", "")).strip("-")
    return REPO / "scripts" / "results" / "-".join(filter(None, slug.split("-"))) / "first_contact"


def stand_in(step: Step, sleep: float) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--stand-in", step.name, "--sleep", str(sleep),
            "--", *step.command]


def run(args) -> int:
    t_start = time.monotonic()
    device = "dry run (stand-in steps)" if args.dry_run else gpu_device()
    out = Path(args.out) if args.out else default_out(device or "no-gpu")
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".work"                       # scratch; removed at the end, so out keeps <= 6 files
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    site = Path(args.site)
    steps = plan(work, wheels=args.wheels, site=site, require=args.require)
    for name, cap in args.cap.items():
        next(s for s in steps if s.name == name).cap = cap
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(site), os.environ.get("PYTHONPATH")]))}
    sys.path.insert(0, str(REPO / "scripts"))
    import benchutil as bu
    summary = {"device": device, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "commit": bu.git_commit(), "host_cpu": bu.cpu_name(),
               "command": shlex.join(["python", "scripts/first_contact.py", *args.argv]), "dry_run": args.dry_run,
               "budget_s": args.budget, "steps": []}
    log = open(out / "log.txt", "w")
    status: dict[str, str] = {}

    def record(step: Step, state: str, seconds: float, **extra):
        status[step.name] = state
        summary["steps"].append({"name": step.name, "status": state, "seconds": round(seconds, 1),
                                 "cap_s": step.cap or None, "why": step.why, "command": shlex.join(step.command),
                                 **extra})
        line = f"=== {step.name}: {state} after {seconds:.1f} s"
        print(line)
        log.write(line + "\n")
        log.flush()

    try:
        if device is None:
            summary["error"] = "no NVIDIA GPU: nvidia-smi lists none (use --dry-run to check the plumbing)"
            print(f"first_contact: {summary['error']}", file=sys.stderr)
            return 2
        for step in steps:
            if step.when == "if_gates_failed" and status.get("gates") == status.get("engine") == "passed":
                record(step, "not run", 0, reason="gates and engine passed")
                continue
            if step.when == "unless_ops_first_ran" and status.get("ops_first") != "not run":
                record(step, "not run", 0, reason="ops_first ran")
                continue
            left = args.budget - (time.monotonic() - t_start)
            limit = min(step.cap or left, left)
            if left < 5:
                record(step, "not run", 0, reason=f"budget spent ({left:.0f} s left)")
                continue
            header = f"=== {step.name} (limit {limit:.0f} s): {shlex.join(step.command)}"
            print(header)
            log.write(header + "\n")
            if step.name == "wheels":
                t0 = time.monotonic()
                ok, detail = install_wheels(REPO / args.wheels, site, args.require, env, log)
                summary["nvmath"] = {"module": args.require, "imports": ok, "detail": detail}
                log.write(detail + "\n")
                print(detail)
                record(step, "passed" if ok else "failed", time.monotonic() - t0, detail=detail)
                if not ok:
                    summary["error"] = f"stopped: {detail}"
                    print(f"first_contact: {detail}: every cuBLASLt path would fail; stopping", file=sys.stderr)
                    for rest in steps[steps.index(step) + 1:]:
                        record(rest, "not run", 0, reason="nvmath-python does not import")
                    return 2
                continue
            cmd = stand_in(step, args.stand_in_sleep.get(step.name, 0)) if args.dry_run else step.command
            rc, seconds = run_logged(cmd, limit, log, env)
            state = "passed" if rc == 0 else "timeout" if rc in (124, 137) else "failed"
            extra = {"exit": rc, "limit_s": round(limit)}
            if step.junit:
                extra["tests"] = junit_counts(work / f"{step.name}.xml")
            record(step, state, seconds, **extra)
        return 0 if all(s in ("passed", "not run") for s in status.values()) else 1
    finally:
        summary.update(bench_summary(work / "bench" / BENCH_JSON))
        files = ["summary.json", "log.txt"]
        if (work / "bench" / BENCH_JSON).is_file():
            shutil.copy(work / "bench" / BENCH_JSON, out / BENCH_JSON)
            files.append(BENCH_JSON)
        if merge_junit({s.name: work / f"{s.name}.xml" for s in steps if s.junit}, out / "tests.xml"):
            files.append("tests.xml")
        summary["total_s"] = round(time.monotonic() - t_start, 1)
        summary["files"] = files
        log.close()
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        shutil.rmtree(work, ignore_errors=True)
        print(f"first_contact: {out / 'summary.json'} ({summary['total_s']} s); "
              + ", ".join(f"{s['name']} {s['status']}" for s in summary["steps"]))


# -------------------------------------------------------------------------------------------------
# The env step and the dry run's stand-ins


def env_report() -> int:
    """Versions, the device, and every kernel instantiation compiled by CuPy with its resources (on the
    GPU: the driver's numbers; without one, ptxas' through NVRTC for sm_90). Exit 1 if a kernel spills."""
    for cmd in (["nvidia-smi"], ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                 "--format=csv"]):
        if shutil.which(cmd[0]):
            print(subprocess.run(cmd, capture_output=True, text=True).stdout)
    print(f"python {sys.version.split()[0]}")
    for name in ("numpy", "cupy", "ml_dtypes", "nvmath", "torch", "pytest", "pytest_timeout", "cuda.bindings"):
        try:
            module = __import__(name, fromlist=["_"])
            print(f"{name} {getattr(module, '__version__', '?')}")
        except ImportError as e:
            print(f"{name}: not importable ({e})")
    import cupy as cp

    from llmpy.gpu import _kernels as K
    from cupy_backends.cuda.libs import nvrtc
    print(f"NVRTC {'.'.join(map(str, nvrtc.getVersion()))}")
    try:
        dev = cp.cuda.Device()
        print(f"CUDA driver {cp.cuda.runtime.driverGetVersion()}, runtime {cp.cuda.runtime.runtimeGetVersion()}, "
              f"device {dev.id} sm_{dev.compute_capability}")
        on_gpu = True
    except cp.cuda.runtime.CUDARuntimeError as e:
        print(f"no CUDA device ({e}): ptxas' resource report through NVRTC for sm_90 instead")
        on_gpu = False
    spills = []
    print(f"{'kernel':60s} {'regs':>5} {'local B':>8} {'static smem':>12}")
    for filename, names in K.NAME_EXPRESSIONS.items():
        t0 = time.perf_counter()
        if on_gpu:
            rows = {}
            for name in names:
                fn = K.kernel(filename, name)          # compiles the file once, with every instantiation
                rows[name] = (fn.num_regs, fn.local_size_bytes, fn.shared_size_bytes)
        else:
            rows = {n: (u["registers"], u["stack"] + u["spill_stores"], 0)
                    for n, u in K.resource_usage(filename, 90).items()}
        for name, (regs, local, smem) in rows.items():
            print(f"{filename + ':' + name:60s} {regs:5d} {local:8d} {smem:12d}")
            if local:
                spills.append(name)
        print(f"  ({filename}: {time.perf_counter() - t0:.1f} s)")
    print("spills: " + (", ".join(spills) if spills else "none"))
    return 1 if spills else 0


def run_stand_in(name: str, command: list[str], sleep: float) -> int:
    """--dry-run's stand-in for a step: say what would run, take `sleep` seconds, write what the step
    writes (a one-test JUnit report, or a benchmark JSON with made-up numbers)."""
    print(f"dry run: {name} would run: {shlex.join(command)}", flush=True)
    time.sleep(sleep)
    for arg in command:
        if arg.startswith("--junitxml="):
            Path(arg.split("=", 1)[1]).write_text(
                f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="1" failures="0" errors="0" '
                f'skipped="0"><testcase classname="dry_run" name="{name}"/></testsuite></testsuites>\n')
    if "--out" in command and "bench_train.py" in " ".join(command):
        bench = Path(command[command.index("--out") + 1])
        bench.mkdir(parents=True, exist_ok=True)
        fake = {key: {"tok_per_s": 1000.0 * (i + 1), "ms_per_step": 65.536 / (i + 1)}
                for i, key in enumerate(("llmpy", "llmpy_flash", "torch"))}
        (bench / BENCH_JSON).write_text(json.dumps({"dry_run": True, **fake,
                                                    "first_step_loss": {"match": True}}) + "\n")
    return 0


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", action="store_true", help="print the steps and their caps; run nothing")
    p.add_argument("--dry-run", action="store_true", help="stand-in steps: check the plumbing without a GPU")
    p.add_argument("--out", default="", help="results folder (default: $OUT, else scripts/results/<gpu>/...)")
    p.add_argument("--budget", type=int, default=BUDGET_S, help=f"seconds for the whole run (default {BUDGET_S})")
    p.add_argument("--cap", action="append", default=[], metavar="STEP=SECONDS", help="override a step's cap")
    p.add_argument("--stand-in-sleep", action="append", default=[], metavar="STEP=SECONDS",
                   help="--dry-run: the stand-in for STEP takes this long (to check that caps are enforced)")
    p.add_argument("--wheels", default=".whl", help="folder of carried wheels (default .whl/ in the checkout)")
    p.add_argument("--site", default=str(SITE), help=f"where the wheels are installed (default {SITE})")
    p.add_argument("--require", default=REQUIRED_MODULE, help=f"module that must import (default {REQUIRED_MODULE})")
    p.add_argument("--env-report", action="store_true", help=argparse.SUPPRESS)   # the env step itself
    p.add_argument("--stand-in", default="", help=argparse.SUPPRESS)              # a dry-run step
    p.add_argument("--sleep", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = [s.name for s in plan(Path("."))]

    def pairs(items, flag):
        parsed = {}
        for item in items:
            name, _, value = item.partition("=")
            if name not in names or not value.replace(".", "", 1).isdigit():
                p.error(f"{flag} {item}: expected STEP=SECONDS with STEP one of {', '.join(names)}")
            parsed[name] = float(value) if flag == "--stand-in-sleep" else int(float(value))
        return parsed
    args.cap, args.stand_in_sleep = pairs(args.cap, "--cap"), pairs(args.stand_in_sleep, "--stand-in-sleep")
    args.argv = argv
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.stand_in:
        return run_stand_in(args.stand_in, args.rest, args.sleep)
    if args.env_report:
        sys.path.insert(0, str(REPO))
        return env_report()
    if args.plan:
        print_plan(plan(Path(args.out or "OUT") / ".work"), args.budget)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

"""Run one llmpy command on a Modal GPU (modal 1.x).

    pip install modal && modal setup                       # once: installs the client, stores a token
    modal run run_on_modal.py --command "python scripts/prepare_tinyshakespeare.py --out data/tinyshakespeare"
    modal run -d run_on_modal.py --gpu H100 --command "llmpy train -i 'data/fineweb10B/*train*.bin' -o log124M"
    modal volume get llmpy-data log124M/main.log .         # fetch results from the volume
    modal run -d run_on_modal.py --gpu H100:8 --command "mpiexec -n 8 llmpy train -z 1 -i ... -o log124M"

Working directory: the command runs in /data, the root of the Volume "llmpy-data", which plays the part
of the repository root for everything that is not code: relative paths (data/..., -o log124M, checkpoints)
read and write the volume, which is committed when the command ends, even when it fails. The code lives
at /root/llmpy (read-only): `llmpy ...` runs `python -m llmpy ...`, and a `scripts/...` path given as the
program or as its first argument (`python scripts/x.py`, `bash scripts/x.sh`) means the repository's copy.
The command is split with shlex, so quote globs and spaces as in a shell; output streams live; the exit
code becomes the exit code of `modal run`.

Image: dependencies come from the project's own pyproject.toml (`uv pip install -r pyproject.toml
--extra cuda12 --extra dist`: CuPy plus the CUDA 12 NVRTC/runtime and NCCL wheels, and mpi4py + MPICH for
`mpiexec` on several GPUs; the host supplies the driver), in a layer that
is rebuilt only when pyproject.toml changes. The repository is then attached last, with copy=False, at
REPO_DIR and put on PYTHONPATH, so editing code never rebuilds the image and `cuda/*.cu` sits at the
repository root, where the kernel loader looks in a checkout. (copy=True plus `pip install -e` would also
work, but would reinstall on every edit; Modal allows no build step after a copy=False add_local_dir.)
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import modal

GPU = "L4"                   # default; override per call with --gpu
TIMEOUT = 24 * 60 * 60       # seconds: Modal's maximum
VOLUME_NAME = "llmpy-data"
REPO_DIR = "/root/llmpy"     # the repository inside the container
DATA_DIR = "/data"           # the volume's mount point and the command's working directory
LOCAL_REPO = Path(__file__).resolve().parent
IGNORE = [".git", ".venv", "data", "log*", "out", "build", "dist", "*.egg-info", ".pytest_cache",
          "**/__pycache__", "**/*.bin"]   # dockerignore patterns, relative to the repository root


def parse_gpu(s: str) -> str:
    """Check a Modal GPU string ('L4', 'h100', 'H100:8', 'A100-80GB') and return it upper-cased."""
    m = re.fullmatch(r"([A-Z0-9][A-Z0-9-]*[!+]?)(?::(\d+))?", s.strip().upper())
    if not m or (m[2] is not None and not 1 <= int(m[2]) <= 8):
        raise ValueError(f"bad --gpu {s!r}: expected TYPE or TYPE:COUNT (COUNT 1-8), e.g. L4, H100, H100:8")
    return m[0]


MPI_LAUNCHERS = ("mpiexec", "mpirun")   # several GPUs: `mpiexec -n 8 llmpy train ...` (the dist extra's MPICH)


def build_argv(command: str, repo_dir: str = REPO_DIR) -> list[str]:
    """shlex-split `command`; `llmpy` -> python -m llmpy, `python` -> this interpreter, scripts/ -> repo.
    After `mpiexec`/`mpirun` (the interpreter's own copy) the same applies to the program it starts."""
    argv = shlex.split(command)
    if not argv:
        raise ValueError("empty --command")
    start = 0
    if argv[0] in MPI_LAUNCHERS:
        launcher = os.path.join(os.path.dirname(sys.executable), argv[0])
        argv[0] = launcher if os.path.exists(launcher) else argv[0]
        start = next((i for i, a in enumerate(argv) if a in ("llmpy", "python", "python3")), len(argv))
    if start < len(argv) and argv[start] == "llmpy":
        argv[start:start + 1] = [sys.executable, "-m", "llmpy"]
    elif start < len(argv) and argv[start] in ("python", "python3"):
        argv[start] = sys.executable
    for i in range(start, min(start + 2, len(argv))):
        if argv[i].startswith("scripts/"):
            argv[i] = f"{repo_dir}/{argv[i]}"
    return argv


def run_command(command: str, cwd: str, repo_dir: str = REPO_DIR) -> int:
    """Run the command in `cwd` with inherited (live) stdout/stderr; return its exit code."""
    argv = build_argv(command, repo_dir)
    print(f"[run_on_modal] cd {cwd} && {shlex.join(argv)}", flush=True)
    try:
        rc = subprocess.run(argv, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    except FileNotFoundError:
        print(f"[run_on_modal] command not found: {argv[0]}", file=sys.stderr, flush=True)
        return 127
    return 128 - rc if rc < 0 else rc     # killed by signal N -> 128 + N, as a shell reports it


app = modal.App("llmpy")
volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)
image = (
    modal.Image.debian_slim(python_version="3.11")
    .uv_pip_install(requirements=[str(LOCAL_REPO / "pyproject.toml")], extra_options="--extra cuda12 --extra dist")
    .env({"PYTHONPATH": REPO_DIR, "PYTHONUNBUFFERED": "1", "XDG_CACHE_HOME": f"{DATA_DIR}/.cache",
          "TIKTOKEN_CACHE_DIR": f"{DATA_DIR}/.cache/tiktoken", "CUPY_CACHE_DIR": f"{DATA_DIR}/.cache/cupy"})
    .add_local_dir(LOCAL_REPO, REPO_DIR, ignore=IGNORE)
)


@app.function(image=image, gpu=GPU, volumes={DATA_DIR: volume}, timeout=TIMEOUT)
def run(command: str) -> int:
    try:
        return run_command(command, DATA_DIR)
    finally:
        volume.commit()


@app.local_entrypoint()
def main(command: str, gpu: str = GPU):
    try:
        gpu = parse_gpu(gpu)
        build_argv(command)          # fail fast, before any GPU is requested, on bad quoting or no command
    except ValueError as e:
        sys.exit(f"run_on_modal: {e}")
    rc = run.with_options(gpu=gpu).remote(command)
    if rc != 0:
        sys.exit(rc)

#!/usr/bin/env bash
# Creates .venv and installs llmpy into it, from the package registries only.
#   bash scripts/setup.sh          llmpy, plus CuPy/cuBLASLt/NCCL and mpiexec for the GPU when nvidia-smi sees one
#   bash scripts/setup.sh --test   also the test oracles (PyTorch CPU, transformers), offline NVRTC and the
#                                  `dist` extra (mpi4py + MPICH: the multi-process tests run `mpiexec -n 2`)
# The GPU extra follows the driver: CUDA 13 wheels for drivers >= 580, CUDA 12 below.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip

extras=""
if driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1) && [ -n "$driver" ]; then
    if [ "${driver%%.*}" -ge 580 ]; then extras="cuda13"; else extras="cuda12"; fi
    extras="$extras,dist"     # mpiexec for several GPUs (mpi4py + MPICH, ~40 MB)
    echo "setup: GPU driver $driver -> llmpy[$extras]"
else
    echo "setup: no NVIDIA GPU found -> CPU install"
fi
if [ "${1:-}" = "--test" ]; then
    # the cuda extras include the kernel compiler; CPU-only machines get NVRTC + headers for the offline check
    extras="${extras:-nvrtc,dist},test"
fi
# PyTorch's CPU wheels (test oracle only) live on PyTorch's own index; use it when it resolves
# (otherwise pip's configured indexes / find-links must provide torch)
index=()
if [[ "$extras" == *test* ]] && python -c "import socket; socket.setdefaulttimeout(5); socket.getaddrinfo('download.pytorch.org', 443)" 2>/dev/null; then
    index=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi
python -m pip install -q -e ".${extras:+[$extras]}" "${index[@]}"
echo "setup: done (.venv with llmpy${extras:+[$extras]})"

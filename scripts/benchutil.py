"""Shared helpers for scripts/bench_*.py: run metadata, timers, device peaks, JSON and plot output.

Timing follows llm.c's dev/cuda harness (llmc-facts.md §12.1): warm up, then time each repetition
on its own and report the median. On the GPU each repetition is bracketed by CUDA events and
preceded by an L2-sized memset, so no repetition reads data a previous one left in L2. On the CPU a
repetition is timed with time.perf_counter.

Peaks are measured here, on the machine at hand, rather than taken from a datasheet: a large array
copy gives the memory bandwidth (bytes read + bytes written), a large square matmul (BLAS on the
CPU, cuBLAS through CuPy on the GPU) gives the GEMM rate; each is the best of a few repetitions.
"% of peak" in every report is relative to these two numbers. Small shapes that fit in a CPU cache
can exceed the copy "peak", which is measured out of cache.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:   # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

# -------------------------------------------------------------------------------------------------
# Run metadata


def git_commit() -> str:
    """`git rev-parse HEAD` of the checkout (+ '-dirty' with uncommitted changes), or 'unknown'.

    $LLMPY_COMMIT wins when set: a copy of the working tree without .git (a rented GPU machine) is told
    which commit it is."""
    if os.environ.get("LLMPY_COMMIT"):
        return os.environ["LLMPY_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else platform.processor(), plus the core count."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical cores)"


def gpu_name() -> str:
    import cupy as cp
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return f"{name} (sm_{props['major']}{props['minor']}, {props['totalGlobalMem'] / 2**30:.0f} GiB)"


def run_metadata(device: str, argv: list[str] | None = None) -> dict:
    """Fields every result row carries: device name, commit, date, the command that produced it."""
    argv = sys.argv[1:] if argv is None else argv
    return {
        "device": gpu_name() if device == "cuda" else cpu_name(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([os.path.relpath(sys.argv[0]) if sys.argv[0] else "python", *argv]),
        # BLAS reads these when NumPy loads; unset means one thread per core
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default",
    }


# -------------------------------------------------------------------------------------------------
# Arrays on either device (bf16 moves as raw bytes: CuPy's bf16 support is partial, cupy-notes.md §4)


def storage_dtype(device: str, requested: str, prog: str) -> str:
    """--dtype as given, else bf16 on cuda and fp32 on cpu; bf16 on the CPU exits with a message."""
    dtype = requested or ("bf16" if device == "cuda" else "fp32")
    if device == "cpu" and dtype == "bf16":
        sys.exit(f"{prog}: --dtype bf16 is a GPU mode (the CPU ops run in float32)")
    return dtype


def upload(xp, host: np.ndarray, dtype=None):
    """A host array as an xp array of `dtype` (default: its own), converted on the host."""
    host = np.ascontiguousarray(host if dtype is None else host.astype(dtype))
    if xp is np:
        return host
    dev = xp.empty(host.shape, dtype=host.dtype)
    if host.size:
        dev.reshape(-1).view(np.uint8).set(host.reshape(-1).view(np.uint8))
    return dev


def to_host_f32(x) -> np.ndarray:
    """Any NumPy or CuPy array (bf16 included) as a host float32 array."""
    if isinstance(x, np.ndarray):
        return x.astype(np.float32)
    if x.dtype.kind != "V":          # CuPy handles its native dtypes
        return x.get().astype(np.float32)
    x = clone(x) if not x.flags.c_contiguous else x
    return x.reshape(-1).view(np.uint8).get().view(x.dtype).reshape(x.shape).astype(np.float32)


def clone(x):
    """A copy of a NumPy or CuPy array (on the GPU a raw device-to-device copy)."""
    if isinstance(x, np.ndarray) or not x.flags.c_contiguous:
        return x.copy()
    import cupy
    out = cupy.empty(x.shape, dtype=x.dtype)
    if x.nbytes:
        out.data.copy_from_device(x.data, x.nbytes)
    return out


# -------------------------------------------------------------------------------------------------
# Timers


def time_cpu(fn, *, warmup: int, reps: int, max_seconds: float = 10.0) -> list[float]:
    """Milliseconds of each of `reps` calls of fn() after `warmup` calls; stops early (after at least
    3 timed calls) once max_seconds have been spent timing."""
    for _ in range(warmup):
        fn()
    times, spent = [], 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt * 1e3)
        spent += dt
        if spent > max_seconds and len(times) >= 3:
            break
    return times


class GpuTimer:
    """CUDA-event timer with an L2 flush before every repetition (llm.c's benchmark_kernel).

    The flush writes a buffer twice the size of L2 with a memset, so the timed call finds none of its
    inputs in L2; both run on the current stream, so the events bracket only the timed call.
    """

    def __init__(self):
        import cupy as cp
        self.cp = cp
        l2 = cp.cuda.runtime.deviceGetAttribute(cp.cuda.runtime.cudaDevAttrL2CacheSize, cp.cuda.Device().id)
        self.flush_buf = cp.empty(2 * max(l2, 2**20), dtype=np.uint8)
        self.start, self.end = cp.cuda.Event(), cp.cuda.Event()

    def flush(self):
        self.flush_buf.data.memset_async(0, self.flush_buf.nbytes)

    def __call__(self, fn, *, warmup: int, reps: int, max_seconds: float = 10.0, flush: bool = True):
        """Milliseconds of each of `reps` calls of fn() (device time between the events)."""
        cp = self.cp
        for _ in range(warmup):
            fn()
        cp.cuda.get_current_stream().synchronize()
        times, t_start = [], time.perf_counter()
        for _ in range(reps):
            if flush:
                self.flush()
            self.start.record()
            fn()
            self.end.record()
            self.end.synchronize()
            times.append(cp.cuda.get_elapsed_time(self.start, self.end))
            if time.perf_counter() - t_start > max_seconds and len(times) >= 3:
                break
        return times


def median(times: list[float]) -> float:
    return float(statistics.median(times))


# -------------------------------------------------------------------------------------------------
# Device peaks, measured


def measure_copy_bandwidth(xp, nbytes: int, *, timer, reps: int = 5) -> dict:
    """GB/s of a large device-to-device (or RAM-to-RAM) copy, counting bytes read + bytes written."""
    n = nbytes // 4
    src = xp.ones(n, dtype=np.float32)
    dst = xp.empty_like(src)
    if xp is np:
        fn = lambda: np.copyto(dst, src)  # noqa: E731  (single-threaded memcpy-like copy)
    else:
        fn = lambda: dst.data.copy_from_device_async(src.data, src.nbytes)  # noqa: E731  (cudaMemcpyAsync)
    ms = min(timer(fn, warmup=1, reps=reps))   # a peak: the best repetition
    return {"what": "copy", "bytes": 2 * src.nbytes, "ms": ms, "gbps": 2 * src.nbytes / ms / 1e6}


def measure_gemm_rate(xp, n: int, dtype, *, timer, reps: int = 5) -> dict:
    """TFLOP/s of an n x n x n matmul (2 n^3 FLOPs) in dtype: BLAS on the CPU, cuBLAS via CuPy."""
    rng = np.random.default_rng(0)
    try:
        a, b = (upload(xp, rng.standard_normal((n, n), dtype=np.float32), dtype) for _ in range(2))
        c = xp.empty((n, n), dtype=a.dtype)
        ms = min(timer(lambda: xp.matmul(a, b, out=c), warmup=1, reps=reps))   # the best repetition
    except Exception as e:   # e.g. a CuPy without bf16 matmul: fall back to the float32 rate
        if np.dtype(dtype) == np.float32:
            raise
        r = measure_gemm_rate(xp, n, np.float32, timer=timer, reps=reps)
        r["note"] = f"{np.dtype(dtype).name} matmul failed ({type(e).__name__}: {e}); float32 rate instead"
        return r
    return {"what": "gemm", "n": n, "dtype": np.dtype(dtype).name, "ms": ms,
            "tflops": 2 * n**3 / ms / 1e9}


# nominal dense bf16 tensor-core peaks (TFLOP/s) by device-name substring, for llm.c-style MFU
# (perf-anchors.md §7; llm.c's mfu.h has no H200 entry, ≈ H100 SXM)
NOMINAL_BF16_TFLOPS = {"H200": 989.0, "H100 80GB HBM3": 988.8, "H100 SXM": 988.8, "H100 PCIe": 756.0,
                       "H100": 756.0, "A100": 312.0, "L4": 121.0, "RTX 4090": 165.2}


# why a measurement can exceed a measured peak: said next to every value over 100 % (JSON, table, chart)
OVER_PEAK = {"copy": "in-cache data: the op rereads or keeps data in cache (CPU caches, GPU L2), while the copy "
                     "peak streams from main memory",
             "gemm": "this shape ran faster than the square GEMM that set the peak (its operands stay in "
                     "cache, or the peak was timed while the machine was busy)"}


def nominal_bf16_tflops(device_name: str) -> float | None:
    for key, tf in NOMINAL_BF16_TFLOPS.items():
        if key in device_name:
            return tf
    return None


# -------------------------------------------------------------------------------------------------
# Output


def write_json(path: Path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=_jsonable) + "\n")
    return path


def _jsonable(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    raise TypeError(f"not JSON serializable: {type(x)}")


def pyplot():
    """matplotlib.pyplot with the Agg backend, imported only when a plot is drawn (after the JSON is
    written); without matplotlib the script ends with one line saying what to install."""
    from llmpy.errors import LlmpyError
    from llmpy.plot import pyplot as llmpy_pyplot
    try:
        return llmpy_pyplot()
    except LlmpyError as e:
        raise SystemExit(f"{Path(sys.argv[0]).name}: no charts: {e}") from None


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]):
    """Print rows as an aligned table; columns are (header, key, format) with format like '{:.3f}'."""
    cells = [[h for h, _, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else fmt.format(r[k])) for _, k, fmt in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))

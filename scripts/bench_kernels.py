"""Per-kernel benchmark: every op the trainer calls, timed through llmpy.cpu or llmpy.gpu, next to a
plain baseline that does the same math.

    python scripts/bench_kernels.py --device cpu --quick --out out/bench      # seconds; what CI runs
    python scripts/bench_kernels.py --device cpu --out out/bench               # GPT-2 124M, B=4 T=64
    python scripts/bench_kernels.py --device cuda --out out/bench              # B=8 T=1024, bf16
    python scripts/bench_kernels.py --device cuda --ops layernorm,gelu -B 8 -T 1024 --out out/bench

The registry (scripts/kernel_cases.py) has one entry per op family (encoder, layernorm, fused_residual,
residual, matmul, attention, gelu, classifier, adamw, global_norm, and the nanochat model's rmsnorm,
rope, relu2, muon), each with its forward and backward
where the op has one. An entry gives the arrays at GPT-2 124M shapes (C=768, NH=12, V=50257, Vp=50304),
the call through the same function the trainer uses, the bytes it must move or the FLOPs it must do,
and the baseline: a NumPy expression on the CPU, the same expression in CuPy on the GPU (timed in bf16
where CuPy can, else in float32; the expected values always come from float32).

For each case: correctness first (ours against the baseline on fresh copies of the inputs), then the
median time after warm-up (llm.c's dev/cuda harness: CUDA events and an L2 flush before every
repetition on the GPU; time.perf_counter on the CPU). GPU launchers that take `block_size=` are swept
over BLOCK_SIZES. The device's copy bandwidth and GEMM rate are measured first; memory-bound ops report
GB/s and % of the copy bandwidth, matmul-shaped ops TFLOP/s and % of the GEMM rate.

Writes DIR/bench_kernels.json (one row per measurement), prints a table, and draws DIR/kernels_time.png
(ours vs baseline), DIR/kernels_peak.png (% of peak; a value over 100 % is hatched and labelled with
its reason, benchutil.OVER_PEAK) and, on the GPU, DIR/kernels_block_size.png.
Timings are only comparable on a quiet machine.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path

import numpy as np

import benchutil as bu
from kernel_cases import FAMILIES, Case, Dims, Ref, registry

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024)   # llm.c's usual sweep (llmc-facts.md §12.1)
KEEP_F32 = {"mean", "rstd", "losses", "m", "v", "master", "norm", "lse", "delta",   # fp32 whatever the storage
            "cos", "sin", "momentum"}                                               # dtype
TOLERANCE = {"float32": 2e-3, "bfloat16": 6e-2}   # max |ours - baseline| / max |baseline|

# -------------------------------------------------------------------------------------------------
# Running one case


class Backend:
    """The op functions of llmpy.cpu or llmpy.gpu, the array module and the timer."""

    def __init__(self, device: str, dtype: str, quick: bool):
        self.device, self.quick = device, quick
        if device == "cuda":
            import cupy as cp
            import ml_dtypes
            self.xp, self.pkg = cp, "llmpy.gpu"
            self.dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bf16" else np.dtype(np.float32)
            timer = bu.GpuTimer()
            self.time = lambda fn: timer(fn, warmup=2 if quick else 5, reps=5 if quick else 50,
                                         max_seconds=1.0 if quick else 5.0)
            self.peak_timer = timer
        else:
            self.xp, self.pkg, self.dtype = np, "llmpy.cpu", np.dtype(np.float32)
            self.time = lambda fn: bu.time_cpu(fn, warmup=1 if quick else 2, reps=3 if quick else 10,
                                               max_seconds=0.5 if quick else 5.0)
            self.peak_timer = lambda fn, **kw: bu.time_cpu(fn, **kw)

    def function(self, case: Case):
        """The op function, from the backend package or its module llmpy.<backend>.<stem>."""
        pkg = importlib.import_module(self.pkg)
        if hasattr(pkg, case.fn):
            return getattr(pkg, case.fn)
        return getattr(importlib.import_module(f"{self.pkg}.{case.module or case.op}"), case.fn)

    def to_device(self, host: dict) -> dict:
        """Host arrays on the device; floats in the storage dtype except the fp32-always ones."""
        return {k: bu.upload(self.xp, v, self.dtype if v.dtype.kind == "f" and k not in KEEP_F32 else None)
                for k, v in host.items()}

    def sync(self):
        if self.device == "cuda":
            self.xp.cuda.get_current_stream().synchronize()


def call_args(case: Case, a: dict):
    """Positional and keyword arguments of the op call; a Ref to an absent array drops the keyword."""
    args = [a[x] if isinstance(x, str) else x for x in case.args]
    kwargs = {k: a[v] if isinstance(v, Ref) else v for k, v in case.kwargs.items()
              if not isinstance(v, Ref) or v in a}
    return args, kwargs


def max_rel_err(ours, expected) -> float:
    """max |ours - expected| / max |expected|: one number per output, comparable across ops."""
    ours, expected = bu.to_host_f32(ours), bu.to_host_f32(expected)
    if ours.shape != expected.shape:
        return float("inf")
    return float(np.abs(ours - expected).max()) / max(float(np.abs(expected).max()), 1e-6)


def copy_arrays(a: dict) -> dict:
    return {k: bu.clone(v) for k, v in a.items()}


def run_baseline(be: Backend, case: Case, a: dict):
    """(expected outputs, the inputs to time the baseline on, the baseline's name).

    The expected outputs always come from the baseline in float32 (on bf16 inputs widened exactly), so
    the check does not depend on how CuPy handles bf16. The timed baseline runs in the storage dtype
    where CuPy can (and the case allows), else in float32.
    """
    name = "numpy" if be.xp is np else "cupy"
    if be.xp is np or be.dtype == np.float32:
        return case.baseline(be.xp, copy_arrays(a)), copy_arrays(a), name
    a32 = {k: be.xp.asarray(bu.to_host_f32(v)) if v.dtype.kind in "fV" else v for k, v in a.items()}
    expected = case.baseline(be.xp, a32)
    if not case.baseline_f32:
        base_a = copy_arrays(a)
        try:
            case.baseline(be.xp, base_a)
            be.sync()
            return expected, base_a, f"{name} {be.dtype.name}"
        except Exception:   # a function without a bf16 version in CuPy
            pass
    return expected, a32, f"{name} float32"


def bench_case(be: Backend, case: Case, rng, peaks: dict) -> list[dict]:
    """Check, then time, one case (over block sizes where the launcher takes them). Returns rows."""
    fn = be.function(case)
    params = inspect.signature(fn).parameters
    host = case.make(rng)
    if be.dtype == np.float32:
        host.pop("master", None)   # fp32 parameters are their own master copy
    a = be.to_device(host)
    expected, base_a, base_kind = run_baseline(be, case, a)
    outputs = [o for o in case.outputs if o in a]
    tol = TOLERANCE[be.dtype.name]
    sweep = be.device == "cuda" and "block_size" in params
    default_bs = params["block_size"].default if sweep else None
    rows, base_ms = [], None
    for bs in sorted(set(BLOCK_SIZES) | {default_bs}) if sweep else (None,):
        kw = {} if bs is None else {"block_size": bs}
        row = {"op": case.op, "direction": case.direction, "case": case.case, "shape": case.label,
               "dtype": be.dtype.name, "backend": be.pkg, "block_size": bs, "default_block": bs == default_bs,
               "flops": case.flops, "bytes": case.bytes(a) if case.bytes else None}
        try:
            fresh = copy_arrays(a)                       # check on fresh inputs: outputs may accumulate
            args, kwargs = call_args(case, fresh)
            fn(*args, **kwargs, **kw)
            be.sync()
            err = max(max_rel_err(fresh[o], expected[o]) for o in outputs)
            args, kwargs = call_args(case, a)
            ms = bu.median(be.time(lambda: fn(*args, **kwargs, **kw)))
        except Exception as e:   # a launcher that rejects a block size, a kernel that fails, ...
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            rows.append(row)
            continue
        if base_ms is None:
            base_ms = bu.median(be.time(lambda: case.baseline(be.xp, base_a)))
        row.update(ms=ms, max_rel_err=err, check_ok=bool(err <= tol), baseline_ms=base_ms,
                   speedup=base_ms / ms, baseline=f"{base_kind}: {case.baseline_name}")
        if case.flops:
            row["tflops"] = case.flops / ms / 1e9
            row["pct_peak"] = 100 * row["tflops"] / peaks["gemm"]["tflops"]
        else:
            row["gbps"] = row["bytes"] / ms / 1e6
            row["pct_peak"] = 100 * row["gbps"] / peaks["copy"]["gbps"]
        if row["pct_peak"] > 100:
            row["over_peak"] = bu.OVER_PEAK["gemm" if case.flops else "copy"]
        rows.append(row)
    return rows


# -------------------------------------------------------------------------------------------------
# Plots


def plot(rows: list[dict], out: Path, device: str) -> list[Path]:
    plt = bu.pyplot()
    ok = [r for r in rows if "ms" in r and r["op"] != "peak" and r["default_block"]]
    short = {"forward": "fwd", "backward": "bwd", "fused": "fwd+bwd", "update": "step"}
    labels = [f"{r['op']}{'.' + r['case'] if r['case'] else ''} {short[r['direction']]}" for r in ok]
    x = np.arange(len(ok))
    paths = []

    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(ok)), 5))
    ax.bar(x - 0.2, [r["ms"] for r in ok], 0.4, label="llmpy")
    ax.bar(x + 0.2, [r["baseline_ms"] for r in ok], 0.4, label="baseline (" + ("NumPy" if device == "cpu"
                                                                              else "CuPy") + ")")
    ax.set_yscale("log")
    ax.set_ylabel("ms (median)")
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.set_title(f"time per op on {rows[0]['device']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    paths.append(out / "kernels_time.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(ok)), 5))
    colors = ["tab:orange" if r.get("tflops") is not None else "tab:blue" for r in ok]
    ax.bar(x, [r["pct_peak"] for r in ok], color=colors, hatch=["//" if "over_peak" in r else "" for r in ok])
    ax.axhline(100, color="gray", ls=":", lw=1)
    ax.set_ylabel("% of measured peak")
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    title = "blue: % of copy bandwidth (GB/s); orange: % of GEMM rate (TFLOP/s)"
    for i, r in enumerate(ok):   # a bar over 100 % carries its value, and the title says why
        if "over_peak" in r:
            ax.annotate(f"{r['pct_peak']:.0f}%", (x[i], r["pct_peak"]), ha="center", va="bottom", fontsize=7)
    for reason in sorted({r["over_peak"] for r in ok if "over_peak" in r}):
        title += f"\nhatched, over 100 %: {reason}"
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    paths.append(out / "kernels_peak.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    swept = {}
    for r in rows:
        if r.get("block_size") is not None and "ms" in r:
            swept.setdefault(f"{r['op']} {r['direction']}", []).append((r["block_size"], r["ms"]))
    if swept:
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, pts in swept.items():
            best = min(ms for _, ms in pts)
            ax.plot([b for b, _ in pts], [ms / best for _, ms in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block_size")
        ax.set_ylabel("time / best time")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "kernels_block_size.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# -------------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="which backend to time")
    p.add_argument("--quick", action="store_true", help="small shapes and few repetitions (seconds)")
    p.add_argument("--ops", default="", help=f"comma-separated families (default all): {','.join(FAMILIES)}")
    p.add_argument("-B", type=int, default=0, help="batch size (default: 4 on cpu, 8 on cuda; quick: 2)")
    p.add_argument("-T", type=int, default=0, help="sequence length (default: 64 on cpu, 1024 on cuda; "
                                                   "quick: 32)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="",
                   help="storage type (default: fp32 on cpu, bf16 on cuda)")
    p.add_argument("--out", required=True, help="output directory for bench_kernels.json and the PNGs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = bu.storage_dtype(args.device, args.dtype, "bench_kernels")
    ops = [o for o in args.ops.split(",") if o] or list(FAMILIES)
    unknown = set(ops) - set(FAMILIES)
    if unknown:
        sys.exit(f"bench_kernels: unknown --ops {sorted(unknown)}; choose from {','.join(FAMILIES)}")
    B = args.B or (2 if args.quick else 8 if args.device == "cuda" else 4)
    T = args.T or (32 if args.quick else 1024 if args.device == "cuda" else 64)
    dims = Dims(B, T, N=(1 << 20) if args.quick else Dims.N)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = bu.run_metadata(args.device, argv)
    be = Backend(args.device, dtype, args.quick)
    print(f"device: {meta['device']}; dtype {be.dtype.name}; {dims}")
    print("bench_kernels: timings are only comparable on an otherwise idle machine")

    # the device's own peaks: copy bandwidth and GEMM rate
    if args.device == "cuda":
        copy_peak = bu.measure_copy_bandwidth(be.xp, (256 if args.quick else 1024) * 2**20,
                                              timer=be.peak_timer)
        gemm_peak = bu.measure_gemm_rate(be.xp, 4096 if args.quick else 8192, be.dtype, timer=be.peak_timer)
    else:
        copy_peak = bu.measure_copy_bandwidth(np, (32 if args.quick else 256) * 2**20, timer=be.peak_timer)
        gemm_peak = bu.measure_gemm_rate(np, 1024 if args.quick else 2048, np.float32, timer=be.peak_timer)
    peaks = {"copy": copy_peak, "gemm": gemm_peak}
    print(f"peak copy bandwidth {copy_peak['gbps']:.1f} GB/s; peak GEMM {gemm_peak['tflops']:.3f} TFLOP/s "
          f"({gemm_peak['dtype']}, n={gemm_peak['n']})")
    rows = [{"op": "peak", "direction": w, **peaks[w], **meta} for w in ("copy", "gemm")]

    rng = np.random.default_rng(0)
    for case in registry(dims, args.quick):
        if case.op not in ops or (case.bf16_only and be.xp is not np and be.dtype == np.float32):
            continue
        try:
            case_rows = bench_case(be, case, rng, peaks)
        except Exception as e:   # the op is missing or its setup failed: report and go on
            case_rows = [{"op": case.op, "direction": case.direction, "case": case.case, "shape": case.label,
                          "backend": be.pkg, "block_size": None,
                          "error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}]
        for r in case_rows:
            r.update(meta)
            rows.append(r)
            bs = f" block_size={r['block_size']}" if r.get("block_size") else ""
            name = f"{r['op']}_{r['direction']}{' ' + r['case'] if r['case'] else ''}{bs}"
            if "ms" in r:
                rate = f"{r['tflops']:.3f} TFLOP/s" if "tflops" in r else f"{r['gbps']:.1f} GB/s"
                print(f"{name}  {r['ms']:.4f} ms  "
                      f"{rate}  ({r['pct_peak']:.1f}% of peak)  baseline {r['baseline_ms']:.4f} ms  "
                      f"err {r['max_rel_err']:.1e}{'' if r['check_ok'] else '  CHECK FAILED'}"
                      + (f"  (over 100 %: {r['over_peak']})" if "over_peak" in r else ""))
            else:
                print(f"{name}  ERROR {r['error']}")

    path = bu.write_json(out / "bench_kernels.json", rows)
    timed = [r for r in rows if "ms" in r and r["op"] != "peak"]
    for r in timed:
        r["rate"] = f"{r['tflops']:.3f} TF/s" if "tflops" in r else f"{r['gbps']:.1f} GB/s"
    print()
    bu.print_table(timed, [("op", "op", "{}"), ("dir", "direction", "{}"), ("case", "case", "{}"),
                           ("block", "block_size", "{}"), ("ms", "ms", "{:.4f}"), ("rate", "rate", "{}"),
                           ("% peak", "pct_peak", "{:.1f}"), ("baseline ms", "baseline_ms", "{:.4f}"),
                           ("x faster", "speedup", "{:.2f}"), ("rel err", "max_rel_err", "{:.1e}")])
    pngs = plot(rows, out, args.device) if timed else []
    print(f"\nwrote {path}" + "".join(f", {p}" for p in pngs))
    # a block size the launcher rejects is not a failure when another size of that case ran
    ran = {(r["op"], r["direction"], r["case"]) for r in timed}
    failed = [r for r in timed if not r["check_ok"]] + [
        r for r in rows if "error" in r
        and (r["block_size"] is None or (r["op"], r["direction"], r["case"]) not in ran)]
    if failed:
        print(f"bench_kernels: {len(failed)} case(s) failed the check or raised: "
              + ", ".join(sorted({f"{r['op']} {r['direction']}" for r in failed})))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

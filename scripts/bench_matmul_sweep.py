"""Matmul sweep: the linear layer out = inp @ W^T + bias (forward) and its backward over a grid of
sizes, llmpy's matmul against a second implementation, plotted as time against FLOPs on log-log axes.

    python scripts/bench_matmul_sweep.py --device cpu --quick --out out/sweep    # a few tiny points
    python scripts/bench_matmul_sweep.py --device cpu --out out/sweep
    python scripts/bench_matmul_sweep.py --device cuda --out out/sweep           # bf16; --dtype fp32

The grid is B in 4..128, T in 64..2048 and C = OC in 48..1536 (a weight as wide as it is tall), each
axis subsampled by factors of 4 (4 x 4 x 4 points). On the CPU, llmpy.cpu.matmul (one BLAS call per
product) races a deliberately naive reference, a Python loop over rows doing each row's products with
elementwise NumPy (no BLAS): the gap is what a real GEMM buys. Points over --max-gflop are skipped on
the CPU, and the naive loop only runs up to --naive-max-gflop. On the GPU, llmpy.gpu.matmul
(cuBLASLt, bias fused in the epilogue) races cupy.matmul (cuBLAS) plus a separate bias add or sum.

FLOPs: forward 2 BT C OC; backward 4 BT C OC (dinp and dweight) plus BT OC for dbias.
Writes DIR/matmul_sweep.json (rows: impl, direction, B, T, C, OC, flops, ms, tflops, device, commit,
date, command) and DIR/matmul_sweep.png. Timings are only comparable on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import benchutil as bu

GRID = {"B": (4, 16, 64, 128), "T": (64, 256, 1024, 2048), "C": (48, 192, 768, 1536)}
QUICK_GRID = [(4, 64, 48), (4, 64, 96), (8, 64, 192)]   # (B, T, C=OC)

# -------------------------------------------------------------------------------------------------
# The naive CPU reference: one row at a time, elementwise products and sums, no BLAS


def naive_forward(out, inp, weight, bias):
    """out[i] = sum_c weight[:, c] * inp[i, c] + bias, row by row."""
    x, y = inp.reshape(-1, inp.shape[-1]), out.reshape(-1, out.shape[-1])
    for i in range(x.shape[0]):
        y[i] = (weight * x[i]).sum(axis=1) + bias


def naive_backward(dinp, dweight, dbias, dout, inp, weight):
    """dinp = dout @ W (overwrite); dweight += dout^T inp and dbias += sum(dout), row by row."""
    x, dy, dx = (a.reshape(-1, a.shape[-1]) for a in (inp, dout, dinp))
    for i in range(x.shape[0]):
        dx[i] = (dy[i][:, None] * weight).sum(axis=0)
        dweight += dy[i][:, None] * x[i][None, :]
        dbias += dy[i]


# -------------------------------------------------------------------------------------------------
# The implementations on each device, as {name: (forward, backward)}


def cupy_forward(out, inp, weight, bias):
    import cupy as cp
    y = out.reshape(-1, out.shape[-1])
    cp.matmul(inp.reshape(-1, inp.shape[-1]), weight.T, out=y)
    y += bias


def cupy_backward(dinp, dweight, dbias, dout, inp, weight):
    import cupy as cp
    dy, x = dout.reshape(-1, dout.shape[-1]), inp.reshape(-1, inp.shape[-1])
    cp.matmul(dy, weight, out=dinp.reshape(-1, dinp.shape[-1]))
    dweight += dy.T @ x
    dbias += dy.sum(axis=0)


def implementations(device: str) -> dict:
    if device == "cuda":
        from llmpy.gpu.matmul import matmul_backward, matmul_forward
        return {"llmpy.gpu (cuBLASLt)": (matmul_forward, matmul_backward),
                "cupy.matmul (cuBLAS)": (cupy_forward, cupy_backward)}
    from llmpy.cpu.matmul import matmul_backward, matmul_forward
    return {"llmpy.cpu (BLAS)": (matmul_forward, matmul_backward),
            "naive row loop (NumPy, no BLAS)": (naive_forward, naive_backward)}


def grid_points(quick: bool) -> list[tuple[int, int, int]]:
    if quick:
        return QUICK_GRID
    return [(B, T, C) for B in GRID["B"] for T in GRID["T"] for C in GRID["C"]]


def flops(direction: str, B: int, T: int, C: int, OC: int) -> float:
    if direction == "forward":
        return 2.0 * B * T * C * OC
    return 4.0 * B * T * C * OC + B * T * OC      # dinp and dweight, plus the bias gradient's sum


# -------------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="three tiny points, few repetitions (seconds)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="", help="default: fp32 on cpu, bf16 on cuda")
    p.add_argument("--max-gflop", type=float, default=20.0,
                   help="cpu: skip points whose forward exceeds this")
    p.add_argument("--naive-max-gflop", type=float, default=0.3, help="cpu: run the naive loop up to this")
    p.add_argument("--out", required=True, help="output directory")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = bu.storage_dtype(args.device, args.dtype, "bench_matmul_sweep")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = bu.run_metadata(args.device, argv)
    if args.device == "cuda":
        import cupy as xp
        import ml_dtypes
        store = np.dtype(ml_dtypes.bfloat16) if dtype == "bf16" else np.dtype(np.float32)
        gpu_timer = bu.GpuTimer()
        timer = lambda fn, big: gpu_timer(fn, warmup=2 if args.quick else 3,  # noqa: E731
                                          reps=3 if args.quick else 20, max_seconds=2.0)
    else:
        xp, store = np, np.dtype(np.float32)
        timer = lambda fn, big: bu.time_cpu(fn, warmup=0 if big else 1,  # noqa: E731
                                            reps=2 if args.quick or big else 5, max_seconds=3.0)
    impls = implementations(args.device)
    print(f"device: {meta['device']}; dtype {store.name}")
    print("bench_matmul_sweep: timings are only comparable on an otherwise idle machine")

    rng = np.random.default_rng(0)
    rows = []
    for B, T, C in grid_points(args.quick):
        OC = C
        fwd_gflop = flops("forward", B, T, C, OC) / 1e9
        if args.device == "cpu" and fwd_gflop > args.max_gflop:
            continue

        def arr(*shape, scale=1.0):   # uniform in [-scale, scale], like llm.c's dev/cuda inputs (and fast)
            x = rng.random(shape, dtype=np.float32)
            x *= np.float32(2 * scale)
            x -= np.float32(scale)
            return bu.upload(xp, x, store)
        a = {"inp": arr(B, T, C), "weight": arr(OC, C, scale=0.02), "bias": arr(OC, scale=0.02),
             "dout": arr(B, T, OC), "out": xp.empty((B, T, OC), dtype=store),
             "dinp": xp.empty((B, T, C), dtype=store), "dweight": xp.zeros((OC, C), dtype=store),
             "dbias": xp.zeros((OC,), dtype=store)}
        for name, (forward, backward) in impls.items():
            if name.startswith("naive") and fwd_gflop > args.naive_max_gflop:
                continue
            calls = {"forward": lambda: forward(a["out"], a["inp"], a["weight"], a["bias"]),
                     "backward": lambda: backward(a["dinp"], a["dweight"], a["dbias"], a["dout"], a["inp"],
                                                  a["weight"])}
            for direction, call in calls.items():
                f = flops(direction, B, T, C, OC)
                row = {"impl": name, "direction": direction, "B": B, "T": T, "C": C, "OC": OC, "flops": f,
                       "dtype": store.name, **meta}
                try:
                    ms = bu.median(timer(call, f > 2e9))
                except Exception as e:   # e.g. a dtype CuPy's reference cannot do: recorded, not fatal
                    row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                    print(f"{name:32s} {direction:8s} B={B} T={T} C=OC={C}: ERROR {row['error']}")
                else:
                    row.update(ms=ms, tflops=f / ms / 1e9)
                    print(f"{name:32s} {direction:8s} B={B:3d} T={T:4d} C=OC={C:4d}  {f / 1e9:9.3f} GFLOP  "
                          f"{ms:10.3f} ms  {f / ms / 1e6:9.1f} GFLOP/s")
                rows.append(row)
        del a

    path = bu.write_json(out / "matmul_sweep.json", rows)
    png = plot(rows, out / "matmul_sweep.png")
    print(f"wrote {path}, {png}")
    return 0 if all("ms" in r for r in rows if r["impl"].startswith("llmpy")) else 1


def plot(rows: list[dict], path: Path) -> Path:
    plt = bu.pyplot()
    from matplotlib.ticker import NullFormatter
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    markers = {"forward": "o", "backward": "s"}
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    for color, impl in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], impls):
        for direction, marker in markers.items():
            pts = sorted((r["flops"], r["ms"], r["tflops"]) for r in rows
                         if r["impl"] == impl and r["direction"] == direction and "ms" in r)
            if not pts:
                continue
            f, ms, tf = zip(*pts)
            ax = axes[0] if direction == "forward" else axes[1]
            ax.plot(f, ms, marker=marker, linestyle="none", color=color, label=impl)
            axes[2].plot(f, [t * 1e3 for t in tf], marker=marker, linestyle="none", color=color,
                         label=f"{impl} {direction}", alpha=0.8)
    for ax, title in zip(axes, ("forward: time", "backward: time", "achieved rate")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("FLOPs per call")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    axes[0].set_ylabel("ms (median)")
    axes[2].set_ylabel("GFLOP/s")
    if rows:
        fig.suptitle(f"linear layer, C = OC; {rows[0]['device']} ({rows[0]['dtype']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())

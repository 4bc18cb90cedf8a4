"""Loss curves from llm.c-format main.log files: train (trl) and val (tel) loss, several runs overlaid.

    python scripts/plot_log.py out/run_a out/run_b --out loss.png
    python scripts/plot_log.py out/run_a/main.log --out loss.png --smooth 20 --ymax 6

Each argument is a run's output directory (holding main.log) or a log file. Lines read (llmc-facts.md
§7.9; llmpy/train.py writes the same): `s:%d trl:%.4f lr:%.6f norm:%.2f` (train, lr and norm optional),
`s:%d tel:%.4f` (val); anything else (HellaSwag `eval:` lines, ...) is skipped. A resumed run may log a
step twice: the last value wins. Each run gets one colour, labelled by its directory name: train as a
line (optionally smoothed with a moving average), val as dots joined by a dashed line.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

import benchutil as bu

LINE = re.compile(r"^s:(\d+) (trl|tel):(\S+)")


def parse_log(path: Path) -> dict[str, dict[int, float]]:
    """{'train': {step: loss}, 'val': {step: loss}} from one main.log."""
    series = {"train": {}, "val": {}}
    for line in path.read_text().splitlines():
        m = LINE.match(line.strip())
        if m:
            step, kind, value = int(m.group(1)), m.group(2), float(m.group(3))
            series["train" if kind == "trl" else "val"][step] = value
    return series


def resolve(arg: str) -> tuple[str, Path]:
    """(label, main.log path) for a run directory or a log file."""
    p = Path(arg)
    if p.is_dir():
        return p.resolve().name, p / "main.log"
    return p.resolve().parent.name, p


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over `window` points (the first points average what exists)."""
    if window <= 1 or len(y) == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    n = np.minimum(np.arange(1, len(y) + 1), window)
    return (c[1:] - c[np.arange(1, len(y) + 1) - n]) / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", help="run directories (with main.log) or main.log files")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window for the train loss (steps)")
    p.add_argument("--ymax", type=float, default=None, help="upper limit of the loss axis")
    p.add_argument("--logx", action="store_true", help="logarithmic step axis")
    p.add_argument("--title", default="", help="plot title")
    args = p.parse_args(argv)

    plt = bu.pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    plotted = 0
    for i, arg in enumerate(args.logs):
        label, path = resolve(arg)
        if not path.is_file():
            print(f"plot_log: {path}: no such log file", file=sys.stderr)
            return 1
        series = parse_log(path)
        color = colors[i % len(colors)]
        train, val = sorted(series["train"].items()), sorted(series["val"].items())
        if train:
            s, y = map(np.asarray, zip(*train))
            ax.plot(s, smooth(y, args.smooth), color=color, lw=1.2, label=f"{label} train")
        if val:
            s, y = map(np.asarray, zip(*val))
            ax.plot(s, y, color=color, ls="--", marker="o", ms=3, lw=1, label=f"{label} val")
        if not train and not val:
            print(f"plot_log: {path}: no 's:N trl:' or 's:N tel:' lines", file=sys.stderr)
        else:
            plotted += 1
            last = f"train {train[-1][1]:.4f} @ {train[-1][0]}" if train else ""
            print(f"{label}: {len(train)} train, {len(val)} val points; last {last}"
                  + (f", val {val[-1][1]:.4f} @ {val[-1][0]}" if val else ""))
    if not plotted:
        return 1
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if args.logx:
        ax.set_xscale("log")
    if args.ymax is not None:
        ax.set_ylim(top=args.ymax)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(args.title or "loss", fontsize=10)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

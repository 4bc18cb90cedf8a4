"""Loss curves from llm.c-format main.log files: train (trl) and val (tel) loss, several runs overlaid.

    python scripts/plot_log.py out/run_a out/run_b --out loss.png
    python scripts/plot_log.py out/run_a/main.log --out loss.png --smooth 20 --ymax 6

Each argument is a run's output directory (holding main.log) or a log file; llmpy/plot.py reads the
lines and draws (the trainer writes each run's own loss.png with it). Each run gets one colour,
labelled by its directory name: train as a line (optionally smoothed with a moving average), val as
dots joined by a dashed line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import benchutil  # noqa: F401  (puts the checkout on sys.path when llmpy is not installed)
from llmpy.errors import LlmpyError
from llmpy.plot import parse_log, plot_runs


def resolve(arg: str) -> tuple[str, Path]:
    """(label, main.log path) for a run directory or a log file."""
    p = Path(arg)
    if p.is_dir():
        return p.resolve().name, p / "main.log"
    return p.resolve().parent.name, p


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", help="run directories (with main.log) or main.log files")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window for the train loss (steps)")
    p.add_argument("--ymax", type=float, default=None, help="upper limit of the loss axis")
    p.add_argument("--logx", action="store_true", help="logarithmic step axis")
    p.add_argument("--title", default="", help="plot title")
    args = p.parse_args(argv)

    runs = []
    for arg in args.logs:
        label, path = resolve(arg)
        if not path.is_file():
            print(f"plot_log: {path}: no such log file", file=sys.stderr)
            return 1
        series = parse_log(path)
        train, val = sorted(series["train"].items()), sorted(series["val"].items())
        if not train and not val:
            print(f"plot_log: {path}: no 's:N trl:' or 's:N tel:' lines", file=sys.stderr)
            continue
        runs.append((label, series))
        last = f"train {train[-1][1]:.4f} @ {train[-1][0]}" if train else ""
        print(f"{label}: {len(train)} train, {len(val)} val points; last {last}"
              + (f", val {val[-1][1]:.4f} @ {val[-1][0]}" if val else ""))
    if not runs:
        return 1
    try:
        out = plot_runs(runs, Path(args.out), smooth_window=args.smooth, ymax=args.ymax, logx=args.logx,
                        title=args.title)
    except LlmpyError as e:   # matplotlib missing: one line saying what to install
        print(f"plot_log: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

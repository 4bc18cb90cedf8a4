"""Loss curves from llm.c-format main.log files (the trainer's loss.png, and scripts/plot_log.py).

Lines read (llmc-facts.md §7.9; llmpy/train.py writes the same): `s:%d trl:%.4f lr:%.6f norm:%.2f`
(train, lr and norm optional), `s:%d tel:%.4f` (val); anything else (HellaSwag `eval:` lines, ...) is
skipped. A resumed run may log a step twice: the last value wins. matplotlib is imported only to draw;
without it `pyplot()` raises an LlmpyError that says what to install.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from llmpy.errors import LlmpyError

LINE = re.compile(r"^s:(\d+) (trl|tel):(\S+)")
INSTALL_HINT = "matplotlib is not installed: pip install matplotlib (or pip install -e '.[plot]')"


def pyplot():
    """matplotlib.pyplot with the Agg backend (no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise LlmpyError(INSTALL_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def parse_log(path: Path) -> dict[str, dict[int, float]]:
    """{'train': {step: loss}, 'val': {step: loss}} from one main.log."""
    series = {"train": {}, "val": {}}
    for line in Path(path).read_text().splitlines():
        m = LINE.match(line.strip())
        if m:
            step, kind, value = int(m.group(1)), m.group(2), float(m.group(3))
            series["train" if kind == "trl" else "val"][step] = value
    return series


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over `window` points (the first points average what exists)."""
    if window <= 1 or len(y) == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    n = np.minimum(np.arange(1, len(y) + 1), window)
    return (c[1:] - c[np.arange(1, len(y) + 1) - n]) / n


def plot_runs(runs: list[tuple[str, dict]], out: Path, *, smooth_window: int = 1, ymax: float | None = None,
              logx: bool = False, title: str = "") -> Path:
    """Draw (label, parse_log series) pairs into one PNG: per run one colour, train as a line (optionally
    smoothed), val as dots joined by a dashed line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, series) in enumerate(runs):
        color = colors[i % len(colors)]
        train, val = sorted(series["train"].items()), sorted(series["val"].items())
        if train:
            s, y = map(np.asarray, zip(*train))
            ax.plot(s, smooth(y, smooth_window), color=color, lw=1.2, label=f"{label} train")
        if val:
            s, y = map(np.asarray, zip(*val))
            ax.plot(s, y, color=color, ls="--", marker="o", ms=3, lw=1, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if logx:
        ax.set_xscale("log")
    if ymax is not None:
        ax.set_ylim(top=ymax)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "loss", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_run_dir(out_dir: str) -> Path | None:
    """out_dir/loss.png from out_dir/main.log (None when the log has no loss lines yet)."""
    series = parse_log(Path(out_dir) / "main.log")
    if not series["train"] and not series["val"]:
        return None
    return plot_runs([(Path(out_dir).resolve().name, series)], Path(out_dir) / "loss.png",
                     smooth_window=max(1, len(series["train"]) // 50))

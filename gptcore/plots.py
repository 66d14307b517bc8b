"""The pictures the stages draw as PNG files, which open anywhere without a network (`dvc plots show` renders
its CSV charts with Vega, which it loads from the internet): train's loss curve (plots/loss.png) and bench's
speed chart (plots/bench.png). Each is drawn from the CSV the same stage writes beside it, so the picture and
the data `dvc plots diff` compares are the same rows.

Figures are built with matplotlib's object API (`Figure`, no pyplot): no global state and no display, and
the Agg renderer writes the PNG.
"""

from __future__ import annotations

import csv
from pathlib import Path

from gptcore.files import atomic_write

# One colour per curve or implementation, so a test (or a reader) can find each in the picture.
TRAIN_COLOR = "#1f77b4"
VAL_COLOR = "#ff7f0e"
LR_COLOR = "#7f7f7f"
TORCH_COLOR = "#1f77b4"
CUTILE_COLOR = "#2ca02c"
DPI = 100


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV a stage wrote (`stage.write_plot`), as strings by column."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _numbers(rows: list[dict], column: str) -> list[float]:
    return [float(row[column]) for row in rows]


def loss_figure(rows: list[dict]):
    """Train and validation loss against the iteration, the learning rate on a second axis (right)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    iters = _numbers(rows, "iter")
    ax.plot(iters, _numbers(rows, "train_loss"), color=TRAIN_COLOR, marker="o", markersize=3, label="train loss")
    ax.plot(iters, _numbers(rows, "val_loss"), color=VAL_COLOR, marker="o", markersize=3, label="val loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (cross-entropy, nats)")
    ax.grid(alpha=0.3)
    lr_axis = ax.twinx()
    lr_axis.plot(iters, _numbers(rows, "lr"), color=LR_COLOR, linestyle="--", linewidth=1, label="learning rate")
    lr_axis.set_ylabel("learning rate")
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lines = ax.get_lines() + lr_axis.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    ax.set_title("Loss per evaluation (plots/train_loss.csv)")
    return fig


def speed_figure(rows: list[dict]):
    """One horizontal bar per measured row: its speed relative to its case's PyTorch reference (1.0, the
    dotted line), cuTile's rows in one colour and PyTorch's (eager, compiled, graphs, SDPA) in another."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(9, 1.5 + 0.25 * max(len(rows), 1)), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    speeds = _numbers(rows, "speedup")
    # "case shape dtype | implementation", as gptcore.bench.timing.plot_rows names a row
    cutile = [row["benchmark"].rpartition(" | ")[2].startswith("cutile") for row in rows]
    ax.barh(range(len(rows)), speeds, color=[CUTILE_COLOR if c else TORCH_COLOR for c in cutile])
    for y, speed in enumerate(speeds):
        ax.text(speed, y, f" {speed:.2f}x", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [row["benchmark"] for row in rows], fontsize=7)
    ax.invert_yaxis()  # the first row on top, as in the CSV
    ax.axvline(1.0, color="black", linestyle=":", linewidth=1)
    ax.set_xlabel("speed relative to the PyTorch reference (higher is faster)")
    ax.set_xlim(0, max([1.0, *speeds]) * 1.15)  # room for the figures at the bars' ends
    fig.legend(
        handles=[Patch(color=CUTILE_COLOR, label="cuTile"), Patch(color=TORCH_COLOR, label="PyTorch")],
        loc="outside right upper",
        fontsize=8,
    )
    if not rows:
        ax.text(0.5, 0.5, "no measured rows: see bench/records.json", ha="center", transform=ax.transAxes)
    ax.set_title("Benchmarks (plots/bench.csv)")
    return fig


def save_png(fig, path: str | Path) -> Path:
    """The figure as a PNG at `path`, written atomically like every output."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def write_loss_curve(csv_path: str | Path, png_path: str | Path) -> Path:
    """Train's loss curve, drawn from the loss CSV it wrote (`iter,train_loss,val_loss,lr` per evaluation)."""
    return save_png(loss_figure(read_rows(csv_path)), png_path)


def write_speed_chart(csv_path: str | Path, png_path: str | Path) -> Path:
    """Bench's speed chart, drawn from the speed CSV it wrote (`benchmark,speedup,ms` per measured row)."""
    return save_png(speed_figure(read_rows(csv_path)), png_path)

"""Pictures people look at instead of tables: colour masks, overlays, the confusion heat map, per-class IoU bars,
and loss / mIoU curves of one or several runs.

matplotlib's object API (Figure, no pyplot) needs no display and keeps no global figure state, so this runs on
headless nodes and inside the training loop. Every PNG goes to a temporary name first and is renamed when whole.
matplotlib is imported at the first figure (0.6 s): ranks that never plot, and the masks and overlays, skip it.

Imports: matplotlib, numpy, frrn_dist.data.labels.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from frrn_dist.data.labels import CLASS_NAMES, IGNORE_INDEX, TRAIN_COLORS, colorize_train_ids

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "colorize_train_ids",
    "overlay",
    "save_png",
    "plot_confusion",
    "plot_class_iou",
    "plot_run_curves",
    "plot_runs",
    "plot_table",
]


def overlay(rgb: np.ndarray, train_ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 image with (H, W) train ids blended in the Cityscapes palette; ignore (255) left as is."""
    if rgb.shape[:2] != train_ids.shape:
        raise ValueError(f"overlay: image {rgb.shape[:2]} and label map {train_ids.shape} differ in size")
    ids = np.asarray(train_ids, np.uint8)
    mixed = (1 - alpha) * rgb.astype(np.float32) + alpha * TRAIN_COLORS[ids].astype(np.float32)
    out = np.where((ids == IGNORE_INDEX)[..., None], rgb.astype(np.float32), mixed)
    return out.round().astype(np.uint8)


def _figure(**kwargs: Any) -> Figure:
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_png(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write a figure atomically (temp name, then rename) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=dpi)
    os.replace(tmp, path)
    return path


def plot_confusion(confusion: list[list[int]] | np.ndarray, path: str | Path, *, title: str = "") -> Path:
    """Row-normalised confusion matrix (row = ground truth, so the diagonal is each class's recall) as a heat map."""
    cm = np.asarray(confusion, np.float64)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.full_like(cm, np.nan), where=rows > 0)  # classes absent from GT: blank row
    n = len(cm)
    names = CLASS_NAMES[:n]
    fig = _figure(figsize=(9, 8), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    for i in range(n):
        for j in range(n):
            if not math.isnan(norm[i, j]) and norm[i, j] >= 0.005:
                ax.text(j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center", fontsize=6,
                        color="black" if norm[i, j] > 0.6 else "white")  # fmt: skip
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the ground-truth class")
    ax.set_title(title or "confusion matrix (rows normalised, % shown)")
    return save_png(fig, path)


def plot_class_iou(class_iou: dict[str, float | None], path: str | Path, *, title: str = "", mean: float | None = None):
    """Horizontal bars of per-class IoU in the class colours; classes without a score are marked n/a."""
    names = list(class_iou)
    values = [float("nan") if class_iou[n] is None else class_iou[n] for n in names]
    colors = [TRAIN_COLORS[CLASS_NAMES.index(n)] / 255 if n in CLASS_NAMES else (0.3, 0.3, 0.6) for n in names]
    fig = _figure(figsize=(7, 0.3 * len(names) + 1.2), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.barh(y, [0 if math.isnan(v) else v for v in values], color=colors, edgecolor="black", linewidth=0.5)
    for yi, v in zip(y, values):
        if math.isnan(v):
            ax.text(0.01, yi, "n/a", va="center", fontsize=8)
        elif v > 0.85:  # no room right of the bar: write inside it
            ax.text(v - 0.01, yi, f"{v:.3f}", va="center", ha="right", fontsize=8, color="white")
        else:
            ax.text(v + 0.01, yi, f"{v:.3f}", va="center", fontsize=8)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU")
    if mean is not None and not math.isnan(mean):
        ax.axvline(mean, color="red", linestyle="--", linewidth=1, label=f"mean {mean:.3f}")
        ax.legend(loc="lower right")
    ax.set_title(title or "per-class IoU")
    return save_png(fig, path)


def _series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; a resumed run appends, so the last record of a step wins."""
    by_step = {}
    for r in records:
        v = r.get(key)
        if r.get("kind") == kind and isinstance(v, (int, float)) and not math.isnan(v):
            by_step[int(r["step"])] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_runs(runs: dict[str, list[dict[str, Any]]], path: str | Path, *, title: str = "") -> Path:
    """Train loss, val loss, val mIoU, throughput and utilisation against the optimizer step, one line per run
    (metrics.jsonl records)."""
    fig = _figure(figsize=(25, 4.2), layout="constrained")
    panels = fig.subplots(1, 5)
    charts = (
        ("train", "loss", "train loss"),
        ("val", "loss", "val loss"),
        ("val", "miou", "val mIoU"),
        ("train", "perf/images_per_s", "images/s (all ranks)"),
        ("train", "perf/mfu", "model FLOP utilisation (dashed: data wait)"),
    )
    for (kind, key, label), ax in zip(charts, panels):
        if key == "perf/mfu":  # the fraction of time waiting for data shares the [0, 1] axis
            for i, records in enumerate(runs.values()):
                steps, values = _series(records, kind, "perf/data_wait")
                if steps:
                    ax.plot(steps, values, linestyle="--", linewidth=1, color=f"C{i % 10}")
        for i, (name, records) in enumerate(runs.items()):
            steps, values = _series(records, kind, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name,
                        color=f"C{i % 10}")  # fmt: skip
        ax.set_title(label)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        drawn = [y for line in ax.lines for y in line.get_ydata()]
        if key == "loss" and drawn and min(drawn) > 0:  # losses fall over decades early on
            ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no records yet", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    return save_png(fig, path)


def plot_run_curves(records: list[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """One run's curves (training writes runs/<name>/curves.png with this)."""
    return plot_runs({title or "run": records}, path, title=title)


def plot_table(header: list[str], rows: list[list[str]], path: str | Path, *, title: str = "") -> Path:
    """A table of strings rendered as a PNG (for people who paste pictures into reports)."""
    fig = _figure(figsize=(max(4.0, 1.6 * len(header)), 0.4 * (len(rows) + 1) + 0.6), layout="constrained")
    ax = fig.add_subplot()
    ax.axis("off")
    table = ax.table(cellText=rows or [["" for _ in header]], colLabels=header, loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.auto_set_column_width(list(range(len(header))))
    for (r, _), cell in table.get_celld().items():
        if r == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#e6e6e6")
    if title:
        ax.set_title(title)
    return save_png(fig, path, dpi=120)

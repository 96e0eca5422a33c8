"""Figures for MLflow and storage: one place for every plot, each legible at a glance.

Pure functions of numbers and arrays that return matplotlib figures or HWC uint8 images;
:func:`figure_png` turns a figure into PNG bytes (then ``Store.write_bytes`` or a tracker).
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def figure_png(figure: Any, dpi: int = 110) -> bytes:
    """Return a matplotlib figure as PNG bytes (and close it)."""
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    _plt().close(figure)
    return buf.getvalue()


def image_bytes(image: Any, name: str) -> bytes:
    """Return an HWC uint8 array or PIL image encoded in the format ``name`` ends with (PNG by default)."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    img.save(buf, format=(os.path.splitext(name)[1].lstrip(".") or "png").upper().replace("JPG", "JPEG"))
    return buf.getvalue()


def line_figure(series: Mapping[str, Mapping[Any, float]], xlabel: str, ylabel: str, title: str,
                chance: float | None = None) -> Any:
    """Return a line plot of named {x: y} series, with an optional dashed chance level."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, points in series.items():
        ax.plot(list(points), list(points.values()), marker="o", label=name)
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", label="chance")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def acceptance_figure(report: Mapping[str, Mapping[str, Any]], threshold: float | None,
                      quota: int | None = None) -> Any:
    """Return per-class histograms of the selector's score: threshold, selectivity and quota fill in each title."""
    plt = _plt()
    n = max(1, len(report))
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (c, r) in zip(axes.flat, report.items()):
        ax.bar(np.linspace(0.05, 0.95, 10), r["score_histogram"], width=0.09, color="tab:blue")
        if threshold is not None:
            ax.axvline(threshold, color="tab:red", ls="--", label=f"threshold {threshold:g}")
            ax.legend(fontsize=7, loc="upper left")
        passed = r.get("passed_rule", r["accepted"])
        selectivity = 100 * passed / r["generated"] if r["generated"] else 0.0
        ax.set_title(f"{c}: {passed}/{r['generated']} passed ({selectivity:.0f}% selectivity)\n"
                     f"{r['accepted']} kept" + (f" of quota {quota}" if quota else ""), fontsize=9)
        ax.set(xlabel="selector score p(target)", ylabel="generated tiles", xlim=(0, 1))
    fig.suptitle("selector scores of the generated tiles; selectivity = passed / generated", fontsize=10)
    fig.tight_layout()
    return fig


def tile_grid(tiles: np.ndarray, columns: int = 8, scale: int = 1, gap: int = 2) -> np.ndarray:
    """Return an HWC uint8 grid of tiles (NHWC uint8), each upscaled ``scale`` times, on a white background."""
    tiles = np.asarray(tiles)
    if scale > 1:
        tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w = tiles.shape[:3]
    cols = max(1, min(n, columns))
    rows = max(1, math.ceil(n / cols))
    grid = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[r * (h + gap):r * (h + gap) + h, q * (w + gap):q * (w + gap) + w] = tiles[i]
    return grid


def labeled_grid_figure(rows: Sequence[tuple[str, np.ndarray]], title: str, scale: int = 4) -> Any:
    """Return a figure of labelled rows of tiles (e.g. one row per class, or original / reconstruction)."""
    plt = _plt()
    grids = [(label, tile_grid(t, columns=len(t), scale=scale)) for label, t in rows if len(t)]
    width = max(g.shape[1] for _, g in grids) if grids else 1
    fig, axes = plt.subplots(len(grids) or 1, 1, figsize=(max(4.0, width / 60), 1.2 + 1.1 * len(grids)),
                             squeeze=False)
    for ax, (label, grid) in zip(axes[:, 0], grids):
        ax.imshow(grid)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def image_figure(image: np.ndarray, title: str, scale: int = 4) -> Any:
    """Return a titled figure of one HWC uint8 image (e.g. a sample grid), upscaled ``scale`` times."""
    plt = _plt()
    image = np.asarray(image).repeat(scale, axis=0).repeat(scale, axis=1)
    h, w = image.shape[:2]
    fig, ax = plt.subplots(figsize=(max(3.0, w / 100), max(3.0, h / 100) + 0.4))
    ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def confusion_figure(matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str) -> Any:
    """Return a confusion-matrix figure (rows: true class, columns: predicted) whose title fits."""
    plt = _plt()
    cm = np.asarray(matrix, dtype=float)
    size = max(4.0, 0.55 * len(class_names) + 2.0)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9, wrap=True)
    top = cm.max() if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if cm[i, j] > top / 2 else "black", fontsize=8)
    fig.tight_layout()
    return fig

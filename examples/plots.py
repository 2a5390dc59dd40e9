"""PNG figures (matplotlib, Agg backend): scatter plots of points, image grids, loss curves, and the line
charts of the reproduction study (examples/reproduce.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402


def scatter(panels: dict[str, np.ndarray], path, *, max_points: int = 5000) -> None:
    """One square panel per (title, N x D points), first two coordinates, on shared axes."""
    every = np.concatenate([p[:max_points, :2] for p in panels.values()])
    low, high = np.percentile(every, 0.5, 0), np.percentile(every, 99.5, 0)
    pad = 0.1 * (high - low)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, points) in zip(axes[0], panels.items()):
        ax.scatter(points[:max_points, 0], points[:max_points, 1], s=1, alpha=0.4, linewidths=0)
        ax.set_xlim(low[0] - pad[0], high[0] + pad[0])
        ax.set_ylim(low[1] - pad[1], high[1] + pad[1])
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def image_grid(panels: dict[str, np.ndarray], path, *, max_images: int = 100) -> None:
    """One grid per (title, N x C x H x W images in [0, 1])."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.3), squeeze=False)
    for ax, (title, images) in zip(axes[0], panels.items()):
        images = np.clip(images[:max_images], 0, 1)
        n, c, h, w = images.shape
        side = math.ceil(math.sqrt(n))
        canvas = np.ones((side * (h + 1), side * (w + 1), c))
        for i, image in enumerate(images):
            row, col = divmod(i, side)
            canvas[row * (h + 1):row * (h + 1) + h, col * (w + 1):col * (w + 1) + w] = image.transpose(1, 2, 0)
        ax.imshow(canvas[..., 0] if c == 1 else canvas, cmap="gray" if c == 1 else None, vmin=0, vmax=1)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def samples(kind: str, panels: dict[str, np.ndarray], path) -> None:
    (scatter if kind == "points" else image_grid)(panels, path)


def loss_curve(log_path, png_path) -> None:
    """The training loss of the JSONL log, raw and smoothed, on a log scale."""
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    steps = np.array([r["step"] for r in records if "loss" in r])
    losses = np.array([r["loss"] for r in records if "loss" in r])
    if len(steps) == 0:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.5, alpha=0.4, label="loss")
    window = max(1, len(losses) // 20)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1:], smooth, lw=1.5, label=f"mean of {window}")
    if (losses > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def lines(curves: dict[str, tuple[list, list]], path, *, xlabel: str, ylabel: str, title: str, log: bool) -> None:
    """One line per name -> (xs, ys); NaN and inf points are left out."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, (xs, ys) in curves.items():
        kept = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        if kept:
            ax.plot(*zip(*kept), marker="o", label=name)
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def loss_panels(panels: dict[str, list[tuple[list, float]]], path, *, legend: str) -> None:
    """One panel per name, holding ([[step, loss], ...], value) curves coloured by the value (named `legend`
    in the key); a shared log scale where every loss is positive."""
    values = sorted({value for curves in panels.values() for _, value in curves})
    colours = {v: plt.cm.viridis(i / max(1, len(values) - 1)) for i, v in enumerate(values)}
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3 * rows), squeeze=False, sharey=True)
    positive = all(loss > 0 for curves in panels.values() for points, _ in curves for _, loss in points
                   if math.isfinite(loss))
    for ax, (name, curves) in zip(axes.flat, panels.items()):
        for points, value in curves:
            finite = [(step, loss) for step, loss in points if math.isfinite(loss)]
            if finite:  # markers where a curve is too short to show as a line
                ax.plot(*zip(*finite), lw=0.7, alpha=0.7, color=colours[value], marker="o" if len(finite) < 3 else None)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        if positive:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colours[v], label=f"{legend} {v:g}") for v in values]
    fig.legend(handles=handles, loc="upper right", fontsize=8)
    axes[0][0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Figures of pair maps (matplotlib's object API only: no pyplot, no global state, no backend switch)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from lightning_swim.pairmap import PairMap

__all__ = ["guess_image_shape", "importance_heatmap", "pair_arrows", "top_pairs", "top_points"]


def guess_image_shape(sample_shape: Sequence[int]) -> tuple[int, ...] | None:
    """An image shape for one example of the probe set, or None if it does not look like an image.

    ``[H, W]`` and ``[C, H, W]`` (C in 1, 3) are images; a flat ``[d]`` is one if ``d`` is a square >= 16.
    """
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) == 2 and min(shape) >= 4:
        return shape
    if len(shape) == 3 and shape[0] in (1, 3) and min(shape[1:]) >= 4:
        return shape
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        if side * side == shape[0] and side >= 4:
            return (side, side)
    return None


def _as_image(x: Tensor, shape: tuple[int, ...]) -> np.ndarray:
    img = x.detach().float().cpu().reshape(shape).numpy()
    return np.transpose(img, (1, 2, 0)) if img.ndim == 3 and img.shape[0] == 3 else img.reshape(img.shape[-2:])


def _label(y: Tensor | None, k: int) -> str:
    if y is None:
        return ""
    v = y[k]
    if v.numel() == 1:
        return f" y={v.item():.3g}" if v.is_floating_point() else f" y={int(v)}"
    return f" y={int(v.argmax())}"


def top_points(
    x: Tensor, importance: Tensor, shape: tuple[int, ...], *, k: int = 16, y: Tensor | None = None, title: str = ""
) -> Figure:
    """A grid of the ``k`` most important probe points, each titled with its index and importance."""
    k = min(k, int((importance > 0).sum()) or 1)
    top = torch.topk(importance, k).indices.tolist()
    cols = min(8, k)
    rows = math.ceil(k / cols)
    fig = Figure(figsize=(1.6 * cols, 2.1 * rows + 0.5), dpi=100)
    lo, hi = float(x.min()), float(x.max())
    for n, idx in enumerate(top):
        ax = fig.add_subplot(rows, cols, n + 1)
        ax.imshow(_as_image(x[idx], shape), cmap="gray_r", vmin=lo, vmax=hi)
        ax.set_title(f"#{idx}{_label(y, idx)}\n{100 * float(importance[idx]):.2f}%", fontsize=8)
        ax.axis("off")
    fig.suptitle(title or f"The {k} most important probe points (share of pair importance)", fontsize=10)
    fig.tight_layout()
    return fig


def top_pairs(
    x: Tensor,
    pm: PairMap,
    shape: tuple[int, ...],
    *,
    neuron_weights: Tensor | None = None,
    k: int = 8,
    y: Tensor | None = None,
    title: str = "",
) -> Figure:
    """The pairs of the ``k`` weightiest neurons: ``x_from`` next to ``x_to``, one pair per row."""
    weights = torch.ones(len(pm)) if neuron_weights is None else neuron_weights.detach().float().cpu()
    weights = torch.where(pm.valid.cpu(), weights, torch.full_like(weights, -1.0))
    k = min(k, int(pm.valid.sum()))
    order = torch.topk(weights, k).indices.tolist()
    fig = Figure(figsize=(4.2, 1.9 * k + 0.5), dpi=100)
    lo, hi = float(x.min()), float(x.max())
    for r, m in enumerate(order):
        i, j = int(pm.idx_from[m]), int(pm.idx_to[m])
        for c, (idx, role) in enumerate(((i, "from"), (j, "to"))):
            ax = fig.add_subplot(k, 2, 2 * r + c + 1)
            ax.imshow(_as_image(x[idx], shape), cmap="gray_r", vmin=lo, vmax=hi)
            ax.set_title(f"neuron {m} {role}: #{idx}{_label(y, idx)}", fontsize=8)
            ax.axis("off")
    fig.suptitle(title or "Top pairs (neuron: x_from | x_to), by neuron weight", fontsize=10)
    fig.tight_layout()
    return fig


def pair_arrows(
    x: Tensor,
    pm: PairMap,
    *,
    importance: Tensor | None = None,
    neuron_weights: Tensor | None = None,
    y: Tensor | None = None,
    title: str = "",
) -> Figure:
    """2-D data with each neuron's pair drawn as an arrow ``x_from -> x_to`` (opacity by neuron weight)."""
    pts = x.detach().double().cpu()
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"Expected 2-D points of shape `[N, 2]` but got {tuple(pts.shape)}.")
    fig = Figure(figsize=(6, 5.4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    color = None if y is None else (y.float().cpu().reshape(len(pts), -1)[:, 0].numpy())
    size = (
        6 if importance is None else 6 + 600 * importance.double().cpu().numpy() / max(float(importance.max()), 1e-12)
    )
    sc = ax.scatter(pts[:, 0], pts[:, 1], c=color, s=size, cmap="viridis", alpha=0.6, linewidths=0)
    if color is not None:
        fig.colorbar(sc, ax=ax, label="target")
    ok = pm.valid.cpu()
    w = torch.ones(len(pm)) if neuron_weights is None else neuron_weights.detach().float().cpu()
    w = w / max(float(w[ok].max()) if bool(ok.any()) else 1.0, 1e-12)
    for m in torch.nonzero(ok).ravel().tolist():
        a, b = pts[int(pm.idx_from[m])], pts[int(pm.idx_to[m])]
        ax.annotate(
            "",
            xy=(float(b[0]), float(b[1])),
            xytext=(float(a[0]), float(a[1])),
            arrowprops={"arrowstyle": "->", "color": "crimson", "alpha": 0.15 + 0.85 * float(w[m]), "lw": 1.0},
        )
    ax.set_xlabel("x[0]")
    ax.set_ylabel("x[1]")
    ax.set_title(title or f"{int(ok.sum())} neurons as pairs x_from -> x_to (point size: importance)", fontsize=10)
    fig.tight_layout()
    return fig


def importance_heatmap(
    importances: Sequence[Tensor], steps: Sequence[int], *, top: int = 40, title: str = ""
) -> Figure:
    """Importance over time: the ``top`` points (most important over the run) x maps, as a heat map."""
    mat = torch.stack([imp.double().cpu() for imp in importances], 1)  # [N, maps]
    top = min(top, mat.shape[0])
    rows = torch.topk(mat.sum(1), top).indices
    fig = Figure(figsize=(max(4.0, 0.35 * len(steps) + 2.5), 0.18 * top + 1.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(100 * mat[rows].numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_yticks(range(top), [f"#{int(r)}" for r in rows], fontsize=6)
    stride = max(1, len(steps) // 12)
    ax.set_xticks(range(0, len(steps), stride), [str(s) for s in steps[::stride]], fontsize=7)
    ax.set_xlabel("global step of the map")
    ax.set_ylabel("probe point")
    fig.colorbar(im, ax=ax, label="importance (%)")
    ax.set_title(title or f"Pair importance over training: the {top} most important points", fontsize=10)
    fig.tight_layout()
    return fig

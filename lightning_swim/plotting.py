"""Figures of pair maps.

Image grids and heat maps are drawn straight into RGB images with Pillow (milliseconds: the monitor
draws them during training); the 2-D pair figure is a matplotlib ``Figure`` (object API only: no
pyplot, no global state, no backend switch).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
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


_PAD = 6  # pixels around text
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@functools.lru_cache(maxsize=8)
def _font(size: int) -> Font:
    return ImageFont.load_default(size=size)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Font) -> tuple[int, int]:
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, spacing=2)
    return int(right - left), int(bottom - top)


def _to_rgb(img: np.ndarray, lo: float, hi: float, *, rgb: bool, cmap: str = "gray_r") -> np.ndarray:
    """``[..., H, W]`` values (through ``cmap``) or ``[..., H, W, 3]`` colours (``rgb``) in ``[lo, hi]``
    -> uint8 ``[..., H, W, 3]``."""
    z = ((img - lo) / max(hi - lo, 1e-12)).clip(0, 1)
    if rgb:
        return (255 * z).round().astype(np.uint8)
    return matplotlib.colormaps[cmap](z, bytes=True)[..., :3]


def _grid(
    tiles: Sequence[np.ndarray], labels: Sequence[str], cols: int, title: str, *, split: int = 0, lo: float, hi: float
) -> Image.Image:
    """``tiles`` on a grid, each with its label above it, drawn straight into one RGB image.

    A few milliseconds where a matplotlib figure with a subplot per tile takes a second: the
    monitor draws these at every map it logs images for. ``split``: a wider gap after every
    ``split`` columns (to set pairs apart).
    """
    h, w = tiles[0].shape[:2]
    zoom = max(1, math.ceil(80 / max(h, w)))  # tiles of at least 80 pixels, each image pixel a square
    th, tw = h * zoom, w * zoom
    font, title_font = _font(12), _font(15)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    sizes = [_text_size(draw, label, font) for label in labels]
    label_w, label_h = max(sz[0] for sz in sizes), max(sz[1] for sz in sizes) + _PAD
    cell_w, cell_h = max(tw, label_w) + 2 * _PAD, th + label_h + _PAD
    wide = 3 * _PAD
    rows = math.ceil(len(tiles) / cols)
    title_h = _text_size(draw, title, title_font)[1] + 3 * _PAD
    x0 = [c * cell_w + (c // split) * wide if split else c * cell_w for c in range(cols)]
    width = max(x0[-1] + cell_w, _text_size(draw, title, title_font)[0] + 4 * _PAD)
    image = Image.new("RGB", (width, title_h + rows * cell_h), "white")
    draw = ImageDraw.Draw(image)
    draw.text((width // 2, 2 * _PAD), title, fill="black", font=title_font, anchor="ma")
    colours = _to_rgb(np.stack(tiles), lo, hi, rgb=tiles[0].ndim == 3)  # one colour-map pass for all tiles
    for n, (rgb, label) in enumerate(zip(colours, labels, strict=True)):
        r, c = divmod(n, cols)
        left, top = x0[c] + (cell_w - tw) // 2, title_h + r * cell_h + label_h
        image.paste(Image.fromarray(np.ascontiguousarray(rgb.repeat(zoom, 0).repeat(zoom, 1))), (left, top))
        draw.rectangle((left - 1, top - 1, left + tw, top + th), outline=(190, 190, 190))
        anchor = (x0[c] + cell_w // 2, top - _PAD // 2)
        draw.multiline_text(anchor, label, fill="black", font=font, anchor="md", align="center", spacing=2)
    return image


def _name(index: Tensor | None, row: int) -> str:
    """``#<dataset index>`` of a probe row (its row number without ``index``)."""
    return f"#{int(index[row])}" if index is not None else f"#{row}"


def top_points(
    x: Tensor,
    importance: Tensor,
    shape: tuple[int, ...],
    *,
    k: int = 16,
    y: Tensor | None = None,
    title: str = "",
    index: Tensor | None = None,
) -> Image.Image:
    """A grid of the ``k`` most important probe points, each labelled with its index and importance.

    ``index``: the dataset index of every probe row (``ProbeSet.index``), used in the labels.
    """
    k = min(k, int((importance > 0).sum()) or 1)
    top = torch.topk(importance, k).indices.tolist()
    tiles = [_as_image(x[idx], shape) for idx in top]
    labels = [f"{_name(index, idx)}{_label(y, idx)}\n{100 * float(importance[idx]):.2f}%" for idx in top]
    title = title or f"The {k} most important probe points (share of pair importance)"
    return _grid(tiles, labels, min(8, k), title, lo=float(x.min()), hi=float(x.max()))


def top_pairs(
    x: Tensor,
    pm: PairMap,
    shape: tuple[int, ...],
    *,
    neuron_weights: Tensor | None = None,
    k: int = 8,
    y: Tensor | None = None,
    title: str = "",
    index: Tensor | None = None,
) -> Image.Image:
    """The pairs of the ``k`` weightiest neurons, ``x_from`` next to ``x_to``, two pairs per row.

    ``index``: the dataset index of every probe row, used in the labels.
    """
    weights = torch.ones(len(pm)) if neuron_weights is None else neuron_weights.detach().float().cpu()
    weights = torch.where(pm.valid.cpu(), weights, torch.full_like(weights, -1.0))
    k = min(k, int(pm.valid.sum()))
    tiles, labels = [], []
    for m in torch.topk(weights, k).indices.tolist():
        i, j = int(pm.idx_from[m]), int(pm.idx_to[m])
        tiles += [_as_image(x[i], shape), _as_image(x[j], shape)]
        labels += [
            f"neuron {m}\nfrom {_name(index, i)}{_label(y, i)}",
            f"neuron {m}\nto {_name(index, j)}{_label(y, j)}",
        ]
    title = title or "Top pairs (x_from, x_to) of the neurons with the largest weight"
    return _grid(tiles, labels, min(4, 2 * k), title, split=2, lo=float(x.min()), hi=float(x.max()))


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
    sc = ax.scatter(
        pts[:, 0], pts[:, 1], c=color, s=size, cmap=None if color is None else "viridis", alpha=0.6, linewidths=0
    )
    if color is not None:
        fig.colorbar(sc, ax=ax, label="target")
    ok = pm.valid.cpu()
    w = torch.ones(len(pm)) if neuron_weights is None else neuron_weights.detach().float().cpu()
    w = w / max(float(w[ok].max()) if bool(ok.any()) else 1.0, 1e-12)
    keep = torch.nonzero(ok).ravel()
    if len(keep):  # one quiver for all arrows: an annotation per arrow costs milliseconds each
        a, b = pts[pm.idx_from[keep].cpu()], pts[pm.idx_to[keep].cpu()]
        colors = np.zeros((len(keep), 4))
        colors[:, 0], colors[:, 1], colors[:, 2] = 0.86, 0.08, 0.24  # crimson
        colors[:, 3] = 0.15 + 0.85 * w[keep].numpy()
        ax.quiver(
            a[:, 0].numpy(),
            a[:, 1].numpy(),
            (b - a)[:, 0].numpy(),
            (b - a)[:, 1].numpy(),
            color=colors,
            angles="xy",
            scale_units="xy",
            scale=1.0,
            width=0.004,
            headwidth=4,
            headlength=5,
        )
    ax.set_xlabel("x[0]")
    ax.set_ylabel("x[1]")
    ax.set_title(title or f"{int(ok.sum())} neurons as pairs x_from -> x_to (point size: importance)", fontsize=10)
    fig.subplots_adjust(left=0.11, right=0.98 if color is None else 1.0, bottom=0.1, top=0.93)
    return fig


def importance_heatmap(
    importances: Sequence[Tensor],
    steps: Sequence[int],
    *,
    top: int = 40,
    title: str = "",
    index: Tensor | None = None,
) -> Image.Image:
    """Importance over time: the ``top`` points (most important over the run) x maps, as a heat map.

    Rows are probe points (labelled ``#index``: their dataset index with ``index``, else their probe
    row), columns the maps (labelled with their global step), colour the importance in percent
    (scale on the right); drawn straight into an RGB image.
    """
    mat = torch.stack([imp.double().cpu() for imp in importances], 1)  # [N, maps]
    top = min(top, mat.shape[0])
    rows = torch.topk(mat.sum(1), top).indices
    vals = 100 * mat[rows].numpy()
    lo, hi = float(vals.min()), float(vals.max())
    hi = hi if hi > lo else lo + 1e-12
    n_maps = len(steps)
    cell_h, cell_w = 14, max(8, min(48, 640 // max(n_maps, 1)))
    font, small, title_font = _font(12), _font(11), _font(15)
    title = title or f"Pair importance over training: the {top} most important points"
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_labels = [_name(index, int(r)) for r in rows]
    left = max(_text_size(draw, t, small)[0] for t in row_labels) + 3 * _PAD
    title_h = _text_size(draw, title, title_font)[1] + 3 * _PAD
    heat_w, heat_h = cell_w * n_maps, cell_h * top
    bar_x = left + heat_w + 4 * _PAD
    caption = "columns: global step of the map; rows: probe points by index"
    title_w, caption_w = _text_size(draw, title, title_font)[0], _text_size(draw, caption, font)[0]
    width = max(bar_x + 16 + 70, title_w + 4 * _PAD, left + caption_w + _PAD)
    height = title_h + heat_h + 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((width // 2, 2 * _PAD), title, fill="black", font=title_font, anchor="ma")
    rgb = matplotlib.colormaps["magma"]((vals - lo) / (hi - lo), bytes=True)[..., :3]
    image.paste(Image.fromarray(np.ascontiguousarray(rgb.repeat(cell_h, 0).repeat(cell_w, 1))), (left, title_h))
    for r, label in enumerate(row_labels):
        draw.text((left - _PAD, title_h + r * cell_h + cell_h // 2), label, fill="black", font=small, anchor="rm")
    stride = max(1, math.ceil(n_maps * 44 / max(heat_w, 1)))  # at most one step label per 44 pixels
    base = title_h + heat_h
    for c in range(0, n_maps, stride):
        cx = left + c * cell_w + cell_w // 2
        draw.line((cx, base, cx, base + 4), fill="black")
        draw.text((cx, base + 6), str(steps[c]), fill="black", font=small, anchor="ma")
    draw.text((left, base + 26), caption, fill="black", font=font, anchor="la")
    ramp = matplotlib.colormaps["magma"](np.linspace(1, 0, heat_h)[:, None].repeat(16, 1), bytes=True)[..., :3]
    image.paste(Image.fromarray(np.ascontiguousarray(ramp)), (bar_x, title_h))
    for frac in (0.0, 0.5, 1.0):
        yy = title_h + round((1 - frac) * (heat_h - 1))
        draw.text((bar_x + 20, yy), f"{lo + frac * (hi - lo):.2f}%", fill="black", font=small, anchor="lm")
    return image

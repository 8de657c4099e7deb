"""Figures of pair maps, drawn for TensorBoard's default card size.

TensorBoard shows a logged image at most about 345 pixels wide in its Images tab (at the default card
size, in a 1,600-pixel window; about 480 in the Time Series tab) and shrinks anything wider, its text
included. The figures here are therefore drawn :data:`WIDTH` pixels wide, with 12- to 15-pixel type,
as a few large panels stacked downwards (a card grows in height, not in width), each headed by a
title and a line that says what its labels mean. They are drawn straight into RGB images with Pillow
(milliseconds: the monitor draws them during training); the 2-D pair figure is a matplotlib
``Figure`` (object API only: no pyplot, no global state, no backend switch) of the same width.

What a probe point looks like depends on what it is:

- an *image* (``[H, W]``, ``[C, H, W]``, or a flat vector that is one, see :func:`guess_image_shape`)
  is drawn as a picture;
- a *signal* (``[C, L]`` per example, e.g. MNIST-1D or the input of a ``Conv1d``) as a line per channel;
- anything else (*tabular* data) as a row of cells, one per feature, coloured by the feature's z-score
  on the probe set (blue below the probe mean, red above).

Points are named by their dataset index (``#1340``, from ``ProbeSet.index``) and their class.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from lightning_swim.pairmap import PairMap

__all__ = [
    "WIDTH",
    "guess_image_shape",
    "importance_heatmap",
    "pair_arrows",
    "patch_pairs",
    "top_pairs",
    "top_points",
]

WIDTH = 340
"""Width in pixels of the Pillow figures: what TensorBoard's Images tab shows without shrinking."""

_PAD = 8  # pixels around panels
_TILE = 72  # side of an image tile (a probe point drawn as a picture)
_SIGNAL = (96, 56)  # width and height of a signal tile
_INK, _GREY, _RULE = (20, 20, 20), (95, 95, 95), (200, 200, 200)
_FROM, _TO = (230, 97, 1), (33, 102, 172)  # outline colours of x_from and x_to (orange, blue)
_Z = 3.0  # z-scores are clipped to [-_Z, _Z] in the feature rows

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


# -- type and layout --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _font(size: int, bold: bool = False) -> Font:
    """DejaVu Sans (shipped with matplotlib: arrows, minus signs and subscripts included) at ``size`` pixels."""
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)
    except OSError:  # pragma: no cover - a matplotlib without its fonts
        return ImageFont.load_default(size=size)


def _length(text: str, font: Font) -> float:
    return float(font.getlength(text))


def _wrap(text: str, font: Font, width: int) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` pixels long (a longer word stays whole)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and _length(candidate, font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


@functools.lru_cache(maxsize=128)
def _text_block(text: str, font: Font, width: int, fill: tuple[int, int, int], spacing: int = 3) -> Image.Image:
    """Wrapped, left-aligned text as an image ``width`` pixels wide. Cached (a figure's explanatory notes
    recur in every figure of its kind): callers paste it, never draw on it."""
    lines = _wrap(text, font, width - 2 * _PAD)
    if isinstance(font, ImageFont.FreeTypeFont):
        ascent, descent = font.getmetrics()
        line_h = int(ascent + descent) + spacing
    else:  # pragma: no cover - Pillow's bitmap font
        box = font.getbbox("Ag")
        line_h = int(box[3] - box[1]) + spacing
    image = Image.new("RGB", (width, line_h * len(lines) + spacing), "white")
    draw = ImageDraw.Draw(image)
    for n, line in enumerate(lines):
        draw.text((_PAD, spacing + n * line_h), line, fill=fill, font=font)
    return image


def _header(title: str, note: str, width: int = WIDTH) -> Image.Image:
    """A bold title and, below it in grey, what the figure's labels mean."""
    parts = [_text_block(title, _font(15, bold=True), width, _INK)]
    if note:
        parts.append(_text_block(note, _font(12), width, _GREY))
    return _stack(parts, width, gap=2)


def _stack(parts: Sequence[Image.Image], width: int = WIDTH, gap: int = _PAD) -> Image.Image:
    """Images one below the other, left-aligned, on white."""
    height = sum(p.height for p in parts) + gap * (len(parts) - 1)
    image = Image.new("RGB", (width, max(height, 1)), "white")
    top = 0
    for p in parts:
        image.paste(p, (0, top))
        top += p.height + gap
    return image


def _framed(parts: Sequence[Image.Image], width: int = WIDTH) -> Image.Image:
    """The figure: its parts stacked with a margin at the bottom."""
    body = _stack(parts, width)
    image = Image.new("RGB", (width, body.height + _PAD), "white")
    image.paste(body, (0, 0))
    return image


# -- what a probe point is ------------------------------------------------------------------------------


def guess_image_shape(sample_shape: Sequence[int], x: Tensor | None = None) -> tuple[int, ...] | None:
    """The shape of one probe example as an image, or ``None`` if it is not one.

    ``[H, W]`` and ``[C, H, W]`` (``C`` in 1, 3) with sides of at least 4 are images. A flat ``[d]``
    is an image only with data ``x`` (``[N, d]``) that says so: ``d`` a square ``s * s`` (``s >= 4``)
    and neighbouring pixels of the ``s x s`` grid correlated clearly more, over the examples, than
    features on average (by at least 0.2: scikit-learn's 8x8 digits give 0.41 against 0.005, the
    same digits with their pixels shuffled -0.002). So 16 or 64 tabular features are never drawn as
    4x4 or 8x8 pseudo-images; pass ``image_shape`` to the monitor to decide yourself.

    Args:
        sample_shape: the shape of one example, ``x.shape[1:]``.
        x: the probe set, needed to recognise flat images.
    """
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) == 2 and min(shape) >= 4:
        return shape
    if len(shape) == 3 and shape[0] in (1, 3) and min(shape[1:]) >= 4:
        return shape
    if len(shape) == 1 and x is not None:
        side = math.isqrt(shape[0])
        if side * side == shape[0] and side >= 4 and _grid_smoothness(x.reshape(len(x), -1), side) >= 0.2:
            return (side, side)
    return None


def _grid_smoothness(x: Tensor, side: int) -> float:
    """Mean correlation of grid neighbours minus the mean correlation of all feature pairs (``-1`` if unknown)."""
    if x.shape[0] < 8 or not x.is_floating_point():
        return -1.0
    z = x.detach().double().cpu()
    z = z - z.mean(0)
    std = z.std(0)
    ok = std > 1e-12 * max(float(std.max()), 1e-300)
    corr = (z.T @ z) / (len(z) - 1) / (std[:, None] * std[None, :]).clamp_min(1e-300)
    grid = torch.arange(side * side).reshape(side, side)
    pairs = torch.cat(
        [
            torch.stack([grid[:, :-1].ravel(), grid[:, 1:].ravel()], 1),
            torch.stack([grid[:-1].ravel(), grid[1:].ravel()], 1),
        ]
    )
    pairs = pairs[ok[pairs[:, 0]] & ok[pairs[:, 1]]]
    both = ok[:, None] & ok[None, :] & ~torch.eye(side * side, dtype=torch.bool)
    if len(pairs) == 0 or not bool(both.any()):
        return -1.0
    return float(corr[pairs[:, 0], pairs[:, 1]].mean() - corr[both].mean())


def _kind(x: Tensor, shape: tuple[int, ...] | None) -> str:
    """``"image"`` (with ``shape``), ``"signal"`` (``x`` is ``[N, C, L]``) or ``"tabular"``."""
    if shape is not None:
        if math.prod(shape) != math.prod(x.shape[1:]):
            raise ValueError(
                f"Expected argument `shape` to hold the {math.prod(x.shape[1:])} values of one example "
                f"(x has shape {tuple(x.shape)}) but got {tuple(shape)}."
            )
        return "image"
    return "signal" if x.ndim == 3 else "tabular"


def _label(y: Tensor | None, row: int) -> str:
    """`` (7)`` for a class label, `` y=0.53`` for a regression target, ``""`` without targets."""
    if y is None:
        return ""
    v = y[row]
    if v.numel() == 1:
        return f" y={v.item():.3g}" if v.is_floating_point() else f" ({int(v)})"
    return f" ({int(v.argmax())})"


def _name(index: Tensor | None, row: int) -> str:
    """``#<dataset index>`` of a probe row (``row <r>`` without ``index``)."""
    return f"#{int(index[row])}" if index is not None else f"row {row}"


def _point(index: Tensor | None, y: Tensor | None, row: int) -> str:
    return _name(index, row) + _label(y, row)


def _check_rows(x: Tensor, index: Tensor | None, y: Tensor | None) -> None:
    if not isinstance(x, Tensor) or x.ndim < 2 or x.shape[0] < 1:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"Expected argument `x` to be a tensor of examples `[N, ...]` but got {shape}.")
    for name, t in (("index", index), ("y", y)):
        if t is not None and len(t) != len(x):
            raise ValueError(f"Expected argument `{name}` to have one entry per row of x ({len(x)}) but got {len(t)}.")


# -- tiles: one probe point drawn ------------------------------------------------------------------------


def _cmap(values: np.ndarray, lo: float, hi: float, cmap: str) -> np.ndarray:
    z = ((values - lo) / max(hi - lo, 1e-12)).clip(0, 1)
    lut = _lut(cmap)
    return lut[np.minimum((z * len(lut)).astype(np.int64), len(lut) - 1)]  # as Colormap.__call__ indexes


@functools.cache
def _lut(cmap: str) -> np.ndarray:
    """The colormap's RGB table, ``[N, 3]`` uint8 (``matplotlib.colormaps[name]`` builds a fresh copy, and
    its table, on every lookup: a tenth of the figures' drawing time)."""
    colormap = matplotlib.colormaps[cmap]
    return colormap(np.arange(colormap.N), bytes=True)[:, :3]


def _fit(rgb: np.ndarray, side: int) -> Image.Image:
    """An ``[h, w, 3]`` picture scaled to fit a ``side x side`` box: pixels as squares when enlarged."""
    h, w = rgb.shape[:2]
    image = Image.fromarray(np.ascontiguousarray(rgb))
    zoom = side / max(h, w)
    if zoom >= 1:
        z = max(1, int(zoom))
        return image.resize((w * z, h * z), Image.Resampling.NEAREST)
    return image.resize((max(1, round(w * zoom)), max(1, round(h * zoom))), Image.Resampling.BOX)


def _picture(v: Tensor, shape: tuple[int, ...], lo: float, hi: float, *, diverging: bool = False) -> np.ndarray:
    """One example as ``[H, W, 3]`` colours: grey ink for one channel, RGB for three; a difference
    (``diverging``) in blue (negative) to red (positive) around white, summed over channels."""
    img = v.detach().double().cpu().reshape(shape).numpy()
    if diverging:
        plane = img.reshape(-1, *img.shape[-2:]).sum(0)
        m = max(float(np.abs(plane).max()), 1e-12)
        return _cmap(plane, -m, m, "RdBu_r")
    if img.ndim == 3 and img.shape[0] == 3:
        return (255 * ((np.transpose(img, (1, 2, 0)) - lo) / max(hi - lo, 1e-12)).clip(0, 1)).round().astype(np.uint8)
    return _cmap(img.reshape(img.shape[-2:]), lo, hi, "gray_r")


_CHANNEL_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (140, 86, 75)]


def _signal(
    v: Tensor, lo: float, hi: float, size: tuple[int, int] = _SIGNAL, window: tuple[int, int] | None = None
) -> Image.Image:
    """One signal ``[C, L]`` (or ``[L]``) as a line per channel on a ``size`` tile, the samples
    ``window = (start, stop)`` shaded; the value range ``[lo, hi]`` is shared by all tiles."""
    s = v.detach().double().cpu().reshape(-1, v.shape[-1]).numpy()
    w, h = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    n = s.shape[1]
    xs = np.linspace(2, w - 3, n) if n > 1 else np.array([w / 2])
    if window is not None:
        a, b = max(window[0], 0), min(window[1], n)
        step = (xs[1] - xs[0]) if n > 1 else w
        draw.rectangle((xs[a] - step / 2, 1, xs[b - 1] + step / 2, h - 2), fill=(255, 236, 179))
    span = max(hi - lo, 1e-12)
    if lo < 0 < hi:
        zero = h - 3 - (0 - lo) / span * (h - 6)
        draw.line((0, zero, w, zero), fill=_RULE)
    for c, row in enumerate(s):
        ys = h - 3 - (row - lo) / span * (h - 6)
        draw.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=_CHANNEL_COLOURS[c % 5], width=2)
    draw.rectangle((0, 0, w - 1, h - 1), outline=_RULE)
    return image


def _tile(x: Tensor, row: int, kind: str, shape: tuple[int, ...] | None, lo: float, hi: float) -> Image.Image:
    if kind == "image":
        assert shape is not None
        return _fit(_picture(x[row], shape, lo, hi), _TILE)
    return _signal(x[row], lo, hi)


def _difference_tile(x: Tensor, i: int, j: int, kind: str, shape: tuple[int, ...] | None) -> Image.Image:
    """``x_to - x_from``: the direction of the neuron's weight (``w`` is proportional to it)."""
    d = x[j].double() - x[i].double()
    if kind == "image":
        assert shape is not None
        return _fit(_picture(d, shape, 0.0, 0.0, diverging=True), _TILE)
    m = max(float(d.abs().max()), 1e-12)
    return _signal(d, -m, m)


def _boxed(tile: Image.Image, colour: tuple[int, int, int] | None = None, width: int = 1) -> Image.Image:
    """The tile inside a thin frame (grey, or ``colour``)."""
    framed = Image.new("RGB", (tile.width + 2 * width, tile.height + 2 * width), colour or _RULE)
    framed.paste(tile, (width, width))
    return framed


# -- tabular points: rows of feature cells ------------------------------------------------------------------


def _zscores(x: Tensor) -> tuple[Tensor, Tensor]:
    flat = x.detach().double().cpu().reshape(len(x), -1)
    return flat.mean(0), flat.std(0).clamp_min(1e-12) if len(flat) > 1 else torch.ones(flat.shape[1])


def _cells(values: np.ndarray, width: int, height: int) -> Image.Image:
    """A row of z-scores ``[d]`` as ``d`` coloured cells over ``width`` pixels (averaged when narrower)."""
    rgb = _cmap(values[None, :], -_Z, _Z, "RdBu_r")
    image = Image.fromarray(np.ascontiguousarray(rgb))
    d = values.shape[0]
    if d <= width:
        cell = width // d
        return image.resize((cell * d, height), Image.Resampling.NEAREST)
    return image.resize((width, height), Image.Resampling.BOX)


def _z_legend(width: int = WIDTH) -> Image.Image:
    """The colour scale of the feature cells."""
    image = Image.new("RGB", (width, 34), "white")
    draw = ImageDraw.Draw(image)
    font = _font(12)
    bar_w = 120
    ramp = _cmap(np.linspace(-_Z, _Z, bar_w)[None, :].repeat(10, 0), -_Z, _Z, "RdBu_r")
    left = _PAD + int(_length(f"−{_Z:g}", font)) + 6
    image.paste(Image.fromarray(np.ascontiguousarray(ramp)), (left, 4))
    draw.rectangle((left - 1, 3, left + bar_w, 14), outline=_RULE)
    draw.text((left - 4, 9), f"−{_Z:g}", fill=_GREY, font=font, anchor="rm")
    draw.text((left + bar_w + 4, 9), f"+{_Z:g}", fill=_GREY, font=font, anchor="lm")
    draw.text((_PAD, 20), "z-score of each feature on the probe set", fill=_GREY, font=font)
    return image


def _feature_axis(left: int, width: int, d: int) -> Image.Image:
    """Feature numbers under a row of ``d`` cells that starts at ``left`` and is ``width`` wide."""
    image = Image.new("RGB", (WIDTH, 18), "white")
    draw = ImageDraw.Draw(image)
    font = _font(11)
    ticks = sorted({0, d - 1, *range(0, d, max(1, math.ceil(d / 5)))})
    last = -100.0
    for t in ticks:
        cx = left + (t + 0.5) * width / d
        if cx - last < 28 and t != ticks[-1]:
            continue
        draw.line((cx, 0, cx, 3), fill=_GREY)
        draw.text((cx, 4), str(t), fill=_GREY, font=font, anchor="ma")
        last = cx
    return image


# -- the figures -------------------------------------------------------------------------------------------


def top_points(
    x: Tensor,
    importance: Tensor,
    shape: tuple[int, ...] | None = None,
    *,
    k: int = 16,
    y: Tensor | None = None,
    title: str = "",
    index: Tensor | None = None,
) -> Image.Image:
    """The ``k`` most important probe points, most important first, each named and with its share.

    Images (with ``shape``) are drawn as pictures four to a row, signals (``x`` of shape ``[N, C, L]``)
    as lines, tabular points as rows of feature cells (z-scores on the probe set).

    Args:
        x: the probe set, ``[N, ...]``.
        importance: per-point pair importance ``[N]`` (a distribution: shares are ``100 * importance`` %).
        shape: the shape of one example as an image (:func:`guess_image_shape`), or ``None``.
        k: how many points (only points of positive importance are shown).
        y: labels (``(7)``) or targets (``y=0.53``) of the probe rows.
        title: the figure's title.
        index: the dataset index of every probe row (``ProbeSet.index``), shown as ``#1340``.

    Returns:
        An RGB image :data:`WIDTH` pixels wide.
    """
    _check_rows(x, index, y)
    imp = importance.detach().double().cpu()
    k = max(1, min(k, int((imp > 0).sum()) or 1, len(imp)))
    top = torch.topk(imp, k).indices.tolist()
    kind = _kind(x, shape)
    title = title or f"The {k} most important probe points"
    if kind == "tabular":
        note = "Each row a point: dataset index (class), share of the layer's pair importance, its features."
        return _framed([_header(title, note), *_feature_rows(x, top, imp, index, y)])
    note = "Above each: dataset index (class) and the point's share of the layer's pair importance."
    lo, hi = float(x.min()), float(x.max())
    tiles = [_boxed(_tile(x, r, kind, shape, lo, hi)) for r in top]
    labels = [f"{_point(index, y, r)}\n{100 * float(imp[r]):.2f} %" for r in top]
    cols = max(1, min(k, (WIDTH - 2 * _PAD) // (max(t.width for t in tiles) + 6)))
    return _framed([_header(title, note), _grid(tiles, labels, cols)])


def _grid(tiles: Sequence[Image.Image], labels: Sequence[str], cols: int) -> Image.Image:
    """Tiles on a grid ``cols`` wide, each under its (centred, multi-line) label, spread over :data:`WIDTH`."""
    font = _font(12)
    tw, th = max(t.width for t in tiles), max(t.height for t in tiles)
    lines = max(label.count("\n") + 1 for label in labels)
    label_h = lines * 15 + 2
    cell_w = (WIDTH - 2 * _PAD) // cols
    cell_h = label_h + th + _PAD
    rows = math.ceil(len(tiles) / cols)
    image = Image.new("RGB", (WIDTH, rows * cell_h), "white")
    draw = ImageDraw.Draw(image)
    for n, (tile, label) in enumerate(zip(tiles, labels, strict=True)):
        r, c = divmod(n, cols)
        cx = _PAD + c * cell_w + cell_w // 2
        top = r * cell_h
        draw.multiline_text((cx, top), label, fill=_INK, font=font, anchor="ma", align="center", spacing=2)
        image.paste(tile, (cx - tw // 2, top + label_h))
    return image


def _feature_rows(
    x: Tensor, rows: Sequence[int], imp: Tensor, index: Tensor | None, y: Tensor | None
) -> list[Image.Image]:
    mean, std = _zscores(x)
    z = ((x.detach().double().cpu().reshape(len(x), -1) - mean) / std).numpy()
    font = _font(12)
    labels = [f"{_point(index, y, r)}  {100 * float(imp[r]):.2f} %" for r in rows]
    left = _PAD + int(max(_length(t, font) for t in labels)) + 8
    width = WIDTH - left - _PAD
    row_h = 16
    image = Image.new("RGB", (WIDTH, row_h * len(rows)), "white")
    draw = ImageDraw.Draw(image)
    cells_w = 0
    for n, (r, label) in enumerate(zip(rows, labels, strict=True)):
        cells = _cells(z[r], width, row_h - 2)
        cells_w = cells.width
        image.paste(cells, (left, n * row_h + 1))
        draw.text((left - 6, n * row_h + row_h // 2), label, fill=_INK, font=font, anchor="rm")
    axis = _feature_axis(left, cells_w, z.shape[1])
    return [image, _stack([axis, _z_legend()], gap=2)]


def _neuron_order(pm: PairMap, neuron_weights: Tensor | None, k: int) -> tuple[list[int], Tensor]:
    """The ``k`` weightiest mapped neurons and every neuron's share of the mapped neurons' weight."""
    valid = pm.valid.cpu()
    w = torch.ones(len(pm), dtype=torch.float64) if neuron_weights is None else neuron_weights.detach().double().cpu()
    w = torch.where(valid, w.abs(), torch.zeros_like(w))
    share = w / max(float(w.sum()), 1e-300)
    k = min(k, int(valid.sum()))
    ranked = torch.where(valid, w, torch.full_like(w, -1.0))
    return torch.topk(ranked, k).indices.tolist() if k > 0 else [], share


def top_pairs(
    x: Tensor,
    pm: PairMap,
    shape: tuple[int, ...] | None = None,
    *,
    neuron_weights: Tensor | None = None,
    k: int = 6,
    y: Tensor | None = None,
    title: str = "",
    index: Tensor | None = None,
    input_layer: bool = True,
) -> Image.Image:
    """The pairs of the ``k`` weightiest neurons: ``x_from -> x_to`` and ``x_to - x_from``, one neuron a row.

    A SWIM neuron's weight is ``s1 (x_to - x_from) / |x_to - x_from|^2`` in the layer's input space, so
    for a layer applied to the data itself the third panel of each row is the direction the neuron's
    weight points in (blue negative, red positive); for a deeper layer it is the difference of the two
    examples, while the weight points along the difference of their features at that layer (the caption
    says which). Each row is headed by the neuron, its share of the layer's neuron weight and the
    function-space error of its pair.

    Args:
        x: the probe set, ``[N, ...]``.
        pm: the layer's :class:`~lightning_swim.PairMap` (indices into the rows of ``x``).
        shape: the shape of one example as an image, or ``None`` (signals and tabular points).
        neuron_weights: per-neuron weights ``[M]`` (e.g. ``|w_m| |a_m|``) that rank the neurons; uniform if None.
        k: how many neurons.
        y: labels or targets of the probe rows.
        title: the figure's title.
        index: the dataset index of every probe row, shown as ``#1340``.
        input_layer: whether the layer is applied to ``x`` itself (else its pairs live in the space of
            an earlier layer's outputs, and the difference drawn is not its weight's direction).

    Returns:
        An RGB image :data:`WIDTH` pixels wide.
    """
    _check_rows(x, index, y)
    kind = _kind(x, shape)
    neurons, share = _neuron_order(pm, neuron_weights, k)
    title = title or f"The pairs of the {len(neurons)} weightiest neurons"
    direction = (
        "the direction of its weight"
        if input_layer
        else "the input difference (its weight points along the difference of their features at this layer)"
    )
    if kind == "tabular":
        note = (
            "Per neuron: its share of the layer's neuron weight and the error of its pair; rows x_from, x_to "
            f"(dataset index, class) and x_to − x_from, {direction}."
        )
    else:
        note = (
            "Per neuron: its share of the layer's neuron weight and the error of its pair; x_from → x_to "
            f"(dataset index, class), then x_to − x_from, {direction} (blue −, red +)."
        )
    parts = [_header(title, note)]
    if not neurons:
        parts.append(_text_block("No mapped neuron.", _font(13), WIDTH, _INK))
        return _framed(parts)
    lo, hi = float(x.min()), float(x.max())
    mean, std = _zscores(x)
    for m in neurons:
        i, j = int(pm.idx_from[m]), int(pm.idx_to[m])
        caption = f"neuron {m} · {100 * float(share[m]):.1f} % of the weight · error {float(pm.func_error[m]):.3f}"
        if kind == "tabular":
            flat = x.detach().double().cpu().reshape(len(x), -1)
            rows = [
                ((flat[i] - mean) / std, f"from {_point(index, y, i)}"),
                ((flat[j] - mean) / std, f"to {_point(index, y, j)}"),
                ((flat[j] - flat[i]) / std, "to − from"),
            ]
            parts.append(_pair_rows(caption, rows))
        else:
            tiles = [
                _boxed(_tile(x, i, kind, shape, lo, hi), _FROM, 2),
                _boxed(_tile(x, j, kind, shape, lo, hi), _TO, 2),
                _boxed(_difference_tile(x, i, j, kind, shape)),
            ]
            labels = [_point(index, y, i), _point(index, y, j), "to − from"]
            parts.append(_pair_panel(caption, tiles, labels))
    if kind == "tabular":
        parts.append(_z_legend())
    return _framed(parts)


def _pair_panel(caption: str, tiles: Sequence[Image.Image], labels: Sequence[str], glyphs: str = "→=") -> Image.Image:
    """A caption line, then the tiles in a row with ``glyphs`` between them and a label under each."""
    font, small = _font(13), _font(12)
    head = _text_block(caption, font, WIDTH, _INK, spacing=2)
    gap = 24
    total = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    th = max(t.height for t in tiles)
    image = Image.new("RGB", (WIDTH, th + 18), "white")
    draw = ImageDraw.Draw(image)
    left = max(_PAD, (WIDTH - total) // 2)
    for n, (tile, label) in enumerate(zip(tiles, labels, strict=True)):
        image.paste(tile, (left, (th - tile.height) // 2))
        draw.text((left + tile.width // 2, th + 2), label, fill=_INK, font=small, anchor="ma")
        if n < len(glyphs) and n < len(tiles) - 1:
            draw.text((left + tile.width + gap // 2, th // 2), glyphs[n], fill=_GREY, font=_font(16), anchor="mm")
        left += tile.width + gap
    return _stack([head, image], gap=2)


def _pair_rows(caption: str, rows: Sequence[tuple[Tensor, str]]) -> Image.Image:
    """A caption line, then labelled rows of feature cells (tabular pairs)."""
    font, small = _font(13), _font(12)
    head = _text_block(caption, font, WIDTH, _INK, spacing=2)
    left = _PAD + int(max(_length(label, small) for _, label in rows)) + 8
    row_h = 16
    image = Image.new("RGB", (WIDTH, row_h * len(rows)), "white")
    draw = ImageDraw.Draw(image)
    for n, (values, label) in enumerate(rows):
        image.paste(_cells(values.numpy(), WIDTH - left - _PAD, row_h - 2), (left, n * row_h + 1))
        draw.text((left - 6, n * row_h + row_h // 2), label, fill=_INK, font=small, anchor="rm")
    return _stack([head, image], gap=2)


def patch_pairs(
    x: Tensor,
    example_from: Tensor,
    location_from: Tensor,
    example_to: Tensor,
    location_to: Tensor,
    patch_size: int | Sequence[int],
    *,
    importance: Tensor | None = None,
    neurons: Tensor | None = None,
    k: int = 6,
    y: Tensor | None = None,
    index: Tensor | None = None,
    title: str = "",
) -> Image.Image:
    """Pairs of patches (a convolution's SWIM pairs) drawn on their examples, the patches outlined.

    A convolutional neuron (an output channel) is a dense neuron over its input's patches, so its pair
    is two patches, each of some example at some location. Each row shows the example of ``x_from``
    with its patch outlined in orange, ``->``, the example of ``x_to`` with its patch outlined in blue
    (signals: framed in orange and blue, each patch a shaded window);
    the ``k`` pairs of largest ``importance`` are shown, the largest first.

    Args:
        x: the examples, images ``[N, C, H, W]`` or signals ``[N, C, L]`` (the layer's input, or the
            network's input for a first layer).
        example_from, example_to: per pair, the row of ``x`` its patch is from, ``[P]``.
        location_from, location_to: per pair, the patch's first (top-left) position in ``x``'s
            coordinates: ``[P, 2]`` (row, column) for images, ``[P]`` or ``[P, 1]`` for signals;
            negative or overhanging positions (padding) are drawn clipped to the example.
        patch_size: the patch's extent in ``x``'s coordinates, ``(kh, kw)`` or ``kl`` (with dilation
            ``d`` a kernel of size ``k`` spans ``d (k - 1) + 1``).
        importance: per pair, what ranks them (e.g. the neuron's weight); default: the given order.
        neurons: per pair, the neuron (output channel) it belongs to, shown in the caption.
        k: how many pairs.
        y: labels of the rows of ``x``.
        index: the dataset index of every row of ``x``.
        title: the figure's title.

    Returns:
        An RGB image :data:`WIDTH` pixels wide.
    """
    if not isinstance(x, Tensor) or x.ndim not in (3, 4):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"Expected argument `x` to be images `[N, C, H, W]` or signals `[N, C, L]` but got {shape}.")
    _check_rows(x, index, y)
    spatial = x.ndim - 2
    size = (patch_size,) * spatial if isinstance(patch_size, int) else tuple(int(s) for s in patch_size)
    if len(size) != spatial or min(size) < 1:
        raise ValueError(
            f"Expected argument `patch_size` to be {spatial} positive int(s) for `x` of shape {tuple(x.shape)} "
            f"but got {patch_size!r}."
        )
    ef, et = torch.as_tensor(example_from).long().cpu(), torch.as_tensor(example_to).long().cpu()
    p = len(ef)
    locs = []
    for name, loc in (("location_from", location_from), ("location_to", location_to)):
        t = torch.as_tensor(loc).long().cpu().reshape(p, -1) if p else torch.zeros(0, spatial, dtype=torch.long)
        if t.shape != (p, spatial):
            raise ValueError(
                f"Expected argument `{name}` to hold {spatial} coordinate(s) for each of the {p} pairs but got "
                f"shape {tuple(torch.as_tensor(loc).shape)}."
            )
        locs.append(t)
    for name, per_pair in (("example_to", et), ("importance", importance), ("neurons", neurons)):
        if per_pair is not None and len(per_pair) != p:
            raise ValueError(f"Expected argument `{name}` to have one entry per pair ({p}) but got {len(per_pair)}.")
    for name, t in (("example_from", ef), ("example_to", et)):
        if p and (int(t.min()) < 0 or int(t.max()) >= len(x)):
            raise ValueError(f"Expected argument `{name}` to hold rows of x (0 to {len(x) - 1}) but got {t.tolist()}.")
    order = list(range(p))
    if importance is not None:
        order = torch.argsort(importance.detach().double().cpu(), descending=True, stable=True).tolist()
    order = order[: max(0, k)]
    title = title or f"The {len(order)} most important pairs of patches"
    if spatial == 2:
        note = (
            "Per pair: the example of x_from with its patch in orange → that of x_to with its patch in blue "
            "(dataset index, class, patch position)."
        )
    else:  # a signal's patch is a shaded window; the frames say which example is which
        note = (
            "Per pair: the signal of x_from (orange frame) → that of x_to (blue frame), each with its patch "
            "shaded (dataset index, class, patch window)."
        )
    parts = [_header(title, note)]
    lo, hi = float(x.min()), float(x.max())
    shape = tuple(x.shape[1:])
    total = float(importance.detach().double().abs().sum()) if importance is not None else 0.0
    for q in order:
        tiles, labels = [], []
        for ex, loc, colour in ((ef[q], locs[0][q], _FROM), (et[q], locs[1][q], _TO)):
            start = tuple(int(v) for v in loc)
            if spatial == 2:
                tile = _fit(_picture(x[int(ex)], shape, lo, hi), _TILE * 3 // 2)
                zoom = tile.width / x.shape[-1]
                draw = ImageDraw.Draw(tile)
                r0, c0 = start
                box = (c0 * zoom, r0 * zoom, (c0 + size[1]) * zoom - 1, (r0 + size[0]) * zoom - 1)
                draw.rectangle(_clip(box, tile.size), outline=colour, width=2)
            else:
                tile = _signal(x[int(ex)], lo, hi, size=(132, 64), window=(start[0], start[0] + size[0]))
            tiles.append(_boxed(tile) if spatial == 2 else _boxed(tile, colour, 2))
            where = f"({start[0]}, {start[1]})" if spatial == 2 else f"[{start[0]}:{start[0] + size[0]}]"
            labels.append(f"{_point(index, y, int(ex))} {where}")
        bits = [f"neuron {int(neurons[q])}"] if neurons is not None else []
        if importance is not None:
            bits.append(f"{100 * float(importance[q]) / max(total, 1e-300):.1f} % of the importance")
        parts.append(_pair_panel(" · ".join(bits) or f"pair {q}", tiles, labels, glyphs="→"))
    return _framed(parts)


def _clip(box: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """A rectangle clipped to an image (a patch over the padding is outlined where it covers the image)."""
    w, h = size
    return (max(box[0], 0), max(box[1], 0), min(max(box[2], box[0] + 1), w - 1), min(max(box[3], box[1] + 1), h - 1))


def importance_heatmap(
    importances: Sequence[Tensor],
    steps: Sequence[int],
    *,
    top: int = 25,
    title: str = "",
    index: Tensor | None = None,
    y: Tensor | None = None,
) -> Image.Image:
    """Importance over training: the ``top`` points of most importance summed over the maps x the maps.

    Rows are those points, most important first (named ``#<dataset index> (class)`` with ``index`` and
    ``y``), columns the maps by global step, colour each point's share of the layer's pair importance
    in percent (scale at the bottom).

    Args:
        importances: per map, the per-point importance ``[N]``.
        steps: per map, its global step.
        top: how many points (rows).
        title: the figure's title.
        index: the dataset index of every probe row.
        y: labels or targets of the probe rows.

    Returns:
        An RGB image :data:`WIDTH` pixels wide.
    """
    if len(importances) != len(steps) or not importances:
        raise ValueError(
            f"Expected one step per importance (at least one) but got {len(importances)} importances and "
            f"{len(steps)} steps."
        )
    mat = torch.stack([imp.detach().double().cpu() for imp in importances], 1)  # [N, maps]
    top = min(top, mat.shape[0])
    rows = torch.topk(mat.sum(1), top).indices.tolist()
    vals = 100 * mat[rows].numpy()
    lo, hi = 0.0, max(float(vals.max()), 1e-12)
    n_maps = len(steps)
    font, small = _font(12), _font(11)
    title = title or "Pair importance over training"
    note = (
        f"Rows: the {top} points with the most importance over all maps (dataset index, class), most first; "
        "columns: the maps, by global step; colour: the point's share of the layer's pair importance."
    )
    labels = [_point(index, y, r) for r in rows]
    left = _PAD + int(max(_length(t, small) for t in labels)) + 6
    heat_w = WIDTH - left - _PAD
    cell_w = max(1, heat_w // n_maps)
    heat_w = cell_w * n_maps
    cell_h = 16
    heat_h = cell_h * top
    body = Image.new("RGB", (WIDTH, heat_h + 74), "white")
    draw = ImageDraw.Draw(body)
    rgb = _cmap(vals, lo, hi, "magma_r")
    body.paste(Image.fromarray(np.ascontiguousarray(rgb.repeat(cell_h, 0).repeat(cell_w, 1))), (left, 0))
    for r, label in enumerate(labels):
        draw.text((left - 5, r * cell_h + cell_h // 2), label, fill=_INK, font=small, anchor="rm")
    stride = max(1, math.ceil(n_maps * 40 / max(heat_w, 1)))  # at most one step label per 40 pixels
    ticks = list(range(0, n_maps, stride))
    if ticks[-1] != n_maps - 1 and (n_maps - 1 - ticks[-1]) * cell_w >= 40:
        ticks.append(n_maps - 1)
    for c in ticks:
        cx = left + c * cell_w + cell_w // 2
        draw.line((cx, heat_h, cx, heat_h + 3), fill=_INK)
        draw.text((cx, heat_h + 4), str(steps[c]), fill=_INK, font=small, anchor="ma")
    draw.text((left + heat_w // 2, heat_h + 19), "global step", fill=_GREY, font=font, anchor="ma")
    bar_top, bar_w = heat_h + 42, 150
    ramp = _cmap(np.linspace(lo, hi, bar_w)[None, :].repeat(10, 0), lo, hi, "magma_r")
    body.paste(Image.fromarray(np.ascontiguousarray(ramp)), (left, bar_top))
    draw.rectangle((left - 1, bar_top - 1, left + bar_w, bar_top + 10), outline=_RULE)
    draw.text((left - 4, bar_top + 5), "0 %", fill=_GREY, font=font, anchor="rm")
    draw.text((left + bar_w + 4, bar_top + 5), f"{hi:.2f} %", fill=_GREY, font=font, anchor="lm")
    return _framed([_header(title, note), body])


def pair_arrows(
    x: Tensor,
    pm: PairMap,
    *,
    importance: Tensor | None = None,
    neuron_weights: Tensor | None = None,
    y: Tensor | None = None,
    title: str = "",
) -> Figure:
    """2-D data with each neuron's pair drawn as an arrow ``x_from -> x_to`` (opacity by neuron weight).

    A figure :data:`WIDTH` pixels wide at its 100 dpi (save it with a higher ``dpi`` for print).
    """
    pts = x.detach().double().cpu()
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"Expected argument `x` to be 2-D points of shape `[N, 2]` but got {tuple(pts.shape)}.")
    fig = Figure(figsize=(WIDTH / 100, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.tick_params(labelsize=8)
    color = None if y is None else (y.float().cpu().reshape(len(pts), -1)[:, 0].numpy())
    size = (
        4 if importance is None else 4 + 300 * importance.double().cpu().numpy() / max(float(importance.max()), 1e-12)
    )
    sc = ax.scatter(
        pts[:, 0], pts[:, 1], c=color, s=size, cmap=None if color is None else "viridis", alpha=0.6, linewidths=0
    )
    if color is not None:
        bar = fig.colorbar(sc, ax=ax, pad=0.01, fraction=0.06, aspect=30)
        bar.set_label("target", fontsize=8)
        bar.ax.tick_params(labelsize=8)
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
            width=0.006,
            headwidth=4,
            headlength=5,
        )
    ax.set_xlabel("x[0]   (point size: pair importance)", fontsize=9)
    ax.set_ylabel("x[1]", fontsize=9)
    ax.set_title(title or f"{int(ok.sum())} neurons as arrows x_from → x_to", fontsize=10, loc="left")
    return fig

"""Where a convolution's patch pairs lie in the examples: windows in the input, and a figure of them.

A convolutional layer's map indexes the ``N L`` patches of its input (pair index ``q``: example
``q // L``, location ``q % L`` row-major over the layer's output grid; see
:func:`~lightning_swim.map_network`). :func:`input_window` turns a location into the window of the
model's input that the patch sees (its receptive field, through the convolutions before it), and
:func:`top_patch_pairs` draws the pairs of a layer's weightiest neurons on their examples with the
patch outlined (images) or shaded (signals), straight into a Pillow image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from lightning_swim._modelio import ConvKind, LayerReading
from lightning_swim.pairmap import PairMap
from lightning_swim.plotting import _font, _label, _name, _to_rgb

__all__ = ["input_window", "top_patch_pairs"]

_RED, _BLUE = (220, 40, 40), (40, 90, 220)


def input_window(
    layers: Sequence[LayerReading], name: str, location: int, input_shape: Sequence[int] | None = None
) -> list[tuple[int, int]] | None:
    """The window ``[(start, stop), ...]`` (one per spatial dimension, stop exclusive, possibly outside
    the input where it is padded) of the model's input that patch ``location`` of layer ``name`` sees.

    The window is carried back through the convolutions called before it, as long as each one's
    output grid is the next one's input (activations and ``BatchNorm`` in between keep the grid);
    ``None`` where that chain breaks (a pooling or a reshape in between), the inputs were not captured,
    or the chain does not start at the model's input: one example's shape ``input_shape`` (default:
    the chain must start at the first layer called).
    """
    names = [la.name for la in layers]
    k = names.index(name)
    layer = layers[k]
    if not isinstance(layer.kind, ConvKind) or layer.input is None:
        return None
    coords: list[int] = []
    rest = location
    for g in reversed(layer.grid):
        coords.insert(0, rest % g)
        rest //= g
    window = [(c, c + 1) for c in coords]  # in the layer's output grid
    chain = [layer]
    for prev in reversed(layers[:k]):  # the convolutions feeding it, as long as their grids chain
        if not isinstance(prev.kind, ConvKind) or prev.grid != tuple(chain[-1].input.shape[2:]):  # type: ignore[union-attr]
            break
        if prev.input is None:
            return None
        chain.append(prev)
    first = chain[-1]
    assert first.input is not None
    for conv in chain:  # output window -> input window of each convolution
        m = conv.module
        pads = ConvKind._pads(m)
        window = [
            (a * s - before, (b - 1) * s - before + d * (kk - 1) + 1)
            for (a, b), s, (before, _), d, kk in zip(window, m.stride, pads, m.dilation, m.kernel_size, strict=True)
        ]
    reads_input = first is layers[0] if input_shape is None else tuple(first.input.shape[1:]) == tuple(input_shape)
    return window if reads_input else None


def top_patch_pairs(
    x: Tensor,
    pm: PairMap,
    layers: Sequence[LayerReading],
    name: str,
    *,
    neuron_weights: Tensor | None = None,
    k: int = 8,
    y: Tensor | None = None,
    title: str = "",
    index: Tensor | None = None,
) -> Image.Image:
    """The patch pairs of the ``k`` weightiest neurons of convolution ``name``, each patch on its example.

    Every pair is drawn as its two examples side by side, ``x_from`` with its window outlined in red
    and ``x_to`` in blue: on the image for 2-D inputs ``[C, H, W]`` (C in 1, 3), on the signal's
    curves for 1-D inputs ``[C, L]``. Windows come from :func:`input_window`; where they cannot be
    carried back to the input, the labels give the patch's location on the layer's grid instead.

    Args:
        x: the probe set the map was made on, ``[N, C, ...]``.
        pm: the layer's map (indices into its ``N L`` patches).
        layers: the reading's layers (with captured inputs), e.g. ``read_model(model, x[:2]).layers``.
        name: the layer.
        neuron_weights: ``[M]``; the pairs of the ``k`` largest are drawn (default: the first ``k``).
        y, index: labels and dataset indices of the probe rows, for the labels.
    """
    layer = next(la for la in layers if la.name == name)
    L = max(1, layer.locations)
    weights = torch.ones(len(pm)) if neuron_weights is None else neuron_weights.detach().float().cpu()
    weights = torch.where(pm.valid.cpu(), weights, torch.full_like(weights, -1.0))
    k = max(1, min(k, int(pm.valid.sum())))
    lo, hi = float(x.min()), float(x.max())
    tiles: list[tuple[Image.Image, str]] = []
    for m in torch.topk(weights, k).indices.tolist():
        for role, colour, q in (("from", _RED, int(pm.idx_from[m])), ("to", _BLUE, int(pm.idx_to[m]))):
            e, loc = q // L, q % L
            win = input_window(layers, name, loc, tuple(x.shape[1:])) if q >= 0 else None
            where = "" if win is not None or L == 1 else f" @{loc}"
            label = f"neuron {m}: {role}\n{_name(index, e)}{_label(y, e)}{where}"
            tiles.append((_tile(x[e], win, colour, lo, hi), label))
    return _sheet(tiles, title or f"{name}: top patch pairs (from: red, to: blue)")


def _tile(
    example: Tensor, window: list[tuple[int, int]] | None, colour: tuple[int, int, int], lo: float, hi: float
) -> Image.Image:
    ex = example.detach().float().cpu()
    if ex.ndim == 3:  # an image [C, H, W]
        h, w = ex.shape[1:]
        zoom = max(1, math.ceil(96 / max(h, w)))
        img = ex.permute(1, 2, 0).numpy() if ex.shape[0] == 3 else ex[0].numpy()
        rgb = _to_rgb(img, lo, hi, rgb=ex.shape[0] == 3)
        tile = Image.fromarray(np.ascontiguousarray(rgb.repeat(zoom, 0).repeat(zoom, 1)))
        if window is not None:
            (r0, r1), (c0, c1) = window
            box = (max(c0, 0) * zoom, max(r0, 0) * zoom, min(c1, w) * zoom - 1, min(r1, h) * zoom - 1)
            ImageDraw.Draw(tile).rectangle(box, outline=colour, width=2)
        return tile
    sig = ex.reshape(-1, ex.shape[-1]).numpy()  # a signal [C, L]: one curve per channel
    length, width, height = sig.shape[1], 180, 72
    tile = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(tile)

    def px(t: float) -> float:
        return 4 + (width - 8) * t / max(length - 1, 1)

    if window is not None:
        (a, b) = window[0]
        shade = (px(max(a, 0) - 0.5), 0.0, px(min(b, length) - 0.5), height - 1.0)
        draw.rectangle(shade, fill=tuple(255 - (255 - v) // 6 for v in colour), outline=colour)
    span = max(hi - lo, 1e-12)
    for c in sig:
        pts = [(px(t), height - 4 - (height - 8) * (v - lo) / span) for t, v in enumerate(c)]
        draw.line(pts, fill=(30, 30, 30), width=1)
    return tile


def _sheet(tiles: list[tuple[Image.Image, str]], title: str, cols: int = 4) -> Image.Image:
    font, title_font = _font(11), _font(14)
    tw = max(t.width for t, _ in tiles)
    th = max(t.height for t, _ in tiles)
    label_h, pad = 30, 6
    cell_w, cell_h = tw + 2 * pad, th + label_h + pad
    rows = math.ceil(len(tiles) / cols)
    width = max(cols * cell_w + (cols // 2) * 2 * pad, 8 * len(title))
    image = Image.new("RGB", (width, 28 + rows * cell_h), "white")
    draw = ImageDraw.Draw(image)
    draw.text((width // 2, 8), title, fill="black", font=title_font, anchor="ma")
    for n, (tile, label) in enumerate(tiles):
        r, c = divmod(n, cols)
        left = c * cell_w + (c // 2) * 2 * pad + pad
        top = 28 + r * cell_h + label_h
        image.paste(tile, (left, top))
        draw.rectangle((left - 1, top - 1, left + tile.width, top + tile.height), outline=(190, 190, 190))
        draw.multiline_text((left + tw // 2, top - 3), label, fill="black", font=font, anchor="md", align="center")
    return image

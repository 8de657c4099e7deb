"""Where a convolution's patch pairs lie in the examples: windows in the input, and a figure of them.

A convolutional layer's map indexes the ``N L`` patches of its input (pair index ``q``: example
``q // L``, location ``q % L`` row-major over the layer's output grid; see
:func:`~lightning_swim.map_network`). :func:`input_window` turns a location into the window of the
model's input that the patch sees (its receptive field, through the convolutions before it), and
:func:`top_patch_pairs` draws the pairs of a layer's weightiest neurons on their examples with the
patch outlined (images) or shaded (signals), through :func:`lightning_swim.plotting.patch_pairs`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from lightning_swim._modelio import ConvKind, LayerReading
from lightning_swim.pairmap import PairMap

__all__ = ["input_window", "top_patch_pairs"]


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


def _as_convolution_input(x: Tensor, layers: Sequence[LayerReading], name: str) -> Tensor:
    """``x`` viewed as the input of the convolutions that lead to layer ``name`` when the model reshapes its
    examples before them (flat ``[N, 64]`` digits and an ``nn.Unflatten(1, (1, 8, 8))``): ``[N, C, ...]``.

    The view is taken only where the first convolution of the chain reads exactly the probe's values (its
    captured input on the first rows of ``x`` equals them); otherwise ``x`` is returned as it is.
    """
    k = [la.name for la in layers].index(name)
    first = layers[k]
    for prev in reversed(layers[:k]):  # the chain of convolutions, as in input_window
        if first.input is None or not isinstance(prev.kind, ConvKind) or prev.grid != tuple(first.input.shape[2:]):
            break
        first = prev
    inp = first.input
    if not isinstance(first.kind, ConvKind) or inp is None or tuple(inp.shape[1:]) == tuple(x.shape[1:]):
        return x
    rows = x[: len(inp)].reshape(len(inp), -1)
    if rows.shape != inp.reshape(len(inp), -1).shape or not torch.equal(rows.to(inp), inp.reshape(len(inp), -1)):
        return x
    return x.reshape(len(x), *inp.shape[1:])


def top_patch_pairs(
    x: Tensor,
    pm: PairMap,
    layers: Sequence[LayerReading],
    name: str,
    *,
    neuron_weights: Tensor | None = None,
    k: int = 6,
    y: Tensor | None = None,
    title: str = "",
    index: Tensor | None = None,
) -> Image.Image:
    """The patch pairs of the ``k`` weightiest neurons of convolution ``name``, each patch on its example.

    Every pair is drawn by :func:`~lightning_swim.plotting.patch_pairs`: its two examples side by side,
    the window of the input that each patch sees outlined (images ``[C, H, W]``) or shaded (signals
    ``[C, L]``). Windows come from :func:`input_window`; where they cannot be carried back to the
    input (a pooling or a reshape before the layer), the whole examples are outlined and the title
    says so.

    Args:
        x: the probe set the map was made on, ``[N, C, ...]``.
        pm: the layer's map (indices into its ``N L`` patches).
        layers: the reading's layers (with captured inputs), e.g. ``read_model(model, x[:2]).layers``.
        name: the layer.
        neuron_weights: ``[M]``; the pairs of the ``k`` largest are drawn (default: the first ``k``).
        y, index: labels and dataset indices of the probe rows, for the labels.
    """
    from lightning_swim import plotting

    x = _as_convolution_input(x, layers, name)
    layer = next(la for la in layers if la.name == name)
    L = max(1, layer.locations)
    spatial = x.ndim - 2
    weights = torch.ones(len(pm)) if neuron_weights is None else neuron_weights.detach().float().cpu().abs()
    neurons = torch.nonzero(pm.valid.cpu() & (pm.idx_from.cpu() >= 0)).ravel()
    title = title or f"{name}: the top patch pairs"
    examples: list[list[int]] = [[], []]
    starts: list[list[list[int]]] = [[], []]
    size: list[int] | None = None
    traced = True
    for m in neurons.tolist():
        for side, q in enumerate((int(pm.idx_from[m]), int(pm.idx_to[m]))):
            examples[side].append(q // L)
            win = input_window(layers, name, q % L, tuple(x.shape[1:]))
            if win is None:
                traced = False
                win = [(0, int(s)) for s in x.shape[2:]]
            starts[side].append([a for a, _ in win])
            size = [b - a for a, b in win]
    if not traced:  # one window per layer fails or none: draw whole examples
        starts = [[[0] * spatial for _ in s] for s in starts]
        size = [int(s) for s in x.shape[2:]]
        title += " (windows not traceable to the input: whole examples)"
    return plotting.patch_pairs(
        x,
        torch.tensor(examples[0], dtype=torch.long),
        torch.tensor(starts[0], dtype=torch.long).reshape(-1, spatial),
        torch.tensor(examples[1], dtype=torch.long),
        torch.tensor(starts[1], dtype=torch.long).reshape(-1, spatial),
        size or [1] * spatial,
        importance=weights[neurons],
        neurons=neurons,
        k=k,
        y=y,
        index=index,
        title=title,
    )

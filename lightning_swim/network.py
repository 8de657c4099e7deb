"""Whole networks: map every dense layer in its own input space, and rebuild a network from its pairs."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_swim._checks import check_choice, check_probe
from lightning_swim._modelio import (
    ActivationSpec,
    LinearLayer,
    capture_inputs,
    capture_outputs,
    linear_layers,
    preserved,
    require_activation,
)
from lightning_swim._solve import ridge_lstsq
from lightning_swim.activations import get_activation
from lightning_swim.pairmap import PairMap, map_layer
from lightning_swim.sampling import swim_neurons

__all__ = ["OUTPUT_MODES", "convert_network", "map_network", "mapped_layers"]

OUTPUT_MODES = ("keep", "refit")


def mapped_layers(
    model: nn.Module,
    x: Tensor,
    *,
    layers: list[str] | None = None,
    activations: ActivationSpec = None,
) -> list[LinearLayer]:
    """The dense layers a map covers, in call order: every one but the output layer, or ``layers``."""
    found = linear_layers(model, x[: min(len(x), 8)], activations)
    if layers is None:
        return found[:-1]
    known = {layer.name: layer for layer in found}
    unknown = sorted(set(layers) - set(known))
    if unknown:
        raise ValueError(
            f"`layers` names {unknown}, which are not nn.Linear layers called by forward: {sorted(known)}."
        )
    return [layer for layer in found if layer.name in layers]


def map_network(
    model: nn.Module,
    x: Tensor,
    *,
    layers: list[str] | None = None,
    activations: ActivationSpec = None,
    batch_size: int | None = None,
    dtype: torch.dtype | None = None,
    **map_kwargs: Any,
) -> dict[str, PairMap]:
    """Map every hidden ``nn.Linear`` of ``model`` to data pairs, each in its own input space.

    The inputs of every mapped layer on the probe set ``x`` are captured with forward pre-hooks in
    one forward pass (eval mode, no grad; hooks removed and modes restored afterwards), then each
    layer is mapped with :func:`~lightning_swim.map_layer`.

    Args:
        model: a module whose forward takes ``x``.
        x: the probe set, ``[N, ...]``; pair indices refer to its rows.
        layers: names of the layers to map; default every ``nn.Linear`` but the last one called.
        activations: overrides activation detection (one for all, or by layer name).
        batch_size: forward the probe set in batches of this size.
        dtype: compute the maps in this dtype (e.g. ``torch.float64``); default the model's.
        **map_kwargs: passed to :func:`~lightning_swim.map_layer` (``top_k``, ``refine``, ``backend``, ...).

    Returns:
        Layer name -> :class:`~lightning_swim.PairMap`, in call order.
    """
    x = check_probe(x)
    chosen = mapped_layers(model, x, layers=layers, activations=activations)
    acts = {layer.name: require_activation(layer) for layer in chosen}
    inputs = capture_inputs(model, x, [layer.name for layer in chosen], batch_size=batch_size)
    maps: dict[str, PairMap] = {}
    for layer in chosen:
        h = inputs[layer.name] if dtype is None else inputs[layer.name].to(dtype)
        try:
            maps[layer.name] = map_layer(
                layer.module.weight,
                layer.module.bias if layer.module.bias is not None else torch.zeros_like(layer.module.weight[:, 0]),
                h,
                activation=acts[layer.name],
                **map_kwargs,
            )
        except (ValueError, TypeError) as err:
            raise type(err)(f"Layer {layer.name!r}: {err}") from err
    return maps


def convert_network(
    model: nn.Module,
    maps: Mapping[str, PairMap],
    x: Tensor,
    *,
    output: str = "keep",
    ridge: float = 1e-8,
    batch_size: int | None = None,
) -> nn.Module:
    """A copy of ``model`` whose mapped layers hold the SWIM neurons of their pairs.

    Layers are rebuilt in call order, each from its pairs in the input space of the *rebuilt* layers
    before it; a homogeneous neuron is multiplied by its ``scale``. Neurons a map flags (index -1),
    and pairs that coincide in the rebuilt input space, keep their original weights (one warning
    counts the latter).

    Args:
        model: the original network (left untouched).
        maps: layer name -> :class:`~lightning_swim.PairMap`, as from :func:`map_network` on ``x``.
        x: the probe set the maps were computed on, ``[N, ...]``.
        output: ``"keep"`` the trained output layer, or ``"refit"`` it by ridge least squares to the
            original output layer's outputs on ``x``.
        ridge: relative ridge regularisation of the refit.
        batch_size: forward the probe set in batches of this size.

    Returns:
        The rebuilt network (a deep copy), in the mode of ``model``.
    """
    x = check_probe(x)
    check_choice(output, "output", OUTPUT_MODES)
    rebuilt = copy.deepcopy(model)
    layers = {layer.name: layer for layer in linear_layers(rebuilt, x[: min(len(x), 8)])}
    order = list(layers)
    unknown = sorted(set(maps) - set(order))
    if unknown:
        raise ValueError(f"`maps` names {unknown}, which are not nn.Linear layers called by forward: {order}.")
    n_kept = 0
    with preserved(rebuilt):
        for name in [n for n in order if n in maps]:
            layer, pm = layers[name], maps[name]
            if len(pm) != layer.module.out_features:
                raise ValueError(
                    f"The map of layer {name!r} has {len(pm)} neurons but the layer has {layer.module.out_features}."
                )
            if bool((pm.idx_from >= len(x)).any() | (pm.idx_to >= len(x)).any()):
                raise ValueError(f"The map of layer {name!r} indexes points beyond the {len(x)} rows of `x`.")
            if layer.module.bias is None:
                raise ValueError(f"Layer {name!r} has no bias; its SWIM neurons cannot be written into it.")
            act = get_activation(pm.activation)
            h = capture_inputs(rebuilt, x, [name], batch_size=batch_size)[name]
            ok = pm.valid.to(h.device)
            i, j = pm.idx_from.to(h.device)[ok], pm.idx_to.to(h.device)[ok]
            apart = (h[i] != h[j]).any(1)
            n_kept += int((~apart).sum())
            rows = torch.nonzero(ok).ravel()[apart]
            w, b = swim_neurons(h[i[apart]], h[j[apart]], act)
            if act.homogeneous:
                s = pm.scale.to(h)[rows]
                w, b = w * s[:, None], b * s
            layer.module.weight[rows] = w
            layer.module.bias[rows] = b
        if output == "refit":
            out_name = order[-1]
            target = capture_outputs(model, x, out_name, batch_size=batch_size)
            h = capture_inputs(rebuilt, x, [out_name], batch_size=batch_size)[out_name]
            w, b = ridge_lstsq(h, target.to(h), ridge)
            layers[out_name].module.weight.copy_(w)
            if layers[out_name].module.bias is not None:
                layers[out_name].module.bias.copy_(b)
            else:
                raise ValueError(f"Output layer {out_name!r} has no bias; use output='keep'.")
    if n_kept:
        warnings.warn(
            f"{n_kept} neuron(s) have pairs whose points coincide in the rebuilt network's input space; they keep "
            "their original weights.",
            RuntimeWarning,
            stacklevel=2,
        )
    return rebuilt

"""Whole networks: map every dense layer in its own input space, and rebuild a network from its pairs.

Both run on one :class:`~lightning_swim._modelio.ModelReading` of the model: :func:`map_reading` maps
the layers a reading found, :func:`rebuild` evaluates the network rebuilt from pairs with forward
hooks (one forward pass, no copy of the model), and :func:`map_network` / :func:`convert_network` are
the public functions built on them.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_swim._checks import check_choice, check_pairmap, check_positive_int, check_probe
from lightning_swim._modelio import (
    ActivationSpec,
    LayerReading,
    ModelReading,
    Replacement,
    compute_dtype,
    read_model,
)
from lightning_swim._solve import ridge_lstsq
from lightning_swim.activations import Activation, get_activation
from lightning_swim.metrics import outputs_fidelity
from lightning_swim.pairmap import PairMap, map_layer, random_map
from lightning_swim.sampling import swim_neurons

__all__ = [
    "DEFAULT_PATCHES",
    "OUTPUT_MODES",
    "Rebuilt",
    "convert_network",
    "in_points",
    "map_network",
    "map_reading",
    "mapped_layers",
    "random_maps",
    "rebuild",
]

OUTPUT_MODES = ("keep", "refit")


def mapped_layers(
    model: nn.Module,
    x: Tensor,
    *,
    layers: list[str] | None = None,
    activations: ActivationSpec = None,
) -> list[LayerReading]:
    """The dense layers a map covers, in call order: every mappable hidden one, or ``layers``."""
    reading = read_model(model, x[: min(len(x), 8)], activations=activations, capture=False)
    return reading.select(layers)


DEFAULT_PATCHES = 4096
"""Patches per convolutional layer that a map draws from the probe's ``N L`` patches by default."""


def in_points(pm: PairMap, index: Tensor | None) -> PairMap:
    """A map of a subsample of a layer's points re-indexed into all of them: entry ``k`` becomes ``index[k]``.

    Args:
        pm: a map whose indices refer to the rows of ``points[index]``.
        index: ``[n]`` indices of the subsample among the layer's points (``None``: ``pm`` itself).
    """
    if index is None:
        return pm
    index = index.to(pm.idx_from.device)

    def lift(t: Tensor | None) -> Tensor:
        assert t is not None
        return torch.where(t >= 0, index[t.clamp_min(0)], t)

    return dataclasses.replace(
        pm, idx_from=lift(pm.idx_from), idx_to=lift(pm.idx_to), soft_from=lift(pm.soft_from), soft_to=lift(pm.soft_to)
    )


def map_reading(
    reading: ModelReading,
    layers: Sequence[LayerReading],
    *,
    dtype: torch.dtype | None = None,
    patches: int = DEFAULT_PATCHES,
    seed: int = 0,
    **map_kwargs: Any,
) -> dict[str, PairMap]:
    """Map ``layers`` of a reading with :func:`~lightning_swim.map_layer`, each on its captured inputs.

    A convolution is mapped on ``patches`` of its ``N L`` input patches (:meth:`ModelReading.sample`,
    seeded by ``seed``); its map indexes all of them (example ``q // L``, location ``q % L``).

    Args:
        reading: a reading of the model on the probe set.
        layers: the layers to map (e.g. ``reading.select()``).
        dtype: compute in this dtype; default the model's (float32 for half precision models).
        patches: the patches a convolutional layer is mapped on (all of them if it has fewer).
        seed: of the patch subsample.
        **map_kwargs: passed to :func:`~lightning_swim.map_layer`.

    Returns:
        Layer name -> :class:`~lightning_swim.PairMap`, in call order.
    """
    check_positive_int(patches, "patches", minimum=2)
    maps: dict[str, PairMap] = {}
    for layer in layers:
        index = reading.sample(layer.name, patches, seed)
        h = reading.points(layer.name, dtype, index)
        w, b = layer.parameters()
        assert layer.activation is not None
        try:
            pm = map_layer(w.to(h), b.to(h), h, activation=layer.activation, **map_kwargs)
        except (ValueError, TypeError) as err:
            raise type(err)(f"Layer {layer.name!r}: {err}") from err
        maps[layer.name] = in_points(pm, index)
    return maps


def map_network(
    model: nn.Module,
    x: Tensor,
    *,
    layers: list[str] | None = None,
    activations: ActivationSpec = None,
    batch_size: int | None = None,
    dtype: torch.dtype | None = None,
    patches: int = DEFAULT_PATCHES,
    seed: int = 0,
    **map_kwargs: Any,
) -> dict[str, PairMap]:
    """Map every hidden ``nn.Linear`` and convolution of ``model`` to data pairs, each in its own input space.

    The model is read once on the probe set ``x`` (:func:`~lightning_swim._modelio.read_model`: one
    forward pass in eval mode, no grad, forked RNG; hooks removed and modes restored afterwards),
    which captures every layer's input and finds the activation after it; an eval-mode
    ``BatchNorm`` between a layer and its activation is folded into the layer. Each mappable layer is
    then mapped with :func:`~lightning_swim.map_layer`. Hidden layers that cannot be mapped (a
    ``LayerNorm`` before the activation, an activation SWIM does not know, no activation, shared
    weights) are skipped with one warning that names them and says why.

    A convolution (``nn.Conv1d``, ``nn.Conv2d``, ``groups=1``) is a dense layer over the patches of its
    input: its pairs are pairs of patches, searched among ``patches`` of the probe's ``N L`` patches
    (``L`` locations per example) drawn with a fixed generator (``seed``), and its map's indices
    refer to all of them: pair index ``q`` is patch ``q % L`` (row-major over the output's spatial
    grid) of example ``q // L``.

    Args:
        model: a module whose forward takes ``x``.
        x: the probe set, ``[N, ...]``; pair indices refer to its rows.
        layers: names of the layers to map (each must be mappable); default every mappable
            ``nn.Linear`` but the last one called.
        activations: overrides activation detection (one for all, or by layer name).
        batch_size: forward the probe set in batches of this size.
        dtype: compute the maps in this dtype (e.g. ``torch.float64``); default the model's
            (float32 for a half-precision model).
        patches: the patches a convolutional layer is mapped on (all of them if it has fewer).
        seed: of the patch subsample.
        **map_kwargs: passed to :func:`~lightning_swim.map_layer` (``top_k``, ``refine``, ``backend``, ...).

    Returns:
        Layer name -> :class:`~lightning_swim.PairMap`, in call order.

    Raises:
        ValueError: if no layer can be mapped (the message says why for each), or ``layers`` names
            one that cannot.
    """
    x = check_probe(x)
    reading = read_model(model, x, activations=activations, batch_size=batch_size)
    chosen = reading.select(layers)
    if not chosen:
        if not reading.hidden:
            raise ValueError("The model has no hidden nn.Linear layer to map (only an output layer).")
        raise ValueError(f"No layer of {type(model).__name__} can be mapped: {reading.note()}")
    if layers is None and (note := reading.note()) is not None:
        warnings.warn(note, UserWarning, stacklevel=2)
    return map_reading(reading, chosen, dtype=dtype, patches=patches, seed=seed, **map_kwargs)


def random_maps(
    reading: ModelReading,
    layers: Sequence[LayerReading],
    *,
    dtype: torch.dtype | None = None,
    patches: int = DEFAULT_PATCHES,
    seed: int = 0,
) -> dict[str, PairMap]:
    """The reference maps of :func:`map_reading`: every neuron on a uniformly random pair of the same points.

    Each layer gets :func:`~lightning_swim.pairmap.random_map` on the points :func:`map_reading` uses (a
    convolution: the same ``patches`` drawn with the same ``seed``), each pair with its best scale, so
    that a network rebuilt from them (:func:`convert_network`) is the baseline of the mapped pairs'.
    """
    check_positive_int(patches, "patches", minimum=2)
    maps: dict[str, PairMap] = {}
    for k, layer in enumerate(layers):
        index = reading.sample(layer.name, patches, seed)
        h = reading.points(layer.name, dtype, index)
        w, b = layer.parameters()
        assert layer.activation is not None
        generator = torch.Generator().manual_seed(seed + 7919 * k)
        pm = random_map(w.to(h), b.to(h), h, activation=layer.activation, generator=generator)
        maps[layer.name] = in_points(pm, index)
    return maps


@dataclass
class Rebuilt:
    """A network rebuilt from its pairs, evaluated on the probe set of a reading.

    Attributes:
        replacements: layer name -> the new neurons (folded frame), as :meth:`ModelReading.write` takes them.
        output: the rebuilt network's output on the probe set (``None`` if not asked for).
        coincident: neurons whose pair's points coincide in the rebuilt input space (kept as they were).
        notes: layers that were mapped but not rebuilt, with the reason.
    """

    replacements: dict[str, Replacement]
    output: Tensor | None
    coincident: int = 0
    notes: dict[str, str] = field(default_factory=dict)


def _activation_of(layer: LayerReading, pm: PairMap) -> Activation:
    """The map's activation; the reading's where it is the same one (it keeps a leaky slope or softplus beta)."""
    if layer.activation is not None and layer.activation.name == pm.activation:
        return layer.activation
    return get_activation(pm.activation)


def _check_map(reading: ModelReading, name: str, pm: PairMap) -> LayerReading:
    layer = reading.layer(name)
    w, _ = layer.parameters()
    if len(pm) != w.shape[0]:
        raise ValueError(f"The map of layer {name!r} has {len(pm)} neurons but the layer has {w.shape[0]}.")
    check_pairmap(pm, reading.n_points(name), name=f"maps[{name!r}]")
    return layer


def rebuild(
    reading: ModelReading,
    maps: Mapping[str, PairMap],
    *,
    output: str = "keep",
    ridge: float = 1e-8,
    batch_size: int | None = None,
    keep_output: bool = True,
    writable_in: nn.Module | None = None,
) -> Rebuilt:
    """The network of a reading with the layers of ``maps`` rebuilt from their pairs, on its probe set.

    Layers are rebuilt in call order, each from its pairs in the input space of the *rebuilt* layers
    before it: the SWIM neurons of the pair points (a homogeneous neuron multiplied by its
    ``scale``) replace the layer's neurons in its folded frame. Neurons a map flags (index -1), and
    pairs whose points coincide in the rebuilt input space, keep their weights. A layer with no bias
    (and no folded ``BatchNorm`` ``beta``) is mapped but not rebuilt: it keeps its weights, and
    ``notes`` says so. With ``output="refit"`` the output layer is solved by ridge least squares to
    the original output layer's outputs on the probe set.

    One forward pass (:data:`~lightning_swim._modelio.PASSES_PER_REBUILD`) with forward hooks; the
    model itself is neither changed nor copied.

    Args:
        reading: a reading of the model on the probe set the maps were computed on.
        maps: layer name -> :class:`~lightning_swim.PairMap`.
        output: ``"keep"`` the output layer, or ``"refit"`` it.
        ridge: relative ridge regularisation of the refit.
        batch_size: forward in batches of this size (then one pass per rebuilt layer, plus one).
        keep_output: also return the rebuilt network's output.
        writable_in: leave out (with a note) layers whose parameters cannot be written into this
            model (the model read, or a copy of it; e.g. behind ``spectral_norm``), so that the
            result can be written into it.

    Raises:
        ValueError: for a map that does not fit its layer, a refit of an output layer without a
            bias, or (``writable_in``) an output layer that cannot be written.
    """
    check_choice(output, "output", OUTPUT_MODES)
    unknown = sorted(set(maps) - {layer.name for layer in reading.layers})
    if unknown:
        raise ValueError(
            f"`maps` names {unknown}, which are not nn.Linear layers called by forward: "
            f"{[la.name for la in reading.layers]}."
        )
    notes: dict[str, str] = {}
    derive: dict[str, Any] = {}
    coincident = [0]
    for layer in reading.layers:
        if layer.name not in maps:
            continue
        pm = maps[layer.name]
        _check_map(reading, layer.name, pm)
        if not layer.has_bias:
            notes[layer.name] = "it has no bias, and a SWIM neuron needs one: it keeps its weights"
            continue
        if writable_in is not None and (why := reading.unwritable(layer, writable_in)) is not None:
            notes[layer.name] = f"its parameters cannot be written ({why}): it keeps its weights"
            continue
        derive[layer.name] = _from_pairs(layer, pm, _activation_of(layer, pm), coincident)
    if output == "refit":
        out_layer = reading.output_layer
        if (why := out_layer.kind.problem(out_layer.module)) is not None:
            raise ValueError(f"Output layer {out_layer.name!r} cannot be refitted: {why}; use output='keep'.")
        if not out_layer.has_bias:
            raise ValueError(f"Output layer {out_layer.name!r} has no bias; use output='keep'.")
        if writable_in is not None and (why := reading.unwritable(out_layer, writable_in)) is not None:
            raise ValueError(f"Output layer {out_layer.name!r} cannot be refitted: {why}; use output='keep'.")
        if out_layer.output is None:
            raise ValueError(f"The outputs of the output layer {out_layer.name!r} were not captured.")
        derive[out_layer.name] = _refit(out_layer, ridge)
    replacements, out = reading.run(derive, batch_size=batch_size, keep_output=keep_output)
    return Rebuilt(replacements, out, coincident[0], notes)


def _from_pairs(layer: LayerReading, pm: PairMap, act: Activation, coincident: list[int]) -> Any:
    def derive(h: Tensor) -> Replacement | None:
        h = h.to(compute_dtype(h.dtype))
        ok = pm.valid.to(h.device)
        i, j = pm.idx_from.to(h.device)[ok], pm.idx_to.to(h.device)[ok]
        apart = (h[i] != h[j]).any(1)
        coincident[0] += int((~apart).sum())
        rows = torch.zeros_like(ok)
        rows[torch.nonzero(ok).ravel()[apart]] = True
        if not bool(rows.any()):
            return None
        w, b = swim_neurons(h[i[apart]], h[j[apart]], act)
        if act.homogeneous:
            s = pm.scale.to(h)[rows]
            w, b = w * s[:, None], b * s
        return Replacement(w, b, rows)

    return derive


def _refit(layer: LayerReading, ridge: float) -> Any:
    assert layer.output is not None
    target = layer.kind.by_neuron(layer.output.to(compute_dtype(layer.output.dtype)))
    if layer.fold is not None:  # the folded layer's outputs
        target = target * layer.fold.scale.to(target) + layer.fold.shift.to(target)

    def derive(h: Tensor) -> Replacement:
        h = h.to(compute_dtype(h.dtype))
        w, b = ridge_lstsq(h, target.to(h), ridge)
        return Replacement(w, b, torch.ones(w.shape[0], dtype=torch.bool, device=w.device))

    return derive


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
    before it (:func:`rebuild`); a homogeneous neuron is multiplied by its ``scale``. Neurons a map
    flags (index -1), and pairs that coincide in the rebuilt input space, keep their original weights
    (one warning counts the latter). The new weights are written through an eval-mode ``BatchNorm``
    folded into a layer and through ``weight_norm``; a layer that cannot hold them (no bias,
    ``spectral_norm``) keeps its weights, with a warning.

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
    reading = read_model(model, x, batch_size=batch_size)
    rebuilt = copy.deepcopy(model)  # the contract: a new model (the maps and fidelity never copy one)
    result = rebuild(
        reading, maps, output=output, ridge=ridge, batch_size=batch_size, keep_output=False, writable_in=rebuilt
    )
    reading.write(result.replacements, rebuilt)
    if result.notes:
        items = "; ".join(f"{name!r}: {why}" for name, why in result.notes.items())
        warnings.warn(f"Layers mapped but not rebuilt ({items}).", UserWarning, stacklevel=2)
    if result.coincident:
        warnings.warn(
            f"{result.coincident} neuron(s) have pairs whose points coincide in the rebuilt network's input space; "
            "they keep their original weights.",
            RuntimeWarning,
            stacklevel=2,
        )
    return rebuilt


def output_fidelity(original: Tensor, rebuilt: Tensor, *, task: str = "classification") -> float:
    """Prediction agreement (classification) or output R² (regression) of two networks' outputs.

    The same numbers as :func:`~lightning_swim.fidelity`, from outputs already computed (e.g.
    ``reading.output`` and ``rebuild(reading, maps).output``).
    """
    return outputs_fidelity(original, rebuilt, task)

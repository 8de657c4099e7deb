"""One map of a whole network and the numbers that describe it: the core the monitor callback calls.

:func:`analyse_network` maps every hidden dense layer (:func:`~lightning_swim.map_layer` in the
layer's own input space), computes per-point pair importance (soft by default), compares with the
previous map (turnover up to near-ties, Jensen-Shannon divergence, top-k overlap), optionally
transports each layer onto SWIM's distribution (:func:`~lightning_swim.transport_map`), and measures
how faithfully the pairs rebuild the network (:func:`~lightning_swim.network.rebuild`), each number
next to its reference: the same network rebuilt from random pairs, and the agreement of a constant
predictor. Tensors in, a :class:`~lightning_swim.history.MapRecord` out, no Lightning, no logging.

The model is read once per map (:func:`~lightning_swim._modelio.read_model`): the map, the turnover,
the transport and every rebuilt network work from that reading, and a rebuilt network is evaluated by
forward hooks in one forward pass, never by a copy of the model. A map costs
:func:`forward_passes` forward passes of the model on the probe set.

The pair search, the bulk of a map's time, can be shared among processes (DDP ranks). Its units of
work are whole layers, or blocks of ``neuron_block`` neurons of a layer (:class:`AnalysisConfig`);
:func:`map_shard` maps the units of one rank (``shard=(rank, world)``, dealt out by
:func:`shard_blocks`), :func:`merge_shards` puts the ranks' units back together, and
:func:`analyse_network` takes the merged maps (``maps=``) for the rest. A unit is mapped by the
same call whatever the number of ranks (one process maps the same units one after the other), so a
shared map is bit-identical to the map made in one process with the same ``neuron_block``. The
distributed calls themselves are the callback's
(:class:`~lightning_swim.callbacks.PairImportanceMonitor`).
"""

from __future__ import annotations

import fnmatch
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_swim._checks import check_choice, check_positive_finite, check_positive_int
from lightning_swim._modelio import (
    PASSES_PER_READING,
    PASSES_PER_REBUILD,
    ActivationSpec,
    LayerReading,
    ModelReading,
    OutputKey,
    read_model,
)
from lightning_swim._search import BACKENDS
from lightning_swim.history import MapRecord
from lightning_swim.importance import (
    contribution_weights,
    cross_class_share,
    effective_points,
    entropy,
    js_divergence,
    pair_importance,
    random_pairs_like,
    topk_overlap,
    turnover,
)
from lightning_swim.network import DEFAULT_PATCHES, in_points, output_fidelity, rebuild
from lightning_swim.pairmap import AUTO_EXACT_WORK, REFINE, PairMap, map_layer, pair_errors, random_map
from lightning_swim.transport import transport_map

__all__ = [
    "IMPORTANCE",
    "NEURON_WEIGHTS",
    "AnalysisConfig",
    "MapShard",
    "analyse_network",
    "forward_passes",
    "map_shard",
    "merge_shards",
    "neuron_weights_of",
    "shard_blocks",
    "warm_up",
]

NEURON_WEIGHTS = ("contribution", "uniform")
IMPORTANCE = ("soft", "argmin")
_FLAG_WARNINGS = r".*(neurons cannot be explained by a pair|neurons have zero or non-finite weights).*"  # counted
UNIT_OVERHEAD = 48
"""The cost of one call of :func:`~lightning_swim.map_layer`, in neurons, beyond its neurons' own: its
neuron-independent work (the Gram matrix, the pre-activations of every pair on every point in the exact
search; measured about 50 neurons' worth at N = 256 on a CPU). Used to deal units out evenly."""
WARM_UP_POINTS = 16
"""Probe rows of :func:`warm_up`: enough for live neurons, too few to cost anything but the compilations."""


@dataclass(frozen=True)
class AnalysisConfig:
    """What one analysis computes (see :class:`~lightning_swim.callbacks.PairImportanceMonitor`).

    ``neuron_block``: map each layer in blocks of this many neurons (one call of
    :func:`~lightning_swim.map_layer` each) rather than whole (None, the default). Blocks are finer units
    to share among ranks (:func:`map_shard`) when a network has fewer wide layers than ranks; a
    floating-point reduction may depend on the neurons of its call, so maps made with different
    ``neuron_block`` may differ in their last bits (and, at an exact near-tie, in a pair), while those made
    with the same ``neuron_block`` are identical on any number of ranks. Each block repeats the
    neuron-independent work of its layer's search (about :data:`UNIT_OVERHEAD` neurons' worth).
    """

    layers: tuple[str, ...] | None = None
    activations: ActivationSpec = None
    top_k: int = 128
    refine: str = "auto"
    local_search: int = 0
    backend: str = "auto"
    atol: float = 0.01
    rtol: float = 0.0
    temperature: float | None = None
    importance: str = "soft"
    neuron_weights: str = "contribution"
    topk_points: int = 16
    fidelity: bool = True
    task: str | None = None
    transport: bool = False
    n_candidates: int = 1024
    blur: float = 0.1
    reach: float | None = None
    seed: int = 0
    dtype: torch.dtype | None = None
    output_key: OutputKey = None
    patches: int = DEFAULT_PATCHES
    neuron_block: int | None = None

    def __post_init__(self) -> None:
        check_positive_int(self.top_k, "top_k")
        check_positive_int(self.patches, "patches", minimum=2)
        check_choice(self.refine, "refine", REFINE)
        check_positive_int(self.local_search, "local_search", minimum=0)
        check_choice(self.backend, "backend", BACKENDS)
        check_choice(self.importance, "importance", IMPORTANCE)
        check_choice(self.neuron_weights, "neuron_weights", NEURON_WEIGHTS)
        check_positive_int(self.topk_points, "topk_points")
        if self.task is not None:
            check_choice(self.task, "task", ("classification", "regression"))
        check_positive_int(self.n_candidates, "n_candidates")
        check_positive_int(self.neuron_block, "neuron_block", allow_none=True)
        check_positive_finite(self.blur, "blur")
        check_positive_finite(self.reach, "reach", allow_none=True, hint=" (None: balanced transport)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"Expected argument `seed` to be an int but got {self.seed!r}.")
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ValueError(f"Expected argument `dtype` to be a floating torch.dtype but got {self.dtype!r}.")
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"Expected argument `{name}` to be a finite number >= 0 but got {value!r}.")
        if self.temperature is not None and not (
            isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise ValueError(
                f"Expected argument `temperature` to be None or a number > 0 but got {self.temperature!r}."
            )

    def map_options(self) -> dict[str, Any]:
        """The options of :func:`~lightning_swim.map_layer` (the same defaults as there)."""
        return {
            "top_k": self.top_k,
            "refine": self.refine,
            "local_search": self.local_search,
            "backend": self.backend,
            "atol": self.atol,
            "rtol": self.rtol,
            "temperature": self.temperature,
        }


def neuron_weights_of(layers: list[LayerReading], name: str, kind: str) -> Tensor | None:
    """The weights :math:`\\omega` of layer ``name``'s neurons: None (uniform) or their contributions.

    The contribution uses the next layer in call order that reads this layer's outputs: a dense
    layer whose input width equals this layer's number of neurons ``M`` (or ``M L``: a convolution's
    ``L`` locations flattened, channel-major), or a convolution with ``M`` input channels, whose
    outgoing weights of neuron ``m`` are all the weights that read channel ``m``; without one,
    uniform. Weights are read with any ``BatchNorm`` folded into the layer.
    """
    if kind == "uniform":
        return None
    names = [layer.name for layer in layers]
    k = names.index(name)
    this = layers[k].weight
    m, spread = this.shape[0], layers[k].locations
    for nxt in layers[k + 1 :]:
        following = nxt.weight  # [K, d]: the columns that read neuron m, gathered into column m below
        if nxt.kind.neuron_dim == 1:  # a convolution: [K, C_in k...], channel-major
            if nxt.module.weight.shape[1] != m:
                continue
            outgoing = following.reshape(following.shape[0], m, -1)
        elif following.shape[1] == m:
            outgoing = following[:, :, None]
        elif spread > 1 and following.shape[1] == m * spread:  # a convolution's output, flattened
            outgoing = following.reshape(following.shape[0], m, spread)
        else:
            continue
        act = layers[k].activation
        flat = outgoing.movedim(1, -1).reshape(-1, m)  # [K k..., M]: one column per neuron
        return contribution_weights(this, flat, homogeneous=act is None or act.homogeneous)
    return None


def forward_passes(n_layers: int, *, fidelity: bool = True) -> int:
    """Forward passes of the model on the probe set that one :func:`analyse_network` makes.

    One reading; with ``fidelity``, one rebuilt network per mapped layer and one with random pairs
    per layer, and the whole network rebuilt (output layer kept, with more than one layer; and
    refitted) from the pairs and from the random pairs. The probe goes forward at once.
    """
    rebuilt = 2 * n_layers + 2 * ((n_layers > 1) + 1) if fidelity else 0
    return PASSES_PER_READING + rebuilt * PASSES_PER_REBUILD


def _chosen(reading: ModelReading, layers: tuple[str, ...] | None) -> list[LayerReading]:
    """The layers to map: every mappable hidden one, or the mappable ones among ``layers`` (names or
    ``fnmatch`` patterns); the others are named by the monitor's note at fit start."""
    if layers is None:
        chosen = reading.select()
        if not chosen and reading.hidden:
            raise ValueError(f"No layer can be mapped: {reading.note()}")
        return chosen
    matched = [la for la in reading.layers if any(fnmatch.fnmatchcase(la.name, p) for p in layers)]
    if not matched:
        names = [la.name for la in reading.layers]
        raise ValueError(f"`layers` {list(layers)} match none of the nn.Linear layers {names}.")
    chosen = [la for la in matched if la.mappable]
    if not chosen:
        raise ValueError("Cannot map " + "; ".join(f"layer {la.name!r}: {la.reason}" for la in matched) + ".")
    return chosen


def _task(config: AnalysisConfig, y: Tensor | None, out: Tensor) -> str:
    if config.task is not None:
        return config.task
    if y is not None:
        return "regression" if y.is_floating_point() else "classification"
    return "classification" if out.ndim == 2 and out.shape[1] > 1 else "regression"


Block = tuple[str, int, int]
"""A block of neurons of one layer: ``(layer name, first neuron, one past the last)``."""


def layer_blocks(sizes: dict[str, int], block: int | None = None) -> list[Block]:
    """The units of a map: every layer whole (``block=None``), or its neurons cut into consecutive blocks
    of ``block`` (the last one shorter), in layer order."""
    if block is None:
        return [(name, 0, m) for name, m in sizes.items() if m > 0]
    return [(name, s, min(s + block, m)) for name, m in sizes.items() for s in range(0, m, block)]


def shard_blocks(blocks: Sequence[Block], world: int) -> list[list[Block]]:
    """The units of each of ``world`` ranks, dealt out evenly (longest processing time first).

    A unit costs its neurons plus :data:`UNIT_OVERHEAD`; the costliest unit goes first to the least
    loaded rank (the lowest among equals). Deterministic: every rank computes the same deal. Each
    rank's units are returned in layer order.
    """
    check_positive_int(world, "world")
    order = sorted(range(len(blocks)), key=lambda k: (-(blocks[k][2] - blocks[k][1]), k))
    shares: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for k in order:
        r = min(range(world), key=lambda q: (load[q], q))
        shares[r].append(k)
        load[r] += blocks[k][2] - blocks[k][1] + UNIT_OVERHEAD
    return [[blocks[k] for k in sorted(share)] for share in shares]


def _mode(refine: str, n: int, m: int) -> str:
    """What ``refine="auto"`` means for a layer of ``m`` neurons on ``n`` probe points (as in map_layer):
    resolved once for the whole layer, so that its blocks all search alike."""
    if refine != "auto":
        return refine
    return "exact" if n**3 * m <= AUTO_EXACT_WORK else "function"


@dataclass
class MapShard:
    """The blocks of a map that one rank computed (:func:`map_shard`); :func:`merge_shards` joins them.

    Attributes:
        rank, world: which share of the blocks (:func:`shard_blocks`) this is.
        sizes: every mapped layer's number of neurons, in layer order.
        blocks: ``(layer, start, stop, map)``: the :class:`~lightning_swim.PairMap` of neurons
            ``start:stop`` of the layer (its ``soft_neuron`` counts from ``start``).
    """

    rank: int
    world: int
    sizes: dict[str, int]
    blocks: list[tuple[str, int, int, PairMap]] = field(default_factory=list)

    def to(self, device: torch.device | str) -> MapShard:
        """The same shard with its tensors on ``device`` (e.g. the CPU, before it is sent to rank zero)."""
        blocks = [(name, start, stop, pm.to(device)) for name, start, stop, pm in self.blocks]
        return MapShard(self.rank, self.world, dict(self.sizes), blocks)


def _check_shard(shard: Any) -> tuple[int, int]:
    ok = (
        isinstance(shard, tuple)
        and len(shard) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
        and shard[1] >= 1
        and 0 <= shard[0] < shard[1]
    )
    if not ok:
        raise ValueError(
            f"Expected argument `shard` to be a pair `(rank, world)` with 0 <= rank < world but got {shard!r}."
        )
    return shard[0], shard[1]


def _map_shard(
    reading: ModelReading,
    chosen: list[LayerReading],
    config: AnalysisConfig,
    shard: tuple[int, int],
    n_for_mode: int,
) -> MapShard:
    """Map this rank's blocks of the ``chosen`` layers (``refine="auto"`` resolved for a probe of ``n_for_mode``
    examples: ``n_for_mode L`` points of a convolution, at most ``config.patches``)."""
    rank, world = shard
    params = {layer.name: _weight_bias(layer) for layer in chosen}
    sizes = {name: int(w.shape[0]) for name, (w, _) in params.items()}
    by_name = {layer.name: layer for layer in chosen}
    mine = shard_blocks(layer_blocks(sizes, config.neuron_block), world)[rank]
    out = MapShard(rank, world, sizes)
    options = config.map_options()
    inputs: dict[str, Tensor] = {}
    for name, start, stop in mine:
        layer = by_name[name]
        if name not in inputs:  # a convolution: its fixed subsample of patches (as in analyse_network)
            inputs[name] = reading.points(name, config.dtype, reading.sample(name, config.patches, config.seed))
        weight, bias = params[name]
        act = layer.activation
        assert act is not None
        points = n_for_mode * layer.locations
        if layer.kind.subsample:
            points = min(points, config.patches)
        options["refine"] = _mode(config.refine, points, sizes[name])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_FLAG_WARNINGS, category=RuntimeWarning)
            try:
                pm = map_layer(weight[start:stop], bias[start:stop], inputs[name], activation=act, **options)
            except (ValueError, TypeError) as err:
                raise type(err)(f"Layer {name!r}: {err}") from err
        out.blocks.append((name, start, stop, pm))
    return out


def _read(model: nn.Module, x: Tensor, config: AnalysisConfig) -> tuple[ModelReading, list[LayerReading]]:
    reading = read_model(model, x, activations=config.activations, output_key=config.output_key)
    chosen = _chosen(reading, config.layers)
    if not chosen:
        raise ValueError("The model has no hidden nn.Linear layer to map (only an output layer).")
    return reading, chosen


def map_shard(
    model: nn.Module,
    x: Tensor,
    *,
    config: AnalysisConfig | None = None,
    shard: tuple[int, int] = (0, 1),
) -> MapShard:
    """The pair search of one rank's share of a map: the units :func:`shard_blocks` gives ``rank``.

    The units (whole layers, or blocks of ``config.neuron_block`` neurons) are dealt out to the
    ``world`` ranks, and this rank maps its own with :func:`~lightning_swim.map_layer`
    (``refine="auto"`` resolved for the whole layer). :func:`merge_shards` of the ``world`` shards is
    bit-identical to the maps :func:`analyse_network` makes in one process with the same config.
    One reading of the model (one forward pass of ``x``).

    Args:
        model: the network (left in the mode and state it was found in).
        x: the probe set, ``[N, ...]``, the same on every rank.
        config: what to compute (``layers``, ``activations``, the options of ``map_layer``).
        shard: ``(rank, world)``, ``0 <= rank < world``.

    Returns:
        A :class:`MapShard` (the units of the other ranks are absent; a rank may get none).
    """
    config = config or AnalysisConfig()
    shard = _check_shard(shard)
    reading, chosen = _read(model, x, config)
    return _map_shard(reading, chosen, config, shard, x.shape[0])


def warm_up(
    model: nn.Module,
    x: Tensor,
    *,
    config: AnalysisConfig | None = None,
    shard: tuple[int, int] = (0, 1),
    points: int = WARM_UP_POINTS,
) -> None:
    """Run this rank's pair search once on the first ``points`` rows of the probe set ``x``.

    What a first map compiles (KeOps formulas, a compiled CPU kernel) depends on the layers' widths,
    input dimensions, dtype and search mode, not on the number of probe points: run on a few rows,
    with ``refine="auto"`` resolved for all of ``x``, the search compiles what the maps on ``x`` will
    use, and costs little else. The results are dropped.

    Once per process for the same layers (kinds, shapes, activations, dtype, device), options and
    probe size: a later call only reads the model (one forward pass of the few rows).
    """
    config = config or AnalysisConfig()
    shard = _check_shard(shard)
    check_positive_int(points, "points", minimum=2)
    reading, chosen = _read(model, x[: min(points, x.shape[0])], config)
    key = (repr(config), shard, x.shape[0], *(_signature(layer) for layer in chosen))
    if key in _WARMED:
        return
    _map_shard(reading, chosen, config, shard, x.shape[0])
    _WARMED.add(key)


_WARMED: set[tuple[Any, ...]] = set()
"""What :func:`warm_up` has run in this process."""


def _signature(layer: LayerReading) -> tuple[Any, ...]:
    """What the compilations of a layer's search depend on: its kind, shapes, activation, dtype and device."""
    w = layer.module.weight
    inputs = None if layer.input is None else (tuple(layer.input.shape[1:]), layer.input.dtype)
    return (
        layer.name,
        type(layer.module),
        repr(layer.activation),
        layer.fold is not None,
        inputs,
        w.shape,
        w.dtype,
        w.device,
    )


def merge_shards(parts: Sequence[MapShard]) -> dict[str, PairMap]:
    """The whole map from the shards of all ranks: layer name -> :class:`~lightning_swim.PairMap`.

    Args:
        parts: the :class:`MapShard` of every rank of one map, in any order.

    Raises:
        ValueError: if the shards are not those of one map: another world size or layers, a rank
            missing or twice, or blocks that do not tile every layer.
    """
    if not parts:
        raise ValueError("Expected argument `parts` to hold the shards of every rank but got none.")
    world, sizes = parts[0].world, parts[0].sizes
    ranks = sorted(p.rank for p in parts)
    if ranks != list(range(world)) or any(p.world != world or p.sizes != sizes for p in parts):
        raise ValueError(
            f"Expected argument `parts` to be the shards of ranks 0..{world - 1} of one map but got ranks {ranks} "
            f"of worlds {sorted({p.world for p in parts})}."
        )
    blocks: dict[str, list[tuple[int, int, PairMap]]] = {name: [] for name in sizes}
    for part in parts:
        for name, start, stop, pm in part.blocks:
            blocks[name].append((start, stop, pm))
    merged: dict[str, PairMap] = {}
    for name, m in sizes.items():
        own = sorted(blocks[name], key=lambda b: b[0])
        edges = [0] + [b[1] for b in own]
        if [b[0] for b in own] != edges[:-1] or edges[-1] != m or any(len(b[2]) != b[1] - b[0] for b in own):
            raise ValueError(f"The blocks of layer {name!r} in `parts` do not tile its {m} neurons exactly once.")
        merged[name] = _join([(start, pm) for start, _, pm in own])
    return merged


def _join(blocks: list[tuple[int, PairMap]]) -> PairMap:
    """The map of consecutive blocks of neurons, in order (soft attributions shifted to the layer's numbering)."""
    if len(blocks) == 1 and blocks[0][0] == 0:
        return blocks[0][1]
    first = blocks[0][1]
    tensors: dict[str, Tensor] = {}
    for key in first.tensors():
        pieces = [getattr(pm, key) for _, pm in blocks]
        if key == "soft_neuron":
            pieces = [t + start for t, (start, _) in zip(pieces, blocks, strict=True)]
        tensors[key] = torch.cat(pieces)
    return PairMap(**tensors, activation=first.activation, refine=first.refine)


def analyse_network(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    *,
    config: AnalysisConfig | None = None,
    previous: MapRecord | None = None,
    step: int = 0,
    epoch: int = 0,
    progress: Callable[[str], None] | None = None,
    maps: dict[str, PairMap] | None = None,
) -> MapRecord:
    """Map a network, measure importance, drift since ``previous``, transport and fidelity.

    Args:
        model: the network (left in the mode and state it was found in).
        x: the probe set, ``[N, ...]``.
        y: labels or targets of the probe set (optional: cross-class share, task of the fidelity).
        config: what to compute.
        previous: the previous map of the same run on the same probe set (for turnover, JS divergence,
            top-k overlap).
        step, epoch: stored in the record.
        progress: called with the name of each stage as it starts (for a progress display).
        maps: the pair maps of this model on ``x``, already made (:func:`merge_shards` of the ranks'
            :func:`map_shard`: a convolution's map indexes its subsample of patches); by default made
            here, in the same blocks.

    Returns:
        A :class:`~lightning_swim.history.MapRecord` whose ``scalars`` are keyed by the tags
        documented on :class:`~lightning_swim.callbacks.PairImportanceMonitor`.
    """
    config = config or AnalysisConfig()
    say = progress or (lambda _stage: None)
    t0 = time.perf_counter()
    say("pair search")
    reading, chosen = _read(model, x, config)
    # a convolution is mapped on a fixed subsample of its patches; its maps index all N L of them
    samples = {layer.name: reading.sample(layer.name, config.patches, config.seed) for layer in chosen}
    inputs = {layer.name: reading.points(layer.name, config.dtype, samples[layer.name]) for layer in chosen}
    # the maps as found, indexing `inputs`
    if maps is None:
        local = merge_shards([_map_shard(reading, chosen, config, (0, 1), x.shape[0])])
    else:
        _check_maps(maps, chosen)
        local = maps
    maps = {}
    randoms: dict[str, PairMap] = {}
    for k, layer in enumerate(chosen):
        weight, bias = _weight_bias(layer)
        act = layer.activation
        assert act is not None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_FLAG_WARNINGS, category=RuntimeWarning)
            generator = torch.Generator().manual_seed(config.seed + 7919 * k)
            rnd_map = random_map(weight, bias, inputs[layer.name], activation=act, generator=generator)
        maps[layer.name] = in_points(local[layer.name], samples[layer.name])
        randoms[layer.name] = in_points(rnd_map, samples[layer.name])
    n = x.shape[0]
    labels = y if y is not None and not y.is_floating_point() else None
    soft = config.importance == "soft"
    scalars: dict[str, float] = {}
    importance: dict[str, Tensor] = {}
    extra: dict[str, dict[str, Tensor]] = {}
    for layer in chosen:
        name, pm, sample = layer.name, maps[layer.name], samples[layer.name]
        n_local, spread = inputs[name].shape[0], layer.locations
        omega = neuron_weights_of(reading.layers, name, config.neuron_weights)
        if omega is not None and float(omega[pm.valid.to(omega.device)].sum()) <= 0:
            omega = None  # every mapped neuron weighs nothing: fall back to uniform weights
        imp = _per_example(pair_importance(local[name], n_local, omega, soft=soft), sample, n, spread)
        importance[name] = imp
        if spread > 1:  # a convolution: where each point's importance comes from (examples and locations)
            extra[name] = _patch_provenance(layer, pair_importance(local[name], n_local, omega, soft=soft), sample, n)
        tag = f"swim/{name}"
        scalars.update(_map_scalars(tag, pm))
        scalars[f"{tag}/importance_entropy"] = float(entropy(imp))
        scalars[f"{tag}/effective_points"] = float(effective_points(imp))
        if bool(pm.valid.any()):  # the same weights on uniformly random pairs: the reference
            null = random_pairs_like(local[name], n_local, torch.Generator().manual_seed(config.seed + 104729))
            rnd = _per_example(pair_importance(null, n_local, omega, soft=soft), sample, n, spread)
            scalars[f"{tag}/effective_points_random_pairs"] = float(effective_points(rnd))
        if previous is not None and name in previous.maps and len(previous.maps[name]) == len(pm):
            before = previous.maps[name]
            errors, _ = pair_errors(
                *_weight_bias(layer),
                inputs[name],
                _in_sample(before.idx_from, sample, n * spread),
                _in_sample(before.idx_to, sample, n * spread),
                activation=pm.activation,
            )
            scalars[f"{tag}/turnover"] = turnover(
                before, pm, previous_errors=errors, atol=config.atol, rtol=config.rtol
            )
            scalars[f"{tag}/js_divergence"] = float(js_divergence(previous.importance[name], imp))
            scalars[f"{tag}/topk_overlap"] = topk_overlap(previous.importance[name], imp, config.topk_points)
        if labels is not None:  # a patch has the label of its example
            scalars[f"{tag}/cross_class_share"] = cross_class_share(
                pm, labels.repeat_interleave(spread, dim=0), soft=soft
            )
        if config.transport:
            say(f"transport of {name}")
            y_points = y if y is None or spread == 1 else y.repeat_interleave(spread, dim=0)[_all(sample, n * spread)]
            scalars[f"{tag}/sinkhorn_divergence"], moved = _transport(layer, inputs[name], y_points, config, omega)
            if spread > 1:  # indices into all the layer's points; importance per example
                index = _all(sample, n * spread)
                for key in ("transport_idx_from", "transport_idx_to"):
                    moved[key] = torch.where(moved[key] >= 0, index[moved[key].clamp_min(0)], moved[key])
                moved["transport_importance"] = _per_example(moved["transport_importance"], sample, n, spread)
            extra.setdefault(name, {}).update(moved)
    if config.fidelity:
        say("rebuilding the network from its pairs")
        scalars.update(_fidelities(reading, y, maps, randoms, config))
    scalars["swim/map_seconds"] = time.perf_counter() - t0
    return MapRecord(step, epoch, maps, importance, scalars, extra)


def _all(sample: Tensor | None, total: int) -> Tensor:
    return torch.arange(total) if sample is None else sample


def _per_example(imp: Tensor, sample: Tensor | None, n: int, spread: int) -> Tensor:
    """A per-point importance (of the ``sample`` of a layer's ``n L`` points) summed per example: ``[n]``."""
    if spread == 1 and sample is None:
        return imp
    out = torch.zeros(n, dtype=imp.dtype)
    out.index_add_(0, _all(sample, n * spread) // spread, imp.cpu())
    return out


def _in_sample(idx: Tensor, sample: Tensor | None, total: int) -> Tensor:
    """Indices into all of a layer's points as indices into its ``sample`` (``-1`` where not in it)."""
    if sample is None:
        return idx
    where = torch.full((total,), -1, dtype=torch.long)
    where[sample] = torch.arange(len(sample))
    idx = idx.cpu()
    ok = (idx >= 0) & (idx < total)
    return torch.where(ok, where[idx.clamp(0, total - 1)], -1).to(sample.device)


def _patch_provenance(layer: LayerReading, imp: Tensor, sample: Tensor | None, n: int) -> dict[str, Tensor]:
    """The patches a convolution was mapped on: example, location and importance of each (``[n_patches]``),
    and the output grid (``patch_grid``: ``L = prod``), so that a history can trace every pair."""
    index = _all(sample, n * layer.locations)
    return {
        "patch_example": index // layer.locations,
        "patch_location": index % layer.locations,
        "patch_importance": imp,
        "patch_grid": torch.tensor(layer.grid, dtype=torch.long),
    }


def _check_maps(maps: dict[str, PairMap], chosen: list[LayerReading]) -> None:
    """``maps`` given to :func:`analyse_network` are those of the layers it maps, one entry per neuron."""
    sizes = {layer.name: int(layer.parameters()[0].shape[0]) for layer in chosen}
    got = {name: len(pm) for name, pm in maps.items()}
    if got != sizes:
        raise ValueError(
            f"Expected argument `maps` to map the layers {sizes} (name: neurons) but got {got}; pass the "
            "merged maps of the same model, probe set and `layers`."
        )


def _weight_bias(layer: LayerReading) -> tuple[Tensor, Tensor]:
    """The layer's weight and bias with any ``BatchNorm`` folded in (a missing bias is zeros)."""
    return layer.parameters()


def _median(t: Tensor) -> float:
    return float(t.double().median()) if t.numel() else float("nan")


def _map_scalars(tag: str, pm: PairMap) -> dict[str, float]:
    """The per-layer numbers of one map: costs and errors of the mapped neurons, flags, ambiguity."""
    ok = pm.valid
    assert pm.status is not None and pm.n_near is not None and pm.n_near_points is not None
    return {
        f"{tag}/param_cost_median": _median(pm.param_cost[ok]),
        f"{tag}/func_error_median": _median(pm.func_error[ok]),
        f"{tag}/unmapped_neurons": float((~ok).sum()),
        f"{tag}/dead_neurons": float((pm.status == 3).sum()),
        f"{tag}/near_pairs_median": _median(pm.n_near[ok]),
        f"{tag}/near_points_median": _median(pm.n_near_points[ok]),
        f"{tag}/ambiguous_share": float((pm.n_near[ok] > 1).double().mean()) if bool(ok.any()) else float("nan"),
    }


def chance_fidelity(outputs: Tensor, task: str) -> float:
    """The fidelity of a constant predictor: the share of the original's majority prediction
    (classification), or 0, the R² of the mean output (regression)."""
    if task == "regression":
        return 0.0
    labels = outputs.argmax(1) if outputs.ndim == 2 and outputs.shape[1] > 1 else (outputs.reshape(len(outputs)) > 0)
    return float(torch.bincount(labels.long().cpu()).max()) / len(labels)


def _fidelities(
    reading: ModelReading,
    y: Tensor | None,
    maps: dict[str, PairMap],
    randoms: dict[str, PairMap],
    config: AnalysisConfig,
) -> dict[str, float]:
    """Fidelity of the network rebuilt from its pairs, per layer and whole, next to its references.

    Every rebuilt network is one forward pass of the model with forward hooks (no copy). A layer
    without a bias is mapped but not rebuilt (it keeps its weights); an output layer without one is
    not refitted (``fidelity_refit`` is NaN).
    """
    out = reading.output
    task = _task(config, y, out)
    scalars = {"swim/network/fidelity_chance": chance_fidelity(out, task)}
    for name in maps:
        for suffix, source in (("", maps), ("_random_pairs", randoms)):
            single = rebuild(reading, {name: source[name]}).output
            assert single is not None
            scalars[f"swim/{name}/fidelity{suffix}"] = output_fidelity(out, single, task=task)
    refit = reading.output_layer.has_bias
    for suffix, source in (("", maps), ("_random_pairs", randoms)):
        for mode in ("keep", "refit"):
            if mode == "keep" and len(source) == 1:
                value = scalars[f"swim/{next(iter(source))}/fidelity{suffix}"]
            elif mode == "refit" and not refit:
                value = float("nan")
            else:
                whole = rebuild(reading, source, output=mode).output
                assert whole is not None
                value = output_fidelity(out, whole, task=task)
            scalars[f"swim/network/fidelity_{mode}{suffix}"] = value
    return scalars


def _transport(
    layer: LayerReading, h: Tensor, y: Tensor | None, config: AnalysisConfig, omega: Tensor | None
) -> tuple[float, dict[str, Tensor]]:
    act = layer.activation
    assert act is not None
    weight, bias = _weight_bias(layer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_FLAG_WARNINGS, category=RuntimeWarning)
        tm = transport_map(
            weight,
            bias,
            h,
            activation=act,
            y=y,
            n_candidates=config.n_candidates,
            blur=config.blur,
            reach=config.reach,
            neuron_weights=omega,
            generator=torch.Generator().manual_seed(config.seed),
        )
    return float(tm.divergence), {
        "transport_assignment": tm.assignment,
        "transport_mass_share": tm.mass_share,
        "transport_importance": tm.importance,
        "transport_idx_from": tm.pairs.idx_from,
        "transport_idx_to": tm.pairs.idx_to,
    }

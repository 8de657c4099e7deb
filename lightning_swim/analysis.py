"""One map of a whole network and the numbers that describe it: the core the monitor callback calls.

:func:`analyse_network` maps every hidden dense layer (:func:`~lightning_swim.map_layer` in the
layer's own input space), computes per-point pair importance (soft by default), compares with the
previous map (turnover up to near-ties, Jensen-Shannon divergence, top-k overlap), optionally
transports each layer onto SWIM's distribution (:func:`~lightning_swim.transport_map`), and measures
how faithfully the pairs rebuild the network (:func:`~lightning_swim.convert_network`), each number
next to its reference: the same network rebuilt from random pairs, and the agreement of a constant
predictor. Tensors in, a :class:`~lightning_swim.history.MapRecord` out, no Lightning, no logging.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_swim._checks import check_choice, check_positive_finite, check_positive_int
from lightning_swim._modelio import (
    ActivationSpec,
    LinearLayer,
    capture_inputs,
    forward_outputs,
    linear_layers,
    require_activation,
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
from lightning_swim.metrics import fidelity
from lightning_swim.network import convert_network, mapped_layers
from lightning_swim.pairmap import REFINE, PairMap, map_layer, pair_errors, random_map
from lightning_swim.transport import transport_map

__all__ = ["IMPORTANCE", "NEURON_WEIGHTS", "AnalysisConfig", "analyse_network", "neuron_weights_of"]

NEURON_WEIGHTS = ("contribution", "uniform")
IMPORTANCE = ("soft", "argmin")
_FLAG_WARNINGS = r".*(neurons cannot be explained by a pair|neurons have zero or non-finite weights).*"  # counted


@dataclass(frozen=True)
class AnalysisConfig:
    """What one analysis computes (see :class:`~lightning_swim.callbacks.PairImportanceMonitor`)."""

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

    def __post_init__(self) -> None:
        check_positive_int(self.top_k, "top_k")
        check_choice(self.refine, "refine", REFINE)
        check_positive_int(self.local_search, "local_search", minimum=0)
        check_choice(self.backend, "backend", BACKENDS)
        check_choice(self.importance, "importance", IMPORTANCE)
        check_choice(self.neuron_weights, "neuron_weights", NEURON_WEIGHTS)
        check_positive_int(self.topk_points, "topk_points")
        if self.task is not None:
            check_choice(self.task, "task", ("classification", "regression"))
        check_positive_int(self.n_candidates, "n_candidates")
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


def neuron_weights_of(layers: list[LinearLayer], name: str, kind: str) -> Tensor | None:
    """The weights :math:`\\omega` of layer ``name``'s neurons: None (uniform) or their contributions.

    The contribution uses the next dense layer in call order that reads this layer's outputs (its
    ``in_features`` equals this layer's ``out_features``); without one, uniform.
    """
    if kind == "uniform":
        return None
    names = [layer.name for layer in layers]
    k = names.index(name)
    this = layers[k].module
    for nxt in layers[k + 1 :]:
        if nxt.module.in_features == this.out_features:
            act = layers[k].activation
            return contribution_weights(
                this.weight.detach(), nxt.module.weight.detach(), homogeneous=act is None or act.homogeneous
            )
    return None


def _task(config: AnalysisConfig, y: Tensor | None, out: Tensor) -> str:
    if config.task is not None:
        return config.task
    if y is not None:
        return "regression" if y.is_floating_point() else "classification"
    return "classification" if out.ndim == 2 and out.shape[1] > 1 else "regression"


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

    Returns:
        A :class:`~lightning_swim.history.MapRecord` whose ``scalars`` are keyed by the tags
        documented on :class:`~lightning_swim.callbacks.PairImportanceMonitor`.
    """
    config = config or AnalysisConfig()
    say = progress or (lambda _stage: None)
    t0 = time.perf_counter()
    say("pair search")
    layers = linear_layers(model, x[: min(len(x), 8)], config.activations)
    chosen = mapped_layers(
        model, x, layers=list(config.layers) if config.layers else None, activations=config.activations
    )
    if not chosen:
        raise ValueError("The model has no hidden nn.Linear layer to map (only an output layer).")
    inputs = capture_inputs(model, x, [layer.name for layer in chosen])
    if config.dtype is not None:
        inputs = {k: v.to(config.dtype) for k, v in inputs.items()}
    maps: dict[str, PairMap] = {}
    randoms: dict[str, PairMap] = {}
    for k, layer in enumerate(chosen):
        weight, bias = _weight_bias(layer)
        act = require_activation(layer)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_FLAG_WARNINGS, category=RuntimeWarning)
            try:
                maps[layer.name] = map_layer(weight, bias, inputs[layer.name], activation=act, **config.map_options())
            except (ValueError, TypeError) as err:
                raise type(err)(f"Layer {layer.name!r}: {err}") from err
            generator = torch.Generator().manual_seed(config.seed + 7919 * k)
            randoms[layer.name] = random_map(weight, bias, inputs[layer.name], activation=act, generator=generator)
    n = x.shape[0]
    labels = y if y is not None and not y.is_floating_point() else None
    soft = config.importance == "soft"
    scalars: dict[str, float] = {}
    importance: dict[str, Tensor] = {}
    extra: dict[str, dict[str, Tensor]] = {}
    for layer in chosen:
        name, pm = layer.name, maps[layer.name]
        omega = neuron_weights_of(layers, name, config.neuron_weights)
        if omega is not None and float(omega[pm.valid.to(omega.device)].sum()) <= 0:
            omega = None  # every mapped neuron weighs nothing: fall back to uniform weights
        imp = pair_importance(pm, n, omega, soft=soft)
        importance[name] = imp
        tag = f"swim/{name}"
        scalars.update(_map_scalars(tag, pm))
        scalars[f"{tag}/importance_entropy"] = float(entropy(imp))
        scalars[f"{tag}/effective_points"] = float(effective_points(imp))
        if bool(pm.valid.any()):  # the same weights on uniformly random pairs: the reference
            null = random_pairs_like(pm, n, torch.Generator().manual_seed(config.seed + 104729))
            rnd = pair_importance(null, n, omega, soft=soft)
            scalars[f"{tag}/effective_points_random_pairs"] = float(effective_points(rnd))
        if previous is not None and name in previous.maps and len(previous.maps[name]) == len(pm):
            before = previous.maps[name]
            errors, _ = pair_errors(
                *_weight_bias(layer), inputs[name], before.idx_from, before.idx_to, activation=pm.activation
            )
            scalars[f"{tag}/turnover"] = turnover(
                before, pm, previous_errors=errors, atol=config.atol, rtol=config.rtol
            )
            scalars[f"{tag}/js_divergence"] = float(js_divergence(previous.importance[name], imp))
            scalars[f"{tag}/topk_overlap"] = topk_overlap(previous.importance[name], imp, config.topk_points)
        if labels is not None:
            scalars[f"{tag}/cross_class_share"] = cross_class_share(pm, labels, soft=soft)
        if config.transport:
            say(f"transport of {name}")
            scalars[f"{tag}/sinkhorn_divergence"], extra[name] = _transport(layer, inputs[name], y, config, omega)
    if config.fidelity:
        say("rebuilding the network from its pairs")
        scalars.update(_fidelities(model, x, y, maps, randoms, config))
    scalars["swim/map_seconds"] = time.perf_counter() - t0
    return MapRecord(step, epoch, maps, importance, scalars, extra)


def _weight_bias(layer: LinearLayer) -> tuple[Tensor, Tensor]:
    weight = layer.module.weight.detach()
    bias = layer.module.bias.detach() if layer.module.bias is not None else torch.zeros_like(weight[:, 0])
    return weight, bias


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
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    maps: dict[str, PairMap],
    randoms: dict[str, PairMap],
    config: AnalysisConfig,
) -> dict[str, float]:
    """Fidelity of the network rebuilt from its pairs, per layer and whole, next to its references."""
    out = forward_outputs(model, x)
    task = _task(config, y, out)
    scalars = {"swim/network/fidelity_chance": chance_fidelity(out, task)}
    for name in maps:
        for suffix, source in (("", maps), ("_random_pairs", randoms)):
            single = convert_network(model, {name: source[name]}, x, output="keep")
            scalars[f"swim/{name}/fidelity{suffix}"] = fidelity(model, single, x, task=task)
    for suffix, source in (("", maps), ("_random_pairs", randoms)):
        for mode in ("keep", "refit"):
            if mode == "keep" and len(source) == 1:
                value = scalars[f"swim/{next(iter(source))}/fidelity{suffix}"]
            else:
                value = fidelity(model, convert_network(model, source, x, output=mode), x, task=task)
            scalars[f"swim/network/fidelity_{mode}{suffix}"] = value
    return scalars


def _transport(
    layer: LinearLayer, h: Tensor, y: Tensor | None, config: AnalysisConfig, omega: Tensor | None
) -> tuple[float, dict[str, Tensor]]:
    act = require_activation(layer)
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

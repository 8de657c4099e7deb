"""One map of a whole network and the numbers that describe it: the core the monitor callback calls.

:func:`analyse_network` maps every hidden dense layer (:func:`~lightning_swim.map_network`), computes
per-point pair importance, compares with the previous map (turnover, Jensen-Shannon divergence,
top-k overlap), optionally transports each layer onto SWIM's distribution
(:func:`~lightning_swim.transport_map`), and measures how faithfully the pairs rebuild the network
(:func:`~lightning_swim.convert_network`): tensors in, a :class:`~lightning_swim.history.MapRecord`
out, no Lightning, no logging.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_swim._checks import check_choice, check_positive_int
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
    topk_overlap,
    turnover,
)
from lightning_swim.metrics import fidelity
from lightning_swim.network import convert_network, map_network, mapped_layers
from lightning_swim.pairmap import REFINE
from lightning_swim.transport import transport_map

__all__ = ["NEURON_WEIGHTS", "AnalysisConfig", "analyse_network", "neuron_weights_of"]

NEURON_WEIGHTS = ("contribution", "uniform")


@dataclass(frozen=True)
class AnalysisConfig:
    """What one analysis computes (see :class:`~lightning_swim.callbacks.PairImportanceMonitor`)."""

    layers: tuple[str, ...] | None = None
    activations: ActivationSpec = None
    top_k: int = 16
    refine: str = "function"
    local_search: int = 0
    backend: str = "auto"
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
        check_choice(self.neuron_weights, "neuron_weights", NEURON_WEIGHTS)
        check_positive_int(self.topk_points, "topk_points")
        if self.task is not None:
            check_choice(self.task, "task", ("classification", "regression"))
        check_positive_int(self.n_candidates, "n_candidates")
        if not self.blur > 0:
            raise ValueError(f"Expected argument `blur` to be positive but got {self.blur!r}.")
        if self.reach is not None and not self.reach > 0:
            raise ValueError(f"Expected argument `reach` to be None or positive but got {self.reach!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"Expected argument `seed` to be an int but got {self.seed!r}.")
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ValueError(f"Expected argument `dtype` to be a floating torch.dtype but got {self.dtype!r}.")


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
        previous: the previous map of the same run (for turnover, JS divergence, top-k overlap).
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # dead neurons: counted in the scalars instead
        maps = map_network(
            model,
            x,
            layers=[c.name for c in chosen],
            activations=config.activations,
            dtype=config.dtype,
            top_k=config.top_k,
            refine=config.refine,
            local_search=config.local_search,
            backend=config.backend,
        )
    n = x.shape[0]
    labels = y if y is not None and not y.is_floating_point() else None
    scalars: dict[str, float] = {}
    importance: dict[str, Tensor] = {}
    extra: dict[str, dict[str, Tensor]] = {}
    if not maps:
        raise ValueError("The model has no hidden nn.Linear layer to map (only an output layer).")
    for name, pm in maps.items():
        omega = neuron_weights_of(layers, name, config.neuron_weights)
        if omega is not None and float(omega[pm.valid.to(omega.device)].sum()) <= 0:
            omega = None  # every mapped neuron weighs nothing: fall back to uniform weights
        imp = pair_importance(pm, n, omega)
        importance[name] = imp
        ok = pm.valid
        tag = f"swim/{name}"
        scalars[f"{tag}/param_cost_median"] = float(pm.param_cost[ok].median()) if bool(ok.any()) else float("nan")
        scalars[f"{tag}/func_error_median"] = float(pm.func_error[ok].median()) if bool(ok.any()) else float("nan")
        scalars[f"{tag}/unmapped_neurons"] = float((~ok).sum())
        scalars[f"{tag}/importance_entropy"] = float(entropy(imp))
        scalars[f"{tag}/effective_points"] = float(effective_points(imp))
        if previous is not None and name in previous.maps and len(previous.maps[name]) == len(pm):
            scalars[f"{tag}/turnover"] = turnover(previous.maps[name], pm)
            scalars[f"{tag}/js_divergence"] = float(js_divergence(previous.importance[name], imp))
            scalars[f"{tag}/topk_overlap"] = topk_overlap(previous.importance[name], imp, config.topk_points)
        if labels is not None:
            scalars[f"{tag}/cross_class_share"] = cross_class_share(pm, labels)
        if config.transport:
            say(f"transport of {name}")
            layer = next(c for c in chosen if c.name == name)
            scalars[f"{tag}/sinkhorn_divergence"], extra[name] = _transport(model, layer, x, y, config, omega)
    if config.fidelity:
        say("rebuilding the network from its pairs")
        out = forward_outputs(model, x)
        task = _task(config, y, out)
        for name in maps:
            single = convert_network(model, {name: maps[name]}, x, output="keep")
            scalars[f"swim/{name}/fidelity"] = fidelity(model, single, x, task=task)
        if len(maps) > 1:
            scalars["swim/network/fidelity_keep"] = fidelity(model, convert_network(model, maps, x), x, task=task)
        else:
            scalars["swim/network/fidelity_keep"] = scalars[f"swim/{next(iter(maps))}/fidelity"]
        rebuilt = convert_network(model, maps, x, output="refit")
        scalars["swim/network/fidelity_refit"] = fidelity(model, rebuilt, x, task=task)
    scalars["swim/map_seconds"] = time.perf_counter() - t0
    return MapRecord(step, epoch, maps, importance, scalars, extra)


def _transport(
    model: nn.Module, layer: LinearLayer, x: Tensor, y: Tensor | None, config: AnalysisConfig, omega: Tensor | None
) -> tuple[float, dict[str, Tensor]]:
    h = capture_inputs(model, x, [layer.name])[layer.name]
    if config.dtype is not None:
        h = h.to(config.dtype)
    act = require_activation(layer)
    bias = layer.module.bias if layer.module.bias is not None else torch.zeros_like(layer.module.weight[:, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tm = transport_map(
            layer.module.weight.detach(),
            bias.detach(),
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

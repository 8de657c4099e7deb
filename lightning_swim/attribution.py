r"""Per-point scores derived from a network's SWIM pairs, plain and loss-aware (tensors in, tensors out).

:func:`pair_importance_scores` is the score that :mod:`lightning_swim.evaluate` puts to the test: map
every hidden dense layer to its pairs (:func:`~lightning_swim.map_network`), give each neuron a weight
:math:`\omega_m`, spread it over the neuron's two points (:func:`~lightning_swim.pair_importance`),
and average the layers' importances (each summing to 1).

Its neuron weights say what "a neuron matters" means:

- ``"contribution"``: :math:`\omega_m = \lVert w_m\rVert\,\lVert a_m\rVert` (the monitor's default:
  how large the neuron is, whatever the data);
- ``"uniform"``: :math:`\omega_m = 1`;
- ``"loss_gradient"``: the training loss's first-order sensitivity to the neuron, example by
  example, :math:`\omega_m = \sum_n \lvert \partial L_n / \partial h_{nm}\; h_{nm}\rvert`, with
  :math:`h_{nm}` the neuron's activation on example :math:`n` and :math:`L_n` its loss (the Taylor
  estimate of the loss change when the neuron is removed, Molchanov et al. 2017);
- ``"loss_ablation"``: the exact increase of the mean training loss when the neuron is removed,
  :math:`\omega_m = \max(0, L(h_{:,m} = 0) - L)`.

:func:`anchor_ablation_scores` asks the loss question of the *points*: in the network rebuilt from
its pairs with a refitted output layer (:func:`~lightning_swim.convert_network`), remove every
neuron anchored on point :math:`k`, refit the output layer, and measure the rise of the training
loss.

:func:`leave_one_out_scores` asks it of the other way SWIM uses data: SWIM fits its output layer by
least squares on *every* training point, so in the network rebuilt from its pairs each point's
exact leave-one-out error of that fit says how much the fit needs it (a hardness score; the anchors
play no part in it, and ``rebuild=False`` computes the same on the trained network's own features).

Which of these say which data training depends on is measured, not assumed: see
``docs/attribution.md``.

References:
    Bolager, Burak, Datar, Sun, Dietrich. *Sampling weights of deep neural networks*. NeurIPS 2023.
    Molchanov, Tyree, Karras, Aila, Kautz. *Pruning convolutional neural networks for resource
    efficient inference*. ICLR 2017.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_swim._checks import check_choice, check_probe
from lightning_swim._modelio import (
    ActivationSpec,
    LayerReading,
    capture_inputs,
    linear_layers,
    model_device_dtype,
    preserved,
)
from lightning_swim._solve import ridge_lstsq
from lightning_swim.analysis import neuron_weights_of
from lightning_swim.importance import pair_importance
from lightning_swim.network import convert_network, map_network, mapped_layers
from lightning_swim.pairmap import PairMap

__all__ = [
    "PAIR_NEURON_WEIGHTS",
    "anchor_ablation_scores",
    "leave_one_out_scores",
    "loss_neuron_weights",
    "pair_importance_scores",
]

PAIR_NEURON_WEIGHTS = ("contribution", "uniform", "loss_gradient", "loss_ablation")


def _loss_of(y: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-example loss: cross-entropy for class labels, squared error summed over outputs for floats."""
    if y.is_floating_point():
        return lambda out, t: ((out - t.reshape(out.shape)) ** 2).flatten(1).sum(1)
    return lambda out, t: nn.functional.cross_entropy(out, t, reduction="none")


def _reader(layers: list[LayerReading], name: str) -> LayerReading:
    """The dense layer that reads layer ``name``'s activations (as :func:`neuron_weights_of` finds it)."""
    names = [layer.name for layer in layers]
    k = names.index(name)
    width = layers[k].weight.shape[0]
    for nxt in layers[k + 1 :]:
        if nxt.weight.shape[1] == width:
            return nxt
    raise ValueError(f"No dense layer after {name!r} reads its {width} outputs; cannot weigh its neurons.")


def _layer_output(model: nn.Module, x: Tensor, name: str) -> Tensor:
    """The output of module ``name`` on ``x`` (before any activation after it), detached, state preserved."""
    outs: list[Tensor] = []
    handle = model.get_submodule(name).register_forward_hook(lambda _m, _i, out: outs.append(out.detach()))
    try:
        with preserved(model):
            model(x.to(*model_device_dtype(model)) if x.is_floating_point() else x)
    finally:
        handle.remove()
    return outs[0]


def _with_input(model: nn.Module, reader: nn.Module, x: Tensor, edit: Callable[[Tensor], Tensor]) -> Tensor:
    """``model(x)`` with the input of ``reader`` replaced by ``edit(input)`` (hook removed afterwards)."""
    handle = reader.register_forward_pre_hook(lambda _m, args: (edit(args[0]), *args[1:]))
    try:
        out = model(x)
    finally:
        handle.remove()
    if not isinstance(out, Tensor):
        raise TypeError("Expected the model to return a tensor.")
    return out


def loss_neuron_weights(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    name: str,
    *,
    kind: str = "loss_gradient",
    activations: ActivationSpec = None,
) -> Tensor:
    r"""Loss-aware weights of the neurons of dense layer ``name``: ``[M]`` float64, non-negative.

    ``kind="loss_gradient"``: :math:`\omega_m = \sum_n |\partial L_n/\partial h_{nm}\, h_{nm}|`;
    ``kind="loss_ablation"``: :math:`\omega_m = \max(0, \bar L(h_{:,m}=0) - \bar L)` with :math:`\bar L`
    the mean loss over ``x``. :math:`h` is the layer's activation as read by the next dense layer;
    the loss is the cross-entropy for integer ``y``, the squared error for floating ``y``.

    The model is evaluated in eval mode and left in its mode, with its parameters untouched.
    """
    check_choice(kind, "kind", ("loss_gradient", "loss_ablation"))
    x = check_probe(x)
    layers = linear_layers(model, x[: min(len(x), 8)], activations)
    if name not in [layer.name for layer in layers]:
        raise ValueError(f"`name` {name!r} is not an nn.Linear layer called by the model's forward.")
    reader = _reader(layers, name).module
    loss = _loss_of(y)
    device, dtype = model_device_dtype(model)
    xin = x.to(device=device, dtype=dtype)
    target = y.to(device=device, dtype=dtype) if y.is_floating_point() else y.to(device)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        if kind == "loss_gradient":
            held: list[Tensor] = []

            def grab(h: Tensor) -> Tensor:
                leaf = h.detach().requires_grad_(True)
                held.append(leaf)
                return leaf

            with torch.enable_grad():
                per = loss(_with_input(model, reader, xin, grab), target)
                (g,) = torch.autograd.grad(per.sum(), held[0])
            return (g * held[0]).detach().abs().sum(0).double().cpu()
        with torch.no_grad():
            base = float(loss(model(xin), target).double().mean())
            m_out = int(reader.weight.shape[1])
            omega = torch.empty(m_out, dtype=torch.float64)
            for m in range(m_out):

                def drop(h: Tensor, m: int = m) -> Tensor:
                    h = h.clone()
                    h[:, m] = 0
                    return h

                omega[m] = float(loss(_with_input(model, reader, xin, drop), target).double().mean()) - base
            return omega.clamp_min(0.0)
    finally:
        for mod, mode in modes:
            mod.training = mode


def pair_importance_scores(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    *,
    soft: bool = True,
    neuron_weights: str = "contribution",
    layers: list[str] | None = None,
    activations: ActivationSpec = None,
    maps: Mapping[str, PairMap] | None = None,
    **map_kwargs: Any,
) -> Tensor:
    r"""Per-point pair importance of a whole network: the mean over mapped layers, ``[N]`` float64.

    .. math::
        I_k = \frac{1}{L}\sum_{l=1}^{L} I^{(l)}_k, \qquad
        I^{(l)}_k = \frac{1}{Z_l}\sum_m \omega^{(l)}_m \frac{[i_m = k] + [j_m = k]}{2}

    Args:
        model: the network.
        x: the points to score (also the probe set of the maps), ``[N, ...]``.
        y: their labels or targets (needed by the loss-aware neuron weights).
        soft: spread each neuron's weight over its near-optimal pairs (the map's soft attribution, as
            :func:`~lightning_swim.pair_importance` does by default), or give it to its best pair only
            (``False``, the argmin importance).
        neuron_weights: one of :data:`PAIR_NEURON_WEIGHTS` (see the module docstring).
        layers, activations: which layers to map and their activations (as in
            :func:`~lightning_swim.map_network`).
        maps: maps already computed on ``x`` (layer name -> map); default: computed here.
        **map_kwargs: passed to :func:`~lightning_swim.map_network` (``top_k``, ``refine``, ``backend``, ...).

    Returns:
        ``[N]``, non-negative, summing to 1 (each layer's importance sums to 1).
    """
    check_choice(neuron_weights, "neuron_weights", PAIR_NEURON_WEIGHTS)
    x = check_probe(x)
    if neuron_weights.startswith("loss") and y is None:
        raise ValueError(f"`neuron_weights={neuron_weights!r}` needs the labels or targets `y` of `x`.")
    if maps is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # dead neurons are flagged, left out of the importance
            maps = map_network(model, x, layers=layers, activations=activations, **map_kwargs)
    if not maps:
        raise ValueError("The model has no hidden nn.Linear layer to map (only an output layer).")
    all_layers = linear_layers(model, x[: min(len(x), 8)], activations)
    n = x.shape[0]
    parts = []
    for name, pm in maps.items():
        if neuron_weights in ("contribution", "uniform"):
            omega = neuron_weights_of(all_layers, name, neuron_weights)
        else:
            assert y is not None
            omega = loss_neuron_weights(model, x, y, name, kind=neuron_weights, activations=activations)
        if omega is not None and float(omega.double()[pm.valid.cpu()].sum()) <= 0:
            omega = None  # no mapped neuron weighs anything: uniform
        parts.append(pair_importance(pm, n, omega, soft=soft))
    return torch.stack(parts).mean(0)


def anchor_ablation_scores(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    maps: Mapping[str, PairMap] | None = None,
    layers: list[str] | None = None,
    activations: ActivationSpec = None,
    ridge: float = 1e-8,
    **map_kwargs: Any,
) -> Tensor:
    r"""How much the training loss relies on each point as an anchor of the rebuilt network: ``[N]`` float64.

    The network is rebuilt from its pairs with a refitted output layer
    (:func:`~lightning_swim.convert_network`, ``output="refit"``: ridge least squares onto the
    original network's outputs on ``x``). For each point :math:`k` that anchors a neuron of a mapped
    layer, those neurons are removed (their activations zeroed), the output layer is refitted the same
    way, and the score is the increase of the mean training loss,

    .. math::
        A^{(l)}_k = \max\big(0,\ \bar L(\text{without the neurons of layer } l \text{ anchored on } k)
                    - \bar L(\text{rebuilt})\big),

    normalised per layer to sum to 1 and averaged over layers; points that anchor nothing score 0.

    Args:
        model: the network (left untouched).
        x: the training points (the probe set of the maps), ``[N, ...]``.
        y: their labels (cross-entropy) or targets (squared error).
        maps: maps already computed on ``x``; default: computed here.
        layers, activations, **map_kwargs: as in :func:`pair_importance_scores`.
        ridge: relative ridge of the output refits.

    Returns:
        ``[N]``, non-negative; sums to 1 unless no removal raises the loss.
    """
    x = check_probe(x)
    if maps is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            maps = map_network(model, x, layers=layers, activations=activations, **map_kwargs)
    if not maps:
        raise ValueError("The model has no hidden nn.Linear layer to map (only an output layer).")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # coincident pairs keep their weights, as in the monitor
        rebuilt = convert_network(model, maps, x, output="refit", ridge=ridge)
    found = linear_layers(rebuilt, x[: min(len(x), 8)], activations)
    out_name = found[-1].name
    out_module = found[-1].module
    target = _layer_output(model, x, out_name)  # what the refit aims at: the original outputs
    loss = _loss_of(y)
    device, dtype = model_device_dtype(rebuilt)
    t = y.to(device=device, dtype=dtype) if y.is_floating_point() else y.to(device)
    n = x.shape[0]
    chosen = {layer.name for layer in mapped_layers(rebuilt, x, layers=list(maps), activations=activations)}
    xin = x.to(device=device, dtype=dtype)

    def refit_loss(h: Tensor) -> float:
        w, b = ridge_lstsq(h, target.to(h), ridge)
        return float(loss(h @ w.T + b, t).double().mean())

    parts = []
    for name, pm in maps.items():
        if name not in chosen:
            raise ValueError(f"`maps` names {name!r}, which is not a mapped nn.Linear layer of the model.")
        reader_module = _reader(found, name).module
        ok = pm.valid.cpu()
        anchors = torch.cat([pm.idx_from.cpu()[ok], pm.idx_to.cpu()[ok]]).unique()

        def last_hidden(drop: Tensor | None, module: nn.Module = reader_module) -> Tensor:
            """Inputs of the output layer, with the neurons in ``drop`` zeroed where ``module`` reads them."""
            feats: list[Tensor] = []

            def edit(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                h = args[0] if drop is None else args[0].masked_fill(drop[None, :], 0.0)
                return (h, *args[1:])

            handles = [module.register_forward_pre_hook(edit)]  # runs before the capture when both are one layer
            handles.append(out_module.register_forward_pre_hook(lambda _m, a: feats.append(a[0].detach())))
            try:
                with torch.no_grad():
                    rebuilt(xin)
            finally:
                for handle in handles:
                    handle.remove()
            return feats[0]

        modes = [(m, m.training) for m in rebuilt.modules()]
        rebuilt.eval()
        try:
            base = refit_loss(last_hidden(None))
            score = torch.zeros(n, dtype=torch.float64)
            idx_from, idx_to = pm.idx_from.cpu(), pm.idx_to.cpu()
            for k in anchors.tolist():
                drop = ((idx_from == k) | (idx_to == k)).to(device)
                score[k] = max(0.0, refit_loss(last_hidden(drop)) - base)
        finally:
            for mod, mode in modes:
                mod.training = mode
        total = score.sum()
        parts.append(score / total if float(total) > 0 else score)
    return torch.stack(parts).mean(0)


def leave_one_out_scores(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    rebuild: bool = True,
    maps: Mapping[str, PairMap] | None = None,
    ridge: float = 1e-3,
    activations: ActivationSpec = None,
    **map_kwargs: Any,
) -> Tensor:
    r"""Leave-one-out error of a least-squares output layer on the pair-rebuilt features: ``[N]`` float64.

    With :math:`H` the inputs of the output layer of the network rebuilt from its pairs
    (:func:`~lightning_swim.convert_network`; the trained network itself with ``rebuild=False``), a
    column of ones appended, targets :math:`T` (one-hot rows for class labels, as SWIM fits its last
    layer), and the ridge fit :math:`W = (H^\top H + \lambda I)^{-1} H^\top T`, the error of the fit
    made *without* point :math:`n`, on point :math:`n`, is exactly

    .. math::
        \mathrm{LOO}_n = \frac{\lVert t_n - W^\top h_n\rVert^2}{(1 - \ell_n)^2}, \qquad
        \ell_n = h_n^\top (H^\top H + \lambda I)^{-1} h_n

    (the PRESS residual; :math:`\ell_n` is the point's leverage), with
    :math:`\lambda = \text{ridge} \cdot \operatorname{tr}(H^\top H) / p`.

    Args:
        model: the network (left untouched).
        x: the training points (the probe set of the maps), ``[N, ...]``.
        y: class labels ``[N]`` or float targets ``[N, k]``.
        rebuild: use the network rebuilt from its pairs (True) or the trained network (False, the control).
        maps: maps already computed on ``x``; default: computed here (only with ``rebuild``).
        ridge: relative ridge :math:`\lambda` of the fit.
        activations, **map_kwargs: as in :func:`pair_importance_scores`.

    Returns:
        ``[N]``, non-negative.
    """
    x = check_probe(x)
    if not ridge > 0:
        raise ValueError(f"Expected argument `ridge` to be positive but got {ridge!r}.")
    if y.shape[0] != x.shape[0]:
        raise ValueError(
            f"Expected argument `y` to have {x.shape[0]} rows, one per point of `x`, but got {y.shape[0]}."
        )
    net = model
    if rebuild:
        if maps is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                maps = map_network(model, x, activations=activations, **map_kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            net = convert_network(model, maps, x, output="keep")
    out_layer = linear_layers(net, x[: min(len(x), 8)], activations)[-1]
    h = capture_inputs(net, x, [out_layer.name])[out_layer.name].double().cpu()
    if y.is_floating_point():
        t = y.double().cpu().reshape(x.shape[0], -1)
    else:
        t = nn.functional.one_hot(y.cpu().long(), max(int(out_layer.weight.shape[0]), int(y.max()) + 1)).double()
    h1 = torch.cat([h, torch.ones(h.shape[0], 1, dtype=torch.float64)], 1)
    gram = h1.T @ h1
    lam = ridge * max(float(gram.trace()) / gram.shape[0], torch.finfo(torch.float64).tiny)
    gram += lam * torch.eye(gram.shape[0], dtype=torch.float64)
    factor = torch.linalg.cholesky(gram)
    w = torch.cholesky_solve(h1.T @ t, factor)  # [p + 1, k]
    resid = t - h1 @ w
    leverage = (h1 * torch.cholesky_solve(h1.T, factor).T).sum(1)
    return (resid**2).sum(1) / (1 - leverage).clamp_min(torch.finfo(torch.float64).eps) ** 2

r"""Pair importance and how it changes between maps (pure functions, tensors in, tensors out).

A map gives neuron :math:`m` a soft attribution :math:`p_m` over its near-optimal pairs (the pairs
whose function-space error is close to its best, with Gibbs weights; see
:func:`~lightning_swim.map_layer`), or, in its *argmin* form, weight 1 on its best pair
:math:`(i_m, j_m)`. A data point's *pair importance* is the total weight of the neurons whose pairs
use it,

.. math::
    I_k = \frac{1}{Z} \sum_m \omega_m \sum_{(i, j)} p_m(i, j) \frac{[i = k] + [j = k]}{2},

normalised to sum to 1, where :math:`\omega_m \ge 0` says how much neuron :math:`m` matters
(uniform, or its contribution :math:`|w_m| |a_m|` with :math:`a_m` its outgoing weights).
It says where the layer's hyperplanes are anchored in the data, not which training points the
network depends on (see ``docs/maths.md``, "What pair importance measures").

Between two maps of the same network: the *turnover* (share of neurons whose previous pair no
longer explains them within the tolerance), the Jensen-Shannon divergence of the importances, and
the overlap of their top-k points.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from lightning_swim._checks import check_pairmap
from lightning_swim.pairmap import PairMap

__all__ = [
    "contribution_weights",
    "cross_class_share",
    "effective_points",
    "entropy",
    "js_divergence",
    "pair_importance",
    "random_pairs_like",
    "topk_overlap",
    "turnover",
]


def contribution_weights(weight: Tensor, next_weight: Tensor, *, homogeneous: bool = True) -> Tensor:
    r"""How much each neuron matters to the network: :math:`\omega_m = |w_m|\,|a_m|`.

    Args:
        weight: the layer's weight, ``[M, d]``.
        next_weight: the weight of the layer that reads it, ``[K, M]``; :math:`a_m` is column ``m``.
        homogeneous: for a homogeneous activation the neuron's magnitude :math:`|w_m|` passes to the
            next layer; for a bounded one (tanh, sigmoid) only :math:`|a_m|` counts.

    Returns:
        ``[M]``, non-negative, zero for non-finite neurons.
    """
    if next_weight.ndim != 2 or next_weight.shape[1] != weight.shape[0]:
        raise ValueError(
            f"Expected `next_weight` of shape `[K, {weight.shape[0]}]` (reading this layer's {weight.shape[0]} "
            f"neurons) but got {tuple(next_weight.shape)}."
        )
    omega = next_weight.detach().norm(dim=0)
    if homogeneous:
        omega = omega * weight.detach().norm(dim=1)
    return torch.nan_to_num(omega, nan=0.0, posinf=0.0)


def pair_importance(pm: PairMap, n_points: int, weights: Tensor | None = None, *, soft: bool = True) -> Tensor:
    """Per-point pair importance of a map, ``[n_points]`` float64 on the CPU, summing to 1.

    Flagged neurons (index -1: dead, zero or non-finite) are left out.

    Args:
        pm: the map.
        n_points: size of the probe set the map indexes.
        weights: neuron weights :math:`\\omega`, ``[M]`` (default uniform).
        soft: spread each neuron's weight over its near-optimal pairs (the map's soft attribution);
            ``False`` for the argmin importance (each neuron's best pair only), which depends on how
            near-ties happen to be broken.

    Example:
        >>> pm = PairMap(torch.tensor([0, 0]), torch.tensor([1, 2]), torch.ones(2), torch.zeros(2), torch.zeros(2))
        >>> pair_importance(pm, 4)
        tensor([0.5000, 0.2500, 0.2500, 0.0000], dtype=torch.float64)
    """
    if weights is None:
        weights = torch.ones(len(pm), dtype=torch.float64)
    if weights.shape != (len(pm),):
        raise ValueError(f"Expected argument `weights` of shape `[{len(pm)}]` but got {tuple(weights.shape)}.")
    if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
        raise ValueError("Expected argument `weights` to be finite and non-negative.")
    check_pairmap(pm, n_points, name="pm")
    ok = pm.valid.cpu()
    omega = weights.detach().double().cpu() * ok
    if soft:
        assert pm.soft_neuron is not None and pm.soft_from is not None and pm.soft_to is not None
        assert pm.soft_weight is not None
        neuron, i, j = pm.soft_neuron.cpu(), pm.soft_from.cpu(), pm.soft_to.cpu()
        w = omega[neuron] * pm.soft_weight.cpu().double() / 2
    else:
        neuron = ok.nonzero().ravel()
        i, j, w = pm.idx_from.cpu()[neuron], pm.idx_to.cpu()[neuron], omega[neuron] / 2
    imp = torch.zeros(n_points, dtype=torch.float64)
    imp.index_add_(0, i, w)
    imp.index_add_(0, j, w)
    total = imp.sum()
    return imp / total if float(total) > 0 else imp


def random_pairs_like(pm: PairMap, n_points: int, generator: torch.Generator) -> PairMap:
    """The null model of an importance: ``pm`` with every pair replaced by a uniformly random ordered
    pair of distinct probe indices, keeping which neurons are mapped and every soft weight.

    ``pair_importance`` of the result is what the same neurons, weights and ambiguity would give if
    the pairs fell anywhere: the reference next to :func:`effective_points` of the real map.
    """
    if n_points < 2:
        raise ValueError(f"Expected argument `n_points` >= 2 but got {n_points}.")

    def draw(k: int) -> tuple[Tensor, Tensor]:
        i = torch.randint(0, n_points, (k,), generator=generator)
        return i, (i + torch.randint(1, n_points, (k,), generator=generator)) % n_points

    ok = pm.valid.cpu()
    idx_from, idx_to = pm.idx_from.cpu().clone(), pm.idx_to.cpu().clone()
    idx_from[ok], idx_to[ok] = draw(int(ok.sum()))
    assert pm.soft_neuron is not None and pm.soft_weight is not None
    soft_from, soft_to = draw(len(pm.soft_neuron))
    return dataclasses.replace(pm.to("cpu"), idx_from=idx_from, idx_to=idx_to, soft_from=soft_from, soft_to=soft_to)


def entropy(p: Tensor) -> Tensor:
    r"""Shannon entropy :math:`-\sum_k p_k \ln p_k` (nats) of a distribution ``[N]``."""
    p = p.double()
    return -(p[p > 0] * p[p > 0].log()).sum()


def effective_points(p: Tensor) -> Tensor:
    """``exp(entropy)``: the number of equally important points with the same entropy."""
    return entropy(p).exp()


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    r"""Jensen-Shannon divergence (nats, in :math:`[0, \ln 2]`) of two distributions ``[N]``."""
    if p.shape != q.shape:
        raise ValueError(f"Expected two distributions of one shape but got {tuple(p.shape)} and {tuple(q.shape)}.")
    p, q = p.double(), q.double()
    m = (p + q) / 2

    def kl(a: Tensor) -> Tensor:
        nz = a > 0
        return (a[nz] * (a[nz] / m[nz]).log()).sum()

    return ((kl(p) + kl(q)) / 2).clamp(0.0, math.log(2))


def topk_overlap(p: Tensor, q: Tensor, k: int) -> float:
    """Share of the ``k`` most important points of ``p`` that are among the ``k`` most important of ``q``."""
    if p.shape != q.shape:
        raise ValueError(f"Expected two distributions of one shape but got {tuple(p.shape)} and {tuple(q.shape)}.")
    k = min(k, p.shape[0])
    if k < 1:
        raise ValueError(f"Expected argument `k` >= 1 but got {k}.")
    a = set(torch.topk(p, k).indices.tolist())
    b = set(torch.topk(q, k).indices.tolist())
    return len(a & b) / k


def turnover(
    previous: PairMap,
    current: PairMap,
    *,
    previous_errors: Tensor | None = None,
    atol: float = 0.01,
    rtol: float = 0.0,
) -> float:
    r"""Share of neurons (mapped in both maps of one layer) whose previous pair no longer explains them.

    With ``previous_errors`` (the function-space errors of the previous map's pairs for the current
    neurons, :func:`~lightning_swim.pairmap.pair_errors`), a neuron counts as changed only if its
    previous pair's error exceeds its current best :math:`e^*` by more than
    :math:`\mathrm{atol} + \mathrm{rtol}\, e^*` (the tolerance of the map's ``n_near``): swaps between
    near-ties are not change, and two maps of an unchanged network have turnover 0. Without them, any
    change of the best pair counts.
    """
    if len(previous) != len(current):
        raise ValueError(f"Expected two maps of one layer but got {len(previous)} and {len(current)} neurons.")
    dev = previous.valid.device
    both = previous.valid & current.valid.to(dev)
    n = int(both.sum())
    if n == 0:
        return float("nan")
    if previous_errors is not None:
        if previous_errors.shape != (len(current),):
            raise ValueError(
                f"Expected argument `previous_errors` of shape `[{len(current)}]` but got "
                f"{tuple(previous_errors.shape)}."
            )
        best = current.func_error.to(dev).double()
        changed = ~(previous_errors.to(dev).double() <= best + atol + rtol * best)
    else:
        changed = (previous.idx_from != current.idx_from.to(dev)) | (previous.idx_to != current.idx_to.to(dev))
    return float((changed & both).sum()) / n


def cross_class_share(pm: PairMap, labels: Tensor, *, soft: bool = True) -> float:
    """Share of mapped neurons whose pair joins points of different classes (straddles a boundary).

    With ``soft``, each neuron counts the soft-attribution weight of its cross-class pairs.
    """
    check_pairmap(pm, len(labels), name="pm")
    ok = pm.valid.cpu()
    if int(ok.sum()) == 0:
        return float("nan")
    labels = labels.cpu()
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]  # a column of labels
    lab = labels if labels.ndim == 1 else labels.argmax(1)  # else one-hot rows
    if soft:
        assert pm.soft_from is not None and pm.soft_to is not None and pm.soft_weight is not None
        cross = (lab[pm.soft_from.cpu()] != lab[pm.soft_to.cpu()]).double()
        return float((cross * pm.soft_weight.cpu().double()).sum()) / int(ok.sum())
    return float((lab[pm.idx_from.cpu()[ok]] != lab[pm.idx_to.cpu()[ok]]).double().mean())

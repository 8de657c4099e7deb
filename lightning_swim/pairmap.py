r"""The weight -> pair map of one dense layer (``../docs/maths.md`` has the derivations).

Given a trained layer ``(weight [M, d], bias [M])`` and its inputs ``x [N, d]`` on a probe set, find
for every neuron the ordered pair of probe points whose SWIM neuron explains it best:

1. **Exact search in parameter space** over all ordered pairs ``i != j`` of distinct points. For a
   homogeneous activation (ReLU) the normalised neurons are compared,

   .. math::
       c_{ij} = \Big\lVert \frac{u}{\delta} - \frac{w}{|w|} \Big\rVert^2
              + \Big(\frac{\langle x_i, x_i - x_j\rangle}{\delta} - \frac{b}{|w|}\Big)^2,
       \quad u = x_j - x_i,\ \delta = |u|,

   and the magnitude is carried by a positive ``scale`` :math:`|w|\delta / s_1`; otherwise (tanh,
   sigmoid) the SWIM neuron itself, :math:`c_{ij} = |w_{ij} - w|^2 + (b_{ij} - b)^2`.
2. **Refinement in function space** (``refine="function"``): the ``top_k`` cheapest pairs are
   re-ranked by the relative error of the best rescaled SWIM neuron on the probe set,

   .. math::
       e = \min_c \frac{\lVert c\, \sigma(X w_{ij} + b_{ij}) - \sigma(X w + b)\rVert^2}
                       {\lVert \sigma(X w + b)\rVert^2}
         = 1 - \cos^2,

   (``c >= 0`` for homogeneous activations, so :math:`1 - \max(0, \cos)^2`), and then improved by
   ``local_search`` sweeps of coordinate descent: keep ``i`` and try every ``j``, then keep ``j`` and try
   every ``i``.

References:
    Bolager, Burak, Datar, Sun, Dietrich. *Sampling weights of deep neural networks*. NeurIPS 2023.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from lightning_swim import _search
from lightning_swim._checks import check_choice, check_pairmap, check_points, check_positive_int
from lightning_swim.activations import Activation, get_activation

__all__ = ["REFINE", "PairMap", "map_layer"]

REFINE = ("function", "none")
DEFAULT_MAX_MEMORY = 512 * 2**20


@dataclass
class PairMap:
    r"""The pairs that explain a layer's neurons, one entry per neuron (``M`` of them).

    Attributes:
        idx_from: index ``i`` of each neuron's first point, ``[M]`` int64; ``-1`` for neurons that no
            pair can explain (zero or non-finite weights).
        idx_to: index ``j`` of the second point, ``[M]`` int64 (``-1`` likewise).
        scale: the factor ``c >= 0`` that carries a homogeneous neuron's magnitude, ``[M]``: the neuron is
            ``c * swim_neuron(x_i, x_j)`` up to the map's error. With ``refine="none"`` it is
            :math:`|w|\delta / s_1` (the norms match); with ``refine="function"`` the least-squares
            ``c`` on the probe set (0 for a neuron that is zero on the whole probe set, whose
            ``func_error`` is then 0). Always 1 for tanh and sigmoid.
        param_cost: the parameter-space cost of the pair, ``[M]``.
        func_error: the relative function-space error of the pair on the probe set, ``[M]``, with the
            optimal output factor ``c`` (``c >= 0`` for homogeneous activations). For tanh and sigmoid
            that factor is left to the next layer's weights: ``convert_network(output="refit")``
            applies it, ``output="keep"`` does not.
        activation: the activation's registry name.
    """

    idx_from: Tensor
    idx_to: Tensor
    scale: Tensor
    param_cost: Tensor
    func_error: Tensor
    activation: str = "relu"

    def __post_init__(self) -> None:
        check_pairmap(self, name="PairMap")  # one length, integer indices >= -1, -1 together

    def __len__(self) -> int:
        return int(self.idx_from.shape[0])

    @property
    def valid(self) -> Tensor:
        """``[M]`` bool: neurons that were mapped to a pair."""
        return self.idx_from >= 0

    def to(self, device: torch.device | str) -> PairMap:
        return PairMap(**{k: v.to(device) for k, v in self.tensors().items()}, activation=self.activation)

    @staticmethod
    def unmapped(m: int, activation: str, dtype: torch.dtype, device: torch.device) -> PairMap:
        """A map of ``m`` neurons that are all flagged (index -1, NaN numbers), to be filled in."""

        def nan() -> Tensor:
            return torch.full((m,), float("nan"), dtype=dtype, device=device)

        idx = torch.full((m,), -1, dtype=torch.long, device=device)
        return PairMap(idx, idx.clone(), nan(), nan(), nan(), activation)

    def tensors(self) -> dict[str, Tensor]:
        """The per-neuron tensors by name (for saving)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "activation"}


def _check_layer(weight: Any, bias: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"Expected argument `weight` to be a 2D tensor of shape `[M, d]` but got {shape}.")
    if not isinstance(bias, Tensor) or bias.ndim != 1 or bias.shape[0] != weight.shape[0]:
        shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"Expected argument `bias` to be a 1D tensor of shape `[{weight.shape[0]}]` but got {shape}.")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"Expected `weight` of shape `[M, {x.shape[1]}]` to match `x` of shape {tuple(x.shape)} but got "
            f"{tuple(weight.shape)}."
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if not t.is_floating_point():
            raise TypeError(f"Expected argument `{name}` to have a floating dtype but got {t.dtype}.")
    return weight.detach().to(device=x.device, dtype=x.dtype), bias.detach().to(device=x.device, dtype=x.dtype)


def mappable_neurons(weight: Tensor, bias: Tensor, *, stacklevel: int = 2) -> Tensor:
    """``[M]`` bool: neurons with finite, non-zero weights; one warning counts the others."""
    alive = torch.isfinite(weight).all(1) & torch.isfinite(bias) & (weight != 0).any(1)
    n_flagged = int((~alive).sum())
    if n_flagged:
        warnings.warn(
            f"{n_flagged} of {len(alive)} neurons have zero or non-finite weights; no pair can explain them and "
            "they are flagged with index -1.",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )
    return alive


def _preactivation(x: Tensor, i: Tensor, j: Tensor, act: Activation) -> Tensor:
    """Pre-activations of the SWIM neurons of pairs ``(i, j)`` on every probe point: ``[C, N]``."""
    u = x[j] - x[i]
    d2 = (u * u).sum(1, keepdim=True)
    return act.s1 * (u @ x.T - (u * x[i]).sum(1, keepdim=True)) / d2 - act.s2


def _fit(h: Tensor, a: Tensor, homogeneous: bool) -> tuple[Tensor, Tensor]:
    """Relative error and optimal scale of ``c h`` against ``a``, row by row.

    ``h [C, N]`` against ``a [N]`` (or ``[C, N]``) -> ``(error [C], scale [C])``. A neuron that is zero
    on the whole probe set is reproduced exactly by scale 0: error 0.
    """
    ha = (h * a).sum(-1)
    hh = (h * h).sum(-1).clamp_min(torch.finfo(h.dtype).tiny)
    aa = (a * a).sum(-1)
    c = ha.clamp_min(0) / hh if homogeneous else ha / hh
    err = (1 - c * ha / aa.clamp_min(torch.finfo(h.dtype).tiny)).clamp_min(0)
    zero = aa == 0
    return err.masked_fill(zero, 0.0), c.masked_fill(zero, 0.0)


class _Probe:
    """The probe set of one layer for the local search, with its Gram matrix if that fits in memory."""

    def __init__(self, x: Tensor, max_memory: int) -> None:
        self.x = x
        self.sq = (x * x).sum(1)
        self.groups = _search.duplicate_groups(x)
        n, item = x.shape[0], x.element_size()
        self.gram = x @ x.T if 2 * n * n * item <= max_memory else None
        self.chunk = max(1, max_memory // (8 * n * item))  # rows of the [chunk, N] temporaries

    def best_partner(self, k: int, a: Tensor, act: Activation, *, k_first: bool) -> tuple[int, Tensor, Tensor]:
        """The partner ``p`` minimising the function-space error of the pair ``(k, p)`` (``k_first``) or
        ``(p, k)``: ``(p, error, scale)``; the first of equals wins."""
        x, n = self.x, self.x.shape[0]
        bad = self.groups == self.groups[k]
        diff = x - x[k]  # x_p - x_k
        d2 = (diff * diff).sum(1).masked_fill(bad, 1.0)  # exact, not from the Gram matrix: near-duplicates
        g = self.gram
        best_p, best_e, best_c = -1, torch.tensor(float("inf"), dtype=x.dtype), torch.tensor(0.0, dtype=x.dtype)
        for s in range(0, n, self.chunk):
            e = min(n, s + self.chunk)
            if k_first:  # z_p(x) = <x - x_k, x_p - x_k> / |x_p - x_k|^2
                dot = g[s:e] - g[k][None, :] - g[k, s:e][:, None] + self.sq[k] if g is not None else diff[s:e] @ diff.T
            else:  # z_p(x) = <x - x_p, x_k - x_p> / |x_k - x_p|^2
                u = -diff[s:e]
                dot = (
                    g[k][None, :] - g[s:e] - g[s:e, k][:, None] + self.sq[s:e, None]
                    if g is not None
                    else u @ x.T - (u * x[s:e]).sum(1, keepdim=True)
                )
            err, c = _fit(act(act.s1 * dot / d2[s:e, None] - act.s2), a, act.homogeneous)
            err = err.masked_fill(bad[s:e], float("inf"))
            j = int(torch.argmin(err))
            if err[j] < best_e:
                best_p, best_e, best_c = s + j, err[j], c[j]
        return best_p, best_e, best_c


def _refine(
    x: Tensor,
    probe: _Probe | None,
    act: Activation,
    a: Tensor,
    cand_i: Tensor,
    cand_j: Tensor,
    cand_cost: Tensor,
    local_search: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Best pair in function space per neuron: ``(i [M], j [M], error [M], scale [M])``."""
    M = a.shape[1]
    best_i = torch.empty(M, dtype=torch.long, device=a.device)
    best_j = torch.empty_like(best_i)
    best_e = torch.empty(M, dtype=a.dtype, device=a.device)
    best_c = torch.empty_like(best_e)
    K, (N, d) = cand_i.shape[1], x.shape
    block = max(1, 2**22 // (K * max(N, d)))  # neurons at a time: [block * K, N or d] temporaries of ~4M entries
    for m0 in range(0, M, block):
        ms = slice(m0, min(m0 + block, M))
        ci, cj = cand_i[ms], cand_j[ms]
        valid = torch.isfinite(cand_cost[ms])  # fewer than top_k pairs of distinct points: inf padding
        ci, cj = ci.masked_fill(~valid, 0), cj.masked_fill(~valid, 1)
        h = act(_preactivation(x, ci.reshape(-1), cj.reshape(-1), act)).view(*ci.shape, N)
        err, c = _fit(h, a[:, ms].T[:, None, :], act.homogeneous)
        err = err.masked_fill(~valid, float("inf"))
        s = torch.argmin(err, dim=1, keepdim=True)
        best_i[ms], best_j[ms] = ci.gather(1, s)[:, 0], cj.gather(1, s)[:, 0]
        best_e[ms], best_c[ms] = err.gather(1, s)[:, 0], c.gather(1, s)[:, 0]
    for m in range(M if local_search else 0):
        i, j, e, scale = int(best_i[m]), int(best_j[m]), best_e[m], best_c[m]
        for _ in range(local_search):
            assert probe is not None
            improved = False
            p, err_p, c_p = probe.best_partner(i, a[:, m], act, k_first=True)
            if err_p < e:
                j, e, scale, improved = p, err_p, c_p, True
            p, err_p, c_p = probe.best_partner(j, a[:, m], act, k_first=False)
            if err_p < e:
                i, e, scale, improved = p, err_p, c_p, True
            if not improved:
                break
        best_i[m], best_j[m], best_e[m], best_c[m] = i, j, e, scale
    return best_i, best_j, best_e, best_c


def map_layer(
    weight: Tensor,
    bias: Tensor,
    x: Tensor,
    *,
    activation: str | Activation = "relu",
    top_k: int = 128,
    refine: str = "function",
    local_search: int = 0,
    backend: str = "auto",
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> PairMap:
    """Map every neuron of a dense layer to the ordered pair of probe points that explains it.

    Args:
        weight: the layer's weight, ``[M, d]`` (``nn.Linear.weight``).
        bias: the layer's bias, ``[M]``.
        x: the layer's inputs on the probe set, ``[N, d]``; computations run in its dtype and on its
            device. In float32, rounding can change which of two nearly equal pairs wins, more so for
            inputs far from the origin relative to their spread: use float64 for exact comparisons.
        activation: the activation that follows the layer (a name or an ``Activation``).
        top_k: number of cheapest parameter-space pairs per neuron passed to the refinement.
        refine: ``"function"`` to re-rank the ``top_k`` pairs in function space and improve them by
            local search, ``"none"`` to keep the parameter-space optimum.
        local_search: coordinate-descent sweeps of the refinement (each costs ``O(N^2)`` per neuron
            with the Gram matrix, ``O(N^2 d)`` without).
        backend: ``"keops"``, ``"torch"`` or ``"auto"`` (KeOps where it compiles, else torch).
        max_memory: bound in bytes on the plain-PyTorch blocks and on the cached Gram matrix.

    Returns:
        A :class:`PairMap`. Neurons with zero or non-finite weights are flagged with index ``-1``
        (one warning counts them); pairs never join coincident points.

    Example:
        >>> from lightning_swim import swim_neurons
        >>> x = torch.randn(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> w, b = swim_neurons(x[[0, 4]], x[[7, 2]])
        >>> pm = map_layer(3 * w, 3 * b, x, backend="torch")
        >>> pm.idx_from.tolist(), pm.idx_to.tolist(), pm.scale.round(decimals=6).tolist()
        ([0, 4], [7, 2], [3.0, 3.0])
    """
    act = get_activation(activation)
    check_points(x, "x")
    weight, bias = _check_layer(weight, bias, x)
    check_positive_int(top_k, "top_k")
    check_choice(refine, "refine", REFINE)
    check_positive_int(local_search, "local_search", minimum=0)
    check_choice(backend, "backend", _search.BACKENDS)
    check_positive_int(max_memory, "max_memory")

    M = weight.shape[0]
    alive = mappable_neurons(weight, bias, stacklevel=3)
    out = PairMap.unmapped(M, act.name, x.dtype, x.device)
    if not bool(alive.any()):
        return out
    w, b = weight[alive], bias[alive]
    fam = _search.Family.of(act)
    v, gamma, c0 = _search.neuron_terms(w, b, x, act)
    fmin, _ = _search.rowmin(x, v, gamma, fam, backend=backend, max_memory=max_memory)
    k = top_k if refine == "function" else 1
    cand_i, cand_j, cand_cost = _search.topk_pairs(x, v, gamma, c0, fam, fmin, k)

    a = act(x @ w.T + b)  # [N, M'] the trained neurons' activations on the probe set
    if refine == "function":
        probe = _Probe(x, max_memory) if local_search > 0 else None  # the Gram matrix only when searched
        i, j, err, c = _refine(x, probe, act, a, cand_i, cand_j, cand_cost, local_search)
    else:
        i, j = cand_i[:, 0], cand_j[:, 0]
        err, _ = _fit(act(_preactivation(x, i, j, act)), a.T, act.homogeneous)
        c = w.norm(dim=1) * (x[i] - x[j]).norm(dim=1) / act.s1  # the parameter-space scale |w| delta / s1
    cost = _search.pair_costs(x, v, gamma, c0, fam, i, j)
    out.idx_from[alive], out.idx_to[alive] = i, j
    out.scale[alive] = c if act.homogeneous else torch.ones_like(c)
    out.param_cost[alive] = cost
    out.func_error[alive] = err
    return out

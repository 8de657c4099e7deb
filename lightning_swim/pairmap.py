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

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from lightning_swim import _search
from lightning_swim._checks import check_choice, check_pairmap, check_points, check_positive_int
from lightning_swim._fsearch import (
    MAX_KEPT,
    SOFT_CUT,
    Candidates,
    exact_candidates,
    fit_error,
    sign_free,
    summarise,
)
from lightning_swim._keops import KeOpsUnavailableError
from lightning_swim.activations import Activation, get_activation

__all__ = ["REFINE", "STATUS", "PairMap", "map_layer", "pair_errors", "random_map"]

REFINE = ("auto", "exact", "function", "none")
STATUS = ("mapped", "zero_weights", "non_finite", "dead")
"""Reasons a neuron is (not) mapped, indexed by :attr:`PairMap.status`."""
DEFAULT_MAX_MEMORY = 512 * 2**20
EXACT_SEEDS = 8  # parameter-space candidates whose errors bound the exact search's best at its start
AUTO_EXACT_WORK = 2.7e11
"""``refine="auto"`` searches exactly when ``N^3 M`` (multiply-adds) is at most this: about 4 s on two CPU cores
(1.25 s with bfloat16 units, ``docs/maths.md``)."""
TIE_ROUNDING = 4
"""Errors of one neuron's pairs within ``TIE_ROUNDING (N + 2) eps`` of its best are ties of the best
(:func:`~lightning_swim._fsearch.summarise`): twice the rounding bound of an error computed from inner
products over ``N`` probe points, under which pairs of one function (collinear points) can differ."""


@dataclass
class PairMap:
    r"""The pairs that explain a layer's neurons, one entry per neuron (``M`` of them).

    Attributes:
        idx_from: index ``i`` of each neuron's first point, ``[M]`` int64; ``-1`` for flagged neurons
            (see ``status``).
        idx_to: index ``j`` of the second point, ``[M]`` int64 (``-1`` likewise).
        scale: the output factor ``c`` of the best fit, ``[M]``: the neuron's activation is
            ``c * sigma(z_ij)`` up to the map's error. For homogeneous activations (ReLU) ``c >= 0``
            and the neuron is the SWIM neuron multiplied by ``c``; with ``refine="none"`` it is
            :math:`|w|\delta / s_1` (the norms match). For tanh ``c >= 0`` too (the pair's orientation
            carries the sign); for sigmoid and the other activations it may be negative.
        param_cost: the parameter-space cost of the pair, ``[M]``, in the layer's normalised frame
            (inputs centred and scaled to unit root-mean-square norm; see :func:`map_layer`).
        func_error: the relative function-space error of the pair on the probe set, ``[M]``, with the
            optimal output factor ``scale``.
        activation: the activation's registry name.
        refine: how the pairs were found: ``"exact"`` (the function-space optimum over all pairs),
            ``"function"`` (the best of the ``top_k`` parameter-space candidates, with local search) or
            ``"none"`` (the parameter-space optimum).
        status: ``[M]`` int64, an index into :data:`STATUS`: 0 mapped, 1 zero weights, 2 non-finite
            weights, 3 dead (zero on the whole probe set). Flagged neurons have index ``-1`` and NaN
            numbers, and carry no importance.
        n_near: ``[M]`` int64, the ordered pairs whose error is within the map's tolerance of the best
            (``atol``, ``rtol`` of :func:`map_layer`): over all pairs with ``refine="exact"`` (exact
            below 2,048; a count of 2,048 or more may be a lower bound, since the search keeps at most
            4,096 candidates per neuron), over the candidates examined otherwise (a lower bound);
            ``-1`` for flagged neurons.
        n_near_points: ``[M]`` int64, the distinct points those pairs use.
        soft_neuron, soft_from, soft_to, soft_weight: the soft attribution, ``[P]`` each: neuron
            ``soft_neuron[p]`` gives weight ``soft_weight[p]`` (float64) to the pair
            ``(soft_from[p], soft_to[p])``; each mapped neuron's weights sum to 1. Without them (maps made
            by hand) every mapped neuron gives weight 1 to its pair.
    """

    idx_from: Tensor
    idx_to: Tensor
    scale: Tensor
    param_cost: Tensor
    func_error: Tensor
    activation: str = "relu"
    refine: str = "none"
    status: Tensor | None = None
    n_near: Tensor | None = None
    n_near_points: Tensor | None = None
    soft_neuron: Tensor | None = None
    soft_from: Tensor | None = None
    soft_to: Tensor | None = None
    soft_weight: Tensor | None = None

    def __post_init__(self) -> None:
        check_pairmap(self, name="PairMap")  # one length, integer indices >= -1, -1 together
        idx = self.idx_from
        ok = idx >= 0
        if self.status is None:
            self.status = torch.where(ok, 0, 1).to(device=idx.device, dtype=torch.long)
        if self.n_near is None:
            self.n_near = torch.where(ok, 1, -1).to(device=idx.device, dtype=torch.long)
        if self.n_near_points is None:
            self.n_near_points = torch.where(ok, 2, -1).to(device=idx.device, dtype=torch.long)
        if self.soft_neuron is None or self.soft_from is None or self.soft_to is None or self.soft_weight is None:
            rows = ok.nonzero().ravel()
            self.soft_neuron, self.soft_from, self.soft_to = rows, self.idx_from[rows], self.idx_to[rows]
            self.soft_weight = torch.ones(len(rows), dtype=torch.float64, device=idx.device)
        soft = {f: getattr(self, f) for f in ("soft_neuron", "soft_from", "soft_to", "soft_weight")}
        if len({tuple(t.shape) for t in soft.values()}) != 1 or soft["soft_neuron"].ndim != 1:
            shapes = {f: tuple(t.shape) for f, t in soft.items()}
            raise ValueError(
                f"Expected the soft attribution of `PairMap` to be 1D tensors of one length but got {shapes}."
            )

    def __len__(self) -> int:
        return int(self.idx_from.shape[0])

    @property
    def valid(self) -> Tensor:
        """``[M]`` bool: neurons that were mapped to a pair."""
        return self.idx_from >= 0

    def reasons(self) -> list[str]:
        """The status of every neuron as a word (see :data:`STATUS`)."""
        assert self.status is not None
        return [STATUS[int(s)] for s in self.status]

    def to(self, device: torch.device | str) -> PairMap:
        return PairMap(
            **{k: v.to(device) for k, v in self.tensors().items()}, activation=self.activation, refine=self.refine
        )

    @staticmethod
    def unmapped(m: int, activation: str, dtype: torch.dtype, device: torch.device) -> PairMap:
        """A map of ``m`` neurons that are all flagged (index -1, NaN numbers), to be filled in."""

        def nan() -> Tensor:
            return torch.full((m,), float("nan"), dtype=dtype, device=device)

        idx = torch.full((m,), -1, dtype=torch.long, device=device)
        return PairMap(idx, idx.clone(), nan(), nan(), nan(), activation)

    def tensors(self) -> dict[str, Tensor]:
        """The tensors by name (for saving)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("activation", "refine")}


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


def _fit(h: Tensor, a: Tensor, free_sign: bool) -> tuple[Tensor, Tensor]:
    """Relative error and optimal factor of ``c h`` against ``a``, row by row.

    ``h [C, N]`` against ``a [N]`` (or ``[C, N]``), ``a`` not identically zero -> ``(error [C], c [C])``.
    """
    tiny = torch.finfo(h.dtype).tiny
    return fit_error((h * a).sum(-1), (h * h).sum(-1).clamp_min(tiny), (a * a).sum(-1).clamp_min(tiny), free_sign)


class _Probe:
    """The probe set of one layer for the local search, with its Gram matrix if that fits in memory."""

    def __init__(self, x: Tensor, max_memory: int) -> None:
        self.x = x
        self.sq = (x * x).sum(1)
        self.groups = _search.duplicate_groups(x)
        n, item = x.shape[0], x.element_size()
        self.gram = x @ x.T if 2 * n * n * item <= max_memory else None
        self.chunk = max(1, max_memory // (8 * n * item))  # rows of the [chunk, N] temporaries

    def best_partner(self, k: int, a: Tensor, act: Activation, *, k_first: bool) -> tuple[int, Tensor]:
        """The partner ``p`` minimising the function-space error of the pair ``(k, p)`` (``k_first``) or
        ``(p, k)``: ``(p, error)``; the first of equals wins."""
        x, n = self.x, self.x.shape[0]
        free = sign_free(act)
        bad = self.groups == self.groups[k]
        diff = x - x[k]  # x_p - x_k
        d2 = (diff * diff).sum(1).masked_fill(bad, 1.0)  # exact, not from the Gram matrix: near-duplicates
        g = self.gram
        best_p, best_e = -1, torch.tensor(float("inf"), dtype=x.dtype)
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
            err, _ = _fit(act(act.s1 * dot / d2[s:e, None] - act.s2), a, free)
            err = err.masked_fill(bad[s:e], float("inf"))
            j = int(torch.argmin(err))
            if err[j] < best_e:
                best_p, best_e = s + j, err[j]
        return best_p, best_e


def _candidate_errors(
    x: Tensor, act: Activation, a: Tensor, cand_i: Tensor, cand_j: Tensor, cand_cost: Tensor
) -> Candidates:
    """The function-space errors of every neuron's ``top_k`` parameter-space candidates."""
    M, (K, N, d) = a.shape[1], (cand_i.shape[1], *x.shape)
    free = sign_free(act)
    block = max(1, 2**22 // (K * max(N, d)))  # neurons at a time: [block * K, N or d] temporaries of ~4M entries
    errs = []
    for m0 in range(0, M, block):
        ms = slice(m0, min(m0 + block, M))
        valid = torch.isfinite(cand_cost[ms])  # fewer than top_k pairs of distinct points: inf padding
        ci, cj = cand_i[ms].masked_fill(~valid, 0), cand_j[ms].masked_fill(~valid, 1)
        h = act(_preactivation(x, ci.reshape(-1), cj.reshape(-1), act)).view(*ci.shape, N)
        err, _ = _fit(h, a[:, ms].T[:, None, :], free)
        errs.append(err.masked_fill(~valid, float("inf")))
    err = torch.cat(errs)
    keep = torch.isfinite(err)
    m = torch.arange(M, device=x.device)[:, None].expand_as(err)
    return Candidates(m[keep], cand_i[keep], cand_j[keep], err[keep])


def _local_search(
    x: Tensor, act: Activation, a: Tensor, best_i: Tensor, best_j: Tensor, best_e: Tensor, sweeps: int, max_memory: int
) -> Candidates:
    """Coordinate descent from each neuron's pair: keep ``i`` and try every ``j``, then keep ``j``..."""
    probe = _Probe(x, max_memory)
    out_i, out_j, out_e = best_i.clone(), best_j.clone(), best_e.clone()
    for m in range(a.shape[1]):
        i, j, e = int(best_i[m]), int(best_j[m]), best_e[m]
        for _ in range(sweeps):
            improved = False
            p, err_p = probe.best_partner(i, a[:, m], act, k_first=True)
            if err_p < e:
                j, e, improved = p, err_p, True
            p, err_p = probe.best_partner(j, a[:, m], act, k_first=False)
            if err_p < e:
                i, e, improved = p, err_p, True
            if not improved:
                break
        out_i[m], out_j[m], out_e[m] = i, j, e
    return Candidates(torch.arange(a.shape[1], device=x.device), out_i, out_j, out_e)


def _frame(x: Tensor, weight: Tensor, bias: Tensor, homogeneous: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""The layer in its normalised frame: ``(x', w', b', k)``.

    With :math:`\mu` the probe mean and :math:`\sigma` the root-mean-square norm of
    :math:`x - \mu`, the inputs become :math:`x' = (x - \mu)/\sigma` and a neuron
    :math:`(w, b)` becomes :math:`(\sigma w, b + \langle w, \mu\rangle)`: the same function of the
    same points. SWIM neurons are equivariant under this similarity transform, so the pairs do not
    change, while every computation stays well scaled at any input or weight magnitude. For
    homogeneous activations each neuron is further divided by ``k = |w'|`` (a positive rescaling),
    which its ``scale`` carries back. Computed in float64, returned in ``x``'s dtype.
    """
    x64 = x.double()
    mu = x64.mean(0)
    xc = x64 - mu
    sigma = xc.square().sum(1).mean().sqrt()
    w64 = weight.double()
    wf, bf = w64 * sigma, bias.double() + w64 @ mu
    k = wf.norm(dim=1) if homogeneous else torch.ones_like(bf)
    wf, bf = wf / k[:, None], bf / k
    dt = x.dtype
    return (xc / sigma).to(dt), wf.to(dt), bf.to(dt), k


def map_layer(
    weight: Tensor,
    bias: Tensor,
    x: Tensor,
    *,
    activation: str | Activation = "relu",
    refine: str = "auto",
    top_k: int = 128,
    local_search: int = 0,
    backend: str = "auto",
    max_memory: int = DEFAULT_MAX_MEMORY,
    atol: float = 0.01,
    rtol: float = 0.0,
    temperature: float | None = None,
    max_soft: int = 64,
) -> PairMap:
    r"""Map every neuron of a dense layer to the ordered pair of probe points that explains it.

    The map works in the layer's normalised frame (probe inputs centred and scaled to unit
    root-mean-square norm, neurons transformed to compute the same function), so that it is
    invariant to translations and scalings of the inputs and numerically sound at any magnitude.

    ``refine`` chooses how the pair is found:

    - ``"exact"``: the ordered pair of distinct probe points that minimises the function-space error
      (the relative error of the best rescaled SWIM neuron on the probe set; the factor is
      non-negative for homogeneous activations and tanh) over all :math:`N(N-1)` pairs; ties (errors
      within :data:`TIE_ROUNDING` :math:`(N + 2)\,\epsilon` of the best: rounding) go to the smallest
      ``(i, j)``. :math:`O(N^3 M)` multiply-adds in GEMMs (in bfloat16 behind a proven error
      bound, the entries near the window computed again exactly, where the CPU has bf16 units).
    - ``"function"``: the exact ``top_k`` pairs in parameter space (stage 1, :math:`O(N^2 M)`) re-ranked
      in function space, then ``local_search`` sweeps of coordinate descent. Not exact.
    - ``"none"``: the exact optimum in parameter space.
    - ``"auto"`` (default): ``"exact"`` when :math:`N^3 M \le` :data:`AUTO_EXACT_WORK` (about 4 s on two
      CPU cores, under 2 s where they have bfloat16 units), else ``"function"``.

    Every pair within ``atol + rtol * e*`` of a neuron's best error ``e*`` is counted (``n_near``:
    how ambiguous the best pair is), and each neuron spreads a *soft attribution* over its
    near-optimal pairs with Gibbs weights :math:`\exp(-(e - e^*)/\tau)`, :math:`\tau` =
    ``temperature`` :math:`\cdot e^*`: a pair whose error exceeds the best by ``temperature`` of it
    weighs :math:`1/e` of the best's. Neurons with zero or non-finite weights, and dead neurons (zero
    on the whole probe set), are flagged.

    Args:
        weight: the layer's weight, ``[M, d]`` (``nn.Linear.weight``).
        bias: the layer's bias, ``[M]``.
        x: the layer's inputs on the probe set, ``[N, d]``; computations run in its dtype and on its
            device. In float32, rounding can change which of two nearly equal pairs wins: use float64
            for exact comparisons.
        activation: the activation that follows the layer (a name or an ``Activation``).
        refine: ``"auto"``, ``"exact"``, ``"function"`` or ``"none"`` (above).
        top_k: parameter-space candidates per neuron re-ranked by ``refine="function"``.
        local_search: coordinate-descent sweeps after ``refine="function"`` (each costs ``O(N^2)`` per
            neuron with the Gram matrix, ``O(N^2 d)`` without).
        backend: ``"keops"``, ``"torch"`` or ``"auto"``. The parameter-space search: KeOps where it
            compiles, else torch. The exact search: torch on the CPU (faster there), KeOps on CUDA
            (no ``[N, N]`` array), else torch. The backends give the same results.
        max_memory: bound in bytes on the blocks of every search and on the cached Gram matrix.
        atol, rtol: the tolerance of ``n_near`` (and of :func:`~lightning_swim.turnover`).
        temperature: of the soft attribution, relative to the neuron's best error (> 0); default
            :math:`\\sqrt{2/N}`.
        max_soft: at most this many pairs per neuron in the soft attribution (the cheapest ones).

    Returns:
        A :class:`PairMap`; flagged neurons have index ``-1`` (one warning counts those with zero or
        non-finite weights); pairs never join coincident points.

    Example:
        >>> from lightning_swim import swim_neurons
        >>> x = torch.randn(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> w, b = swim_neurons(x[[0, 4]], x[[7, 2]])
        >>> pm = map_layer(3 * w, 3 * b, x, refine="exact")
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
    for name, value in (("atol", atol), ("rtol", rtol)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"Expected argument `{name}` to be a finite number >= 0 but got {value!r}.")
    if temperature is not None and not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"Expected argument `temperature` to be a finite number > 0 but got {temperature!r}.")
    check_positive_int(max_soft, "max_soft")

    N, M = x.shape[0], weight.shape[0]
    mode = refine if refine != "auto" else ("exact" if N**3 * M <= AUTO_EXACT_WORK else "function")
    out = PairMap.unmapped(M, act.name, x.dtype, x.device)
    out.refine = mode
    out.status = torch.zeros(M, dtype=torch.long, device=x.device)
    finite = torch.isfinite(weight).all(1) & torch.isfinite(bias)
    out.status[~finite] = STATUS.index("non_finite")
    out.status[finite & ~(weight != 0).any(1)] = STATUS.index("zero_weights")
    alive = out.status == 0
    try:
        if bool(alive.any()):
            xf, wf, bf, k = _frame(x, weight[alive], bias[alive], act.homogeneous)
            a = act(xf @ wf.T + bf)  # [N, M'] the trained neurons' activations on the probe set
            live = (a != 0).any(0)
            rows = alive.nonzero().ravel()
            out.status[rows[~live]] = STATUS.index("dead")
            if bool(live.any()):
                _map_alive(out, rows[live], xf, wf[live], bf[live], k[live], a[:, live], act, mode, locals())
    finally:
        _warn_flagged(out.status)
    return out


def _warn_flagged(status: Tensor) -> None:
    counts = torch.bincount(status.cpu(), minlength=len(STATUS)).tolist()
    if sum(counts[1:]):
        detail = ", ".join(f"{c} {STATUS[k].replace('_', ' ')}" for k, c in enumerate(counts) if k and c)
        warnings.warn(
            f"{sum(counts[1:])} of {len(status)} neurons cannot be explained by a pair and are flagged with index -1 "
            f"({detail}; `PairMap.status` says which; dead: zero on every probe point).",
            RuntimeWarning,
            stacklevel=3,
        )


def _map_alive(
    out: PairMap,
    rows: Tensor,
    x: Tensor,
    w: Tensor,
    b: Tensor,
    k: Tensor,
    a: Tensor,
    act: Activation,
    mode: str,
    opts: dict[str, Any],
) -> None:
    """Fill ``out`` for the live neurons ``rows`` (their frame weights ``w, b``, activations ``a``)."""
    atol, rtol = float(opts["atol"]), float(opts["rtol"])
    temperature = float(opts["temperature"]) if opts["temperature"] is not None else math.sqrt(2 / x.shape[0])
    max_memory = int(opts["max_memory"])
    M = len(rows)
    fam = _search.Family.of(act)
    v, gamma, c0 = _search.neuron_terms(w, b, x, act)
    tau0 = 16 * torch.finfo(x.dtype).eps
    tie = TIE_ROUNDING * (x.shape[0] + 2) * torch.finfo(x.dtype).eps  # errors closer than this are ties

    def threshold(best: Tensor) -> Tensor:
        return best + torch.maximum(atol + rtol * best, SOFT_CUT * (temperature * best + tau0)).clamp_min(tie)

    fmin, _ = _search.rowmin(x, v, gamma, fam, backend=str(opts["backend"]), max_memory=max_memory)
    kk = {"exact": EXACT_SEEDS, "function": int(opts["top_k"]), "none": 1}[mode]
    cand_i, cand_j, cand_cost = _search.topk_pairs(x, v, gamma, c0, fam, fmin, kk)
    cand = _candidate_errors(x, act, a, cand_i, cand_j, cand_cost)
    if mode == "exact":  # the parameter-space candidates bound the best error: fewer pairs kept on the way
        bound = torch.full((M,), float("inf"), dtype=x.dtype, device=x.device).scatter_reduce_(
            0, cand.m, cand.err, reduce="amin"
        )
        max_kept = max(MAX_KEPT, 2 * int(opts["max_soft"]))
        near = threshold_fn(atol, rtol)
        keep = {
            "max_kept": max_kept,
            "near": None if near is None else (lambda best: torch.maximum(near(best), best + tie)),
            "n_cheapest": int(opts["max_soft"]),
        }
        cand = _exact(x, act, a, threshold, bound, max_memory, str(opts["backend"]), keep)
    else:
        sweeps = int(opts["local_search"])
        if mode == "function" and sweeps:
            first = summarise(cand, M, atol=atol, rtol=rtol, temperature=temperature, max_soft=1, tie=tie)
            more = _local_search(x, act, a, first.best_i, first.best_j, first.best_err, sweeps, max_memory)
            cand = Candidates(*(torch.cat([getattr(cand, f), getattr(more, f)]) for f in ("m", "i", "j", "err")))
            cand = _unique_pairs(cand)
    cand = _equal_errors_for_duplicates(cand, _search.duplicate_groups(x))
    res = summarise(cand, M, atol=atol, rtol=rtol, temperature=temperature, max_soft=int(opts["max_soft"]), tie=tie)
    i, j = res.best_i, res.best_j
    err, c = _fit(act(_preactivation(x, i, j, act)), a.T, sign_free(act))
    if mode == "none":
        c = (x[i] - x[j]).norm(dim=1) / act.s1 if act.homogeneous else c  # the parameter-space scale
    out.idx_from[rows], out.idx_to[rows] = i, j
    out.scale[rows] = (c * k.to(c)) if act.homogeneous else c
    out.param_cost[rows] = _search.pair_costs(x, v, gamma, c0, fam, i, j)
    out.func_error[rows] = err
    assert out.n_near is not None and out.n_near_points is not None
    out.n_near[rows], out.n_near_points[rows] = res.n_near, res.n_near_points
    out.soft_neuron, out.soft_from, out.soft_to, out.soft_weight = (
        rows[res.soft_neuron],
        res.soft_from,
        res.soft_to,
        res.soft_weight,
    )


def _exact(
    x: Tensor,
    act: Activation,
    a: Tensor,
    threshold: Callable[[Tensor], Tensor],
    bound: Tensor,
    max_memory: int,
    backend: str,
    keep: dict[str, Any],
) -> Candidates:
    """The exact search on the chosen backend. ``"auto"``: torch on the CPU (GEMMs on ``[N, N]`` blocks
    run faster there than KeOps' reductions), KeOps on CUDA, falling back to torch with one warning."""
    if backend == "auto":
        backend = "keops" if x.device.type == "cuda" else "torch"
        if backend == "keops":
            try:
                return exact_candidates(x, act, a, threshold, bound, max_memory=max_memory, backend="keops", **keep)[0]
            except Exception as err:  # KeOps unavailable, failing to compile, or no formula for the activation
                _search.warn_fallback(err, "exact function-space search")
                backend = "torch"
    if backend == "keops":
        try:
            return exact_candidates(x, act, a, threshold, bound, max_memory=max_memory, backend="keops", **keep)[0]
        except KeOpsUnavailableError:
            raise
        except Exception as err:
            raise KeOpsUnavailableError(
                f"KeOps failed on the exact search ({type(err).__name__}: {err}). Use backend='torch' or "
                "backend='auto' to run without it."
            ) from err
    return exact_candidates(x, act, a, threshold, bound, max_memory=max_memory, backend="torch", **keep)[0]


def _equal_errors_for_duplicates(cand: Candidates, groups: Tensor) -> Candidates:
    """Give pairs of coincident points (same neuron, same point groups) one error, their smallest.

    Their SWIM neurons are the same function, but the searches compute their errors at different
    places in a block (or in a sampled product), so rounding can tell them apart; equal, they tie
    exactly, and the tie goes to the smallest ``(i, j)`` as documented.
    """
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    if n_groups == len(groups) or len(cand.m) == 0:  # no duplicates
        return cand
    key = (cand.m * n_groups + groups[cand.i]) * n_groups + groups[cand.j]
    _, inverse = torch.unique(key, return_inverse=True)
    low = torch.full((int(inverse.max()) + 1,), float("inf"), dtype=cand.err.dtype, device=cand.err.device)
    low.scatter_reduce_(0, inverse, cand.err, reduce="amin")
    return Candidates(cand.m, cand.i, cand.j, low[inverse])


def _unique_pairs(cand: Candidates) -> Candidates:
    """Drop repeated ``(m, i, j)`` entries (local search may rediscover a candidate)."""
    if len(cand.m) == 0:
        return cand
    n = int(torch.maximum(cand.i, cand.j).max()) + 1
    _, inverse = torch.unique((cand.m * n + cand.i) * n + cand.j, return_inverse=True)  # (m, i, j) as one key
    first = torch.full((int(inverse.max()) + 1,), len(inverse), dtype=torch.long, device=inverse.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(inverse), device=inverse.device), reduce="amin")
    return Candidates(cand.m[first], cand.i[first], cand.j[first], cand.err[first])


def threshold_fn(atol: float, rtol: float) -> Callable[[Tensor], Tensor]:
    """The tolerance of ``n_near`` as a function of the best errors (also used by turnover)."""
    return lambda best: best + atol + rtol * best


def pair_errors(
    weight: Tensor,
    bias: Tensor,
    x: Tensor,
    idx_from: Tensor,
    idx_to: Tensor,
    *,
    activation: str | Activation = "relu",
) -> tuple[Tensor, Tensor]:
    """The function-space error and output factor of given pairs, one pair per neuron.

    Args:
        weight, bias: the layer, ``[M, d]`` and ``[M]``.
        x: its inputs on the probe set, ``[N, d]``.
        idx_from, idx_to: a pair per neuron, ``[M]`` (``-1``: none).

    Returns:
        ``(error [M], scale [M])`` as in :class:`PairMap` (``func_error``, ``scale``); NaN where a
        neuron has no pair, joins coincident points, or is flagged (zero, non-finite or dead).
    """
    act = get_activation(activation)
    check_points(x, "x")
    weight, bias = _check_layer(weight, bias, x)
    M = weight.shape[0]
    for name, t in (("idx_from", idx_from), ("idx_to", idx_to)):
        if not isinstance(t, Tensor) or t.shape != (M,) or t.is_floating_point():
            raise ValueError(f"Expected argument `{name}` to be an integer tensor of shape `[{M}]` but got {t!r}.")
        if bool((t >= x.shape[0]).any()):
            raise ValueError(f"Argument `{name}` indexes points beyond the {x.shape[0]} rows of `x`.")
    err = torch.full((M,), float("nan"), dtype=x.dtype, device=x.device)
    scale = err.clone()
    i, j = idx_from.to(x.device), idx_to.to(x.device)
    ok = torch.isfinite(weight).all(1) & torch.isfinite(bias) & (weight != 0).any(1) & (i >= 0) & (j >= 0)
    ok &= (x[i.clamp_min(0)] != x[j.clamp_min(0)]).any(1)
    if not bool(ok.any()):
        return err, scale
    xf, wf, bf, k = _frame(x, weight[ok], bias[ok], act.homogeneous)
    a = act(xf @ wf.T + bf)
    live = (a != 0).any(0)
    rows = ok.nonzero().ravel()[live]
    e, c = _fit(act(_preactivation(xf, i[rows], j[rows], act)), a[:, live].T, sign_free(act))
    err[rows] = e
    scale[rows] = c * k[live].to(c) if act.homogeneous else c
    return err, scale


def random_map(
    weight: Tensor,
    bias: Tensor,
    x: Tensor,
    *,
    activation: str | Activation = "relu",
    generator: torch.Generator,
) -> PairMap:
    """A reference map: every neuron gets a uniformly random ordered pair of distinct probe points.

    Each pair keeps its best output factor (the least-squares ``scale``, as the real map's), so a
    network rebuilt from it is the real map's baseline: what any pairs would do.

    Args:
        weight, bias: the layer, ``[M, d]`` and ``[M]``.
        x: its inputs on the probe set, ``[N, d]`` (at least two distinct points).
        activation: the activation after the layer.
        generator: the source of randomness (CPU).

    Returns:
        A :class:`PairMap` (``refine="random"``); neurons without a valid pair are flagged as by
        :func:`map_layer`.
    """
    act = get_activation(activation)
    check_points(x, "x")
    weight, bias = _check_layer(weight, bias, x)
    M, N = weight.shape[0], x.shape[0]
    groups = _search.duplicate_groups(x).cpu()
    i = torch.randint(0, N, (M,), generator=generator)
    j = (i + torch.randint(1, N, (M,), generator=generator)) % N
    for _ in range(64):  # redraw pairs of coincident points (at least two distinct points exist)
        same = groups[i] == groups[j]
        if not bool(same.any()):
            break
        j[same] = torch.randint(0, N, (int(same.sum()),), generator=generator)
    i, j = i.to(x.device), j.to(x.device)
    err, scale = pair_errors(weight, bias, x, i, j, activation=act)
    ok = torch.isfinite(err)
    idx = torch.full((M,), -1, dtype=torch.long, device=x.device)
    pm = PairMap(
        torch.where(ok, i, idx),
        torch.where(ok, j, idx),
        scale,
        torch.full_like(err, float("nan")),
        err,
        act.name,
        "random",
    )
    return pm

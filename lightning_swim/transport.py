r"""The population map: a layer's neurons against SWIM's distribution, by entropic optimal transport.

The trained neurons form a measure :math:`\mu = \sum_m \alpha_m \delta_{\theta_m}` in parameter
space, the SWIM neurons of candidate pairs a measure :math:`\nu = \sum_k \beta_k \delta_{\theta_k}`.
Parameters are normalised for homogeneous activations, :math:`\theta = (w, b) / |w|` (as in the pair
map: only the direction of a ReLU neuron matters), and :math:`\theta = (w, b)` otherwise.

Units (GeomLoss ``SamplesLoss`` with ``p = 2``): the ground cost is :math:`C(\theta, \theta') =
\tfrac12 |\theta - \theta'|^2` and the entropic regularisation is :math:`\varepsilon = \text{blur}^2`;
with ``reach`` the marginal constraints are relaxed by :math:`\rho\,\mathrm{KL}` with
:math:`\rho = \text{reach}^2`. From the (non-debiased) dual potentials :math:`f, g`, the plan is

.. math::
    \pi_{mk} = \alpha_m \beta_k \exp\big((f_m + g_k - C_{mk}) / \varepsilon\big),

evaluated lazily in blocks of candidates. Each neuron's *hard assignment* is the candidate of largest
plan mass in its row, its *mass share* that candidate's share of the row. The *Sinkhorn divergence*
:math:`S_\varepsilon(\mu, \nu)` (debiased, one more solve) is one number per layer: how far the layer
is from the SWIM distribution.

A point's importance is the plan's column mass on the candidates that use it (half to each point of
a pair). With balanced transport (``reach=None``) every candidate receives exactly its weight
:math:`\beta_k`, so this importance only restates the candidate pool; with ``reach`` candidates that
no neuron needs are left empty and it says which points the layer uses.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_swim._checks import check_choice, check_points, check_positive_finite, check_positive_int
from lightning_swim._fsearch import sign_free
from lightning_swim.activations import Activation, get_activation
from lightning_swim.pairmap import PairMap, _check_layer, _fit, _preactivation, mappable_neurons
from lightning_swim.sampling import sample_pairs, swim_neurons

__all__ = ["OT_BACKENDS", "TransportMap", "transport_map"]

OT_BACKENDS = ("auto", "tensorized", "online", "blocked")
DEFAULT_MAX_MEMORY = 512 * 2**20
_warned = {"online": False}


@dataclass
class TransportMap:
    """The entropic transport of a layer's neurons onto SWIM candidate neurons.

    Attributes:
        divergence: the Sinkhorn divergence :math:`S_\\varepsilon(\\mu, \\nu)` (scalar tensor).
        cand_from, cand_to: the candidate pairs, ``[K]`` int64 indices into the probe set.
        f: dual potential on the neurons, ``[M]`` (NaN for flagged neurons).
        g: dual potential on the candidates, ``[K]``.
        assignment: each neuron's candidate of largest plan mass, ``[M]`` (-1 for flagged neurons).
        mass_share: that candidate's share of the neuron's plan mass, ``[M]``.
        pairs: the hard assignments as a :class:`~lightning_swim.PairMap`.
        importance: per-point importance from the plan's column mass, ``[N]``, summing to 1.
        eps: the entropic regularisation :math:`\\text{blur}^2`.
        backend: the backend that ran the annealed solve (``"blocked"``: the plain-PyTorch twin).
        iterations: Sinkhorn iterations run at the final temperature after GeomLoss' annealing.
    """

    divergence: Tensor
    cand_from: Tensor
    cand_to: Tensor
    f: Tensor
    g: Tensor
    assignment: Tensor
    mass_share: Tensor
    pairs: PairMap
    importance: Tensor
    eps: float
    backend: str
    iterations: int


def _params(w: Tensor, b: Tensor, act: Activation) -> Tensor:
    """Points of parameter space, ``[M, d + 1]``: ``(w, b) / |w|`` if homogeneous, else ``(w, b)``."""
    theta = torch.cat([w, b[:, None]], 1)
    return theta / w.norm(dim=1, keepdim=True) if act.homogeneous else theta


def _keops_works() -> bool:
    try:
        from lightning_swim._keops import pykeops_torch

        pykeops_torch()
        return True
    except Exception:
        return False


def _choose_backend(backend: str, m: int, k: int, itemsize: int, device: torch.device, max_memory: int) -> str:
    if backend != "auto":
        return backend
    # On a CPU the dense ("tensorized") solver is about ten times faster than KeOps' online one
    # (benchmarks/bench_transport.py), so it is used whenever its cost matrices fit in max_memory;
    # online runs on GPUs and where a dense M x K matrix would not fit, on KeOps if it imports, else
    # on its plain-PyTorch twin ("blocked").
    dense_fits = 3 * m * k * itemsize <= max_memory
    if device.type == "cpu" and dense_fits:
        return "tensorized"
    return "online" if _keops_works() else "blocked"


def _samples_loss(blur: float, reach: float | None, scaling: float, backend: str, potentials: bool) -> Any:
    from lightning_swim._keops import import_geomloss

    SamplesLoss = import_geomloss().SamplesLoss

    return SamplesLoss(
        "sinkhorn",
        p=2,
        blur=blur,
        reach=reach,
        scaling=scaling,
        debias=not potentials,
        potentials=potentials,
        backend=backend,
    )


def _blocked_softmin(x: Tensor, y: Tensor, h: Tensor, eps: float, max_memory: int) -> Tensor:
    r"""The soft-C-transform :math:`f_i = -\varepsilon \log \sum_j e^{h_j - |x_i - y_j|^2 / 2\varepsilon}`, ``[N]``.

    What GeomLoss' online backend computes with a KeOps log-sum-exp reduction, here in blocks of rows
    and columns with at most ``max_memory`` bytes of temporaries (the log-sum-exps of column blocks
    merged with ``logaddexp``). The cost is GeomLoss' tensorized ``(|x|^2 + |y|^2 - 2 <x, y>) / 2``.
    """
    n, m = x.shape[0], y.shape[0]
    entries = max(1, max_memory // (3 * x.element_size()))  # a [rows, cols] cost, its exponent, a spare
    cols = min(m, entries)
    rows = max(1, min(n, entries // cols))
    sq_x, sq_y = (x * x).sum(1), (y * y).sum(1)
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    for r in range(0, n, rows):
        xr = x[r : r + rows]
        acc: Tensor | None = None
        for c in range(0, m, cols):
            cost = (sq_x[r : r + rows, None] - 2 * xr @ y[c : c + cols].T + sq_y[None, c : c + cols]).clamp_min_(0)
            lse = torch.logsumexp(h[None, c : c + cols] - cost / (2 * eps), dim=1)
            acc = lse if acc is None else torch.logaddexp(acc, lse)
        assert acc is not None
        out[r : r + rows] = -eps * acc
    return out


def _sinkhorn_blocked(
    alpha: Tensor,
    x: Tensor,
    beta: Tensor,
    y: Tensor,
    *,
    blur: float,
    reach: float | None,
    scaling: float,
    potentials: bool,
    max_memory: int,
) -> Any:
    """GeomLoss' ``SamplesLoss("sinkhorn", p=2, backend="online")`` in plain PyTorch, in linear memory.

    The same annealed Sinkhorn loop (GeomLoss' own ``sinkhorn_loop``, epsilon schedule and final
    cost) with :func:`_blocked_softmin` in place of the KeOps reduction: the online path where KeOps
    is missing or cannot compile. Returns the non-debiased potentials ``([M], [K])`` if
    ``potentials``, else the debiased Sinkhorn divergence (a scalar tensor).
    """
    from lightning_swim._keops import import_geomloss

    import_geomloss()  # KeOps first, quietly
    from geomloss._legacy.sinkhorn_divergence import log_weights, scaling_parameters, sinkhorn_cost, sinkhorn_loop

    x, y = x.detach(), y.detach()
    a, b = alpha.detach().reshape(1, -1), beta.detach().reshape(1, -1)
    debias = not potentials

    def softmin(eps: float, c_xy: tuple[Tensor, Tensor], h: Tensor) -> Tensor:
        return _blocked_softmin(c_xy[0], c_xy[1], h.reshape(-1), eps, max_memory).reshape(1, -1)

    _, eps, eps_list, rho = scaling_parameters(x, y, 2, blur, reach, None, scaling)
    with torch.no_grad():
        f_aa, g_bb, g_ab, f_ba = sinkhorn_loop(
            softmin,
            log_weights(a),
            log_weights(b),
            (x, x) if debias else None,
            (y, y) if debias else None,
            (x, y),
            (y, x),
            eps_list,
            rho,
            debias=debias,
        )
        out = sinkhorn_cost(eps, rho, a, b, f_aa, g_bb, g_ab, f_ba, batch=True, debias=debias, potentials=potentials)
    if potentials:
        return out[0].detach().reshape(-1), out[1].detach().reshape(-1)
    return out.detach().reshape(())


def _ot(
    alpha: Tensor, x: Tensor, beta: Tensor, y: Tensor, *, backend: str, auto: bool, max_memory: int, **kw: Any
) -> tuple[Any, str]:
    """One annealed solve (``potentials=True``: the plan's potentials, else the debiased divergence).

    Returns the result and the backend that ran it. ``"online"`` runs KeOps; if KeOps fails (no
    compiler, a formula that does not build) and the backend was chosen automatically (``auto``),
    the plain-PyTorch twin runs instead, with one warning per process.
    """
    if backend == "blocked":
        return _sinkhorn_blocked(alpha, x, beta, y, max_memory=max_memory, **kw), "blocked"
    try:
        with torch.no_grad():  # SamplesLoss turns autograd back on inside; nothing here needs it
            out = _samples_loss(backend=backend, **kw)(alpha.detach(), x.detach(), beta.detach(), y.detach())
    except Exception as err:
        if backend != "online":
            raise
        reason = f"{type(err).__name__}: {str(err)[:200]}"
        if not auto:
            from lightning_swim._keops import KeOpsUnavailableError

            raise KeOpsUnavailableError(
                f"KeOps failed on the online transport ({reason}). Use backend='blocked' (the same solve in "
                "plain PyTorch, in linear memory) or backend='auto'."
            ) from err
        if not _warned["online"]:
            _warned["online"] = True
            warnings.warn(
                f"KeOps is not usable for the online transport ({reason}); it runs in plain PyTorch, in blocks "
                "(the same results, slower on large layers).",
                RuntimeWarning,
                stacklevel=3,
            )
        return _sinkhorn_blocked(alpha, x, beta, y, max_memory=max_memory, **kw), "blocked"
    if kw["potentials"]:
        return (out[0].detach().reshape(-1), out[1].detach().reshape(-1)), backend
    return out.detach().reshape(()), backend


class _Costs:
    """The cost :math:`C_{mk} = |\theta_m - \theta'_k|^2 / 2` in blocks of candidates, cached if it fits."""

    def __init__(self, theta: Tensor, cand: Tensor, max_memory: int) -> None:
        self.theta, self.cand = theta, cand
        m, k = theta.shape[0], cand.shape[0]
        self.block = max(1, max_memory // (4 * m * theta.element_size()))
        self.cache = self._compute(0, k) if 2 * m * k * theta.element_size() <= max_memory else None

    def _compute(self, start: int, stop: int) -> Tensor:
        return 0.5 * torch.cdist(self.theta, self.cand[start:stop]) ** 2

    def blocks(self) -> list[tuple[int, Tensor]]:
        k = self.cand.shape[0]
        if self.cache is not None:
            return [(0, self.cache)]
        return [(s, self._compute(s, s + self.block)) for s in range(0, k, self.block)]


def _polish_scaling(
    c: Tensor,
    log_a: Tensor,
    log_b: Tensor,
    f: Tensor,
    g: Tensor,
    eps: float,
    damping: float,
    max_iter: int,
    tol: float,
) -> tuple[Tensor, Tensor, float, int] | None:
    r"""The iterations of :func:`_polish` in scaling form, on a cost matrix held in memory.

    With the annealed potentials absorbed into the kernel :math:`K = e^{(f \oplus g - C)/\varepsilon}`
    (bounded: it is the plan up to the marginals), the updates are matrix-vector products,
    :math:`u \leftarrow (K(\beta v))^{-\lambda} e^{(\lambda - 1) f/\varepsilon}` and the same for
    :math:`v`: one exponential pass, then two GEMVs an iteration instead of two log-sum-exps.
    Returns None if the kernel under- or overflows (the log-domain iterations then run instead).
    """
    kern = torch.exp((f[:, None] + g[None, :] - c) / eps)
    if not bool(torch.isfinite(kern).all()):
        return None
    a, b = log_a.exp(), log_b.exp()
    fa = torch.exp((damping - 1) * f / eps) if damping != 1 else None
    ga = torch.exp((damping - 1) * g / eps) if damping != 1 else None
    log_u, v = torch.zeros_like(f), torch.ones_like(g)
    change, it = float("inf"), 0
    for it in range(1, max_iter + 1):  # noqa: B007 - the count is returned
        kv = kern @ (b * v)
        new_log_u = -damping * kv.log() + ((damping - 1) * f / eps if fa is not None else 0.0)
        change = float((new_log_u - log_u).abs().max())
        log_u = new_log_u
        ku = kern.T @ (a * log_u.exp())
        v = ku.pow(-damping) * (ga if ga is not None else 1.0)
        if not (math.isfinite(change) and bool(torch.isfinite(v).all())):
            return None
        if change <= tol:
            break
    return f + eps * log_u, g + eps * v.log(), change, it


def _polish(
    costs: _Costs,
    log_a: Tensor,
    log_b: Tensor,
    f: Tensor,
    g: Tensor,
    eps: float,
    damping: float,
    max_iter: int,
    tol: float,
) -> tuple[Tensor, Tensor, float, int]:
    r"""Sinkhorn iterations at the final temperature, from GeomLoss' annealed potentials.

    GeomLoss anneals the temperature and stops at ``blur**2`` without a convergence test, so its
    marginals are approximate (L1 errors of 0.02 to 0.7 on small problems). These log-domain updates,
    :math:`f_m \leftarrow -\lambda\varepsilon \log\sum_k \beta_k e^{(g_k - C_{mk})/\varepsilon}` and
    the same for :math:`g` (:math:`\lambda = 1/(1 + \varepsilon/\rho)`, 1 if balanced), run until
    :math:`\max_m |\Delta f_m| / \varepsilon \le` ``tol``: for balanced transport, the log of every
    neuron's marginal error. With the cost matrix in memory they run in scaling form
    (:func:`_polish_scaling`, measured 40x faster at M = 512, K = 50,000). Returns the potentials, the
    last change and the number of iterations.
    """
    if costs.cache is not None:
        done = _polish_scaling(costs.cache, log_a, log_b, f, g.clone(), eps, damping, max_iter, tol)
        if done is not None:
            return done
    change, it = float("inf"), 0
    for it in range(1, max_iter + 1):  # noqa: B007 - the count is returned
        lse = torch.full_like(f, -float("inf"))
        for s, c in costs.blocks():
            e = s + c.shape[1]
            lse = torch.logaddexp(lse, torch.logsumexp(log_b[None, s:e] + (g[None, s:e] - c) / eps, 1))
        f_new = -damping * eps * lse
        change = float((f_new - f).abs().max()) / eps
        f = f_new
        for s, c in costs.blocks():
            g[s : s + c.shape[1]] = -damping * eps * torch.logsumexp(log_a[:, None] + (f[:, None] - c) / eps, 0)
        if change <= tol:
            break
    return f, g, change, it


def _plan_summaries(
    costs: _Costs, alpha: Tensor, beta: Tensor, f: Tensor, g: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Row argmax, its share of the row, and column masses of the plan, in blocks of candidates.

    The row statistics use the plan's conditional law,
    :math:`\pi_{k|m} \propto \beta_k e^{(g_k - C_{mk})/\varepsilon}`, defined even when :math:`\alpha_m = 0`.
    """
    theta = costs.theta
    m, k = theta.shape[0], costs.cand.shape[0]
    log_a, log_b = alpha.log(), beta.log()
    best_val = torch.full((m,), -float("inf"), dtype=theta.dtype, device=theta.device)
    best_idx = torch.zeros(m, dtype=torch.long, device=theta.device)
    row_lse = torch.full((m,), -float("inf"), dtype=theta.dtype, device=theta.device)
    col_mass = torch.empty(k, dtype=theta.dtype, device=theta.device)
    for s, c in costs.blocks():
        e = s + c.shape[1]
        cond = log_b[None, s:e] + (g[None, s:e] - c) / eps  # log of the row's conditional law, unnormalised
        val, idx = cond.max(1)
        better = val > best_val
        best_val, best_idx = torch.where(better, val, best_val), torch.where(better, idx + s, best_idx)
        row_lse = torch.logaddexp(row_lse, torch.logsumexp(cond, 1))
        col_mass[s:e] = torch.logsumexp(log_a[:, None] + f[:, None] / eps + cond, 0).exp()
    return best_idx, (best_val - row_lse).exp(), col_mass


def transport_map(
    weight: Tensor,
    bias: Tensor,
    x: Tensor,
    *,
    activation: str | Activation = "relu",
    candidates: tuple[Tensor, Tensor] | None = None,
    n_candidates: int = 4096,
    y: Tensor | None = None,
    task: str | None = None,
    neuron_weights: Tensor | None = None,
    blur: float = 0.1,
    reach: float | None = None,
    scaling: float = 0.9,
    backend: str = "auto",
    generator: torch.Generator | None = None,
    divergence: bool = True,
    tol: float = 1e-5,
    max_iter: int = 5000,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> TransportMap:
    """Transport a layer's neurons onto the SWIM neurons of candidate pairs of its probe set.

    Args:
        weight: the layer's weight, ``[M, d]``.
        bias: the layer's bias, ``[M]``.
        x: the layer's inputs on the probe set, ``[N, d]``.
        activation: the activation after the layer.
        candidates: candidate pairs ``(idx_from [K], idx_to [K])``; by default ``n_candidates`` pairs drawn
            with SWIM's pair distribution (:func:`~lightning_swim.sample_pairs`, with ``y`` and ``task``).
        n_candidates: number of candidates drawn when ``candidates`` is not given.
        y, task: targets and task of the candidate draw (see :func:`~lightning_swim.sample_pairs`).
        neuron_weights: :math:`\\alpha`, ``[M]``, non-negative (default uniform); normalised.
        blur: the transport's resolution in parameter space; :math:`\\varepsilon = \\text{blur}^2`.
        reach: if given, unbalanced transport with :math:`\\rho = \\text{reach}^2`.
        scaling: GeomLoss' annealing ratio (closer to 1: more iterations, more accurate marginals).
        backend: ``"tensorized"`` (dense, fast on a CPU while ``3 M K`` numbers fit in ``max_memory``),
            ``"online"`` (KeOps, linear memory), ``"blocked"`` (the online solve in plain PyTorch, in
            blocks of ``max_memory``: no compiler needed, slower) or ``"auto"`` (tensorized where it
            fits on a CPU, else online, falling back to blocked with one warning if KeOps fails).
        generator: randomness of the candidate draw (the global RNG is never used).
        divergence: compute the debiased Sinkhorn divergence. Its self-transport of the candidates
            costs ``O(K^2)``: dense while ``3 K^2`` numbers fit in ``max_memory``, else online.
        tol: convergence tolerance of the final Sinkhorn iterations (largest potential change / eps).
        max_iter: bound on those iterations; a warning says when it is reached.
        max_memory: bound in bytes on the blocks of the plan (and on the dense solver under ``"auto"``).

    Returns:
        A :class:`TransportMap`.
    """
    act = get_activation(activation)
    check_points(x, "x")
    weight, bias = _check_layer(weight, bias, x)
    check_choice(backend, "backend", OT_BACKENDS)
    check_positive_int(n_candidates, "n_candidates")
    check_positive_int(max_iter, "max_iter")
    if not isinstance(tol, (int, float)) or tol <= 0:
        raise ValueError(f"Expected argument `tol` to be a positive number but got {tol!r}.")
    check_positive_finite(blur, "blur")
    check_positive_finite(scaling, "scaling")
    if scaling >= 1:
        raise ValueError(f"Expected argument `scaling` in (0, 1) but got {scaling}.")
    check_positive_finite(reach, "reach", allow_none=True, hint=" Use reach=None for balanced transport.")

    M, N = weight.shape[0], x.shape[0]
    alive = mappable_neurons(weight, bias)  # the others are left out of the transport
    if not bool(alive.any()):
        raise ValueError("Every neuron has zero or non-finite weights: there is nothing to transport.")
    if neuron_weights is None:
        alpha_all = torch.ones(M, dtype=x.dtype, device=x.device)
    else:
        if (
            neuron_weights.shape != (M,)
            or not bool(torch.isfinite(neuron_weights).all())
            or bool((neuron_weights < 0).any())
        ):
            raise ValueError(f"Expected argument `neuron_weights` to be finite, non-negative, of shape `[{M}]`.")
        alpha_all = neuron_weights.detach().to(x)
    alpha = alpha_all[alive]
    if float(alpha.sum()) <= 0:
        raise ValueError("Expected `neuron_weights` to give some mass to a mapped neuron.")
    alpha = alpha / alpha.sum()

    if candidates is None:
        cand_from, cand_to = sample_pairs(x, y, n_candidates, task=task, generator=generator)
    else:
        cand_from, cand_to = (c.to(x.device).long() for c in candidates)
        if cand_from.shape != cand_to.shape or cand_from.ndim != 1:
            raise ValueError("Expected `candidates` to be two 1D index tensors of one length.")
        if bool(((cand_from < 0) | (cand_from >= N) | (cand_to < 0) | (cand_to >= N)).any()):
            raise ValueError(f"Expected candidate indices in [0, {N - 1}].")
    keep = (x[cand_from] != x[cand_to]).any(1)
    if not bool(keep.all()):
        warnings.warn(f"{int((~keep).sum())} candidate pair(s) join coincident points and are dropped.", stacklevel=2)
        cand_from, cand_to = cand_from[keep], cand_to[keep]
    if cand_from.numel() == 0:
        raise ValueError("No candidate pair of distinct points.")
    K = cand_from.shape[0]
    beta = torch.full((K,), 1.0 / K, dtype=x.dtype, device=x.device)

    cw, cb = swim_neurons(x[cand_from], x[cand_to], act)
    theta, cand = _params(weight[alive], bias[alive], act), _params(cw, cb, act)
    which = _choose_backend(backend, theta.shape[0], K, x.element_size(), x.device, max_memory)
    opts: dict[str, Any] = dict(blur=blur, reach=reach, scaling=scaling, max_memory=max_memory, auto=backend == "auto")
    (f, g), which = _ot(alpha, theta, beta, cand, potentials=True, backend=which, **opts)
    eps = blur**2
    costs = _Costs(theta, cand, max_memory)
    damping = 1.0 if reach is None else 1.0 / (1.0 + eps / reach**2)
    f, g, change, n_iter = _polish(costs, alpha.log(), beta.log(), f, g, eps, damping, max_iter, tol)
    if change > tol:
        warnings.warn(
            f"Sinkhorn did not converge in {max_iter} iterations at blur={blur} (last potential change "
            f"{change:.2e} eps > tol={tol}): increase `max_iter`, or `blur`, or `scaling` towards 1.",
            RuntimeWarning,
            stacklevel=2,
        )
    if divergence:
        big = max(theta.shape[0], K)
        which_div = _choose_backend(backend, big, big, x.element_size(), x.device, max_memory)
        div, _ = _ot(alpha, theta, beta, cand, potentials=False, backend=which_div, **opts)
    else:
        div = torch.tensor(float("nan"), dtype=x.dtype, device=x.device)
    idx, share, col = _plan_summaries(costs, alpha, beta, f, g, eps)

    assign = torch.full((M,), -1, dtype=torch.long, device=x.device)
    assign[alive] = idx
    f_all = torch.full((M,), float("nan"), dtype=x.dtype, device=x.device)
    f_all[alive] = f
    share_all = torch.full((M,), float("nan"), dtype=x.dtype, device=x.device)
    share_all[alive] = share

    i, j = cand_from[idx], cand_to[idx]
    a = act(x @ weight[alive].T + bias[alive])
    err, _ = _fit(act(_preactivation(x, i, j, act)), a.T, sign_free(act))
    pairs = PairMap.unmapped(M, act.name, x.dtype, x.device)
    pairs.idx_from[alive], pairs.idx_to[alive] = i, j
    scale = weight[alive].norm(dim=1) * (x[i] - x[j]).norm(dim=1) / act.s1
    pairs.scale[alive] = scale if act.homogeneous else torch.ones_like(scale)
    pairs.param_cost[alive] = ((theta - cand[idx]) ** 2).sum(1)
    pairs.func_error[alive] = err

    imp = torch.zeros(N, dtype=torch.float64, device=x.device)
    imp.index_add_(0, cand_from, col.double() / 2)
    imp.index_add_(0, cand_to, col.double() / 2)
    imp = imp / imp.sum()
    return TransportMap(
        divergence=div,
        cand_from=cand_from,
        cand_to=cand_to,
        f=f_all,
        g=g,
        assignment=assign,
        mass_share=share_all,
        pairs=pairs,
        importance=imp.cpu(),
        eps=eps,
        backend=which,
        iterations=n_iter,
    )

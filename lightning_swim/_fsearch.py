r"""The exact search in function space, and what it says about ambiguity (``../docs/maths.md``).

For a layer's probe inputs ``x [N, d]`` and the activations ``a [N, M]`` of its trained neurons, the
function-space error of the ordered pair ``(i, j)`` for neuron ``m`` is that of the best rescaled
SWIM neuron,

.. math::
    e_{ijm} = \min_c \frac{\lVert c\, h_{ij} - a_m\rVert^2}{\lVert a_m\rVert^2}
            = 1 - \frac{\langle h_{ij}, a_m\rangle^2}{\lVert h_{ij}\rVert^2 \lVert a_m\rVert^2},
    \qquad h_{ij}(x_n) = \sigma\Big(s_1 \frac{\langle x_n - x_i, x_j - x_i\rangle}{\lVert x_j - x_i\rVert^2}
                                      - s_2\Big),

with ``c >= 0`` (the positive part of the inner product) where the sign of ``c`` is not free: for
homogeneous activations, and for odd ones with ``s1 = 2 s2`` (tanh), where swapping the pair flips
the sign of ``h`` so that the orientation carries it. For a fixed anchor ``i`` the pre-activations
of all pairs ``(i, j)`` on all probe points come from the Gram matrix ``G = x x^T``,

.. math::
    z_{ij}(x_n) = (G_{jn} - G_{in}) r_{ij} + c_{ij}, \quad r_{ij} = \frac{s_1}{D_{ij}},\quad
    c_{ij} = s_1 \frac{G_{ii} - G_{ij}}{D_{ij}} - s_2,

an ``[N, N]`` array per anchor, and one GEMM with ``a`` gives every inner product: ``O(N^3 M)``
multiply-adds for the layer, in blocks of anchors bounded by ``max_memory``. Every pair whose error
lies within the tolerance or the soft window of the best error found so far is kept (and pruned as
the best improves), so the argmin, the ambiguity counts and the soft attribution are exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_swim._keops import KeOpsUnavailableError, pykeops_torch
from lightning_swim._search import KEOPS_DIM_MULTIPLE, _d2_rows, _pad_cols, duplicate_groups, keops_neuron_chunk
from lightning_swim.activations import Activation

__all__ = ["Candidates", "SoftResult", "exact_candidates", "fit_error", "sign_free", "summarise"]

SOFT_CUT = 5.0  # soft weights below exp(-SOFT_CUT) of the best's are left out
MAX_KEPT = 4096  # candidate pairs kept per neuron during the exact search (see exact_candidates)


def sign_free(act: Activation) -> bool:
    """Whether the output factor ``c`` of a SWIM neuron may be negative in the function-space fit.

    Not for homogeneous activations (``c`` is folded into the neuron), nor for odd ones whose pair
    swap negates the neuron (``s1 == 2 s2`` and ``sigma(-z) == -sigma(z)``, as tanh): there the
    orientation of the pair carries the sign. Otherwise (sigmoid, GELU, ...) ``c`` is free.
    """
    if act.homogeneous:
        return False
    z = torch.linspace(-4.0, 4.0, 81, dtype=torch.float64)
    odd = bool(torch.allclose(act(-z), -act(z), atol=1e-12))
    return not (odd and math.isclose(act.s1, 2 * act.s2, rel_tol=1e-12))


def fit_error(ha: Tensor, hh: Tensor, aa: Tensor, free_sign: bool) -> tuple[Tensor, Tensor]:
    """Relative error and optimal factor of ``c h`` against ``a`` from their inner products.

    ``ha = <h, a>``, ``hh = |h|^2 > 0``, ``aa = |a|^2 > 0``, broadcast together -> ``(error, c)``.
    """
    ha_used = ha if free_sign else ha.clamp_min(0)
    c = ha_used / hh
    err = (1 - ha_used * c / aa).clamp_min(0)
    return err, c


@dataclass
class Candidates:
    """Pairs with their errors, flat: entry ``p`` is neuron ``m[p]``'s pair ``(i[p], j[p])``."""

    m: Tensor
    i: Tensor
    j: Tensor
    err: Tensor


class _Layer:
    """What every block of anchors needs: the probe in its frame, its Gram matrix, the neurons."""

    def __init__(self, x: Tensor, act: Activation, a: Tensor, backend: str) -> None:
        self.x, self.act, self.a, self.backend = x, act, a, backend
        self.gram = x @ x.T if backend == "torch" else None  # KeOps forms no [N, N] array
        self.sq = (x * x).sum(1)
        self.groups = duplicate_groups(x)
        self.inv_aa = (a * a).sum(0).reciprocal()
        self.free_sign = sign_free(act)

    def gram_rows(self, rows: Tensor) -> Tensor:
        return self.gram[rows] if self.gram is not None else self.x[rows] @ self.x.T

    def pair_terms(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(r, c, bad)`` of the pairs ``(rows[b], j)``, ``[B, N]`` each: ``z_ij(x_n) = (G_jn - G_in) r + c``."""
        act = self.act
        d2, bad = _d2_rows(self.x, self.sq, rows, self.groups)
        return act.s1 / d2, act.s1 * (self.sq[rows, None] - self.gram_rows(rows)) / d2 - act.s2, bad

    def scores(self, rows: Tensor, work: Tensor) -> Tensor:
        """``q = 1 - e`` of every pair ``(rows[b], j)`` for every neuron, ``[B, N, M]``; -inf on excluded pairs.

        ``q = <h, a>_+^2 / (|h|^2 |a|^2)`` is the explained share of the neuron's squared norm (the
        positive part only where the sign of ``c`` is not free).
        """
        r, c, bad = self.pair_terms(rows)
        if self.backend == "keops":
            q, inv_hh = _inner_keops(self, rows, r, c)
        else:
            q, inv_hh = _inner_torch(self, rows, r, c, work)
        q = q.abs_() if self.free_sign else q.clamp_min_(0)
        q.square_().mul_(inv_hh[:, :, None]).mul_(self.inv_aa)
        return q.masked_fill_(bad[:, :, None], float("-inf"))


def _inner_torch(layer: _Layer, rows: Tensor, r: Tensor, c: Tensor, work: Tensor) -> tuple[Tensor, Tensor]:
    """``(<h, a> [B, N, M], 1/|h|^2 [B, N])`` from the ``[B, N, N]`` pre-activations, built in ``work``
    (a buffer of at least ``B N^2`` entries reused across blocks: a fresh allocation of that size per
    block costs more than the arithmetic in it)."""
    gram, act, a = layer.gram, layer.act, layer.a
    assert gram is not None
    B, N, M = len(rows), *a.shape
    z = torch.sub(gram[None, :, :], gram[rows][:, None, :], out=work[: B * N * N].view(B, N, N))  # G_jn - G_in
    torch.addcmul(c[:, :, None], z, r[:, :, None], out=z)  # z_ij(x_n), [B, N(j), N(n)]
    h = z.clamp_min_(0) if act.name == "relu" else act(z)
    inv_hh = torch.linalg.vector_norm(h, dim=2).square_().reciprocal_()  # |h| > 0: h(x_j) = sigma(s1 - s2)
    return (h.view(B * N, N) @ a).view(B, N, M), inv_hh


def _keops_activation(act: Activation, z: Any, param: Any) -> Any:
    """The activation in a KeOps formula, with its constants as parameters: one formula per family."""
    if act.name in ("relu", "leaky_relu"):  # relu(z) - slope relu(-z)
        return z.relu() - param * (-z).relu()
    if act.name in ("tanh", "sigmoid"):  # p0 sigmoid(p1 z) + p2
        return param.elem(0) / (1.0 + (-param.elem(1) * z).exp()) + param.elem(2)
    raise KeOpsUnavailableError(f"The KeOps exact search has no formula for the activation {act.name!r}.")


def _keops_params(act: Activation) -> list[float]:
    if act.name in ("relu", "leaky_relu"):
        return [act.negative_slope]
    return [2.0, 2.0, -1.0] if act.name == "tanh" else [1.0, 1.0, 0.0]


def _inner_keops(layer: _Layer, rows: Tensor, r: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """The twin of :func:`_inner_torch` as KeOps ``Sum`` reductions over the probe points ``n``.

    A batch of anchors ``b``, ``i`` over partners ``j``, ``j`` over probe points ``n``:
    ``z = (<x_j, x_n> - G_{i_b n}) r_bj + c_bj`` (a dot product in ``d`` instead of a Gram lookup, so
    that no ``[N, N]`` array is formed), then the activation, then one reduction of the vector
    ``(h a_n, h^2)`` per neuron chunk.
    """
    LazyTensor = pykeops_torch().LazyTensor
    x, a = layer.x, layer.a
    B, N, M = len(rows), *a.shape
    mc = keops_neuron_chunk(M)
    xp = _pad_cols(x, KEOPS_DIM_MULTIPLE).contiguous()
    ap = _pad_cols(a, mc)
    par = torch.tensor(_keops_params(layer.act), dtype=x.dtype, device=x.device)
    x_j, x_n = LazyTensor(xp[None, :, None, :]), LazyTensor(xp[None, None, :, :])
    g_n = LazyTensor(layer.gram_rows(rows)[:, None, :, None].contiguous())
    r_j, c_j = LazyTensor(r[:, :, None, None].contiguous()), LazyTensor(c[:, :, None, None].contiguous())
    h = _keops_activation(layer.act, ((x_j | x_n) - g_n) * r_j + c_j, LazyTensor(par.view(1, 1, 1, -1)))
    ha = torch.empty(B, N, ap.shape[1], dtype=x.dtype, device=x.device)
    hh = torch.empty(B, N, dtype=x.dtype, device=x.device)
    for s in range(0, M, mc):
        out = (h * LazyTensor(ap[None, None, :, s : s + mc].contiguous())).concat(h * h).sum(dim=2)  # [B, N, mc+1]
        ha[:, :, s : s + mc], hh[:] = out[:, :, :mc], out[:, :, mc]
    return ha[:, :, :M], hh.reciprocal_()


CACHE_BYTES = 16 * 2**20  # anchors per block: their [N, N] arrays fill about this much (measured: 2-4 at N = 1,257)


def _block_size(n: int, m: int, item: int, max_memory: int) -> int:
    by_memory = max_memory // (item * (n * n + 3 * n * m))
    by_cache = -(-CACHE_BYTES // (item * n * n))
    return max(1, min(n, by_memory, by_cache))


def exact_candidates(
    x: Tensor,
    act: Activation,
    a: Tensor,
    threshold: Callable[[Tensor], Tensor],
    bound: Tensor,
    *,
    max_memory: int,
    backend: str = "torch",
    max_kept: int = MAX_KEPT,
) -> tuple[Candidates, Tensor]:
    """Every pair whose error is within ``threshold(best)`` of each neuron's best, over all pairs, up
    to ``max_kept`` per neuron.

    Anchors are visited in blocks; a pair is kept while its error is within ``threshold`` of the
    best error found so far (initially ``bound``), and the kept pairs are pruned to the final
    threshold at the end, so the result is exact whatever the bound. A neuron that no pair explains
    well can have most of its ``N^2`` pairs inside that window: once it holds more than
    ``max_kept``, only its ``max_kept // 2`` cheapest are kept and its *ceiling* drops to the largest
    of them; later pairs are kept only below the ceiling. Every pair at most
    ``min(threshold(best), ceiling)`` is then in the result, so the best pair and the cheapest
    ``max_kept // 2`` are exact, and a count within a threshold above the ceiling is a lower bound.

    Args:
        x: the probe inputs ``[N, d]`` (a well-conditioned frame: centred and scaled).
        act: the activation.
        a: the trained neurons' activations ``[N, M]``, none identically zero.
        threshold: maps best errors ``[M]`` to the largest error kept per neuron ``[M]`` (at least
            the best error itself; non-decreasing).
        bound: an upper bound on each neuron's best error ``[M]`` (e.g. the error of some pair; inf
            if none is known): the tighter, the fewer pairs are kept along the way.
        max_memory: bound in bytes on the blocks of anchors.
        backend: ``"torch"`` (GEMMs on ``[N, N]`` blocks) or ``"keops"`` (reductions that form no
            ``[N, N]`` array); the same results.

    Returns:
        ``(candidates, ceiling [M])``: the :class:`Candidates`, unsorted, each neuron's best pair
        among them; the ceilings (inf where no neuron overflowed).
    """
    N, M = a.shape
    if backend == "torch" and 2 * N * N * x.element_size() > max_memory:
        need = 2 * N * N * x.element_size() / 2**20
        raise ValueError(
            f"The exact function-space search over N = {N} probe points needs the {N}x{N} Gram matrix "
            f"({need:.0f} MB) within `max_memory` = {max_memory / 2**20:.0f} MB, and O(N^3 M) time. Use a "
            "smaller probe set, raise `max_memory`, use backend='keops' (no N x N array), or use "
            "refine='function'."
        )
    layer = _Layer(x, act, a, backend)
    best = bound.to(x.dtype).clone()
    if backend == "keops":  # no [N, N] arrays: blocks of anchors as large as the [B, N, M] outputs allow
        block = max(1, min(N, max_memory // (x.element_size() * 4 * N * (M + 1))))
        work = torch.empty(0, dtype=x.dtype, device=x.device)
    else:
        block = _block_size(N, M, x.element_size(), max_memory)
        work = torch.empty(block * N * N, dtype=x.dtype, device=x.device)
    ceiling = torch.full_like(best, float("inf"))
    parts: list[Candidates] = []
    counts = torch.zeros(M, dtype=torch.long, device=x.device)
    for s in range(0, N, block):
        rows = torch.arange(s, min(N, s + block), device=x.device)
        q = layer.scores(rows, work)
        best = torch.minimum(best, 1 - q.amax(dim=(0, 1)))
        keep = q >= 1 - torch.minimum(threshold(best), ceiling)
        b, j, m = keep.nonzero(as_tuple=True)
        if len(m):
            parts.append(Candidates(m, rows[b], j, 1 - q[b, j, m]))
            counts += torch.bincount(m, minlength=M)
        if bool((counts > max_kept).any()):
            cand = _within(_cat(parts), torch.minimum(threshold(best), ceiling))
            cand, ceiling = _cap(cand, M, max_kept // 2, ceiling)
            parts, counts = [cand], torch.bincount(cand.m, minlength=M)
    return _within(_cat(parts), torch.minimum(threshold(best), ceiling)), ceiling


def _cap(cand: Candidates, n_neurons: int, keep: int, ceiling: Tensor) -> tuple[Candidates, Tensor]:
    """Keep the ``keep`` cheapest candidates of every neuron that has more (and any tied with the
    last of them); lower those neurons' ceilings to the largest error kept.

    One sort of an integer key, the neuron above the error's float32 bits (a non-negative float32
    orders as its bits): float32 rounding may swap errors that round alike, so the ``keep`` kept by
    rank are the cheapest up to such swaps, and every candidate at most the new ceiling is kept, so
    the result holds every pair at most the ceiling, as the search needs.
    """
    bits = cand.err.float().clamp_min(0.0).view(torch.int32).long()
    order = torch.sort((cand.m.long() << 31) | bits).indices
    m, err = cand.m[order], cand.err[order]
    counts = torch.bincount(m, minlength=n_neurons)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(m), device=m.device) - start[m]
    over = counts > keep
    last = err[(start + keep - 1).clamp_max(len(m) - 1)]  # the keep-th cheapest error of each neuron
    ceiling = torch.where(over, torch.minimum(ceiling, last), ceiling)
    ok = (rank < keep) | ~over[m] | (err <= ceiling[m])
    idx = order[ok]
    return Candidates(cand.m[idx], cand.i[idx], cand.j[idx], cand.err[idx]), ceiling


def _cat(parts: list[Candidates]) -> Candidates:
    return Candidates(*(torch.cat([getattr(p, f) for p in parts]) for f in ("m", "i", "j", "err")))


def _within(cand: Candidates, thr: Tensor) -> Candidates:
    ok = cand.err <= thr[cand.m]
    return Candidates(cand.m[ok], cand.i[ok], cand.j[ok], cand.err[ok])


@dataclass
class SoftResult:
    """The per-neuron summary of a candidate set (see :func:`summarise`)."""

    best_i: Tensor
    best_j: Tensor
    best_err: Tensor
    n_near: Tensor
    n_near_points: Tensor
    soft_neuron: Tensor
    soft_from: Tensor
    soft_to: Tensor
    soft_weight: Tensor


def _lexsort(*keys: Tensor) -> Tensor:
    """Permutation sorting by ``keys[0]``, then ``keys[1]``, ... (all stable)."""
    order = torch.arange(len(keys[0]), device=keys[0].device)
    for key in reversed(keys):
        order = order[torch.sort(key[order], stable=True).indices]
    return order


def summarise(
    cand: Candidates,
    n_neurons: int,
    *,
    atol: float,
    rtol: float,
    temperature: float,
    max_soft: int,
) -> SoftResult:
    r"""Best pair, ambiguity and soft attribution of every neuron from its candidate pairs.

    - best: the smallest error; ties go to the smallest ``(i, j)`` in lexicographic order;
    - ``n_near``: pairs with :math:`e \le e^* + \mathrm{atol} + \mathrm{rtol}\, e^*`, and
      ``n_near_points`` the distinct points they use;
    - soft attribution: weights :math:`\propto \exp(-(e - e^*)/\tau)` with
      :math:`\tau = \mathrm{temperature}\cdot e^* + \tau_0` (:math:`\tau_0` = 16 machine epsilons
      of the dtype, so that exact ties share the weight) over the pairs with weight at least
      :math:`e^{-5}` of the best's, at most ``max_soft`` per neuron (the cheapest).

    Every neuron must have at least one candidate.
    """
    order = _lexsort(cand.m, cand.err, cand.i, cand.j)
    m, i, j, e = cand.m[order], cand.i[order], cand.j[order], cand.err[order]
    first = torch.ones_like(m, dtype=torch.bool)
    first[1:] = m[1:] != m[:-1]
    if int(first.sum()) != n_neurons:
        raise RuntimeError("Internal error: a neuron has no candidate pair.")  # pragma: no cover
    start = first.nonzero().ravel()
    best_e = e[start]
    e_star = best_e[m]
    near = e <= e_star + atol + rtol * e_star
    n_near = torch.zeros(n_neurons, dtype=torch.long, device=m.device).index_add_(0, m, near.long())
    n_pts = torch.zeros(n_neurons, dtype=torch.long, device=m.device)
    if bool(near.any()):
        pts = torch.unique(torch.stack([torch.cat([m[near], m[near]]), torch.cat([i[near], j[near]])]), dim=1)
        n_pts.index_add_(0, pts[0], torch.ones_like(pts[0]))
    tau = temperature * e_star + 16 * torch.finfo(e.dtype).eps
    gap = (e - e_star) / tau
    rank = torch.arange(len(m), device=m.device) - start.repeat_interleave(torch.bincount(m, minlength=n_neurons))
    soft = (gap <= SOFT_CUT) & (rank < max_soft)
    sm, si, sj = m[soft], i[soft], j[soft]
    w = torch.exp(-gap[soft].double())
    total = torch.zeros(n_neurons, dtype=torch.float64, device=m.device).index_add_(0, sm, w)
    return SoftResult(i[start], j[start], best_e, n_near, n_pts, sm, si, sj, w / total[sm])

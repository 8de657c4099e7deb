r"""Stage 1 of the pair map: the exact all-pairs search in parameter space.

For a neuron with the per-point projections ``v`` and offset ``gamma`` (see :func:`neuron_terms`), the
cost of the ordered pair ``(i, j)`` is

.. math::
    c_{ij} = c_0 + \alpha \rho_{ij} - 2 (v_j - v_i) \rho_{ij} + (\kappa t_{ij} \rho_{ij} - \gamma)^2,
    \qquad t_{ij} = \tfrac12 (|x_i|^2 - |x_j|^2 + D_{ij}),\ D_{ij} = |x_i - x_j|^2,

with :math:`\rho = D^{-1/2}`, :math:`\alpha = 0`, :math:`\kappa = 1` for homogeneous activations (the
normalised cost) and :math:`\rho = D^{-1}`, :math:`\alpha = s_1^2`, :math:`\kappa = s_1` otherwise.
Pairs of coincident points (``i == j`` and duplicates) are excluded.

Everything d-dimensional is neuron-independent: one ``[N, M]`` projection and, per pair, one squared
distance, after which a neuron costs a handful of flops per pair. Two backends compute, for every
anchor ``i`` and neuron ``m``, the cost of its best partner ``j`` (the *row minimum*):

- ``keops``: a symbolic ``(N, N, Mc)`` LazyTensor, ``i`` and ``j`` over points, the last axis a chunk
  of ``Mc`` neurons (64 or 256), with the squared distance written as ``sqdist`` and factorised so that g++
  vectorises it and computes it once per pair (a ``|``-dot-product accumulates through a serial
  ``fma`` chain and runs 10x slower on a CPU);
- ``torch``: the same formula on ``[Bi, N, Mc]`` blocks, bounded by ``max_memory``.

Only the minima are reduced (no argmin): the exact top-k pairs of a neuron lie in its ``k`` anchors of
smallest row minimum (a pair cheaper than the k-th smallest row minimum has an anchor whose row
minimum is cheaper still), so a second step, shared by both backends, scans those ``k`` rows in full.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_swim._keops import KeOpsUnavailableError, pykeops_torch
from lightning_swim.activations import Activation

BACKENDS = ("auto", "keops", "torch")
KEOPS_DIM_MULTIPLE = 16  # input dims are zero-padded to a multiple of this: fewer distinct formulas
_BIG = 1e30
_warned = {"keops": False}


@dataclass(frozen=True)
class Family:
    """The constants of the cost formula for one activation."""

    homogeneous: bool
    alpha: float
    kappa: float

    @staticmethod
    def of(act: Activation) -> Family:
        if act.homogeneous:
            return Family(True, 0.0, 1.0)
        return Family(False, act.s1**2, act.s1)

    def rho(self, d2: Tensor) -> Tensor:
        return d2.rsqrt() if self.homogeneous else d2.reciprocal()


def neuron_terms(weight: Tensor, bias: Tensor, x: Tensor, act: Activation) -> tuple[Tensor, Tensor, Tensor]:
    """``(v [N, M], gamma [M], c0 [M])`` of the cost formula for valid (non-zero, finite) neurons."""
    proj = x @ weight.T
    if act.homogeneous:
        norm = weight.norm(dim=1)
        return proj / norm, bias / norm, torch.full_like(bias, 2.0)
    return act.s1 * proj, bias + act.s2, (weight * weight).sum(1)


def _pair_terms(fam: Family, d2: Tensor, sq_i: Tensor, sq_j: Tensor) -> tuple[Tensor, Tensor]:
    """The neuron-independent factors of the cost: ``(rho, kappa t rho)``, broadcast like ``d2``."""
    rho = fam.rho(d2)
    t = 0.5 * (sq_i - sq_j + d2)
    return rho, fam.kappa * t * rho


def _f_terms(fam: Family, rho: Tensor, ktr: Tensor, v_i: Tensor, v_j: Tensor, gamma: Tensor) -> Tensor:
    """The neuron-dependent part of the cost from the pair factors of :func:`_pair_terms`."""
    f = -2.0 * (v_j - v_i) * rho + (ktr - gamma) ** 2
    return f + fam.alpha * rho if fam.alpha else f


def _f(fam: Family, d2: Tensor, sq_i: Tensor, sq_j: Tensor, v_i: Tensor, v_j: Tensor, gamma: Tensor) -> Tensor:
    """The neuron-dependent part of the cost; ``d2``, ``sq_*`` broadcast against ``v_*`` and ``gamma``."""
    return _f_terms(fam, *_pair_terms(fam, d2, sq_i, sq_j), v_i, v_j, gamma)


def duplicate_groups(x: Tensor) -> Tensor:
    """An id per point, equal for coincident points: ``[N]`` int64."""
    return torch.unique(x, dim=0, return_inverse=True)[1]


def _d2_rows(x: Tensor, sq: Tensor, rows: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    r"""Squared distances from ``x[rows]`` to every point, ``[R, N]``, and the mask of excluded pairs.

    One GEMM gives :math:`|x_i|^2 + |x_j|^2 - 2\langle x_i, x_j\rangle`; where that cancels below the
    rounding of its terms (close points far from the origin), the distance is recomputed from the
    difference, so that near-duplicates keep a true, positive distance (as KeOps' ``sqdist`` gives).
    """
    norms = sq[rows, None] + sq[None, :]
    d2 = norms - 2.0 * (x[rows] @ x.T)
    bad = groups[rows, None] == groups[None, :]
    unsure = (d2 <= 8 * x.shape[1] ** 0.5 * torch.finfo(x.dtype).eps * norms) & ~bad
    if bool(unsure.any()):
        r, c = unsure.nonzero(as_tuple=True)
        step = max(1, 2**24 // x.shape[1])
        for s in range(0, len(r), step):
            rs, cs = r[s : s + step], c[s : s + step]
            d2[rs, cs] = ((x[rows[rs]] - x[cs]) ** 2).sum(1)
    return d2.masked_fill(bad, 1.0), bad


def rowmin_torch(x: Tensor, v: Tensor, gamma: Tensor, fam: Family, *, max_memory: int) -> Tensor:
    r"""Row minima ``[N, M]`` on ``[Bi, N, Mc]`` blocks of at most ``max_memory`` bytes.

    The cost expands into one term that couples ``j`` with the neuron and a rank-3 product:
    :math:`f = -2 \rho_{ij} v_{jm} + P_{ij} \cdot Q_{im} + \gamma_m^2` with
    :math:`P = (\rho, t\rho, \kappa^2 (t\rho)^2 + \alpha\rho)` and :math:`Q = (2 v_{im}, -2\kappa\gamma_m, 1)`,
    so a block costs one broadcast product and one ``baddbmm``.
    """
    N, M = v.shape
    sq = (x * x).sum(1)
    groups = duplicate_groups(x)
    mc = min(M, 64)
    bi = max(1, min(N, max_memory // (x.element_size() * N * (3 * mc + 12))))
    fmin = torch.empty(N, M, dtype=x.dtype, device=x.device)
    for start in range(0, N, bi):
        rows = torch.arange(start, min(N, start + bi), device=x.device)
        d2, bad = _d2_rows(x, sq, rows, groups)
        rho = fam.rho(d2)
        trho = 0.5 * (sq[rows, None] - sq[None, :] + d2) * rho
        p = torch.stack([rho, trho, fam.kappa**2 * trho * trho + fam.alpha * rho], dim=2)  # [Bi, N, 3]
        for c in range(0, M, mc):
            g = gamma[c : c + mc]
            q = torch.stack(
                [
                    2.0 * v[rows, c : c + mc],
                    (-2.0 * fam.kappa * g).expand(len(rows), -1),
                    torch.ones_like(v[rows, c : c + mc]),
                ],
                dim=1,
            )  # [Bi, 3, Mc]
            f = torch.baddbmm(-2.0 * rho[:, :, None] * v[None, :, c : c + mc], p, q)
            fmin[rows, c : c + mc] = f.masked_fill_(bad[:, :, None], float("inf")).amin(dim=1) + g * g
    return fmin


def _pad_cols(t: Tensor, multiple: int) -> Tensor:
    extra = (-t.shape[1]) % multiple
    return torch.nn.functional.pad(t, (0, extra)) if extra else t


def keops_neuron_chunk(M: int) -> int:
    """Neurons per KeOps call: 64 for narrow layers, else 256 (one formula per size, few sizes)."""
    return 64 if M <= 64 else 256


def rowmin_keops(x: Tensor, v: Tensor, gamma: Tensor, fam: Family) -> Tensor:
    """Row minima ``[N, M]`` with KeOps ``Min`` reductions over ``j``.

    KeOps' CPU kernel sweeps every ``j`` for each ``i``; past the last-level cache that sweep is
    bound by memory bandwidth. The ``j`` axis is therefore cut into blocks of about 4 MB (measured
    at N = 8,000, d = 784: 4.8 s in blocks of 1,024 against 8.6 s unblocked) and the block minima
    combined in torch.
    """
    LazyTensor = pykeops_torch().LazyTensor
    N, M = v.shape
    xp = _pad_cols(x, KEOPS_DIM_MULTIPLE).contiguous()
    sq = (x * x).sum(1, keepdim=True)
    mc = keops_neuron_chunk(M)
    vp, gp = _pad_cols(v, mc), _pad_cols(gamma[None, :], mc)[0]
    block = max(256, (4 * 2**20) // ((xp.shape[1] + mc) * x.element_size()))
    # the family's constants are parameters, not literals: one formula serves every activation
    consts = torch.tensor([1.0 if fam.homogeneous else -1.0, fam.kappa, fam.alpha], dtype=x.dtype, device=x.device)
    homogeneous, kappa, alpha = (LazyTensor(consts[k : k + 1].view(1, 1, 1)) for k in range(3))
    x_i, sq_i = LazyTensor(xp[:, None, :]), LazyTensor(sq[:, None, :])
    fmin = torch.full((N, vp.shape[1]), float("inf"), dtype=x.dtype, device=x.device)
    for c in range(0, M, mc):
        v_c = vp[:, c : c + mc].contiguous()
        v_i = LazyTensor(v_c[:, None, :])
        g = LazyTensor(gp[None, None, c : c + mc].contiguous())
        for s in range(0, N, block):
            x_j, sq_j = LazyTensor(xp[None, s : s + block]), LazyTensor(sq[None, s : s + block])
            v_j = LazyTensor(v_c[None, s : s + block])
            d2 = x_i.sqdist(x_j)
            bad = (-d2).step()  # 1 exactly for coincident points, whose squared distance is exactly 0
            d2safe = d2 + bad
            rho = homogeneous.ifelse(d2safe.rsqrt(), 1.0 / d2safe)
            t = 0.5 * (sq_i - sq_j + d2safe)
            f = alpha * rho - 2.0 * (v_j - v_i) * rho + (kappa * t * rho - g) ** 2 + _BIG * bad
            f = f.factorize(rho).factorize(d2)
            torch.minimum(fmin[:, c : c + mc], f.min(dim=1), out=fmin[:, c : c + mc])
    return fmin[:, :M]


def warn_fallback(err: Exception, what: str, *, stacklevel: int = 4) -> None:
    """Say once per process that KeOps failed and the plain-PyTorch twin runs instead."""
    if not _warned["keops"]:
        _warned["keops"] = True
        warnings.warn(
            f"KeOps is not usable here ({type(err).__name__}: {str(err)[:200]}); the {what} runs on the "
            "plain-PyTorch backend instead (same results, slower on large probe sets).",
            RuntimeWarning,
            stacklevel=stacklevel,
        )


def rowmin(x: Tensor, v: Tensor, gamma: Tensor, fam: Family, *, backend: str, max_memory: int) -> tuple[Tensor, str]:
    """Row minima ``[N, M]`` and the backend that computed them.

    ``"auto"`` falls back to torch, with one warning, if KeOps is unavailable or fails to compile.
    """
    if backend in ("auto", "keops"):
        try:
            return rowmin_keops(x, v, gamma, fam), "keops"
        except Exception as err:  # KeOps unavailable, or failing to compile or load a formula
            if backend == "keops":
                if isinstance(err, KeOpsUnavailableError):
                    raise
                raise KeOpsUnavailableError(
                    f"KeOps failed on the pair search ({type(err).__name__}: {err}). Use backend='torch' or "
                    "backend='auto' to run without it."
                ) from err
            warn_fallback(err, "pair search", stacklevel=4)
    return rowmin_torch(x, v, gamma, fam, max_memory=max_memory), "torch"


def topk_pairs(
    x: Tensor,
    v: Tensor,
    gamma: Tensor,
    c0: Tensor,
    fam: Family,
    fmin: Tensor,
    k: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The exact ``k`` cheapest ordered pairs of every neuron: ``(i [M, k], j [M, k], cost [M, k])``.

    Ties are broken by the smallest ``(i, j)`` in lexicographic order (the rows are rescanned even
    for ``k = 1``, so that both backends break ties between coincident partners alike).
    """
    N, M = v.shape
    k = min(k, N * (N - 1))
    # anchors in order of row minimum; a stable sort keeps the smaller index first among equals
    order = torch.sort(fmin.T, dim=1, stable=True).indices  # [M, N]
    sq = (x * x).sum(1)
    groups = duplicate_groups(x)
    n_anchor = min(k, N)
    out_i = torch.empty(M, k, dtype=torch.long, device=x.device)
    out_j = torch.empty_like(out_i)
    out_c = torch.empty(M, k, dtype=x.dtype, device=x.device)
    block = max(1, 2**22 // (n_anchor * N))  # neurons at a time: [block, n_anchor, N] costs of ~4M entries
    table = None
    if N * N <= 2**22:  # small probe sets: the pair factors of all N^2 pairs once, gathered per neuron
        d2_all, bad_all = _d2_rows(x, sq, torch.arange(N, device=x.device), groups)
        table = (*_pair_terms(fam, d2_all, sq[:, None], sq[None, :]), bad_all)
    for m0 in range(0, M, block):
        ms = torch.arange(m0, min(m0 + block, M), device=x.device)
        anchors = order[ms, :n_anchor].sort(dim=1).values  # ascending: flat order is lexicographic (i, j)
        flat, shape = anchors.reshape(-1), (len(ms), n_anchor, N)
        if table is not None:
            rho, ktr, bad = (t[flat].view(shape) for t in table)
        else:
            d2, bad = (t.view(shape) for t in _d2_rows(x, sq, flat, groups))
            rho, ktr = _pair_terms(fam, d2, sq[anchors][..., None], sq[None, None, :])
        v_i = v[anchors, ms[:, None], None]
        f = _f_terms(fam, rho, ktr, v_i, v.T[ms][:, None, :], gamma[ms, None, None])
        f = f.masked_fill(bad, float("inf")).reshape(len(ms), -1)
        # the k-th smallest cost bounds the winners; a stable sort of the (few) entries up to it breaks
        # ties by flat index, exactly as a stable sort of the whole row would
        kth = torch.topk(f, k, dim=1, largest=False, sorted=False).values.amax(1, keepdim=True)
        within = f <= kth
        counts = within.sum(1)
        exact = counts == k  # no tie at the k-th cost: the k winners are known, in flat-index order
        if bool(exact.any()):
            rows = exact.nonzero().squeeze(1)
            cand = within[rows].nonzero()[:, 1].view(len(rows), k)
            vals = f[rows[:, None], cand]
            order_k = torch.sort(vals, dim=1, stable=True).indices
            best, vals = cand.gather(1, order_k), vals.gather(1, order_k)
            mr = ms[rows]
            out_i[mr], out_j[mr], out_c[mr] = anchors[rows[:, None], best // N], best % N, vals + c0[mr, None]
        for r in (~exact).nonzero().squeeze(1).tolist():  # ties at the k-th cost: more than k candidates
            m = int(ms[r])
            cand = torch.nonzero(within[r]).squeeze(1)
            best = cand[torch.sort(f[r, cand], stable=True).indices[:k]]
            out_i[m], out_j[m], out_c[m] = anchors[r, best // N], best % N, f[r, best] + c0[m]
    return out_i, out_j, out_c


def pair_costs(x: Tensor, v: Tensor, gamma: Tensor, c0: Tensor, fam: Family, i: Tensor, j: Tensor) -> Tensor:
    """The cost of given pairs, one per neuron: ``i, j [M]`` -> ``[M]``."""
    sq = (x * x).sum(1)
    d2 = ((x[i] - x[j]) ** 2).sum(1)
    m = torch.arange(v.shape[1], device=x.device)
    return _f(fam, d2, sq[i], sq[j], v[i, m], v[j, m], gamma) + c0

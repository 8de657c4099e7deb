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
distance (a GEMM), after which a neuron costs a handful of flops per pair: with the pair factors of
:func:`_cost_terms`, one add, two multiply-adds and a min per ``(i, j, m)``, about 15 flops in all
with the factors' share. Three engines compute, for every anchor ``i`` and neuron ``m``, the cost of
its best partner ``j`` (the *row minimum*):

- the compiled CPU kernel (:mod:`lightning_swim._cpu_kernel`): distances from one GEMM per block of
  anchors (PyTorch), then the per-neuron work with four anchors sharing each load (what ``"auto"`` and
  ``"torch"`` run on a CPU). At N = 20,000, d = 784, M = 256 on a 2-core AMD EPYC (AVX-512) it took
  0.9-1.1x the FLOP floor (15 flops per pair and neuron at the GEMM rate measured in the same run),
  KeOps 2.1x (its per-pair ``sqdist`` runs at a fraction of the GEMM rate on a CPU), plain PyTorch
  3.4x (``benchmarks/bench_pair_search.py``);
- ``keops``: a symbolic ``(N, N, Mc)`` LazyTensor, ``i`` and ``j`` over points, the last axis a chunk
  of ``Mc`` neurons (64 or 256), with the squared distance written as ``sqdist`` and factorised so that g++
  vectorises it and computes it once per pair (a ``|``-dot-product accumulates through a serial
  ``fma`` chain and runs 10x slower on a CPU); the engine of ``"auto"`` on a GPU;
- plain PyTorch on ``[Bi, N, Mc]`` blocks, bounded by ``max_memory`` (GPUs under ``"torch"``, and every
  device where nothing compiles).

Only the minima are reduced (no argmin): the exact top-k pairs of a neuron lie in its ``k`` anchors of
smallest row minimum (a pair cheaper than the k-th smallest row minimum has an anchor whose row
minimum is cheaper still), so a second step, shared by all engines, scans those ``k`` rows in full.

The anchor lower bound of DESIGN.md §2, ``cost_ij >= s_i^2 / (1 + |x_i|^2)``, would let an exact
search skip the anchors whose bound exceeds the best cost found; on the benchmark's data (uniform in
``[0, 1]^d``, hyperplanes through the data) and on digits it skips none, as ``|x_i|^2`` is large
next to the costs (``bench_pair_search.py`` prints the share), so no engine uses it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_swim._cpu_kernel import NEURON_PAD, CpuKernel, CpuKernelUnavailableError, load_cpu_kernel
from lightning_swim._keops import KeOpsUnavailableError, pykeops_torch
from lightning_swim.activations import Activation

BACKENDS = ("auto", "keops", "torch")
KEOPS_DIM_MULTIPLE = 16  # input dims are zero-padded to a multiple of this: fewer distinct formulas
_BIG = 1e30
_warned = {"keops": False}
# why KeOps failed in this process, per device type: "auto" does not retry it (a compilation at every map)
_keops_failure: dict[str, str] = {}


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


_INT_OF_SIZE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def duplicate_groups(x: Tensor) -> Tensor:
    """An id per point, equal for coincident points: ``[N]`` int64, the ids ``0, ..., G - 1`` of the ``G``
    distinct points (``x[i]`` and ``x[j]`` coincide where every coordinate compares equal).

    Rows are grouped by :func:`_row_keys`, and every row is compared with the first of its group; a
    collision (or a NaN) falls back to ``torch.unique``'s row comparison (the same groups, slower: it
    compares rows one slice at a time).
    """
    n = x.shape[0]
    if n == 0 or x[0].numel() == 0:
        return torch.zeros(n, dtype=torch.long, device=x.device)
    flat = x.reshape(n, -1)
    _, inverse = torch.unique(_row_keys(flat), return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), n, dtype=torch.long, device=x.device)
    first.scatter_reduce_(0, inverse, torch.arange(n, device=x.device), reduce="amin")
    if not bool((flat == flat[first[inverse]]).all()):
        return torch.unique(flat, dim=0, return_inverse=True)[1]
    return inverse


_INT_OF_SIZE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def _row_keys(flat: Tensor) -> Tensor:
    """A hash of each row of ``flat [N, D]``, ``[N]`` int64: its coordinates' bits (``-0.0`` read as
    ``0.0``) times fixed odd multipliers, summed modulo ``2^64``. Integer sums do not depend on their
    order, so coincident rows get one key."""
    bits = (flat + 0).contiguous().view(_INT_OF_SIZE[flat.element_size()]).long()  # + 0: -0.0 -> 0.0
    odd = torch.randint(-(2**62), 2**62, (flat.shape[1],), generator=torch.Generator().manual_seed(0x5EED)) | 1
    return (bits * odd.to(bits.device)).sum(1)  # wraps around


class _Distances:
    r"""Squared distances by GEMM, guarded against cancellation.

    Distances do not move with the origin, so the GEMM runs on the centred points ``y = x - mean(x)``:
    :math:`D_{ij} = |y_i|^2 + |y_j|^2 - 2\langle y_i, y_j\rangle`, whose rounding error is about
    :math:`8 \sqrt{d}\, \epsilon\, (|y_i|^2 + |y_j|^2)`. Where that could exceed :math:`\sqrt{\epsilon}\, D_{ij}`
    (close points: near-duplicates), the distance is recomputed from the difference of the original
    coordinates, so that every distance keeps at least half the digits of the dtype and
    near-duplicates a true, positive distance (as KeOps' ``sqdist`` gives).
    """

    def __init__(self, x: Tensor, groups: Tensor | None = None) -> None:
        self.x = x
        self.y = x - x.mean(0)
        self.sqy = (self.y * self.y).sum(1)
        self.groups = duplicate_groups(x) if groups is None else groups
        self.tol = _recompute_below(x)

    def rows(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Squared distances from ``x[rows]`` to every point, ``[R, N]``, and the mask of excluded pairs
        (coincident points, whose distance is set to 1)."""
        return _guarded_d2(self.x, self.y, self.sqy, rows, self.groups, self.tol)


def _guarded_d2(x: Tensor, y: Tensor, sqy: Tensor, rows: Tensor, groups: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """:meth:`_Distances.rows` for the GEMM points ``y`` (``x`` translated) and their ``sqy = |y|^2``."""
    norms = sqy[rows, None] + sqy[None, :]
    d2 = norms - 2.0 * (y[rows] @ y.T)
    bad = groups[rows, None] == groups[None, :]
    unsure = (d2 <= tol * norms) & ~bad
    if bool(unsure.any()):
        r, c = unsure.nonzero(as_tuple=True)
        step = max(1, 2**24 // x.shape[1])
        for s in range(0, len(r), step):
            rs, cs = r[s : s + step], c[s : s + step]
            d2[rs, cs] = ((x[rows[rs]] - x[cs]) ** 2).sum(1)
    return d2.masked_fill(bad, 1.0), bad


def _d2_rows(x: Tensor, sq: Tensor, rows: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """:meth:`_Distances.rows` with the GEMM on ``x`` itself (``sq = |x|^2``), for callers that keep
    ``sq`` and ``groups``: points already centred lose nothing."""
    return _guarded_d2(x, x, sq, rows, groups, _recompute_below(x))


def _recompute_below(x: Tensor) -> float:
    """Relative size (of ``|y_i|^2 + |y_j|^2``) below which a GEMM-based squared distance is recomputed."""
    return 8 * x.shape[1] ** 0.5 * torch.finfo(x.dtype).eps ** 0.5


def _cost_terms(v: Tensor, gamma: Tensor, fam: Family, multiple: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    r"""The neuron factors of the expanded cost, neurons zero-padded to a multiple of ``multiple``.

    .. math::
        f_{ijm} = A_{ij} + R_{ij} (a_{im} + b_{jm}) + K_{ij} g_m + \gamma_m^2,\qquad
        A = K^2 + \alpha\rho,\ R = \rho,\ K = \kappa t\rho,\ a = 2v,\ b = -2v,\ g = -2\gamma,

    one add, two multiply-adds and a min per ``(i, j, m)`` once the pair factors are known; the
    row minima leave out the constant :math:`\gamma_m^2`. Returns ``(a, b [N, Mp], g [Mp])``.
    """
    a, b, g = 2.0 * v, -2.0 * v, -2.0 * gamma[None, :]
    return _pad_cols(a, multiple).contiguous(), _pad_cols(b, multiple).contiguous(), _pad_cols(g, multiple)[0]


def _pair_factors(fam: Family, d2: Tensor, bad: Tensor, sq_i: Tensor, sq_j: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(A, R, K)`` of :func:`_cost_terms` for the pairs of ``d2`` (``A = inf`` on excluded pairs)."""
    rho, ktr = _pair_terms(fam, d2, sq_i, sq_j)
    A = ktr * ktr + fam.alpha * rho
    return A.masked_fill_(bad, float("inf")), rho, ktr


def _row_blocks(n: int, rows_per_block: int) -> list[tuple[int, int]]:
    step = max(1, min(n, rows_per_block))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def rowmin_torch(x: Tensor, v: Tensor, gamma: Tensor, fam: Family, *, max_memory: int, kernel: bool = True) -> Tensor:
    r"""Row minima ``[N, M]`` from one GEMM per block of anchors, then the per-neuron work.

    Squared distances come from a GEMM of the centred points (recomputed from the coordinates where
    that cancels, see :class:`_Distances`); the per-neuron work is the expansion of :func:`_cost_terms`.
    On a CPU, in float32 and float64, with ``kernel=True``, it runs in the compiled kernel of
    :mod:`lightning_swim._cpu_kernel` (GEMM blocks of at most ``max_memory / 2`` bytes) if that builds,
    else in plain PyTorch on ``[Bi, N, Mc]`` blocks of at most ``max_memory`` bytes.
    """
    if kernel and _kernel_fits(x):
        try:
            compiled = cpu_kernel()
        except CpuKernelUnavailableError:
            pass
        else:
            return _rowmin_kernel(compiled, x, v, gamma, fam, max_memory=max_memory)
    return _rowmin_eager(x, v, gamma, fam, max_memory=max_memory)


def _rowmin_eager(x: Tensor, v: Tensor, gamma: Tensor, fam: Family, *, max_memory: int) -> Tensor:
    N, M = v.shape
    sq = (x * x).sum(1)
    dist = _Distances(x)
    a, b, g = _cost_terms(v, gamma, fam)
    mc = min(M, 64)
    b_chunks = [b[:, c : c + mc].contiguous() for c in range(0, M, mc)]
    per_block = max(1, min(N, max_memory // (x.element_size() * N * (mc + 12))))
    nj = N
    if x.device.type == "cpu":  # [Bi, Nj, Mc] blocks of ~2^22 costs in one reused buffer, within the caches
        per_block = min(per_block, 64)
        nj = max(256, 2**22 // (per_block * mc))
    buf = torch.empty(per_block, min(nj, N), mc, dtype=x.dtype, device=x.device)
    fmin = torch.empty(N, M, dtype=x.dtype, device=x.device)
    for start, stop in _row_blocks(N, per_block):
        rows = torch.arange(start, stop, device=x.device)
        d2, bad = dist.rows(rows)
        A, R, K = (t[:, :, None] for t in _pair_factors(fam, d2, bad, sq[rows, None], sq[None, :]))
        for c, b_c in zip(range(0, M, mc), b_chunks, strict=True):
            out = fmin[start:stop, c : c + mc]
            for j0 in range(0, N, nj):
                js = slice(j0, j0 + nj)
                f = buf[: stop - start, : min(nj, N - j0), : b_c.shape[1]]
                torch.add(a[start:stop, None, c : c + mc], b_c[None, js], out=f)  # [Bi, Nj, Mc]
                f.mul_(R[:, js]).add_(A[:, js]).addcmul_(K[:, js], g[c : c + mc])
                if j0 == 0:
                    torch.amin(f, dim=1, out=out)
                else:
                    torch.minimum(out, f.amin(dim=1), out=out)
    return fmin + gamma * gamma


def _rowmin_kernel(kern: CpuKernel, x: Tensor, v: Tensor, gamma: Tensor, fam: Family, *, max_memory: int) -> Tensor:
    N, M = v.shape
    x = x.contiguous()
    sq = (x * x).sum(1)
    dist = _Distances(x)
    a, b, g = _cost_terms(v, gamma, fam, NEURON_PAD)
    consts = (fam.kappa, fam.alpha, fam.homogeneous, dist.tol)
    fmin = torch.empty(N, a.shape[1], dtype=x.dtype)
    # a few hundred anchors per GEMM: fast GEMMs; the kernel reads each Gram entry once
    per_block = min(512, max(4, max_memory // (2 * x.element_size() * N)))
    for start, stop in _row_blocks(N, per_block):
        gram = dist.y[start:stop] @ dist.y.T
        kern.rowmin_block(gram, start, x, sq, dist.sqy, dist.groups, a, b, g, consts, fmin[start:stop])
    return fmin[:, :M] + gamma * gamma


_kernel_checked: dict[str, bool] = {}


def cpu_kernel() -> CpuKernel:
    """The compiled CPU kernel, checked once against plain PyTorch on a small problem.

    Raises:
        CpuKernelUnavailableError: where it is turned off, cannot be built, or computes wrong numbers.
    """
    kern = load_cpu_kernel()
    if "ok" not in _kernel_checked:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(23, 5, generator=g, dtype=torch.float64)
        x = torch.cat([x, x[:3], x[:1] + 1e-9])  # duplicates and a near-duplicate
        v, gamma = torch.randn(len(x), 37, generator=g, dtype=torch.float64), torch.randn(37, generator=g)
        ok = True
        for dtype in (torch.float32, torch.float64):
            for fam in (Family(True, 0.0, 1.0), Family(False, 1.2, 1.1)):
                xs, vs, gs = x.to(dtype), v.to(dtype), gamma.to(dtype)
                got = _rowmin_kernel(kern, xs, vs, gs, fam, max_memory=4096)
                want = _rowmin_eager(xs, vs, gs, fam, max_memory=2**20)
                tol = 1e-3 if dtype == torch.float32 else 1e-9
                ok &= bool(torch.allclose(got, want, rtol=tol, atol=tol))
        _kernel_checked["ok"] = ok
    if not _kernel_checked["ok"]:
        raise CpuKernelUnavailableError(f"the CPU kernel {kern.path} disagrees with PyTorch on a small test problem")
    return kern


def _pad_cols(t: Tensor, multiple: int) -> Tensor:
    extra = (-t.shape[1]) % multiple
    return torch.nn.functional.pad(t, (0, extra)) if extra else t


def keops_neuron_chunk(M: int) -> int:
    """Neurons per KeOps call: 64 for narrow layers, else 256 (one formula per size, few sizes)."""
    return 64 if M <= 64 else 256


def rowmin_keops(x: Tensor, v: Tensor, gamma: Tensor, fam: Family) -> Tensor:
    """Row minima ``[N, M]`` with KeOps ``Min`` reductions over ``j``.

    The pair factors are scalars computed once per ``(i, j)`` from ``sqdist`` (the per-neuron part is
    the expansion of :func:`_cost_terms`). KeOps' CPU kernel sweeps every ``j`` for each ``i``; past
    the last-level cache that sweep is bound by memory bandwidth. The ``j`` axis is therefore cut
    into blocks of about 4 MB (measured at N = 8,000, d = 784: 4.8 s in blocks of 1,024 against
    8.6 s unblocked) and the block minima combined in torch.
    """
    LazyTensor = pykeops_torch().LazyTensor
    N, M = v.shape
    xp = _pad_cols(x, KEOPS_DIM_MULTIPLE).contiguous()
    sq = (x * x).sum(1, keepdim=True)
    mc = keops_neuron_chunk(M)
    a, b, g = _cost_terms(v, gamma, fam, mc)
    block = max(256, (4 * 2**20) // ((xp.shape[1] + mc) * x.element_size()))
    # the family's constants are parameters, not literals: one formula serves every activation
    consts = torch.tensor([1.0 if fam.homogeneous else -1.0, fam.kappa, fam.alpha], dtype=x.dtype, device=x.device)
    homogeneous, kappa, alpha = (LazyTensor(consts[k : k + 1].view(1, 1, 1)) for k in range(3))
    x_i, sq_i = LazyTensor(xp[:, None, :]), LazyTensor(sq[:, None, :])
    fmin = torch.full((N, a.shape[1]), float("inf"), dtype=x.dtype, device=x.device)
    for c in range(0, M, mc):
        a_i = LazyTensor(a[:, None, c : c + mc].contiguous())
        g_c = LazyTensor(g[None, None, c : c + mc].contiguous())
        b_c = b[:, c : c + mc].contiguous()
        for s in range(0, N, block):
            x_j, sq_j = LazyTensor(xp[None, s : s + block]), LazyTensor(sq[None, s : s + block])
            b_j = LazyTensor(b_c[None, s : s + block])
            d2 = x_i.sqdist(x_j)
            bad = (-d2).step()  # 1 exactly for coincident points, whose squared distance is exactly 0
            d2safe = d2 + bad
            rho = homogeneous.ifelse(d2safe.rsqrt(), 1.0 / d2safe)
            ktr = kappa * (0.5 * (sq_i - sq_j + d2safe)) * rho
            A = ktr * ktr + alpha * rho + _BIG * bad
            f = (A + rho * (a_i + b_j) + ktr * g_c).factorize(rho).factorize(d2)
            torch.minimum(fmin[:, c : c + mc], f.min(dim=1), out=fmin[:, c : c + mc])
    return fmin[:, :M] + gamma * gamma


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
    """Row minima ``[N, M]`` and the engine that computed them (``"cpu-kernel"``, ``"keops"`` or ``"torch"``).

    - ``"keops"``: KeOps, or :class:`KeOpsUnavailableError`;
    - ``"torch"``: :func:`rowmin_torch`, in the compiled CPU kernel on a CPU where it builds;
    - ``"auto"``: on a CPU the compiled kernel (faster than KeOps on a CPU at every size measured by
      ``benchmarks/bench_pair_search.py``), else KeOps; on a GPU KeOps. Where neither works, plain
      PyTorch, with one warning.
    """
    if backend == "torch":
        return rowmin_torch(x, v, gamma, fam, max_memory=max_memory), _torch_engine(x)
    reasons = []
    if backend == "auto" and _kernel_fits(x):
        try:
            kern = cpu_kernel()
        except CpuKernelUnavailableError as err:
            reasons.append(f"compiled CPU kernel: {err}")
        else:
            return _rowmin_kernel(kern, x, v, gamma, fam, max_memory=max_memory), "cpu-kernel"
    failed = _keops_failure.get(x.device.type) if backend == "auto" else None
    if failed is not None:
        reasons.append(failed)
    else:
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
            reasons.append(f"KeOps: {type(err).__name__}: {str(err)[:200]}")
            _keops_failure[x.device.type] = reasons[-1]
    if not _warned["keops"]:
        _warned["keops"] = True
        warnings.warn(
            f"KeOps is not usable here ({'; '.join(reasons)}); the pair search runs on the plain-PyTorch backend "
            "instead (same results, slower on large probe sets).",
            RuntimeWarning,
            stacklevel=3,
        )
    return _rowmin_eager(x, v, gamma, fam, max_memory=max_memory), "torch"


def _kernel_fits(x: Tensor) -> bool:
    """Whether the compiled CPU kernel serves these points: on the CPU, in float32 or float64."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def _torch_engine(x: Tensor) -> str:
    if not _kernel_fits(x):
        return "torch"
    try:
        cpu_kernel()
    except CpuKernelUnavailableError:
        return "torch"
    return "cpu-kernel"


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
    dist = _Distances(x)
    n_anchor = min(k, N)
    out_i = torch.empty(M, k, dtype=torch.long, device=x.device)
    out_j = torch.empty_like(out_i)
    out_c = torch.empty(M, k, dtype=x.dtype, device=x.device)
    block = max(1, 2**22 // (n_anchor * N))  # neurons at a time: [block, n_anchor, N] costs of ~4M entries
    table = None
    if N * N <= 2**22:  # small probe sets: the pair factors of all N^2 pairs once, gathered per neuron
        d2_all, bad_all = dist.rows(torch.arange(N, device=x.device))
        table = (*_pair_terms(fam, d2_all, sq[:, None], sq[None, :]), bad_all)
    for m0 in range(0, M, block):
        ms = torch.arange(m0, min(m0 + block, M), device=x.device)
        anchors = order[ms, :n_anchor].sort(dim=1).values  # ascending: flat order is lexicographic (i, j)
        flat, shape = anchors.reshape(-1), (len(ms), n_anchor, N)
        if table is not None:
            rho, ktr, bad = (t[flat].view(shape) for t in table)
        else:
            d2, bad = (t.view(shape) for t in dist.rows(flat))
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

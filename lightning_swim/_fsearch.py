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

Where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), the torch search *screens* each
block: the cosines of the unit-normalised ``h`` and ``a`` come from one bfloat16 GEMM (4-5x the
float32 rate on the AVX512-BF16 EPYC this was measured on), whose error is at most
:func:`screen_slack` (bfloat16 rounding of both factors and of the result, float32 accumulation),
and only the (pair, neuron) entries whose screened cosine is within that slack of the window are
computed again in the working dtype, by a sampled product (SDDMM). Every pair in the window passes
the screen, so the result is the same as without it.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_swim import _search
from lightning_swim._cpu_kernel import CpuKernelUnavailableError, PwlRows
from lightning_swim._keops import KeOpsUnavailableError, pykeops_torch
from lightning_swim._search import KEOPS_DIM_MULTIPLE, _d2_rows, _pad_cols, duplicate_groups, keops_neuron_chunk
from lightning_swim.activations import Activation, get_activation

__all__ = ["Candidates", "SoftResult", "exact_candidates", "fit_error", "screen_slack", "sign_free", "summarise"]

SOFT_CUT = 5.0  # soft weights below exp(-SOFT_CUT) of the best's are left out
MAX_KEPT = 4096  # candidate pairs kept per neuron during the exact search (see exact_candidates)
SCREEN: bool | None = None  # the bfloat16 screen of the torch search: None = where the CPU has bf16 units


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


@functools.cache
def _native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX): elsewhere a bf16 GEMM is
    emulated, slower than float32, and the screen would not pay."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def screens(x: Tensor) -> bool:
    """Whether the torch exact search on ``x`` screens its blocks with a bfloat16 GEMM (``SCREEN``
    forces it either way; by default on a CPU with native bf16, for float32 and float64)."""
    if SCREEN is not None:
        return SCREEN
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and _native_bf16()


def screen_slack(n: int) -> float:
    r"""Bound on :math:`|\hat c - c|` for the cosine of two unit vectors of length ``n`` computed by a
    bfloat16 GEMM: both factors rounded to bfloat16 (unit roundoff :math:`u = 2^{-8}`), exact products
    accumulated in float32 in any order (:math:`\gamma_n = n v / (1 - n v)`, :math:`v = 2^{-24}`), the
    result rounded to bfloat16. With :math:`S = \sum_n |h_n a_n| \le 1` (Cauchy-Schwarz),
    :math:`|\hat c - c| \le (2u + u^2) S + \gamma_n (1+u)^2 S + u |\hat c_{\text{acc}}|`, below
    ``3u + 3u^2 + u^3 + (1+u)^3 gamma_n``; 1% and a few float32 roundings of the normalisation are
    added, and ``2^-100`` for inputs bfloat16 flushes to zero."""
    u, v = 2.0**-8, 2.0**-24
    gamma = n * v / (1 - n * v)
    return 1.01 * (3 * u + 3 * u * u + u**3 + (1 + u) ** 3 * gamma + 8 * v) + 2.0**-100


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
        self.unit_a = a * self.inv_aa.sqrt()
        self.unit_a_bf16 = self.unit_a.to(torch.bfloat16)
        self.unit_a_t = self.unit_a.T.contiguous()

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

    def unit_neurons(
        self, rows: Tensor, work: Tensor, work_bf16: Tensor, stored: bool = True
    ) -> tuple[Tensor | PwlRows, Tensor, Tensor]:
        """The SWIM neurons of the pairs ``(rows[b], j)`` on every probe point as unit vectors,
        ``[B N, N]`` (in ``work``), the same in bfloat16 (in ``work_bf16``), and which pairs are
        excluded, ``[B N]``. The compiled kernel where it runs (piecewise-linear activations on the CPU),
        else its torch twin; with ``stored=False`` the kernel writes only the bfloat16 rows, and the
        first is the :class:`~lightning_swim._cpu_kernel.PwlRows` that build the others again."""
        B, N = len(rows), self.x.shape[0]
        r, c, bad = self.pair_terms(rows)
        out, out_bf16 = work[: B * N * N].view(B * N, N), work_bf16[: B * N * N].view(B * N, N)
        kernel = _unit_kernel(self.act, self.x)
        if kernel is not None and self.gram is not None:
            r, c, slope = r.contiguous(), c.contiguous(), self.act.negative_slope
            if stored:
                kernel.unit_neurons(self.gram, rows, r, c, slope, out, out_bf16)
                return out, out_bf16, bad.view(-1)
            inv = torch.empty(B, N, dtype=self.x.dtype, device=self.x.device)
            kernel.unit_neurons(self.gram, rows, r, c, slope, None, out_bf16, inv)
            return PwlRows(self.gram, rows, r, c, slope, inv), out_bf16, bad.view(-1)
        _unit_neurons_torch(self, rows, r, c, out, out_bf16)
        return out, out_bf16, bad.view(-1)


def _unit_neurons_torch(layer: _Layer, rows: Tensor, r: Tensor, c: Tensor, out: Tensor, out_bf16: Tensor) -> None:
    """The twin of :meth:`lightning_swim._cpu_kernel.CpuKernel.unit_neurons`, any activation."""
    B, N = r.shape
    h = _activations(layer, rows, r, c, out)  # in `out` for ReLU, a new tensor for other activations
    inv = torch.linalg.vector_norm(h, dim=2).reciprocal_()  # |h| > 0: h(x_j) = sigma(s1 - s2)
    torch.mul(h, inv[:, :, None], out=out.view(B, N, N))
    out_bf16.copy_(out)


_unit_checked: dict[str, Any] = {}


def _checked(name: str, agrees: Callable[[Any], bool]) -> Any:
    """The compiled CPU kernel if it is available and ``agrees`` with the torch twin of its function ``name``
    (checked once per process), else None."""
    if name not in _unit_checked:
        _unit_checked[name] = None
        try:
            kernel = _search.cpu_kernel()
        except CpuKernelUnavailableError:
            return None
        _unit_checked[name] = kernel if agrees(kernel) else None
    return _unit_checked[name]


def _unit_kernel(act: Activation, x: Tensor) -> Any:
    """The compiled unit-neuron kernel for ``act`` on ``x``, or None where it does not apply (other
    activations, devices or dtypes) or is unavailable; checked once against the torch twin."""
    if act.name not in ("relu", "leaky_relu") or not _kernel_takes(x):
        return None
    return _checked("kernel", _units_agree)


def _units_agree(kernel: Any) -> bool:
    """Whether the compiled unit neurons are the torch twin's (and their bf16 rounding), in both dtypes."""
    g = torch.Generator().manual_seed(0)
    ok = True
    for dtype, name in itertools.product((torch.float32, torch.float64), ("relu", "leaky_relu")):
        pwl = get_activation(name)
        xs = torch.randn(19, 4, generator=g, dtype=torch.float64).to(dtype)
        layer = _Layer(xs, pwl, torch.rand(19, 3, generator=g, dtype=torch.float64).to(dtype), "torch")
        rows = torch.tensor([0, 5, 18])
        r, c, _ = layer.pair_terms(rows)
        want, want_bf16 = torch.empty(3 * 19, 19, dtype=dtype), torch.empty(3 * 19, 19, dtype=torch.bfloat16)
        got, got_bf16 = torch.empty_like(want), torch.empty_like(want_bf16)
        _unit_neurons_torch(layer, rows, r, c, want, want_bf16)
        assert layer.gram is not None
        kernel.unit_neurons(layer.gram, rows, r.contiguous(), c.contiguous(), pwl.negative_slope, got, got_bf16)
        fine = torch.isfinite(want).all(1)  # the pairs (i, i) have no neuron
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        ok &= bool(torch.allclose(got[fine], want[fine], rtol=tol, atol=tol))
        ok &= bool(((got_bf16[fine].double() - got[fine].double()).abs() <= 2.0**-8 * got[fine].abs()).all())
    return ok


def _activations(layer: _Layer, rows: Tensor, r: Tensor, c: Tensor, work: Tensor) -> Tensor:
    """``h_ij(x_n)`` of the pairs ``(rows[b], j)``, ``[B, N(j), N(n)]``, built in ``work``."""
    gram, act = layer.gram, layer.act
    assert gram is not None
    B, N = len(rows), gram.shape[0]
    z = torch.sub(gram[None, :, :], gram[rows][:, None, :], out=work[: B * N * N].view(B, N, N))  # G_jn - G_in
    torch.addcmul(c[:, :, None], z, r[:, :, None], out=z)  # z_ij(x_n)
    return z.clamp_min_(0) if act.name == "relu" else act(z)


def _inner_torch(layer: _Layer, rows: Tensor, r: Tensor, c: Tensor, work: Tensor) -> tuple[Tensor, Tensor]:
    """``(<h, a> [B, N, M], 1/|h|^2 [B, N])`` from the ``[B, N, N]`` pre-activations, built in ``work``
    (a buffer of at least ``B N^2`` entries reused across blocks: a fresh allocation of that size per
    block costs more than the arithmetic in it)."""
    a = layer.a
    B, N, M = len(rows), *a.shape
    h = _activations(layer, rows, r, c, work)
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


def _block_size(n: int, m: int, item: int, max_memory: int, screened: bool = False) -> int:
    per_anchor = item * (n * n + 3 * n * m) + (2 * (n * n + n * m) if screened else 0)  # + the bf16 copies
    by_memory = max_memory // per_anchor
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
    near: Callable[[Tensor], Tensor] | None = None,
    n_cheapest: int = 0,
) -> tuple[Candidates, Tensor]:
    """Every pair whose error is within ``threshold(best)`` of each neuron's best, over all pairs, up
    to ``max_kept`` per neuron; or, with ``near``, only the pairs a summary reads: those within
    ``near(best)`` and the ``n_cheapest`` cheapest.

    Anchors are visited in blocks; a pair is kept while its error is within ``threshold`` of the
    best error found so far (initially ``bound``), and the kept pairs are pruned to the final
    threshold at the end, so the result is exact whatever the bound. Every neuron has a *ceiling*
    (inf at first), and only pairs at most ``min(threshold(best), ceiling)`` are kept:

    - with ``near``, the first block in which many pairs of a neuron pass (more than ``4 n_cheapest``,
      and a sixteenth of the block) lowers the neuron's ceiling to ``max(near(best), e_k)``, ``e_k`` an
      error that ``n_cheapest`` pairs of the block are known to beat: every pair within
      ``near(best)`` of the final best, and the ``n_cheapest`` cheapest, stay in. (A neuron no pair
      explains well can have a third of its ``N^2`` pairs in a wide soft window; the summary reads
      only these.)
    - a neuron that holds more than ``max_kept`` pairs keeps its ``max_kept // 2`` cheapest and its
      ceiling drops to the largest of them. The best pair and the cheapest ``max_kept // 2`` are still
      exact, and a count within a threshold above the ceiling is a lower bound.

    Args:
        x: the probe inputs ``[N, d]`` (a well-conditioned frame: centred and scaled).
        act: the activation.
        a: the trained neurons' activations ``[N, M]``, none identically zero.
        threshold: maps best errors ``[M]`` to the largest error kept per neuron ``[M]`` (at least
            the best error itself; non-decreasing).
        bound: an upper bound on each neuron's best error ``[M]`` (e.g. the error of some pair; inf
            if none is known): the tighter, the fewer pairs are kept along the way.
        max_memory: bound in bytes on the blocks of anchors.
        backend: ``"torch"`` (GEMMs on ``[N, N]`` blocks, screened in bfloat16 where :func:`screens`)
            or ``"keops"`` (reductions that form no ``[N, N]`` array); the same results.
        near: maps best errors to the tolerance of the ambiguity counts (non-decreasing, at most
            ``threshold``); None keeps the whole window.
        n_cheapest: with ``near``, the cheapest pairs per neuron that must stay (the soft set).

    Returns:
        ``(candidates, ceiling [M])``: the :class:`Candidates`, unsorted, each neuron's best pair
        among them; the ceilings (inf where no neuron was trimmed).
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
    screened = backend == "torch" and screens(x)
    if backend == "keops":  # no [N, N] arrays: blocks of anchors as large as the [B, N, M] outputs allow
        block = max(1, min(N, max_memory // (x.element_size() * 4 * N * (M + 1))))
        work = torch.empty(0, dtype=x.dtype, device=x.device)
    else:
        block = _block_size(N, M, x.element_size(), max_memory, screened)
        work = torch.empty(block * N * N, dtype=x.dtype, device=x.device)
    work_bf16 = torch.empty(len(work) if screened else 0, dtype=torch.bfloat16, device=x.device)
    search = _Search(layer, threshold, bound, near, n_cheapest, work_bf16)
    parts: list[Candidates] = []
    counts = torch.zeros(M, dtype=torch.long, device=x.device)
    for s in range(0, N, block):
        rows = torch.arange(s, min(N, s + block), device=x.device)
        b, j, m, q = search.screened_block(rows, work) if screened else search.dense_block(rows, work)
        keep = q >= 1 - search.limit()[m]
        if bool(keep.any()):
            b, j, m, q = b[keep], j[keep], m[keep], q[keep]
            parts.append(Candidates(m, rows[b], j, 1 - q))
            counts += torch.bincount(m, minlength=M)
        if bool((counts > max_kept).any()):
            cand = _within(_cat(parts), search.limit())
            cand, search.ceiling = _cap(cand, M, max_kept // 2, search.ceiling)
            parts, counts = [cand], torch.bincount(cand.m, minlength=M)
    return _within(_cat(parts), search.limit()), search.ceiling


class _Search:
    """The running state of :func:`exact_candidates`: each neuron's best error and ceiling, and the
    entries of one block of anchors that can be in the window."""

    def __init__(
        self,
        layer: _Layer,
        threshold: Callable[[Tensor], Tensor],
        bound: Tensor,
        near: Callable[[Tensor], Tensor] | None,
        n_cheapest: int,
        work_bf16: Tensor,
    ) -> None:
        self.layer, self.threshold, self.near, self.k = layer, threshold, near, n_cheapest
        self.best = bound.to(layer.x.dtype).clone()
        self.ceiling = torch.full_like(self.best, float("inf"))
        self.work_bf16 = work_bf16  # the screen's buffer, reused by every block

    def limit(self) -> Tensor:
        """The largest error kept now, per neuron."""
        return torch.minimum(self.threshold(self.best), self.ceiling)

    def _trim(self, counts: Tensor, pairs: int, kth: Callable[[], Tensor]) -> bool:
        """Lower the ceilings of neurons with more than ``4 k`` entries, and a sixteenth of the block's
        ``pairs``, to ``max(near(best), e_k)``; ``kth()`` gives ``e_k``, an error that ``k`` entries of
        the block are known to beat, per neuron (a top-k over the block: worth it only where it saves
        extracting many entries), once per neuron. Whether any ceiling moved."""
        if self.near is None or self.k < 1:
            return False
        heavy = (counts > max(4 * self.k, pairs // 16)) & torch.isfinite(self.best)  # near(inf) may be nan
        near = self.near(self.best)
        # once per neuron: later blocks pass mostly entries near the ceiling (the screen's band), which
        # no later trim removes (measured: 10-20% faster maps than trimming again)
        heavy &= torch.isinf(self.ceiling)
        if not bool(heavy.any()):
            return False
        soft = torch.maximum(kth(), near)
        self.ceiling = torch.where(heavy, torch.minimum(self.ceiling, soft), self.ceiling)
        return True

    def dense_block(self, rows: Tensor, work: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(b, j, m, q)`` of every entry of the block within the current limit, from all its scores."""
        q = self.layer.scores(rows, work)
        M = q.shape[2]
        self.best = torch.minimum(self.best, 1 - q.amax(dim=(0, 1)))
        b, j, m = (q >= 1 - self.limit()).nonzero(as_tuple=True)
        # a few epsilons above the k-th error: 1 - (1 - q) may round below q, which would drop the k-th pair
        kth = lambda: 1 - q.view(-1, M).topk(self.k, dim=0).values[-1] + 4 * torch.finfo(q.dtype).eps  # noqa: E731
        qs = q[b, j, m]
        if self._trim(torch.bincount(m, minlength=M), q.shape[0] * q.shape[1], kth):
            ok = qs >= 1 - self.limit()[m]
            b, j, m, qs = b[ok], j[ok], m[ok], qs[ok]
        return b, j, m, qs

    def screened_block(self, rows: Tensor, work: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(b, j, m, q)`` of a superset of the block's entries within the limit: those whose bfloat16
        cosine passes the limit less :func:`screen_slack`, with ``q`` computed again exactly."""
        layer = self.layer
        N = layer.a.shape[0]
        kernel = _screen_kernel(layer.x)  # it builds the exact rows it reads again: they need not be stored
        hn, hb, bad = layer.unit_neurons(rows, work, self.work_bf16, stored=kernel is None)  # bad: [B N]
        chat = hb @ layer.unit_a_bf16  # [B N, M] cosines within eps
        if layer.free_sign:
            chat.abs_()
        chat.index_fill_(0, bad.nonzero().ravel(), float("-inf"))
        eps = screen_slack(N)

        def screen_cosines() -> Tensor:
            lim = self.limit()
            return torch.where(lim < 1, (1 - lim).clamp_min(0).sqrt() - eps, -1e30).to(torch.float32)

        def kth() -> Tensor:  # k entries have a true cosine >= the k-th screened one less eps
            c = chat.topk(self.k, dim=0).values[-1].to(self.best.dtype) - eps
            return 1 - c.clamp(0, 1).square()

        def trim(counts: Tensor) -> Tensor | None:  # the screen's thresholds after a trim, or None
            return screen_cosines() if self._trim(counts, chat.shape[0], kth) else None

        if kernel is not None:
            p, m, cos = kernel.screen(chat, screen_cosines(), hn, layer.unit_a_t, trim)
        else:
            assert isinstance(hn, Tensor)
            p, m, cos = _screen_torch(chat, screen_cosines(), hn, layer.unit_a_t, trim)
        q = cos.abs() if layer.free_sign else cos.clamp_min(0)
        q = q.square()
        if len(q):
            top = torch.full_like(self.best, float("-inf")).scatter_reduce_(0, m, q, reduce="amax")
            self.best = torch.minimum(self.best, 1 - top)
        return p // N, p % N, m, q


def _screen_torch(
    chat: Tensor, thr: Tensor, h: Tensor, a_t: Tensor, trim: Callable[[Tensor], Tensor | None] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The twin of :meth:`lightning_swim._cpu_kernel.CpuKernel.screen`: the entries of ``chat`` at least
    ``thr`` (or the thresholds ``trim`` returns from their counts), and their exact cosines."""
    p, m = (chat >= thr).nonzero(as_tuple=True)
    if trim is not None and (lower := trim(torch.bincount(m, minlength=chat.shape[1]))) is not None:
        ok = chat[p, m] >= lower[m]
        p, m = p[ok], m[ok]
    return p, m, _sampled(h, a_t.T, p, m)


def _screen_kernel(x: Tensor) -> Any:
    """The compiled screen for ``x``'s dtype, or None where it does not apply (other devices or dtypes) or
    is unavailable; checked once against its torch twin."""
    if not _kernel_takes(x):
        return None
    return _checked("screen", _screen_agrees)


def _kernel_takes(x: Tensor) -> bool:
    """Whether the compiled kernels take ``x``: on the CPU, in float32 or float64."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def _screen_agrees(kernel: Any) -> bool:
    """Whether the compiled screen gives its twin's entries, and their cosines to rounding, in both dtypes,
    with and without a trim, on rows excluded (-inf) and neurons whose threshold passes every entry; from
    stored rows, and from rows it builds again (:class:`~lightning_swim._cpu_kernel.PwlRows`) for ReLU
    and leaky ReLU."""
    g = torch.Generator().manual_seed(0)
    thr = torch.tensor([0.5, -1e30, 0.0, 2.0, -0.25])
    trims = (None, lambda counts: thr + 0.25 * (counts > 3))
    ok = True
    for dtype, name in itertools.product((torch.float32, torch.float64), ("relu", "leaky_relu")):
        pwl = get_activation(name)
        x, a = torch.randn(23, 4, generator=g, dtype=dtype), torch.rand(23, 5, generator=g, dtype=dtype)
        layer, rows = _Layer(x, pwl, a, "torch"), torch.tensor([0, 7, 22])
        assert layer.gram is not None
        r, c, bad = layer.pair_terms(rows)
        h, h_bf16 = torch.empty(3 * 23, 23, dtype=dtype), torch.empty(3 * 23, 23, dtype=torch.bfloat16)
        inv = torch.linalg.vector_norm(_activations(layer, rows, r, c, torch.empty_like(h)), dim=2).reciprocal()
        _unit_neurons_torch(layer, rows, r, c, h, h_bf16)
        h[bad.view(-1)] = 0  # (the pairs (i, i) have no neuron)
        rebuilt = PwlRows(layer.gram, rows, r.contiguous(), c.contiguous(), pwl.negative_slope, inv.contiguous())
        chat = (h @ layer.unit_a).to(torch.bfloat16)
        chat[bad.view(-1)] = float("-inf")
        for source, trim in itertools.product((h, rebuilt), trims):
            want = _screen_torch(chat, thr, h, layer.unit_a_t, trim)
            got = kernel.screen(chat, thr, source, layer.unit_a_t, trim)
            ok &= torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2].shape == want[2].shape
            ok &= ok and bool(torch.allclose(got[2], want[2], rtol=1e-5, atol=1e-5))
    return ok


def _sampled(h: Tensor, a: Tensor, p: Tensor, m: Tensor) -> Tensor:
    """``<h[p_k], a[:, m_k]>`` for every ``k`` (``p`` ascending): one sampled product (SDDMM) instead of
    the full ``h @ a``."""
    if len(p) == 0:
        return torch.zeros(0, dtype=h.dtype, device=h.device)
    crow = torch.zeros(h.shape[0] + 1, dtype=torch.long, device=h.device)
    crow[1:] = torch.cumsum(torch.bincount(p, minlength=h.shape[0]), 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(
            crow,
            m,
            torch.zeros(len(p), dtype=h.dtype, device=h.device),
            (h.shape[0], a.shape[1]),
            check_invariants=False,
        )
        return torch.sparse.sampled_addmm(pattern, h, a, beta=0.0).values()


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


def _by_neuron_error_pair(m: Tensor, err: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """Permutation sorting candidates by neuron, then error, then ``(i, j)``, as :func:`_lexsort` does: one sort
    of an integer key where the four fit in 63 bits (float32 errors, none NaN: a float maps to an unsigned
    integer of the same order), else :func:`_lexsort` (four stable sorts; measured 13x slower on 73,000
    candidates)."""
    if err.dtype == torch.float32 and len(m) and not bool(err.isnan().any()):
        b = max(1, int(torch.maximum(i, j).max()).bit_length())  # bits of a point index
        if max(1, int(m.max()).bit_length()) + 32 + 2 * b <= 63:
            u = (err + 0.0).view(torch.int32).long() & 0xFFFFFFFF  # + 0.0: -0.0 -> 0.0, which sort as equal
            e = torch.where(u < 2**31, u + 2**31, 2**32 - 1 - u)  # sign bit set: a negative float, reversed
            return torch.sort((((m << 32) | e) << (2 * b)) | (i << b) | j).indices
    return _lexsort(m, err, i, j)


def summarise(
    cand: Candidates,
    n_neurons: int,
    *,
    atol: float,
    rtol: float,
    temperature: float,
    max_soft: int,
    tie: float = 0.0,
) -> SoftResult:
    r"""Best pair, ambiguity and soft attribution of every neuron from its candidate pairs.

    - ties: an error within ``tie`` of its neuron's smallest is that error (``tie``: the rounding
      bound of the errors' computation, under which pairs of one function, e.g. of collinear points,
      can differ);
    - best: the smallest error; ties go to the smallest ``(i, j)`` in lexicographic order;
    - ``n_near``: pairs with :math:`e \le e^* + \mathrm{atol} + \mathrm{rtol}\, e^*`, and
      ``n_near_points`` the distinct points they use;
    - soft attribution: weights :math:`\propto \exp(-(e - e^*)/\tau)` with
      :math:`\tau = \mathrm{temperature}\cdot e^* + \tau_0` (:math:`\tau_0` = 16 machine epsilons
      of the dtype, so that exact ties share the weight) over the pairs with weight at least
      :math:`e^{-5}` of the best's, at most ``max_soft`` per neuron (the cheapest).

    Every neuron must have at least one candidate.
    """
    err = cand.err
    if tie > 0 and len(err):
        least = torch.full((n_neurons,), float("inf"), dtype=err.dtype, device=err.device)
        least = least.scatter_reduce_(0, cand.m, err, reduce="amin")[cand.m]
        err = torch.where(err <= least + tie, least, err)
    order = _by_neuron_error_pair(cand.m, err, cand.i, cand.j)
    m, i, j, e = cand.m[order], cand.i[order], cand.j[order], err[order]
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
        n = int(torch.maximum(i, j).max()) + 1  # (neuron, point) as one integer key
        pts = torch.unique(torch.cat([m[near] * n + i[near], m[near] * n + j[near]]))
        n_pts.index_add_(0, pts // n, torch.ones_like(pts))
    tau = temperature * e_star + 16 * torch.finfo(e.dtype).eps
    gap = (e - e_star) / tau
    rank = torch.arange(len(m), device=m.device) - start.repeat_interleave(torch.bincount(m, minlength=n_neurons))
    soft = (gap <= SOFT_CUT) & (rank < max_soft)
    sm, si, sj = m[soft], i[soft], j[soft]
    w = torch.exp(-gap[soft].double())
    total = torch.zeros(n_neurons, dtype=torch.float64, device=m.device).index_add_(0, sm, w)
    return SoftResult(i[start], j[start], best_e, n_near, n_pts, sm, si, sj, w / total[sm])

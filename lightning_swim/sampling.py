"""The forward direction of SWIM: data pairs -> dense-layer weights (Bolager et al., NeurIPS 2023).

References:
    [1] E. L. Bolager, I. Burak, C. Datar, Q. Sun, F. Dietrich. *Sampling weights of deep neural
        networks*. Advances in Neural Information Processing Systems 36 (2023).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_swim._checks import check_choice, check_points, check_positive_int, check_targets
from lightning_swim.activations import Activation, get_activation

__all__ = ["TASKS", "sample_pairs", "swim_neurons"]

TASKS = ("regression", "classification", "uniform")
_MAX_CATEGORIES = 2**24  # torch.multinomial's limit on the number of categories


def swim_neurons(x_from: Tensor, x_to: Tensor, activation: str | Activation = "relu") -> tuple[Tensor, Tensor]:
    r"""The SWIM neurons of ordered pairs of points.

    .. math::
        w = s_1 \frac{x_{to} - x_{from}}{\lVert x_{to} - x_{from}\rVert^2}, \qquad
        b = -\langle w, x_{from}\rangle - s_2,

    so that each neuron's pre-activation is :math:`-s_2` at ``x_from`` and :math:`s_1 - s_2` at
    ``x_to`` (see :mod:`lightning_swim.activations` for :math:`s_1, s_2`).

    Args:
        x_from: first points of the pairs, ``[M, d]``.
        x_to: second points of the pairs, ``[M, d]``.
        activation: a name from :data:`~lightning_swim.activations.ACTIVATIONS` or an
            :class:`~lightning_swim.activations.Activation`.

    Returns:
        ``(weight [M, d], bias [M])`` in the dtype and on the device of the inputs; ``weight`` has
        the layout of ``nn.Linear.weight``.

    Raises:
        ValueError: on shape mismatch, non-finite inputs, a pair of coincident points, a pair whose
            neuron is not representable in the dtype (never silently zero or infinite weights), or
            an unknown activation.

    The neurons are computed in a normalised frame (the difference divided by a power of two near
    its size), so points of size ``1e-20`` or ``1e20`` in float32 give the neurons of the points at
    size 1, scaled.

    Example:
        >>> x_from, x_to = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])
        >>> w, b = swim_neurons(x_from, x_to, "relu")
        >>> w, b
        (tensor([[0.5000, 0.0000]]), tensor([-0.]))
    """
    act = get_activation(activation)
    check_points(x_from, "x_from", min_distinct=0)
    check_points(x_to, "x_to", min_distinct=0)
    if x_from.shape != x_to.shape:
        raise ValueError(
            f"Expected `x_from` and `x_to` to have the same shape but got {tuple(x_from.shape)} "
            f"and {tuple(x_to.shape)}."
        )
    if x_from.dtype != x_to.dtype or x_from.device != x_to.device:
        raise ValueError("Expected `x_from` and `x_to` to share dtype and device.")
    u = x_to - x_from
    same = (u == 0).all(dim=1)
    if bool(same.any()):
        bad = torch.nonzero(same).ravel()[:5].tolist()
        raise ValueError(
            f"{int(same.sum())} pair(s) have coincident points (x_from == x_to), e.g. rows {bad}: "
            "a SWIM neuron needs two distinct points."
        )
    # In a normalised frame: u = s v with s a power of two near max|u|, so that |v|^2 neither overflows
    # nor underflows (|u|^2 does in float32 beyond |u| ~ 1e19 or below 1e-19). Scaling by a power of two
    # is exact, so the result is bit for bit the direct formula wherever that one does not overflow.
    s = _pow2_scale(u.abs().amax(dim=1))
    v = u / s.unsqueeze(1)
    weight = (act.s1 / (v * v).sum(dim=1)).unsqueeze(1) * v / s.unsqueeze(1)
    bias = -(weight * x_from).sum(dim=1) - act.s2
    bad_rows = ~(torch.isfinite(weight).all(dim=1) & torch.isfinite(bias) & (weight != 0).any(dim=1))
    if bool(bad_rows.any()):
        rows = torch.nonzero(bad_rows).ravel()[:5].tolist()
        raise ValueError(
            f"{int(bad_rows.sum())} pair(s) are too close or too far apart for a SWIM neuron in {x_from.dtype} "
            f"(|w| = s1 / |x_to - x_from| is not representable), e.g. rows {rows}: compute in float64."
        )
    return weight, bias


def _pow2_scale(t: Tensor) -> Tensor:
    """The power of two ``2^e`` with ``t = m 2^e``, ``m`` in ``[0.5, 1)`` (1 where ``t`` is 0), elementwise."""
    _, exponent = torch.frexp(t)
    return torch.where(t > 0, torch.ldexp(torch.ones_like(t), exponent), torch.ones_like(t))


def _pair_scores(x: Tensor, y: Tensor | None, idx_from: Tensor, idx_to: Tensor, task: str) -> tuple[Tensor, Tensor]:
    """SWIM's unnormalised pair scores and the pair distances (swimnetworks' ``weight_probabilities``)."""
    dist = (x[idx_to] - x[idx_from]).norm(dim=1)
    if task == "uniform":
        score = torch.ones_like(dist)
    elif task == "regression":
        assert y is not None
        yy = y.reshape(y.shape[0], -1).to(dist.dtype)
        score = (yy[idx_to] - yy[idx_from]).abs().amax(dim=1) / dist.clamp_min(torch.finfo(dist.dtype).tiny)
    else:  # classification: 1 / distance for pairs of different labels
        assert y is not None
        yy = y.reshape(y.shape[0], -1)
        differ = (yy[idx_to] != yy[idx_from]).any(dim=1)
        score = differ.to(dist.dtype) / dist.clamp_min(torch.finfo(dist.dtype).tiny)
    return score, dist


def sample_pairs(
    x: Tensor,
    y: Tensor | None = None,
    n: int = 1,
    *,
    task: str | None = None,
    candidates: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Draw ``n`` ordered pairs of points with SWIM's pair distribution.

    As the reference implementation ``swimnetworks`` does, ``candidates`` ordered pairs
    :math:`(i, j)`, :math:`i \ne j`, are drawn uniformly, each is scored, and ``n`` pairs are drawn
    from them with replacement, with probability proportional to the score:

    - ``"regression"``: :math:`\max_k |y_j[k] - y_i[k]| / \lVert x_j - x_i\rVert`;
    - ``"classification"``: :math:`1 / \lVert x_j - x_i\rVert` if the labels differ, else 0;
    - ``"uniform"``: 1.

    If every score is 0 the draw falls back to uniform. Pairs of coincident points (duplicates in
    ``x``) get probability 0, so every returned pair has two distinct points.

    Args:
        x: points, ``[N, d]``, floating and finite, with at least two distinct rows.
        y: targets, ``[N]`` or ``[N, k]``: real values for regression, labels (``[N]``) or one-hot
            rows (``[N, k]``) for classification. Not needed for ``"uniform"``.
        n: number of pairs to return.
        task: ``"regression"``, ``"classification"`` or ``"uniform"``. By default inferred: uniform
            without ``y``, classification for integer ``y``, regression for floating ``y``.
        candidates: number of candidate pairs scored; default ``N * max(1, ceil(n / N))`` as in
            ``swimnetworks``.
        generator: the source of randomness (a CPU ``torch.Generator``). The global RNG is never
            used; without a generator, a fresh non-deterministically seeded one is.

    Returns:
        ``(idx_from [n], idx_to [n])``, int64 on the device of ``x``.

    Example:
        >>> x = torch.tensor([[0.0], [1.0], [3.0]])
        >>> i, j = sample_pairs(x, n=4, generator=torch.Generator().manual_seed(0))
        >>> bool((i != j).all())
        True
    """
    check_points(x, "x")
    check_positive_int(n, "n")
    check_positive_int(candidates, "candidates", allow_none=True)
    if task is None:
        task = "uniform" if y is None else ("regression" if y.is_floating_point() else "classification")
    check_choice(task, "task", TASKS)
    if y is not None:
        y = check_targets(y, x.shape[0]).to(x.device)
    elif task != "uniform":
        raise ValueError(f"`task={task!r}` scores pairs by their targets: pass `y` (or use task='uniform').")
    if task == "regression" and y is not None and not y.is_floating_point():
        y = y.to(x.dtype)
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"Expected argument `generator` to be a torch.Generator but got {type(generator).__name__}.")

    N = x.shape[0]
    n_cand = candidates if candidates is not None else N * max(1, math.ceil(n / N))
    if n_cand > _MAX_CATEGORIES:
        raise ValueError(f"Expected argument `candidates` to be at most {_MAX_CATEGORIES} but got {n_cand}.")
    gen_device = generator.device
    cand_from = torch.randint(0, N, (n_cand,), generator=generator, device=gen_device)
    offset = torch.randint(1, N, (n_cand,), generator=generator, device=gen_device)
    cand_to = (cand_from + offset) % N  # never cand_from == cand_to
    cand_from, cand_to = cand_from.to(x.device), cand_to.to(x.device)

    # scores in a normalised frame: every score is proportional to 1 / distance, so dividing x by a power
    # of two (exact) leaves the draw unchanged while keeping |x_j - x_i|^2 away from float32's overflow
    # and underflow (points of size 1e20 or 1e-20)
    score, dist = _pair_scores(x / _pow2_scale(x.abs().amax()), y, cand_from, cand_to, task)
    valid = dist > 0
    if not bool(valid.any()):
        raise ValueError(
            f"All {n_cand} candidate pairs join coincident points of `x`; `x` has too many duplicates. "
            "Increase `candidates` or remove duplicate rows."
        )
    score = torch.where(valid, score, torch.zeros_like(score)).double()
    total = score.sum()
    if not bool(torch.isfinite(total)) or float(total) <= 0:
        score = valid.double()
    probs = (score / score.sum()).to(gen_device)
    chosen = torch.multinomial(probs, n, replacement=True, generator=generator).to(x.device)
    return cand_from[chosen], cand_to[chosen]

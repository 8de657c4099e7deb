"""When the monitor maps: a plan of evenly (or log-evenly) spaced steps, thinned to an overhead budget.

Pure functions of numbers (no Lightning, no clock): :class:`~lightning_swim.callbacks.PairImportanceMonitor`
measures the times and calls them.

- :func:`plan_steps`: ``n_maps`` steps over ``[0, total]``, the first at 0 (fit start) and the last
  at ``total`` (fit end); ``"linear"``: evenly spaced; ``"log"``: evenly spaced in
  :math:`\\log(\\text{step})` (denser early, where representations move most), no two closer
  than a quarter of the linear spacing (and never on consecutive steps where the fit is long enough).
- :func:`kept`: the plan thinned by a stride ``s``: planned maps ``0, s, 2s, ...`` and the last.
  Every kept step is a planned one, so no two maps are ever closer than the planned spacing.
- :func:`choose_stride`: the smallest stride whose remaining maps, at the measured cost of a map,
  keep all maps of the run within ``max_overhead`` of the projected training time.
"""

from __future__ import annotations

import math

__all__ = ["LOG_MIN_GAP", "SPACINGS", "choose_stride", "kept", "plan_steps", "unknown_horizon_steps"]

SPACINGS = ("linear", "log")
LOG_MIN_GAP = 0.25
"""The smallest gap of a log-even plan, as a share of the linear plan's spacing."""
UNKNOWN_HORIZON_FIRST = 32
"""Without a known number of steps (an infinite fit), maps are planned at 0 and at 32, 64, 128, ...: an
even spacing in log(step)."""


def plan_steps(total: int, n_maps: int, spacing: str = "linear") -> list[int]:
    """The planned map steps of a fit of ``total`` optimizer steps: ``n_maps`` steps (fewer if ``total``
    is small), sorted, distinct, the first 0 and the last ``total``.

    Args:
        total: the fit's optimizer steps (``Trainer.estimated_stepping_batches``), ``>= 0``.
        n_maps: maps planned, fit start and end included, ``>= 2``.
        spacing: ``"linear"`` (step :math:`k T/(n-1)`) or ``"log"`` (0, then geometric up to
            :math:`T`, from the first step that keeps every gap at least :data:`LOG_MIN_GAP` of
            :math:`T/(n-1)`; rounded steps closer than that are pushed later).
    """
    if total <= 0:
        return [0]
    if spacing == "linear" or n_maps <= 2:
        return sorted({round(k * total / (n_maps - 1)) for k in range(n_maps)})
    # geometric from `first` to `total` (n - 1 steps), `first` the smallest whose smallest gap,
    # first * (ratio - 1), is LOG_MIN_GAP of the linear spacing: log-even, no burst at the start
    gap = total / (n_maps - 1) * LOG_MIN_GAP

    def smallest_gap(first: float) -> float:
        return first * ((total / first) ** (1 / (n_maps - 2)) - 1)

    lo, hi = 1.0, total / (n_maps - 1)
    if smallest_gap(lo) < gap:
        for _ in range(60):  # smallest_gap grows with `first` on [1, total / (n - 1)]
            mid = math.sqrt(lo * hi)
            lo, hi = (lo, mid) if smallest_gap(mid) >= gap else (mid, hi)
        lo = hi
    ratio = (total / lo) ** (1 / (n_maps - 2))
    least = max(1, math.ceil(gap))  # rounding must not bring two maps closer than the continuous plan
    steps = [0]
    for k in range(n_maps - 1):
        step = max(round(lo * ratio**k), steps[-1] + least)
        if step >= total:
            break
        steps.append(step)
    if total - steps[-1] < least and len(steps) > 1:
        steps.pop()  # the last map is fit end's
    return [*steps, total]


def unknown_horizon_steps(up_to: int) -> list[int]:
    """The plan of a fit of unknown length up to step ``up_to``: 0, then 32, 64, 128, ..."""
    steps, s = [0], UNKNOWN_HORIZON_FIRST
    while s <= up_to:
        steps.append(s)
        s *= 2
    return steps


def kept(plan: list[int], stride: int) -> list[int]:
    """The planned steps kept at ``stride``: those of index ``0, stride, 2 stride, ...``, and the last."""
    last = len(plan) - 1
    return [s for k, s in enumerate(plan) if k % stride == 0 or k == last]


def choose_stride(plan: list[int], step: int, spent: float, cost: float, allowed: float) -> int:
    """The smallest stride that keeps the run's maps within budget.

    Args:
        plan: the planned steps.
        step: the step of the map just made; the maps of later planned steps remain.
        spent: seconds spent in maps so far.
        cost: the expected seconds of one more map (the last map's).
        allowed: the seconds of maps the run may spend (``max_overhead`` of its projected training time).

    Returns:
        A stride ``s >= 1`` for :func:`kept`; ``len(plan)`` keeps only the last planned map (fit end).
    """
    later = [k for k, s in enumerate(plan) if s > step]
    last = len(plan) - 1
    for stride in range(1, len(plan)):
        remaining = sum(1 for k in later if k % stride == 0 or k == last)
        if spent + cost * remaining <= allowed:
            return stride
    return max(1, len(plan))

"""The monitor's plan of map steps (lightning_swim._schedule): pure functions, checked against brute force."""

from __future__ import annotations

import itertools
import math

import pytest

from lightning_swim._schedule import LOG_MIN_GAP, choose_stride, kept, plan_steps, unknown_horizon_steps


@pytest.mark.parametrize(("total", "n_maps"), [(200, 20), (1000, 20), (19, 20), (57, 5), (7, 2), (1, 20)])
def test_linear_plan_is_evenly_spaced_from_start_to_end(total, n_maps):
    plan = plan_steps(total, n_maps)
    assert plan[0] == 0 and plan[-1] == total and plan == sorted(set(plan))
    assert len(plan) == min(n_maps, total + 1)
    spacing = total / (n_maps - 1)
    for k, step in enumerate(plan):  # every step within rounding of k T / (n - 1)
        if total >= n_maps - 1:
            assert abs(step - k * spacing) <= 0.5
    gaps = [b - a for a, b in itertools.pairwise(plan)]
    assert max(gaps) - min(gaps) <= 1  # even


def test_a_forty_epoch_fit_gets_twenty_maps_never_on_consecutive_steps():
    plan = plan_steps(200, 20)  # 40 epochs of 5 steps
    assert len(plan) == 20 and min(b - a for a, b in itertools.pairwise(plan)) >= 10


@pytest.mark.parametrize("total", [200, 1000, 10**6])
def test_log_plan_is_log_even_with_a_floor_on_its_gaps(total):
    n_maps = 20
    plan = plan_steps(total, n_maps, "log")
    assert plan[0] == 0 and plan[-1] == total and len(plan) == n_maps
    gaps = [b - a for a, b in itertools.pairwise(plan)]
    assert min(gaps) >= LOG_MIN_GAP * total / (n_maps - 1) - 1  # no burst at the start
    assert gaps[-1] > 2 * gaps[1]  # denser early
    ratios = [b / a for a, b in itertools.pairwise(plan[1:])]  # geometric after step 0 (up to rounding)
    tail = ratios[len(ratios) // 2 :]
    assert max(tail) / min(tail) < 1.05


def test_log_plan_of_a_short_fit_keeps_start_and_end():
    for total, n_maps in itertools.product(range(1, 30), (2, 3, 5, 20)):
        plan = plan_steps(total, n_maps, "log")
        assert plan[0] == 0 and plan[-1] == total and plan == sorted(set(plan)) and len(plan) <= n_maps


def test_kept_is_every_stride_th_planned_step_and_the_last():
    plan = plan_steps(200, 20)
    assert kept(plan, 1) == plan
    assert kept(plan, 3) == [*plan[0:19:3], 200]
    assert kept(plan, len(plan)) == [0, 200]
    for stride in range(1, 21):  # kept maps are planned ones: never closer than the plan's spacing
        assert min(b - a for a, b in itertools.pairwise(kept(plan, stride))) >= 10


def _brute_force_stride(plan, step, spent, cost, allowed):
    for stride in range(1, len(plan) + 1):
        later = [s for s in kept(plan, stride) if s > step]
        if spent + cost * len(later) <= allowed or stride == len(plan):
            return stride
    raise AssertionError


@pytest.mark.parametrize(
    ("step", "spent", "cost", "allowed"),
    [(11, 0.2, 0.1, 10.0), (11, 0.2, 0.1, 1.0), (11, 0.2, 0.1, 0.5), (11, 0.2, 0.1, 0.1), (105, 3.0, 1.0, 6.0)],
)
def test_choose_stride_is_the_smallest_that_fits(step, spent, cost, allowed):
    plan = plan_steps(200, 20)
    stride = choose_stride(plan, step, spent, cost, allowed)
    assert stride == _brute_force_stride(plan, step, spent, cost, allowed)
    later = [s for s in kept(plan, stride) if s > step]
    assert spent + cost * len(later) <= allowed or later == [200]


def test_unknown_length_doubles_its_gaps():
    assert unknown_horizon_steps(300) == [0, 32, 64, 128, 256]
    steps = unknown_horizon_steps(2**40)
    assert all(math.log2(s) == int(math.log2(s)) for s in steps[1:])

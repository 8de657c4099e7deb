"""Fidelity when a network's outputs are not finite (issue 11, item 12)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_swim import OutputR2, PredictionAgreement, fidelity


class _Poisoned(nn.Module):
    """``base`` with non-finite outputs on the rows where ``rows`` is True."""

    def __init__(self, base: nn.Module, rows: torch.Tensor, value: float = float("nan")) -> None:
        super().__init__()
        self.base, self.rows, self.value = base, rows, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return torch.where(self.rows[: len(x), None], torch.full_like(out, self.value), out)


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(1)
    net = nn.Linear(3, 4)
    torch.random.set_rng_state(torch_state)
    return x, net


class TestNonFiniteOutputs:
    @pytest.mark.parametrize("value", [float("nan"), float("inf")])
    def test_a_rebuilt_network_that_outputs_nan_disagrees_where_it_does(self, setup, value):
        x, net = setup
        rows = torch.arange(40) < 10  # a quarter of the rows
        assert fidelity(net, _Poisoned(net, rows, value), x) == pytest.approx(0.75)
        assert fidelity(net, _Poisoned(net, torch.ones(40, dtype=torch.bool), value), x) == 0.0

    def test_binary_outputs_by_sign(self, setup):
        x, net = setup
        binary = nn.Sequential(net, nn.Linear(4, 1))
        all_nan = _Poisoned(binary, torch.ones(40, dtype=torch.bool))
        assert fidelity(binary, all_nan, x) == 0.0  # NaN > 0 is False: it used to "agree" with class 0

    def test_nan_original_has_no_fidelity(self, setup):
        x, net = setup
        broken = _Poisoned(net, torch.arange(40) == 3)
        assert math.isnan(fidelity(broken, net, x))
        assert math.isnan(fidelity(broken, broken, x))  # was 1.0: argmax of NaN rows is 0 for both
        assert math.isnan(fidelity(broken, net, x, task="regression"))

    def test_r2_of_a_rebuilt_network_with_nan_outputs_is_minus_infinity(self, setup):
        x, net = setup
        assert fidelity(net, _Poisoned(net, torch.arange(40) == 5), x, task="regression") == -math.inf
        assert fidelity(net, net, x, task="regression") == 1.0

    def test_metrics_accumulate_across_batches(self, setup):
        x, net = setup
        with torch.no_grad():
            out = net(x)
        bad = out.clone()
        bad[:4] = float("nan")
        agree = PredictionAgreement()
        agree.update(bad[:20], out[:20])
        agree.update(bad[20:], out[20:])
        assert float(agree.compute()) == pytest.approx(36 / 40)
        r2 = OutputR2()
        r2.update(out[:20], out[:20])
        r2.update(bad[20:], out[20:])
        assert float(r2.compute()) == 1.0  # the NaN rows were in the first half only
        r2.update(bad[:20], out[:20])
        assert float(r2.compute()) == -math.inf


@pytest.mark.parametrize("width", [1, 2, 5])
def test_output_fidelity_equals_the_metric(width):
    """``output_fidelity`` (the maps' fidelity, computed without a ``Metric`` object) is ``PredictionAgreement``."""
    from lightning_swim.network import output_fidelity

    g = torch.Generator().manual_seed(width)
    for trial in range(30):
        original, rebuilt = torch.randn(2, 25, width, generator=g)
        same = torch.rand(25, generator=g) < 0.5
        rebuilt[same] = original[same]  # these agree, the others by chance
        if trial % 3 == 1:
            rebuilt[torch.rand(25, generator=g) < 0.2] = float("nan")
        if trial % 3 == 2:
            original[int(torch.randint(0, 25, (1,), generator=g))] = float("inf")
        metric = PredictionAgreement()
        metric.update(rebuilt.double(), original.double())
        want, got = float(metric.compute()), output_fidelity(original, rebuilt)
        assert (math.isnan(want) and math.isnan(got)) or want == got

"""Pair importance, drift measures and fidelity metrics: exact values on small cases, invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_swim import (
    OutputR2,
    PairMap,
    PredictionAgreement,
    contribution_weights,
    cross_class_share,
    effective_points,
    entropy,
    fidelity,
    js_divergence,
    pair_importance,
    topk_overlap,
    turnover,
)


def pm(i, j):
    n = len(i)
    return PairMap(torch.tensor(i), torch.tensor(j), torch.ones(n), torch.zeros(n), torch.zeros(n))


class TestImportance:
    def test_hand_computed(self):
        imp = pair_importance(pm([0, 1, -1], [2, 2, -1]), 4, torch.tensor([1.0, 3.0, 5.0]))
        # neuron 0 (weight 1): points 0 and 2 get 1/2 each; neuron 1 (3): points 1 and 2 get 3/2 each
        torch.testing.assert_close(imp, torch.tensor([0.5, 1.5, 2.0, 0.0], dtype=torch.float64) / 4)

    @settings(max_examples=30, deadline=None)
    @given(st.integers(2, 30), st.integers(1, 40), st.integers(0, 1000))
    def test_distribution(self, n, m, seed):
        g = torch.Generator().manual_seed(seed)
        i = torch.randint(0, n, (m,), generator=g)
        j = (i + torch.randint(1, n, (m,), generator=g)) % n
        pairs = PairMap(i, j, torch.ones(m), torch.zeros(m), torch.zeros(m))
        imp = pair_importance(pairs, n, torch.rand(m, generator=g))
        assert imp.shape == (n,) and bool((imp >= 0).all())
        assert math.isclose(float(imp.sum()), 1.0, rel_tol=1e-12)
        assert 0 <= float(entropy(imp)) <= math.log(n) + 1e-12
        assert 1 - 1e-9 <= float(effective_points(imp)) <= n + 1e-9

    def test_bad_weights(self):
        with pytest.raises(ValueError, match="shape"):
            pair_importance(pm([0], [1]), 3, torch.ones(2))
        with pytest.raises(ValueError, match="non-negative"):
            pair_importance(pm([0], [1]), 3, -torch.ones(1))
        with pytest.raises(ValueError, match="refers to point 5"):
            pair_importance(pm([0], [5]), 3)

    def test_contribution_weights(self):
        w = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
        nxt = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        torch.testing.assert_close(contribution_weights(w, nxt), torch.tensor([5.0, 2.0]))
        torch.testing.assert_close(contribution_weights(w, nxt, homogeneous=False), torch.tensor([1.0, 2.0]))
        with pytest.raises(ValueError, match=r"`\[K, 2\]`"):
            contribution_weights(w, torch.ones(3, 3))


class TestDrift:
    def test_entropy_of_uniform_and_point_mass(self):
        assert math.isclose(float(entropy(torch.full((8,), 1 / 8))), math.log(8))
        assert float(entropy(torch.tensor([0.0, 1.0, 0.0]))) == 0.0
        assert math.isclose(float(effective_points(torch.full((8,), 1 / 8))), 8.0)

    def test_js_divergence(self):
        p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
        assert math.isclose(float(js_divergence(p, q)), math.log(2))
        assert float(js_divergence(p, p)) == 0.0
        a = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
        b = torch.tensor([0.5, 0.4, 0.1], dtype=torch.float64)
        assert math.isclose(float(js_divergence(a, b)), float(js_divergence(b, a)))
        m = (a + b) / 2
        expected = 0.5 * float((a * (a / m).log()).sum() + (b * (b / m).log()).sum())
        assert math.isclose(float(js_divergence(a, b)), expected, rel_tol=1e-12)

    def test_topk_overlap_and_turnover(self):
        p = torch.tensor([0.4, 0.3, 0.2, 0.1])
        q = torch.tensor([0.1, 0.3, 0.2, 0.4])
        assert topk_overlap(p, q, 2) == 0.5 and topk_overlap(p, p, 3) == 1.0
        assert turnover(pm([0, 1, 2, -1], [1, 2, 3, -1]), pm([0, 2, 2, 3], [1, 2, 0, 1])) == 2 / 3
        with pytest.raises(ValueError, match="one layer"):
            turnover(pm([0], [1]), pm([0, 1], [1, 0]))

    def test_cross_class_share(self):
        labels = torch.tensor([0, 0, 1, 1])
        assert cross_class_share(pm([0, 0, 2, -1], [1, 2, 3, -1]), labels) == 1 / 3
        onehot = nn.functional.one_hot(labels, 2)
        assert cross_class_share(pm([0, 0], [1, 2]), onehot) == 0.5
        assert cross_class_share(pm([0, 0], [1, 2]), labels[:, None]) == 0.5  # a column of labels


class TestFidelity:
    def test_agreement_metric(self):
        metric = PredictionAgreement()
        rebuilt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
        metric.update(rebuilt, torch.tensor([[1.0, 0.5], [1.0, 0.0], [3.0, 0.0]]))
        metric.update(torch.tensor([0.5, -1.0]), torch.tensor([1.0, 2.0]))  # binary logits: sign
        assert float(metric.compute()) == 3 / 5

    def test_r2_metric(self):
        metric = OutputR2()
        target = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
        metric.update(target, target)
        assert float(metric.compute()) == 1.0

    def test_fidelity_of_a_network_with_itself(self):
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
        x = torch.randn(20, 3)
        assert fidelity(model, model, x) == 1.0
        assert fidelity(model, model, x, task="regression") == 1.0
        with pytest.raises(ValueError, match="Invalid `task`"):
            fidelity(model, model, x, task="ranking")

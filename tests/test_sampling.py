"""swim_neurons and sample_pairs: exact invariants, the reference implementation, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_swim import ACTIVATIONS, Activation, sample_pairs, swim_neurons
from lightning_swim.activations import get_activation

DTYPES = [torch.float32, torch.float64]


@st.composite
def pairs_problem(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, str]:
    n = draw(st.integers(1, 40))
    d = draw(st.integers(1, 30))
    dtype = draw(st.sampled_from(DTYPES))
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    g = torch.Generator().manual_seed(seed)
    x_from = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    x_to = x_from + torch.randn(n, d, generator=g, dtype=torch.float64) * scale * draw(st.sampled_from([1e-3, 1.0]))
    return x_from.to(dtype), x_to.to(dtype), act


class TestSwimNeurons:
    @settings(max_examples=60, deadline=None)
    @given(pairs_problem())
    def test_preactivation_is_minus_s2_at_from_and_s1_minus_s2_at_to(self, problem):
        x_from, x_to, name = problem
        act = get_activation(name)
        w, b = swim_neurons(x_from, x_to, name)
        assert w.dtype == x_from.dtype and b.dtype == x_from.dtype
        z_from = (w * x_from).sum(1) + b
        z_to = (w * x_to).sum(1) + b
        # rounding: the terms of <w, x> have size |w| |x|, far above the result near x_from
        eps = torch.finfo(x_from.dtype).eps
        tol = 16 * eps * (1 + (w.abs() * x_from.abs()).sum(1) + (w.abs() * x_to.abs()).sum(1) + act.s1)
        assert torch.all((z_from + act.s2).abs() <= tol)
        assert torch.all((z_to - (act.s1 - act.s2)).abs() <= tol)

    @pytest.mark.parametrize("name", sorted(ACTIVATIONS))
    def test_activation_values_at_the_pair(self, name):
        act = get_activation(name)
        x_from = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
        x_to = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
        w, b = swim_neurons(x_from, x_to, act)
        a = act(torch.cat([x_from, x_to]) @ w.T + b).ravel()
        expected = {
            "relu": (0.0, 1.0),
            "leaky_relu": (0.0, 1.0),
            "tanh": (-0.5, 0.5),
            "sigmoid": (0.25, 0.75),
            # smooth ReLUs: the half-maximum points of the curvature, -z* and +z* (docs/maths.md)
            "gelu": (-0.16960306826741003, 0.6240253811286611),
            "gelu_tanh": (-0.1696958993442766, 0.6232928117910582),
            "silu": (-0.2771376765611943, 0.8935482693684861),
            "softplus": (0.15834718382037496, 1.9210943578594608),
        }[name]
        torch.testing.assert_close(a, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)

    def test_hand_computed_relu_neuron(self):
        w, b = swim_neurons(torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, 1.0]]))
        torch.testing.assert_close(w, torch.tensor([[0.5, 0.0]]))
        torch.testing.assert_close(b, torch.tensor([-0.5]))

    def test_unknown_activation_lists_valid_names(self):
        with pytest.raises(ValueError, match=r"Invalid activation 'mish'.*\['gelu', 'gelu_tanh', 'leaky_relu', 'relu'"):
            swim_neurons(torch.zeros(1, 2), torch.ones(1, 2), "mish")

    def test_coincident_pair_is_an_error(self):
        x = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
        with pytest.raises(ValueError, match="coincident points"):
            swim_neurons(x, torch.tensor([[1.0, 1.0], [2.0, 2.0]]))

    @pytest.mark.parametrize(
        ("x_from", "x_to", "match"),
        [
            (torch.zeros(2, 3), torch.ones(3, 3), "same shape"),
            (torch.zeros(3), torch.ones(3), "2D tensor"),
            (torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), "floating dtype"),
            (torch.tensor([[0.0, float("nan")]]), torch.ones(1, 2), "non-finite"),
        ],
    )
    def test_bad_input(self, x_from, x_to, match):
        with pytest.raises((ValueError, TypeError), match=match):
            swim_neurons(x_from, x_to)

    def test_leaky_relu_slope_is_kept(self):
        act = Activation.leaky_relu(0.2)
        assert act.homogeneous and act.negative_slope == 0.2
        torch.testing.assert_close(act(torch.tensor([-1.0, 2.0])), torch.tensor([-0.2, 2.0]))


class TestReferenceParity:
    """The same pairs give the same weights as swimnetworks (float64, 1e-10)."""

    @pytest.mark.parametrize("name", ["relu", "tanh"])
    @pytest.mark.parametrize("is_classifier", [False, True])
    def test_same_pairs_same_weights(self, name, is_classifier):
        swimnetworks = pytest.importorskip("swimnetworks")
        rng = np.random.default_rng(3)
        x = rng.normal(size=(200, 7))
        y = rng.integers(0, 4, size=200) if is_classifier else np.sin(x @ rng.normal(size=(7, 2)))
        dense = swimnetworks.Dense(
            layer_width=50, activation=name, parameter_sampler=name, random_seed=5, is_classifier=is_classifier
        ).fit(x, y)
        xt = torch.from_numpy(x)
        w, b = swim_neurons(xt[dense.idx_from], xt[dense.idx_to], name)
        np.testing.assert_allclose(w.numpy(), dense.weights.T, rtol=0, atol=1e-10)
        np.testing.assert_allclose(b.numpy(), dense.biases.ravel(), rtol=0, atol=1e-10)


def _global_rng_unchanged(fn):
    before = torch.random.get_rng_state().clone()
    result = fn()
    assert torch.equal(before, torch.random.get_rng_state()), "the global RNG was used"
    return result


class TestSamplePairs:
    def test_never_i_equals_j_nor_duplicates(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(30, 4, generator=g)
        x = torch.cat([x, x[:10], x[:10]])  # every one of the first ten points three times
        for task, y in [("uniform", None), ("regression", x.sum(1)), ("classification", torch.arange(50) % 3)]:
            i, j = sample_pairs(x, y, 2000, task=task, generator=g)
            assert i.shape == j.shape == (2000,)
            assert bool((i != j).all())
            assert bool(((x[i] - x[j]).norm(dim=1) > 0).all())

    def test_deterministic_for_a_generator_and_global_rng_untouched(self):
        x = torch.randn(100, 3, generator=torch.Generator().manual_seed(1))
        y = x[:, 0]

        def draw(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
            return _global_rng_unchanged(lambda: sample_pairs(x, y, 64, generator=torch.Generator().manual_seed(seed)))

        a, b, c = draw(7), draw(7), draw(8)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))
        _global_rng_unchanged(lambda: sample_pairs(x, y, 8))  # no generator: a fresh one, not the global

    @pytest.mark.parametrize("task", ["regression", "classification", "uniform"])
    def test_distribution_matches_the_scores(self, task):
        """With many candidates, pair frequencies approach score / sum(score) over all ordered pairs."""
        x = torch.tensor([[0.0], [1.0], [3.0], [3.5]], dtype=torch.float64)
        y = torch.tensor([0.0, 2.0, 2.5, 0.5]) if task == "regression" else torch.tensor([0, 1, 1, 0])
        n_pairs = 200_000
        i, j = sample_pairs(x, y, n_pairs, task=task, candidates=n_pairs, generator=torch.Generator().manual_seed(0))
        counts = torch.zeros(4, 4, dtype=torch.float64)
        counts.index_put_((i, j), torch.ones(n_pairs, dtype=torch.float64), accumulate=True)
        dist = (x - x.T).abs()
        off = ~torch.eye(4, dtype=torch.bool)
        if task == "regression":
            score = (y[:, None] - y[None, :]).abs().double() / dist.clamp_min(1e-300)
        elif task == "classification":
            score = (y[:, None] != y[None, :]).double() / dist.clamp_min(1e-300)
        else:
            score = torch.ones(4, 4, dtype=torch.float64)
        expected = torch.where(off, score, torch.zeros_like(score))
        expected /= expected.sum()
        assert (counts.diagonal() == 0).all()
        torch.testing.assert_close(counts / n_pairs, expected, atol=6e-3, rtol=0)

    def test_classification_picks_only_cross_class_pairs(self):
        x = torch.randn(60, 2, generator=torch.Generator().manual_seed(2))
        y = (x[:, 0] > 0).long()
        i, j = sample_pairs(x, y, 500, generator=torch.Generator().manual_seed(0))
        assert bool((y[i] != y[j]).all())

    def test_one_hot_targets_work_as_labels(self):
        x = torch.randn(60, 2, generator=torch.Generator().manual_seed(2))
        labels = (x[:, 0] > 0).long()
        onehot = torch.nn.functional.one_hot(labels, 2)
        i, j = sample_pairs(x, onehot, 300, task="classification", generator=torch.Generator().manual_seed(0))
        assert bool((labels[i] != labels[j]).all())

    def test_all_zero_scores_fall_back_to_uniform(self):
        x = torch.randn(20, 2, generator=torch.Generator().manual_seed(2))
        i, j = sample_pairs(x, torch.zeros(20), 3000, task="regression", generator=torch.Generator().manual_seed(0))
        assert len(torch.unique(i * 20 + j)) > 200  # spread over many of the 380 ordered pairs

    def test_default_candidates_follow_swimnetworks(self):
        """N * ceil(n / N) candidates: with n > N more than N distinct pairs can come out."""
        x = torch.randn(10, 2, generator=torch.Generator().manual_seed(2))
        i, j = sample_pairs(x, n=1000, generator=torch.Generator().manual_seed(0))
        assert len(torch.unique(i * 10 + j)) > 10

    def test_task_inferred_from_targets(self):
        x = torch.randn(40, 2, generator=torch.Generator().manual_seed(2))
        y = (x[:, 0] > 0).long()
        i, j = sample_pairs(x, y, 200, generator=torch.Generator().manual_seed(0))
        assert bool((y[i] != y[j]).all())

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"x": torch.ones(5, 2)}, "at least 2 distinct points"),
            ({"x": torch.ones(1, 2)}, "at least 2 distinct points"),
            ({"x": torch.tensor([[0.0], [float("inf")]])}, "non-finite"),
            ({"x": torch.randn(5, 2), "y": torch.randn(4)}, "5 rows"),
            ({"x": torch.randn(5, 2), "task": "regression"}, "pass `y`"),
            ({"x": torch.randn(5, 2), "task": "ranking"}, "Invalid `task`"),
            ({"x": torch.randn(5, 2), "n": 0}, "`n` to be an integer >= 1"),
            ({"x": torch.randn(5, 2), "candidates": 0}, "`candidates`"),
            ({"x": torch.randn(5, 2, dtype=torch.float64).long()}, "floating dtype"),
            ({"x": torch.randn(5, 2), "y": torch.tensor([0.0, 1, 2, 3, float("nan")])}, "non-finite"),
        ],
    )
    def test_bad_input(self, kwargs, match):
        kwargs.setdefault("n", 3)
        with pytest.raises((ValueError, TypeError), match=match):
            sample_pairs(**kwargs)

    def test_float64_and_device_follow_input(self):
        x = torch.randn(10, 2, dtype=torch.float64)
        i, j = sample_pairs(x, n=5)
        assert i.dtype == torch.long and i.device == x.device
        assert math.isfinite(float(swim_neurons(x[i], x[j])[0].sum()))


SCALES = [1e-20, 1e-10, 1e10, 1e20]


class TestExtremeScales:
    """SWIM is invariant to scalings of its inputs: float32 points of size 1e-20 or 1e20 give the same
    pairs as at size 1 and neurons that scale with them (issue 11, item 13)."""

    @pytest.mark.parametrize("scale", SCALES)
    @pytest.mark.parametrize("name", ["relu", "tanh"])
    def test_neurons_scale_with_their_points(self, scale, name):
        x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
        w1, b1 = swim_neurons(x[:20], x[20:], name)
        w, b = swim_neurons(x[:20] * scale, x[20:] * scale, name)
        # the neuron of (c x_from, c x_to) is (w / c, b); c x is rounded, so equal to float32 rounding
        torch.testing.assert_close(w * scale, w1, rtol=1e-5, atol=0)
        torch.testing.assert_close(b, b1, rtol=1e-5, atol=1e-5)
        act = get_activation(name)
        z = ((w * x[:20].mul(scale)).sum(1) + b, (w * x[20:].mul(scale)).sum(1) + b)
        torch.testing.assert_close(z[0], torch.full_like(z[0], -act.s2), atol=1e-4, rtol=0)
        torch.testing.assert_close(z[1], torch.full_like(z[1], act.s1 - act.s2), atol=1e-4, rtol=0)

    @pytest.mark.parametrize("scale", SCALES)
    @pytest.mark.parametrize("task", ["regression", "classification", "uniform"])
    def test_pairs_drawn_do_not_depend_on_the_scale(self, scale, task):
        x = torch.randn(60, 4, generator=torch.Generator().manual_seed(1))
        y = {"regression": x[:, 0].sin(), "classification": (x[:, 1] > 0).long(), "uniform": None}[task]
        ref = sample_pairs(x, y, 200, task=task, generator=torch.Generator().manual_seed(4))
        got = sample_pairs(x * scale, y, 200, task=task, generator=torch.Generator().manual_seed(4))
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])

    def test_a_pair_too_close_for_the_dtype_is_an_error_not_a_zero_or_infinite_neuron(self):
        x_from = torch.zeros(1, 2)
        x_to = torch.tensor([[1e-45, 0.0]])  # a subnormal: |w| = 1 / 1e-45 overflows float32
        with pytest.raises(ValueError, match="float64"):
            swim_neurons(x_from, x_to)
        w, _ = swim_neurons(x_from.double(), x_to.double())
        assert bool(torch.isfinite(w).all()) and float(w[0, 0]) > 0

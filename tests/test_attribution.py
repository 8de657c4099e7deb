"""SWIM-derived per-point scores: planted pairs, loss-aware weights and ablations against brute force."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_swim import map_network, pair_importance, swim_neurons
from lightning_swim._datasets import digits
from lightning_swim._modelio import linear_layers
from lightning_swim._solve import ridge_lstsq
from lightning_swim.analysis import neuron_weights_of
from lightning_swim.attribution import (
    anchor_ablation_scores,
    leave_one_out_scores,
    loss_neuron_weights,
    pair_importance_scores,
)
from lightning_swim.evaluate import TrainConfig, mlp_factory, train_models

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """A 64-12-8-10 network trained briefly on 150 digits (float64)."""
    xtr, ytr, _, _ = digits(dtype=F64)
    x, y = xtr[:150], ytr[:150]
    make = mlp_factory([64, 12, 8, 10], dtype=F64)
    model = train_models(make, x, y, seeds=[0], config=TrainConfig(epochs=15, batch_size=32, lr=1e-2)).models[0]
    return model, x, y


def mean_loss(model: nn.Module, x, y) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


class TestPairImportanceScores:
    def test_a_planted_swim_layer_scores_its_own_points(self):
        xtr, _, _, _ = digits(dtype=F64)
        x = xtr[:60]
        i, j = torch.tensor([0, 3, 3, 7]), torch.tensor([5, 9, 11, 2])
        w, b = swim_neurons(x[i], x[j])
        model = mlp_factory([64, 4, 3], dtype=F64)(torch.Generator().manual_seed(0))
        with torch.no_grad():
            model[0].weight.copy_(w * 2.0)
            model[0].bias.copy_(b * 2.0)
        imp = pair_importance_scores(model, x, neuron_weights="uniform", soft=False, backend="torch")
        expected = torch.zeros(60, dtype=F64)
        expected[[0, 5, 9, 11, 7, 2]] = torch.tensor([1, 1, 1, 1, 1, 1], dtype=F64) / 8
        expected[3] = 2 / 8  # point 3 anchors two neurons
        torch.testing.assert_close(imp, expected)

    def test_the_mean_of_the_layers_importances(self, trained):
        model, x, y = trained
        maps = map_network(model, x, backend="torch", top_k=8)
        layers = linear_layers(model, x[:4])
        parts = [
            pair_importance(pm, len(x), neuron_weights_of(layers, name, "contribution")) for name, pm in maps.items()
        ]
        got = pair_importance_scores(model, x, y, maps=maps)
        torch.testing.assert_close(got, torch.stack(parts).mean(0))
        assert float(got.sum()) == pytest.approx(1.0)
        lg = pair_importance_scores(model, x, y, maps=maps, neuron_weights="loss_gradient")
        assert float(lg.sum()) == pytest.approx(1.0) and not torch.allclose(lg, got)

    def test_soft_and_argmin(self, trained):
        model, x, y = trained
        maps = map_network(model, x, backend="torch")
        layers = linear_layers(model, x[:4])
        for soft in (True, False):
            parts = [
                pair_importance(pm, len(x), neuron_weights_of(layers, name, "uniform"), soft=soft)
                for name, pm in maps.items()
            ]
            got = pair_importance_scores(model, x, y, maps=maps, soft=soft, neuron_weights="uniform")
            torch.testing.assert_close(got, torch.stack(parts).mean(0))
        argmin = pair_importance_scores(model, x, y, maps=maps, soft=False)
        soft = pair_importance_scores(model, x, y, maps=maps)
        assert int((soft > 0).sum()) >= int((argmin > 0).sum())  # near-optimal pairs spread the weight

    def test_loss_weights_need_labels(self, trained):
        model, x, _ = trained
        with pytest.raises(ValueError, match="needs the labels"):
            pair_importance_scores(model, x, neuron_weights="loss_gradient")
        with pytest.raises(ValueError, match="Invalid `neuron_weights`"):
            pair_importance_scores(model, x, neuron_weights="size")


class TestLossNeuronWeights:
    def test_ablation_against_zeroing_the_outgoing_weights(self, trained):
        model, x, y = trained
        omega = loss_neuron_weights(model, x, y, "2", kind="loss_ablation")
        base = mean_loss(model, x, y)
        for m in (0, 3, 7):
            copy_ = copy.deepcopy(model)
            with torch.no_grad():
                copy_[4].weight[:, m] = 0
            assert float(omega[m]) == pytest.approx(max(0.0, mean_loss(copy_, x, y) - base), abs=1e-12)

    def test_gradient_against_per_example_autograd(self, trained):
        model, x, y = trained
        model.train()
        before = copy.deepcopy(model.state_dict())
        omega = loss_neuron_weights(model, x, y, "0", kind="loss_gradient")
        expected = torch.zeros(12, dtype=F64)
        for n in range(len(x)):
            h = model[1](model[0](x[n : n + 1])).detach().requires_grad_(True)
            loss = nn.functional.cross_entropy(model[4](model[3](model[2](h))), y[n : n + 1])
            (g,) = torch.autograd.grad(loss, h)
            expected += (g * h).detach().abs()[0]
        torch.testing.assert_close(omega, expected)
        assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        model.eval()


class TestAnchorAblation:
    def test_against_rebuilding_and_refitting_by_hand(self, trained):
        model, x, y = trained
        maps = map_network(model, x, layers=["0"], backend="torch", top_k=8)
        got = anchor_ablation_scores(model, x, y, maps=maps)
        pm = maps["0"]
        anchors = set(pm.idx_from.tolist()) | set(pm.idx_to.tolist())
        assert set(torch.nonzero(got).ravel().tolist()) <= anchors
        assert float(got.sum()) == pytest.approx(1.0)

        from lightning_swim import convert_network

        rebuilt = convert_network(model, maps, x, output="refit")
        target = model(x).detach()

        def refit_loss(drop: torch.Tensor) -> float:
            net = copy.deepcopy(rebuilt)
            with torch.no_grad():
                h = net[3](net[2](net[1](net[0](x)).masked_fill(drop[None, :], 0.0)))
                w, b = ridge_lstsq(h, target, 1e-8)
                return float(nn.functional.cross_entropy(h @ w.T + b, y))

        base = refit_loss(torch.zeros(12, dtype=torch.bool))
        raw = {k: max(0.0, refit_loss((pm.idx_from == k) | (pm.idx_to == k)) - base) for k in anchors}
        total = sum(raw.values())
        for k in sorted(anchors)[:4]:
            assert float(got[k]) == pytest.approx(raw[k] / total, rel=1e-6, abs=1e-12)


class TestLeaveOneOut:
    @pytest.mark.parametrize("rebuild", [False, True])
    def test_against_refitting_without_the_point(self, trained, rebuild):
        model, x, y = trained
        got = leave_one_out_scores(model, x, y, rebuild=rebuild, ridge=1e-3, backend="torch", top_k=8)
        if rebuild:
            from lightning_swim import convert_network

            net = convert_network(model, map_network(model, x, backend="torch", top_k=8), x)
        else:
            net = model
        with torch.no_grad():
            h = net[3](net[2](net[1](net[0](x))))
        h1 = torch.cat([h, torch.ones(len(x), 1, dtype=F64)], 1)
        t = nn.functional.one_hot(y, 10).double()
        gram = h1.T @ h1
        lam = 1e-3 * float(gram.trace()) / gram.shape[0]  # the ridge of the full fit, kept for every refit
        for n in (0, 17, 99):
            keep = torch.arange(len(x)) != n
            a, b = h1[keep], t[keep]
            w = torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1], dtype=F64), a.T @ b)
            assert float(got[n]) == pytest.approx(float(((t[n] - h1[n] @ w) ** 2).sum()), rel=1e-6)

"""SWIMInit: the reference's accuracy, a deep regression network, state left alone, the callback."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import MLPModule, mlp, trainer
from torch import nn

from lightning_swim import SWIMInit
from lightning_swim._data import probe_from_dataloader
from lightning_swim._datasets import digits
from lightning_swim.activations import ACTIVATIONS


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


class TestAgainstSwimnetworks:
    @pytest.mark.parametrize("width", [128, 256])
    def test_digits_accuracy_within_two_points(self, width):
        swimnetworks = pytest.importorskip("swimnetworks")
        from sklearn.pipeline import Pipeline

        xtr, ytr, xte, yte = digits(dtype=torch.float64)
        ours, ref = [], []
        for seed in range(5):
            model = mlp([64, width, 10], dtype=torch.float64, seed=seed)
            # the reference's default output solve: lstsq with rcond=1e-8; ours with the same scale
            SWIMInit(seed=seed, ridge=1e-8).apply(model, xtr, ytr)
            ours.append(_accuracy(model, xte, yte))
            pipe = Pipeline(
                [
                    (
                        "dense",
                        swimnetworks.Dense(
                            layer_width=width,
                            activation="relu",
                            parameter_sampler="relu",
                            random_seed=seed,
                            is_classifier=True,
                        ),
                    ),
                    ("linear", swimnetworks.Linear(regularization_scale=1e-8, is_classifier=True)),
                ]
            ).fit(xtr.numpy(), ytr.numpy())
            ref.append(float((pipe.predict(xte.numpy()).ravel() == yte.numpy()).mean()))
        assert abs(np.mean(ours) - np.mean(ref)) <= 0.02, (ours, ref)
        assert np.mean(ours) > 0.9


def _regression_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=g) * 2 - 1
    y = torch.sin(math.pi * x[:, :1]) * torch.cos(math.pi * x[:, 1:2]) + x[:, 2:] ** 2
    return x, y


class TestDeepRegression:
    @pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
    def test_three_hidden_layers_beat_default_init(self, act):
        xtr, ytr = _regression_data(1000, 0)
        xte, yte = _regression_data(500, 1)
        default = mlp([3, 128, 128, 128, 1], act, seed=0)
        swim = copy.deepcopy(default)
        pairs = SWIMInit(seed=0).apply(swim, xtr, ytr)
        assert list(pairs) == ["0", "2", "4"]
        with torch.no_grad():
            mse_default = float(F.mse_loss(default(xte), yte))
            mse_swim = float(F.mse_loss(swim(xte), yte))
        assert mse_swim < 0.1 * mse_default, (mse_swim, mse_default)

    def test_each_layer_is_sampled_in_its_own_input_space(self):
        """Layer 2's neurons are SWIM neurons of the *sampled* layer 1's activations at its pairs."""
        x, y = _regression_data(300, 0)
        model = mlp([3, 32, 16, 1], seed=1)
        pairs = SWIMInit(seed=0).apply(model, x, y)
        with torch.no_grad():
            h = torch.relu(model[0](x))
            i, j = pairs["2"]
            z = model[2](h)
            idx = torch.arange(16)
            torch.testing.assert_close(z[i, idx], torch.zeros(16), atol=1e-5, rtol=0)
            torch.testing.assert_close(z[j, idx], torch.ones(16), atol=1e-5, rtol=0)


class TestLeavesTheWorldAsItWas:
    def test_mode_grad_and_global_rng(self):
        x, y = _regression_data(200, 0)
        model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))
        model.train()
        model[0].weight.requires_grad_(False)
        state = torch.random.get_rng_state().clone()
        SWIMInit(seed=0).apply(model, x, y)
        assert torch.equal(state, torch.random.get_rng_state())
        assert model.training and all(m.training for m in model.modules())
        assert not model[0].weight.requires_grad and model[3].weight.requires_grad
        assert torch.is_grad_enabled()
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())

    def test_eval_mode_kept(self):
        x, y = _regression_data(100, 0)
        model = mlp([3, 8, 1]).eval()
        SWIMInit().apply(model, x, y)
        assert not model.training

    def test_same_seed_same_network(self):
        x, y = _regression_data(100, 0)
        a, b = mlp([3, 8, 8, 1], seed=0), mlp([3, 8, 8, 1], seed=1)
        SWIMInit(seed=4).apply(a, x, y)
        SWIMInit(seed=4).apply(b, x, y)
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pa, pb)

    def test_failure_leaves_the_weights_alone(self):
        # layer 2's inputs all coincide (layer 1 has a single dead-ish unit set to zero)
        x, y = _regression_data(50, 0)
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
        with torch.no_grad():
            model[0].weight.zero_()
            model[0].bias.fill_(-1.0)
        before = copy.deepcopy(model.state_dict())
        # sample layer "2" only: its inputs, relu(layer 0) = 0, are one point, and the output layer was to be
        # solved after it: nothing may change
        with pytest.raises(ValueError, match=r"Layer '2'.*distinct points"):
            SWIMInit(layers=["2"]).apply(model, x, y)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, before[k])


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(3, 16), nn.Linear(16, 16), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc2(F.relu(self.fc1(x)))))


class _Mish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.out = nn.Linear(3, 16), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.mish(self.fc1(x)))


class TestModels:
    def test_functional_activations_are_detected(self):
        x, y = _regression_data(300, 0)
        model = _Functional()
        pairs = SWIMInit(seed=0).apply(model, x, y)
        assert set(pairs) == {"fc1", "fc2"}
        with torch.no_grad():
            h = F.relu(model.fc1(x))
            z = model.fc2(h)
            i, j = pairs["fc2"]
            s2 = math.log(3) / 2  # tanh: z = -s2 at x_from, +s2 at x_to
            torch.testing.assert_close(z[i, torch.arange(16)], torch.full((16,), -s2), atol=1e-5, rtol=0)
            torch.testing.assert_close(z[j, torch.arange(16)], torch.full((16,), s2), atol=1e-5, rtol=0)

    def test_undetectable_activation_says_how_to_fix_it(self):
        x, y = _regression_data(50, 0)
        with pytest.raises(ValueError, match=r"'fc1'.*`mish`.*activations=\{'fc1': 'relu'\}"):
            SWIMInit().apply(_Mish(), x, y)

    def test_explicit_activation_overrides(self):
        x, y = _regression_data(50, 0)
        model = _Mish()
        pairs = SWIMInit(activations={"fc1": "relu"}).apply(model, x, y)
        assert set(pairs) == {"fc1"}

    def test_unmappable_layers_keep_their_weights_and_the_others_are_sampled(self):
        """Issue 13.4: a LayerNorm before one activation skips that layer only, with one warning."""
        x, y = _regression_data(200, 0)
        model = nn.Sequential(
            nn.Linear(3, 16),
            nn.GELU(),
            nn.Linear(16, 16),
            nn.LayerNorm(16),
            nn.ReLU(),
            nn.Linear(16, 8),
            nn.SiLU(),
            nn.Linear(8, 1),
        ).double()
        before = model[2].weight.detach().clone()
        with pytest.warns(UserWarning, match=r"layers not sampled.*'2': a layer_norm"):
            pairs = SWIMInit(seed=0).apply(model, x.double(), y.double())
        assert list(pairs) == ["0", "5"]
        assert torch.equal(model[2].weight, before)
        with torch.no_grad():  # layer 5 is sampled in the input space of the network as it is (layer 2 unchanged)
            h = model[:5](x.double())
            z = model[5](h)
        i, j = pairs["5"]
        m, silu = torch.arange(8), ACTIVATIONS["silu"]
        torch.testing.assert_close(z[i, m], torch.full((8,), -silu.s2, dtype=torch.float64), atol=1e-10, rtol=0)
        torch.testing.assert_close(
            z[j, m], torch.full((8,), silu.s1 - silu.s2, dtype=torch.float64), atol=1e-10, rtol=0
        )

    def test_smooth_relus_are_sampled(self):
        x, y = _regression_data(300, 0)
        for act, name in ((nn.GELU, "gelu"), (nn.SiLU, "silu")):
            model = mlp([3, 16, 1], act, seed=0)
            pairs = SWIMInit(seed=0).apply(model, x, y)
            i, j = pairs["0"]
            with torch.no_grad():
                z = model[0](x)
            s1, s2 = ACTIVATIONS[name].s1, ACTIVATIONS[name].s2
            torch.testing.assert_close(z[i, torch.arange(16)], torch.full((16,), -s2), atol=1e-5, rtol=0)
            torch.testing.assert_close(z[j, torch.arange(16)], torch.full((16,), s1 - s2), atol=1e-5, rtol=0)

    def test_lightning_module_holding_a_sequential(self):
        xtr, ytr, xte, yte = digits()
        module = MLPModule([64, 128, 10], xtr, ytr)
        pairs = SWIMInit(seed=0).apply(module, xtr, ytr)
        assert list(pairs) == ["net.0"]
        assert _accuracy(module, xte, yte) > 0.9

    def test_uniform_without_targets_keeps_output_layer(self):
        x, _ = _regression_data(100, 0)
        model = mlp([3, 8, 1])
        out_w = model[2].weight.detach().clone()
        SWIMInit().apply(model, x)
        assert torch.equal(out_w, model[2].weight)

    @pytest.mark.parametrize(
        ("model", "x", "y", "match"),
        [
            (nn.Sequential(nn.ReLU()), torch.randn(5, 3), None, "no nn.Linear"),
            (mlp([3, 4, 1]), torch.randn(5, 3), torch.randn(4), "5 rows"),
            (mlp([3, 4, 1]), torch.tensor([[float("nan"), 0.0, 0.0]] * 5), None, "non-finite"),
            (mlp([3, 4, 1]), torch.ones(5, 3), None, "distinct points"),
            (mlp([3, 4, 1]), torch.randn(1, 3), None, "at least 2 examples"),
            (mlp([3, 4, 3]), torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 4]), r"labels in \[0, 2\]"),
            (mlp([3, 4, 2]), torch.randn(5, 3), torch.randn(5, 3), "2 column"),
        ],
    )
    def test_bad_input(self, model, x, y, match):
        with pytest.raises((ValueError, TypeError), match=match):
            SWIMInit().apply(model, x, y)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"task": "ranking"}, "Invalid `task`"),
            ({"ridge": -1.0}, "`ridge`"),
            ({"probe_size": 1}, "`probe_size`"),
            ({"candidates_per_point": 0}, "`candidates_per_point`"),
            ({"layers": ["nope"]}, "not hidden nn.Linear"),
        ],
    )
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            SWIMInit(**kwargs).apply(mlp([3, 4, 1]), torch.randn(10, 3), torch.randn(10, 1))


class _Record(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.weights = copy.deepcopy(pl_module.state_dict())


class TestCallback:
    def test_applied_at_fit_start_on_a_fixed_probe(self, tmp_path):
        xtr, ytr, _, _ = digits()
        module = MLPModule([64, 32, 10], xtr, ytr)
        fresh = copy.deepcopy(module)
        record = _Record()
        state = torch.random.get_rng_state().clone()
        trainer(tmp_path, max_steps=1, callbacks=[SWIMInit(probe_size=300, seed=5), record]).fit(module)
        # the same probe, drawn from the dataset with the callback's own generator
        loader = fresh.train_dataloader()
        x, y = probe_from_dataloader(loader, 300, torch.Generator().manual_seed(5))
        SWIMInit(seed=5).apply(fresh, x, y)
        for k, v in fresh.state_dict().items():
            torch.testing.assert_close(record.weights[k], v)
        # the global RNG moved only because the DataLoader shuffled; redo without the callback
        torch.random.set_rng_state(state)
        trainer(tmp_path, max_steps=1).fit(MLPModule([64, 32, 10], xtr, ytr))
        after_plain = torch.random.get_rng_state()
        torch.random.set_rng_state(state)
        trainer(tmp_path, max_steps=1, callbacks=[SWIMInit(probe_size=300)]).fit(MLPModule([64, 32, 10], xtr, ytr))
        assert torch.equal(after_plain, torch.random.get_rng_state())

    def test_uniform_pairs_still_solve_the_output_layer(self, tmp_path):
        xtr, ytr, xte, yte = digits()
        module = MLPModule([64, 64, 10], xtr, ytr)
        record = _Record()
        trainer(tmp_path, max_steps=1, callbacks=[SWIMInit(task="uniform", probe_size=600), record]).fit(module)
        module.load_state_dict(record.weights)
        assert _accuracy(module, xte, yte) > 0.8  # the least-squares output layer makes it a classifier

    def test_resume_keeps_the_checkpoint_weights(self, tmp_path):
        xtr, ytr, _, _ = digits()
        module = MLPModule([64, 32, 10], xtr, ytr)
        t = trainer(tmp_path, max_steps=3, callbacks=[SWIMInit(probe_size=200)], enable_checkpointing=True)
        t.fit(module)
        ckpt = tmp_path / "ckpt.ckpt"
        t.save_checkpoint(ckpt)
        saved = copy.deepcopy(module.state_dict())
        record = _Record()
        resumed = MLPModule([64, 32, 10], xtr, ytr)
        trainer(tmp_path, max_steps=4, max_epochs=10, callbacks=[SWIMInit(probe_size=200), record]).fit(
            resumed, ckpt_path=ckpt
        )
        for k, v in saved.items():
            torch.testing.assert_close(record.weights[k], v)


class TestExtremeScales:
    @pytest.mark.parametrize("scale", [1e-20, 1e20])
    def test_the_same_network_function_at_every_input_scale(self, scale):
        """Issue 11, item 13: float32 inputs of size 1e20 gave an all-zero first layer without a word."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(200, 5, generator=g)
        y = (x[:, 0] * x[:, 1] > 0).long()
        ref, model = mlp([5, 32, 16, 2], seed=1), mlp([5, 32, 16, 2], seed=1)
        pairs_ref = SWIMInit(seed=3).apply(ref, x, y)
        pairs = SWIMInit(seed=3).apply(model, x * scale, y)
        for name in pairs_ref:
            assert torch.equal(pairs[name][0], pairs_ref[name][0]) and torch.equal(pairs[name][1], pairs_ref[name][1])
        first, first_ref = model[0], ref[0]
        assert bool((first.weight.abs().sum(1) > 0).all())
        torch.testing.assert_close(first.weight * scale, first_ref.weight, rtol=1e-4, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(model(x * scale), ref(x), rtol=1e-3, atol=1e-3)

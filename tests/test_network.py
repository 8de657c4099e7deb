"""map_network and convert_network: planted pairs, the thesis's benchmark, digits, state left alone."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
from helpers import mlp, train_mlp
from torch import nn

from lightning_swim import SWIMInit, convert_network, fidelity, map_network
from lightning_swim._datasets import digits, log_2d

F64 = torch.float64


def _planted(widths: list[int], act: type[nn.Module], x: torch.Tensor, y: torch.Tensor, seed: int):
    """A SWIM network whose hidden neurons are permuted and (last hidden, homogeneous) rescaled.

    Returns the network and, per hidden layer, the pair indices of its neurons after the permutation.
    """
    model = mlp(widths, act, F64, seed=seed)
    pairs = SWIMInit(seed=seed).apply(model, x, y)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    g = torch.Generator().manual_seed(seed + 100)
    expected = {}
    with torch.no_grad():
        for k, (name, (i, j)) in enumerate(pairs.items()):
            p = torch.randperm(linears[k].out_features, generator=g)
            linears[k].weight.copy_(linears[k].weight[p])
            linears[k].bias.copy_(linears[k].bias[p])
            linears[k + 1].weight.copy_(linears[k + 1].weight[:, p])
            expected[name] = (i[p], j[p])
        if act is nn.ReLU:  # rescale the last hidden layer by random positive factors
            s = torch.rand(linears[-2].out_features, generator=g, dtype=F64) * 5 + 0.2
            linears[-2].weight.mul_(s[:, None])
            linears[-2].bias.mul_(s)
            linears[-1].weight.div_(s[None, :])
    return model, expected


class TestPlantedTruth:
    """A network built by SWIM maps back to exactly its own pairs and is rebuilt exactly."""

    @pytest.mark.parametrize(
        ("act", "widths", "backend"),
        [
            pytest.param(act, widths, backend, marks=[pytest.mark.keops] if backend == "keops" else [])
            for act in (nn.ReLU, nn.Tanh)
            for widths in ([64, 48, 10], [64, 32, 32, 32, 10])
            for backend in ("torch", "keops")
        ]
        + [(nn.GELU, [64, 32, 32, 10], "torch"), (nn.SiLU, [64, 32, 32, 10], "torch")],
    )
    def test_maps_back_to_its_pairs(self, act, widths, backend):
        xtr, ytr, xte, _ = digits(dtype=F64)
        x, y = xtr[:400], ytr[:400]
        model, expected = _planted(widths, act, x, y, seed=len(widths))
        before = copy.deepcopy(model.state_dict())
        maps = map_network(model, x, backend=backend, top_k=8)
        assert list(maps) == list(expected)
        for name, pm in maps.items():
            i, j = expected[name]
            # the same pair, or a pair whose points coincide with it in this layer's input space
            same = (pm.idx_from == i) & (pm.idx_to == j)
            assert bool(same.all()), f"layer {name}: {int((~same).sum())} neurons mapped elsewhere"
            assert float(pm.param_cost.max()) < 1e-12
            assert float(pm.func_error.max()) < 1e-12
        rebuilt = convert_network(model, maps, x, output="keep")
        with torch.no_grad():
            out, out_rebuilt = model(xte), rebuilt(xte)
        assert float((out - out_rebuilt).abs().max() / out.abs().max()) < 1e-6
        for k, v in model.state_dict().items():  # the original is untouched
            assert torch.equal(v, before[k])


class TestThesisBenchmark:
    """2-D Laplacian of Gaussian, 100 ReLU neurons trained with Adam (DhiaBou/sampled-networks)."""

    def test_rebuilt_network_r2(self):
        x, y = log_2d(500, seed=0)
        x_test, _ = log_2d(2000, seed=1)
        model = train_mlp([2, 100, 1], x, y, lr=1e-2, full_batch_steps=3000, seed=0)
        maps = map_network(model, x)
        keep = fidelity(model, convert_network(model, maps, x, output="keep"), x_test, task="regression")
        refit = fidelity(model, convert_network(model, maps, x, output="refit"), x_test, task="regression")
        assert keep >= 0.995, keep  # thesis: 0.957
        assert refit >= 0.9995, refit  # thesis: 0.99914


class TestDigits:
    """64-128-10 and 64-256-128-10 ReLU networks trained with Adam; held-out agreement, mean of 2 seeds."""

    @pytest.fixture(scope="class")
    def data(self):
        return digits(dtype=F64)

    def _agreements(self, widths, data, outputs):
        xtr, ytr, xte, yte = data
        result: dict[str, list[float]] = {o: [] for o in outputs}
        for seed in (0, 1):
            model = train_mlp(widths, xtr, ytr, epochs=40, seed=seed)
            with torch.no_grad():
                assert float((model(xte).argmax(1) == yte).double().mean()) > 0.96
            maps = map_network(model, xtr)
            for o in outputs:
                result[o].append(fidelity(model, convert_network(model, maps, xtr, output=o), xte))
        return {o: statistics.fmean(v) for o, v in result.items()}

    def test_one_hidden_layer(self, data):
        agree = self._agreements([64, 128, 10], data, ["keep", "refit"])
        assert agree["keep"] >= 0.93, agree
        assert agree["refit"] >= 0.99, agree

    def test_two_hidden_layers(self, data):
        agree = self._agreements([64, 256, 128, 10], data, ["refit"])
        assert agree["refit"] >= 0.97, agree


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 12), nn.Linear(12, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(nn.functional.relu(self.a(x)))))


class TestNetworkPlumbing:
    def test_keys_in_call_order_and_state_restored(self):
        model = _Functional().double().train()
        x = torch.randn(50, 3, dtype=F64)
        state = torch.random.get_rng_state().clone()
        maps = map_network(model, x, backend="torch", top_k=4)
        assert list(maps) == ["a", "b"]
        assert maps["a"].activation == "relu" and maps["b"].activation == "tanh"
        assert model.training and all(m.training for m in model.modules())
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        assert torch.equal(state, torch.random.get_rng_state())
        rebuilt = convert_network(model, maps, x, output="refit")
        assert rebuilt.training and rebuilt is not model

    def test_layer_filter_and_dtype(self):
        model = _Functional()
        x = torch.randn(40, 3)
        maps = map_network(model, x, layers=["b"], dtype=F64, backend="torch", top_k=4)
        assert list(maps) == ["b"] and maps["b"].scale.dtype == F64

    def test_refit_matches_original_outputs_on_the_probe(self):
        model = mlp([3, 30, 2], dtype=F64)
        x = torch.randn(200, 3, dtype=F64)
        maps = map_network(model, x, backend="torch")
        rebuilt = convert_network(model, maps, x, output="refit")
        assert fidelity(model, rebuilt, x, task="regression") > fidelity(
            model, convert_network(model, maps, x, output="keep"), x, task="regression"
        )

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"output": "fresh"}, "Invalid `output`"),
        ],
    )
    def test_convert_bad_options(self, kwargs, match):
        model = mlp([3, 5, 1], dtype=F64)
        x = torch.randn(20, 3, dtype=F64)
        maps = map_network(model, x, backend="torch", top_k=2)
        with pytest.raises(ValueError, match=match):
            convert_network(model, maps, x, **kwargs)

    def test_convert_rejects_foreign_maps(self):
        model = mlp([3, 5, 1], dtype=F64)
        x = torch.randn(20, 3, dtype=F64)
        maps = map_network(model, x, backend="torch", top_k=2)
        with pytest.raises(ValueError, match="probe set has 10 points"):
            convert_network(model, maps, x[:10])
        with pytest.raises(ValueError, match="not nn.Linear layers"):
            convert_network(model, {"nope": maps["0"]}, x)
        with pytest.raises(ValueError, match="5 neurons but the layer has 7"):
            convert_network(mlp([3, 7, 1], dtype=F64), maps, x)

    def test_unsupported_activation_is_named(self):
        model = nn.Sequential(nn.Linear(3, 4), nn.Mish(), nn.Linear(4, 1))
        with pytest.raises(ValueError, match=r"'0': its output goes to `mish`.*activations=\{'0': 'relu'\}"):
            map_network(model, torch.randn(10, 3))
        with pytest.raises(ValueError, match=r"Cannot map layer '0'"):
            map_network(model, torch.randn(10, 3), layers=["0"])

    def test_unmappable_layers_are_skipped_with_one_note(self):
        """Issue 13.4: a LayerNorm before one activation and a residual branch skip only those layers."""

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.a, self.b, self.c = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 8)
                self.ln, self.d, self.head = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 2)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                h = nn.functional.gelu(self.a(x))
                h = h + self.c(torch.tanh(self.b(h)))  # a residual block: b is mapped, c ends the branch
                h = torch.relu(self.ln(self.d(h)))
                return self.head(h)

        x = torch.randn(60, 3, dtype=F64)
        model = Net().double()
        with pytest.warns(
            UserWarning, match=r"2 of 4 hidden layer\(s\) cannot be mapped.*'c'.*'d'.*the other 2"
        ) as rec:
            maps = map_network(model, x, backend="torch", top_k=4)
        assert len(rec) == 1
        assert list(maps) == ["a", "b"] and maps["a"].activation == "gelu"
        keep = convert_network(model, maps, x)
        assert fidelity(model, keep, x) >= 0  # the rebuilt network runs, the skipped layers as they were
        assert torch.equal(keep.d.weight, model.d.weight) and torch.equal(keep.c.weight, model.c.weight)

    def test_analysis_needs_a_hidden_layer(self):
        from lightning_swim import analyse_network

        with pytest.raises(ValueError, match="no hidden nn.Linear"):
            analyse_network(nn.Sequential(nn.Linear(3, 2)), torch.randn(10, 3))

    def test_layer_errors_name_the_layer(self):
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
        with torch.no_grad():
            model[0].weight.zero_()
            model[0].bias.fill_(-1.0)  # layer "2" sees a single point
        with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="Layer '2'.*distinct points"):
            map_network(model, torch.randn(10, 3))

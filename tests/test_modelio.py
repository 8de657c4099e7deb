"""Reading a model once per map: layers, activations, folds, passes, state, parametrizations, real fits."""

from __future__ import annotations

import copy
import math
import random
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.nn.utils import parametrizations
from torch.utils.data import DataLoader, TensorDataset

from lightning_swim import PairImportanceMonitor, SWIMInit, convert_network, load_history, map_network
from lightning_swim._datasets import digits
from lightning_swim._modelio import (
    PASSES_PER_READING,
    PASSES_PER_REBUILD,
    preserved,
    read_model,
    select_output,
)
from lightning_swim.activations import ACTIVATIONS
from lightning_swim.analysis import AnalysisConfig, analyse_network, forward_passes
from lightning_swim.network import output_fidelity, rebuild

F64 = torch.float64


class Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def _seeded(seed: int = 0):
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    return torch_state


def _net(*mods: nn.Module, seed: int = 0, dtype=torch.float32) -> nn.Sequential:
    state = _seeded(seed)
    model = nn.Sequential(*mods).to(dtype)
    torch.random.set_rng_state(state)
    return model


def _x(n: int = 60, d: int = 5, seed: int = 0, dtype=torch.float32) -> Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _randomise_bn(bn: nn.BatchNorm1d, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        if bn.affine:
            bn.weight.copy_(
                torch.randn(bn.num_features, generator=g).sign() * (torch.rand(bn.num_features, generator=g) + 0.5)
            )
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))


class TestActivations:
    @pytest.mark.parametrize(
        ("act", "name"),
        [
            (nn.GELU(), "gelu"),
            (nn.GELU(approximate="tanh"), "gelu_tanh"),
            (nn.SiLU(), "silu"),
            (nn.Softplus(), "softplus"),
            (nn.Tanh(), "tanh"),
            (nn.Sigmoid(), "sigmoid"),
            (nn.ReLU(inplace=True), "relu"),
            (Lambda(F.gelu), "gelu"),
            (Lambda(lambda z: F.gelu(z, approximate="tanh")), "gelu_tanh"),
            (Lambda(F.silu), "silu"),
            (Lambda(lambda z: z.sigmoid()), "sigmoid"),
            (Lambda(lambda z: z.relu_()), "relu"),
        ],
    )
    def test_modules_and_functional_calls_are_detected(self, act, name):
        model = _net(nn.Linear(5, 7), nn.Dropout(0.1), act, nn.Linear(7, 2))
        layer = read_model(model, _x()).layers[0]
        assert layer.activation is not None and layer.activation.name == name
        assert layer.mappable

    def test_parameters_of_activations_are_kept(self):
        reading = read_model(
            _net(nn.Linear(5, 7), nn.LeakyReLU(0.2), nn.Linear(7, 7), nn.Softplus(beta=4.0), nn.Linear(7, 1)), _x()
        )
        leaky, soft = reading.layers[0].activation, reading.layers[1].activation
        assert leaky.negative_slope == 0.2
        z = torch.linspace(-3, 3, 13)
        torch.testing.assert_close(soft(z), F.softplus(z, beta=4.0))
        # the bend of softplus with beta has width 1/beta: the pair's constants shrink with it
        assert soft.s1 == pytest.approx(ACTIVATIONS["softplus"].s1 / 4)

    @pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu", "softplus"])
    def test_smooth_relus_bracket_the_bend_at_half_its_curvature(self, name):
        """docs/maths.md: sigma''(-s2) = sigma''(s1 - s2) = sigma''(0) / 2, and the curvature peaks at 0."""
        act = ACTIVATIONS[name]
        z = torch.tensor([-act.s2, 0.0, act.s1 - act.s2], dtype=F64, requires_grad=True)
        (d1,) = torch.autograd.grad(act(z).sum(), z, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), z)
        torch.testing.assert_close(d2[[0, 2]], d2[[1, 1]] / 2, rtol=1e-12, atol=1e-12)
        grid = torch.linspace(-4, 4, 801, dtype=F64, requires_grad=True)
        (g1,) = torch.autograd.grad(act(grid).sum(), grid, create_graph=True)
        (g2,) = torch.autograd.grad(g1.sum(), grid)
        assert float(grid.detach()[g2.argmax()]) == pytest.approx(0.0, abs=1e-2)
        assert act.s1 == pytest.approx(2 * act.s2) and not act.homogeneous


class TestReading:
    def test_layers_in_call_order_with_their_followers(self):
        class Block(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.head = nn.Linear(6, 2)
                self.a, self.b, self.c = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 6)
                self.ln, self.unused = nn.LayerNorm(6), nn.Linear(6, 6)

            def forward(self, x: Tensor) -> Tensor:
                h = F.silu(self.a(x))
                h = h + self.c(torch.relu(self.ln(self.b(h))))  # LayerNorm; a residual branch's end
                return self.head(F.mish(h))

        block = Block()
        reading = read_model(block, _x())
        assert [la.name for la in reading.layers] == ["a", "b", "c", "head"]
        a, b, c, head = reading.layers
        assert a.mappable and a.activation.name == "silu"
        assert "layer_norm" in b.reason and "normalises across the layer's neurons" in b.reason
        assert "`add`" in c.reason and "residual" in c.reason
        assert reading.output_layer is head
        assert [la.name for la in reading.select()] == ["a"]
        note = reading.note()
        assert "'b'" in note and "'c'" in note and "the other 1 are mapped" in note
        with pytest.raises(ValueError, match=r"Cannot map layer 'b': a layer_norm"):
            reading.select(["a", "b"])
        # the captured inputs and outputs are the layers' own
        with torch.no_grad():
            torch.testing.assert_close(reading.points("c"), torch.relu(block.ln(b.output)))
            torch.testing.assert_close(reading.output, block(_x()))

    def test_unknown_activation_says_how_to_fix_it(self):
        model = _net(nn.Linear(5, 7), nn.Mish(), nn.Linear(7, 1))
        layer = read_model(model, _x()).layers[0]
        assert "`mish`" in layer.reason and "activations={'0': 'relu'}" in layer.reason
        assert read_model(model, _x(), activations={"0": "relu"}).layers[0].mappable

    def test_shared_and_sequence_layers_are_skipped_with_a_reason(self):
        class Odd(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.shared, self.tok, self.head = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 1)

            def forward(self, x: Tensor) -> Tensor:
                h = torch.relu(self.shared(torch.relu(self.shared(x))))
                h = torch.relu(self.tok(h.unsqueeze(1).expand(-1, 3, -1))).mean(1)
                return self.head(h)

        reading = read_model(Odd(), _x())
        shared, tok, _ = reading.layers
        assert shared.calls == 2 and "calls it 2 times" in shared.reason
        assert "inputs of shape (60, 3, 5)" in tok.reason
        with pytest.raises(ValueError, match="No layer of Odd can be mapped"):
            map_network(Odd(), _x())

    def test_batchnorm_is_folded_into_the_layer(self):
        model = _net(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Dropout(0.2), nn.ReLU(), nn.Linear(8, 2), dtype=F64)
        _randomise_bn(model[1])
        x = _x(dtype=F64)
        layer = read_model(model, x).layers[0]
        assert layer.fold is not None and layer.activation.name == "relu" and layer.mappable
        w, b = layer.parameters()
        with torch.no_grad():
            torch.testing.assert_close(x @ w.T + b, model[1].eval()(model[0](x)), rtol=1e-12, atol=1e-12)
        model.train()
        # a BatchNorm without running statistics cannot be folded
        no_stats = _net(nn.Linear(5, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(), nn.Linear(8, 2))
        assert "without running statistics" in read_model(no_stats, _x()).layers[0].reason

    @pytest.mark.parametrize(
        ("out", "key", "expected"),
        [
            (torch.ones(2), None, torch.ones(2)),
            ((torch.ones(2), torch.zeros(1)), None, torch.ones(2)),
            ({"logits": torch.ones(2), "aux": torch.zeros(1)}, None, torch.ones(2)),
            ({"y": torch.zeros(2), "z": torch.ones(1)}, "y", torch.zeros(2)),
            ((torch.zeros(1), torch.ones(2)), 1, torch.ones(2)),
            ({"a": (torch.ones(2),)}, lambda o: o["a"][0], torch.ones(2)),
        ],
    )
    def test_output_selection(self, out, key, expected):
        assert torch.equal(select_output(out, key), expected)

    def test_zero_width_and_meta_models_are_named(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch: initialising zero-element tensors
            model = _net(nn.Linear(5, 0), nn.ReLU(), nn.Linear(0, 4), nn.ReLU(), nn.Linear(4, 1))
            thin_output = _net(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 0))
        reading = read_model(model, _x())
        assert all("zero width (nn.Linear(" in la.reason for la in reading.hidden)
        with pytest.raises(ValueError, match=r"Cannot solve the output layer '2': it has zero width"):
            SWIMInit().apply(thin_output, _x(), torch.zeros(60, 0))
        with pytest.raises(ValueError, match=r"parameter `0.weight` is a meta tensor"):
            read_model(_net(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1)).to("meta"), _x())

    def test_output_selection_error_names_the_fix(self):
        with pytest.raises(TypeError, match=r"keys \['aux', 'pred_x'\].*output_key='logits'"):
            select_output({"pred_x": torch.ones(1), "aux": torch.ones(1)})

    def test_a_failing_forward_is_named(self):
        class NoForward(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))

        with pytest.raises(RuntimeError, match="forward pass of NoForward on the probe set"):
            read_model(NoForward(), _x())
        with pytest.raises(RuntimeError, match=r"SWIMInit\(module='net'\)"):
            SWIMInit().apply(NoForward(), _x(), _x()[:, :1])
        pairs = SWIMInit(module="net").apply(NoForward(), _x(), _x()[:, :1])
        assert list(pairs) == ["0"]
        with pytest.raises(ValueError, match=r"module.*'nett'.*submodules are \['net'\]"):
            SWIMInit(module="nett").apply(NoForward(), _x(), _x()[:, :1])
        with pytest.raises(MisconfigurationException, match=r"PairImportanceMonitor: .*'nett'.*\['net'\]"):
            PairImportanceMonitor(module="nett")._target(NoForward())


class _Counting:
    """Counts forward passes of the model (a hook on its root) and calls of a user hook on a layer."""

    def __init__(self, model: nn.Module, layer: nn.Module) -> None:
        self.passes, self.user = 0, 0
        model.register_forward_hook(lambda *_: self._pass())
        layer.register_forward_hook(lambda *_: self._user())

    def _pass(self) -> None:
        self.passes += 1

    def _user(self) -> None:
        self.user += 1


class TestOneReading:
    """The number of forward passes per map is a constant; rebuilt networks need no copy."""

    def _model(self):
        model = _net(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 10))
        x, y, _, _ = digits()
        SWIMInit(seed=0).apply(model, x[:200], y[:200])
        return model, x[:200]

    def test_forward_passes_are_counted(self, monkeypatch):
        model, x = self._model()
        count = _Counting(model, model[2])
        maps = map_network(model, x, top_k=4, backend="torch")
        assert (count.passes, count.user) == (PASSES_PER_READING, PASSES_PER_READING)
        reading = read_model(model, x)
        count.passes = count.user = 0
        for name in maps:  # one rebuilt network per layer and one for all of them: one pass each
            rebuild(reading, {name: maps[name]})
        rebuild(reading, maps, output="refit")
        assert (count.passes, count.user) == (3 * PASSES_PER_REBUILD, 3 * PASSES_PER_REBUILD)
        count.passes = 0
        convert_network(model, maps, x, output="refit")
        assert count.passes == PASSES_PER_READING + PASSES_PER_REBUILD
        count.passes = 0
        SWIMInit(seed=1).apply(model, x)
        assert count.passes == PASSES_PER_READING + PASSES_PER_REBUILD
        count.passes = 0
        read_model(model, x, batch_size=50)  # in chunks: one call per chunk
        assert count.passes == 4

    def test_a_map_of_the_monitor_costs_the_stated_passes(self):
        model, x = self._model()
        count = _Counting(model, model[2])
        record = analyse_network(model, x, config=AnalysisConfig(top_k=4, backend="torch", refine="function"))
        assert list(record.maps) == ["0", "2"]
        assert (count.passes, count.user) == (forward_passes(2), forward_passes(2)) == (9, 9)
        count.passes = 0
        analyse_network(model, x, config=AnalysisConfig(top_k=4, backend="torch", refine="function", fidelity=False))
        assert count.passes == forward_passes(2, fidelity=False) == PASSES_PER_READING

    def test_a_rebuild_copies_nothing_and_changes_nothing(self, monkeypatch):
        model, x = self._model()
        maps = map_network(model, x, top_k=4, backend="torch")
        before = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
        reading = read_model(model, x)

        def no_copy(*_a, **_k):
            raise AssertionError("deepcopy called")

        monkeypatch.setattr(copy, "deepcopy", no_copy)
        keep = rebuild(reading, maps)
        refit = rebuild(reading, maps, output="refit")
        monkeypatch.undo()
        for k, v in model.state_dict().items():
            assert v.data_ptr() == before[k][0] and torch.equal(v, before[k][1])
        # what the hooks computed is what convert_network's copy computes
        for result, mode in ((keep, "keep"), (refit, "refit")):
            copy_ = convert_network(model, maps, x, output=mode)
            with torch.no_grad():
                torch.testing.assert_close(result.output, copy_(x), rtol=1e-5, atol=1e-5)
        assert output_fidelity(reading.output, keep.output) > 0.99  # a SWIM network rebuilds itself

    def test_chunked_rebuild_equals_the_one_pass_rebuild(self):
        model, x = self._model()
        maps = map_network(model, x, top_k=4, backend="torch")
        whole = rebuild(read_model(model, x), maps, output="refit")
        chunked = rebuild(read_model(model, x, batch_size=64), maps, output="refit")
        torch.testing.assert_close(whole.output, chunked.output, rtol=1e-4, atol=1e-4)


class TestPreserved:
    def test_train_overrides_run_and_grad_flags_come_back(self):
        calls = []

        class Freezing(nn.Module):  # freezes its body in eval mode, as some fine-tuning code does
            def __init__(self) -> None:
                super().__init__()
                self.body, self.head = nn.Linear(5, 8), nn.Linear(8, 1)
                self.bn = nn.BatchNorm1d(8)

            def train(self, mode: bool = True) -> Freezing:
                calls.append(mode)
                super().train(mode)
                self.body.requires_grad_(mode)
                return self

            def forward(self, x: Tensor) -> Tensor:
                return self.head(torch.relu(self.bn(self.body(x))))

        model = Freezing().train()
        model.bn.eval()  # a frozen BatchNorm inside a training model stays frozen
        model.head.bias.requires_grad_(False)
        calls.clear()
        with preserved(model):
            assert not model.training and not model.body.weight.requires_grad
        assert calls == [False, True]
        assert model.training and model.body.training and not model.bn.training
        assert model.body.weight.requires_grad and not model.head.bias.requires_grad

    def test_every_global_rng_is_left_alone(self):
        class Noisy(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 1)

            def forward(self, x: Tensor) -> Tensor:
                h = F.dropout(torch.relu(self.a(x)), 0.2, training=True)
                h = h + 0.01 * torch.randn_like(h) + float(np.random.rand()) + random.random()  # noqa: NPY002
                return self.b(h)

        model = Noisy()
        x = _x()
        states = torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()  # noqa: NPY002
        maps = map_network(model, x, top_k=2, backend="torch")
        convert_network(model, maps, x, output="refit")
        SWIMInit().apply(model, x)
        assert torch.equal(states[0], torch.random.get_rng_state())
        assert np.array_equal(states[1], np.random.get_state()[1])  # noqa: NPY002
        assert states[2] == random.getstate()


class TestWriteBack:
    def test_swim_init_and_rebuild_through_a_batchnorm_fold(self):
        """Linear -> BatchNorm (eval, random statistics) -> ReLU: SWIM neurons of the whole, written back."""
        x = _x(200, 5, dtype=F64)
        y = x[:, :2].sum(1, keepdim=True)
        for bias in (True, False):
            model = _net(nn.Linear(5, 12, bias=bias), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 1), dtype=F64).eval()
            _randomise_bn(model[1])
            pairs = SWIMInit(seed=0).apply(model, x, y)
            i, j = pairs["0"]
            with torch.no_grad():
                z = model[1](model[0](x))
            m = torch.arange(12)
            torch.testing.assert_close(z[i, m], torch.zeros(12, dtype=F64), atol=1e-10, rtol=0)
            torch.testing.assert_close(z[j, m], torch.ones(12, dtype=F64), atol=1e-10, rtol=0)
            # and it maps back to the same pairs, and rebuilds exactly
            maps = map_network(model, x, top_k=8, backend="torch")
            assert torch.equal(maps["0"].idx_from, i) and torch.equal(maps["0"].idx_to, j)
            rebuilt = convert_network(model, maps, x)
            with torch.no_grad():
                torch.testing.assert_close(rebuilt(x), model(x), rtol=1e-9, atol=1e-9)

    @pytest.mark.parametrize("wrap", ["weight_norm", "old_weight_norm"])
    def test_weight_norm_is_written_through(self, wrap):
        x = _x(100, 5)
        model = _net(nn.Linear(5, 10), nn.ReLU(), nn.Linear(10, 1))
        if wrap == "weight_norm":
            parametrizations.weight_norm(model[0])
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                torch.nn.utils.weight_norm(model[0])
        pairs = SWIMInit(seed=0).apply(model, x, x.sum(1, keepdim=True))
        i, j = pairs["0"]
        with torch.no_grad():
            z = model[0](x)
        m = torch.arange(10)
        torch.testing.assert_close(z[i, m], torch.zeros(10), atol=1e-5, rtol=0)
        torch.testing.assert_close(z[j, m], torch.ones(10), atol=1e-5, rtol=0)
        assert (wrap == "weight_norm") == hasattr(model[0], "parametrizations")

    def test_spectral_norm_is_refused_clearly(self):
        x = _x(100, 5)
        model = _net(nn.Linear(5, 10), nn.ReLU(), nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 1))
        parametrizations.spectral_norm(model[0])
        before = copy.deepcopy(model.state_dict())
        with pytest.warns(UserWarning, match=r"'0': `weight`, computed by the parametrization _SpectralNorm"):
            pairs = SWIMInit(seed=0).apply(model, x, x.sum(1, keepdim=True))
        assert list(pairs) == ["2"]  # never pairs for a layer it did not write
        assert torch.equal(
            model.state_dict()["0.parametrizations.weight.original"], before["0.parametrizations.weight.original"]
        )
        with pytest.raises(ValueError, match="Cannot sample layer '0'"):
            SWIMInit(layers=["0"]).apply(model, x)
        maps = map_network(model, x, top_k=4, backend="torch")  # reading it is fine
        with pytest.warns(UserWarning, match="Layers mapped but not rebuilt"):
            rebuilt = convert_network(model, maps, x)
        assert torch.equal(
            rebuilt.state_dict()["0.parametrizations.weight.original"], before["0.parametrizations.weight.original"]
        )

    def test_bias_free_layers_are_mapped_but_not_rebuilt(self):
        x = _x(100, 5)
        model = _net(nn.Linear(5, 10, bias=False), nn.ReLU(), nn.Linear(10, 1))
        maps = map_network(model, x, top_k=4, backend="torch")
        assert list(maps) == ["0"]
        reading = read_model(model, x)
        result = rebuild(reading, maps)
        assert "no bias" in result.notes["0"] and not result.replacements
        torch.testing.assert_close(result.output, reading.output)


class TestHalfPrecision:
    def test_bf16_maps_in_float32(self):
        x = _x(80, 5)
        model = _net(nn.Linear(5, 10), nn.ReLU(), nn.Linear(10, 2)).to(torch.bfloat16)
        maps = map_network(model, x, top_k=4, backend="torch")
        assert maps["0"].scale.dtype == torch.float32
        rebuilt = convert_network(model, maps, x, output="refit")
        assert rebuilt[0].weight.dtype == torch.bfloat16


# -- real fits ------------------------------------------------------------------------------------------


class _Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, x: Tensor, y: Tensor, *, with_forward: bool = True) -> None:
        super().__init__()
        self.net, self.x, self.y = net, x, y
        if with_forward:
            self.forward = self.net.forward  # type: ignore[method-assign]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        out = self.net(x)
        if isinstance(out, dict):
            out = out["logits"] if "logits" in out else out["pred"]
        return F.cross_entropy(out.float(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=32, shuffle=True)


class _MCDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(F.dropout(torch.relu(self.a(x)), 0.2, training=True))


class _Noise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))
        return self.b(h + 0.01 * torch.randn_like(h))


class _Toggling(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(64, 16), nn.ReLU()), nn.Linear(16, 10)

    def train(self, mode: bool = True) -> _Toggling:
        super().train(mode)
        self.body.requires_grad_(mode)  # frozen in eval mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def _plain() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


@pytest.fixture(scope="module")
def data():
    x, y, _, _ = digits()
    return x[:256], y[:256]


def _fit(tmp_path, make, data, callbacks, **kwargs):
    x, y = data
    state = _seeded(0)
    module = _Classifier(make(), x, y)
    torch.random.set_rng_state(state)
    torch.manual_seed(1)  # the runs' common global RNG (dropout, noise, shuffling)
    trainer(tmp_path, max_steps=8, callbacks=callbacks, **kwargs).fit(module)
    return module, torch.random.get_rng_state()


class TestTrainingIsUnchanged:
    """Issue 11.1 and 11.3: bit-identical training, RNG included, with the monitor attached."""

    @pytest.mark.parametrize(
        "make", [_plain, _MCDropout, _Noise, _Toggling], ids=["plain", "mc_dropout", "noise", "toggling"]
    )
    def test_bit_identical_with_and_without_the_monitor(self, tmp_path, data, make):
        plain, rng_plain = _fit(tmp_path / "a", make, data, [])
        monitor = PairImportanceMonitor(every_n_train_steps=2, probe_size=64, top_k=4, log_images=False)
        monitored, rng_monitored = _fit(tmp_path / "b", make, data, [monitor])
        assert monitor._steps == [0, 2, 4, 6, 8]
        for (k, a), b in zip(plain.state_dict().items(), monitored.state_dict().values(), strict=True):
            assert torch.equal(a, b), k
        assert torch.equal(rng_plain, rng_monitored)
        assert all(p.requires_grad for p in monitored.parameters())


class TestWhatTheMonitorMaps:
    def test_one_unmappable_layer_leaves_the_others_mapped(self, tmp_path, data):
        """Issue 13.4: a LayerNorm between a layer and its activation skips that layer, with one note."""

        def make() -> nn.Module:
            return nn.Sequential(
                nn.Linear(64, 16),
                nn.GELU(),
                nn.Linear(16, 16),
                nn.LayerNorm(16),
                nn.ReLU(),
                nn.Linear(16, 12),
                nn.SiLU(),
                nn.Linear(12, 10),
            )

        monitor = PairImportanceMonitor(every_n_train_steps=4, probe_size=64, top_k=4, log_images=False)
        with pytest.warns(UserWarning, match=r"cannot be mapped and are skipped \('net.2': a layer_norm") as record:
            _fit(tmp_path, make, data, [monitor])
        assert sum("cannot be mapped" in str(w.message) for w in record) == 1
        history = load_history(tmp_path / "swim_maps")
        assert [r.step for r in history] == [0, 4, 8]
        for r in history:
            assert list(r.maps) == ["net.0", "net.5"]
            assert r.maps["net.0"].activation == "gelu" and r.maps["net.5"].activation == "silu"
            assert 0 <= r.scalars["swim/network/fidelity_keep"] <= 1

    def test_a_module_without_forward_is_named(self, tmp_path, data):
        """Issue 11.15: `module="net"`, and a clear error with that fix at fit start without it."""
        x, y = data
        module = _Classifier(_plain(), x, y, with_forward=False)
        with pytest.raises(MisconfigurationException, match=r"PairImportanceMonitor\(module='net'\)"):
            trainer(tmp_path / "a", max_steps=2, callbacks=[PairImportanceMonitor(probe_size=32, top_k=2)]).fit(module)
        monitor = PairImportanceMonitor(module="net", every_n_train_steps=2, probe_size=32, top_k=2, log_images=False)
        init = SWIMInit(module="net", probe_size=64)
        trainer(tmp_path / "b", max_steps=2, callbacks=[init, monitor]).fit(
            _Classifier(_plain(), x, y, with_forward=False)
        )
        assert [list(r.maps) for r in load_history(tmp_path / "b" / "swim_maps")] == [["0"], ["0"]]

    def test_an_output_key_selects_what_the_fidelity_compares(self, tmp_path, data):
        """Issue 11.14: a model returning a dict without a `logits` entry; the fix is named at fit start."""

        class Heads(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 10)

            def forward(self, x: Tensor) -> dict[str, Tensor]:
                h = torch.relu(self.a(x))
                return {"features": h, "pred": self.b(h)}

        with pytest.raises(MisconfigurationException, match=r"keys \['features', 'pred'\].*Pass `output_key`"):
            _fit(tmp_path / "a", Heads, data, [PairImportanceMonitor(probe_size=32, top_k=2)])
        monitor = PairImportanceMonitor(
            output_key="pred", every_n_train_steps=4, probe_size=64, top_k=4, log_images=False
        )
        _fit(tmp_path / "b", Heads, data, [monitor])
        history = load_history(tmp_path / "b" / "swim_maps")
        assert [r.step for r in history] == [0, 4, 8]
        assert 0.0 <= history[-1].scalars["swim/network/fidelity_keep"] <= 1.0

    def test_dict_outputs_bf16_and_bias_free_layers(self, tmp_path, data):
        """Issue 11.14: a dict output, precision="bf16-true" and bias-free hidden layers are mapped."""

        class Dict(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.a, self.b = nn.Linear(64, 16, bias=False), nn.Linear(16, 10)

            def forward(self, x: Tensor) -> dict[str, Tensor]:
                h = torch.relu(self.a(x))
                return {"features": h, "logits": self.b(h)}

        monitor = PairImportanceMonitor(every_n_train_steps=4, probe_size=64, top_k=4, log_images=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            _fit(tmp_path, Dict, data, [monitor], precision="bf16-true")
        history = load_history(tmp_path / "swim_maps")
        assert [r.step for r in history] == [0, 4, 8]
        assert history[-1].maps["net.a"].scale.dtype == torch.float32
        assert math.isfinite(history[-1].scalars["swim/network/fidelity_keep"])

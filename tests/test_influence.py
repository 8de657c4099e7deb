"""EL2N and TracIn against direct per-example computations and captum; the InfluenceMonitor in a real Trainer."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import MLPModule, trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_swim import PairImportanceMonitor
from lightning_swim._datasets import digits
from lightning_swim.callbacks import InfluenceMonitor
from lightning_swim.evaluate import mlp_factory, spearman
from lightning_swim.influence import (
    TracInAccumulator,
    el2n_scores,
    learning_rates,
    per_sample_grad_norms,
    tracin_self_influence,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def net(seed: int, widths=(4, 6, 3), dtype=torch.float64) -> nn.Module:
    return mlp_factory(list(widths), dtype=dtype)(torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(25, 4, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (25,), generator=g)


def direct_grad_sq(model: nn.Module, x, y, weights=None) -> torch.Tensor:
    """One backward pass per example."""
    out = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        out.append(sum((1.0 if weights is None else weights[n]) * g.pow(2).sum() for n, g in grads.items()))
    model.zero_grad()
    return torch.stack(out).double()


class TestEL2N:
    def test_against_a_direct_computation_averaged_over_models(self, data):
        x, y = data
        models = [net(0), net(1)]
        expected = torch.zeros(len(x), dtype=torch.float64)
        for m in models:
            for i in range(len(x)):
                logits = m(x[i]).detach()
                p = torch.exp(logits) / torch.exp(logits).sum()
                e = torch.zeros(3, dtype=torch.float64)
                e[y[i]] = 1
                expected[i] += float(torch.sqrt(((p - e) ** 2).sum())) / 2
        torch.testing.assert_close(el2n_scores(models, x, y, batch_size=7), expected)

    def test_mode_is_kept_and_labels_checked(self, data):
        x, y = data
        m = net(0).train()
        el2n_scores(m, x, y)
        assert m.training
        with pytest.raises(ValueError, match="class labels"):
            el2n_scores(m, x, y.double())
        with pytest.raises(ValueError, match=r"labels in \[0, 3\)"):
            el2n_scores(m, x, y + 3)


class TestTracIn:
    def test_per_sample_gradients_against_a_loop(self, data):
        x, y = data
        m = net(2)
        params = [p.detach().clone() for p in m.parameters()]
        torch.testing.assert_close(per_sample_grad_norms(m, x, y, batch_size=4), direct_grad_sq(m, x, y))
        assert all(torch.equal(a, b) for a, b in zip(params, m.parameters(), strict=True))
        assert all(p.grad is None or not p.grad.any() for p in m.parameters())

    def test_self_influence_sums_checkpoints_with_learning_rates(self, data):
        x, y = data
        ckpts, lrs = [net(0), net(1), net(2)], [0.1, 0.02, 0.5]
        expected = sum(lr * direct_grad_sq(c, x, y) for c, lr in zip(ckpts, lrs, strict=True))
        torch.testing.assert_close(tracin_self_influence(ckpts, x, y, lrs), expected)

    def test_against_captum_tracincp(self, data, tmp_path):
        captum_influence = pytest.importorskip("captum.influence", reason="captum (the `test` extra) is not installed")
        from torch.utils.data import TensorDataset

        x, y = data
        model = net(0)
        paths, lrs = [], [0.1, 0.05, 0.2]
        for t, lr in enumerate(lrs):
            path = tmp_path / f"ckpt{t}.pt"
            torch.save({"state": net(t + 10).state_dict(), "lr": lr}, path)
            paths.append(str(path))

        def load(m: nn.Module, path: str) -> float:
            ckpt = torch.load(path)
            m.load_state_dict(ckpt["state"])
            return ckpt["lr"]

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # captum's notes on gradient requirements
            ref = captum_influence.TracInCP(
                model,
                TensorDataset(x, y),
                paths,
                checkpoints_load_func=load,
                loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                batch_size=8,
                sample_wise_grads_per_batch=True,
            ).self_influence()
        ours = tracin_self_influence([net(t + 10) for t in range(3)], x, y, lrs)
        torch.testing.assert_close(ours, ref.double(), rtol=1e-6, atol=1e-8)

    def test_parameter_groups_weigh_by_their_own_learning_rate(self, data):
        x, y = data
        m = net(3)
        opt = torch.optim.SGD([{"params": m[0].parameters(), "lr": 0.1}, {"params": m[2].parameters(), "lr": 0.01}])
        lrs = learning_rates(m, opt)
        assert lrs == {"0.weight": 0.1, "0.bias": 0.1, "2.weight": 0.01, "2.bias": 0.01}
        acc = TracInAccumulator(x, y, batch_size=10)
        term = acc.update(m, opt)
        torch.testing.assert_close(term, direct_grad_sq(m, x, y, lrs))
        acc.update(m, 0.5)
        torch.testing.assert_close(acc.scores, term + 0.5 * direct_grad_sq(m, x, y))
        assert acc.n_checkpoints == 2

    def test_frozen_parameters_are_left_out(self, data):
        x, y = data
        m = net(4)
        m[0].weight.requires_grad_(False)
        weights = {"0.weight": 0.0, "0.bias": 1.0, "2.weight": 1.0, "2.bias": 1.0}
        torch.testing.assert_close(per_sample_grad_norms(m, x, y), direct_grad_sq(m, x, y, weights))
        assert not m[0].weight.requires_grad

    def test_bad_arguments(self, data):
        x, y = data
        with pytest.raises(ValueError, match="one learning rate per checkpoint"):
            tracin_self_influence([net(0)], x, y, [0.1, 0.2])
        with pytest.raises(ValueError, match="not trainable parameters"):
            per_sample_grad_norms(net(0), x, y, param_weights={"nope": 1.0})
        with pytest.raises(ValueError, match="one row per example"):
            per_sample_grad_norms(net(0), x, y[:3])


class Snapshots(Callback):
    """Keeps a copy of the network and its learning rate at every epoch end (runs before the monitor)."""

    def __init__(self):
        self.nets, self.lrs = [], []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.nets.append(copy.deepcopy(pl_module.net))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


class TestInfluenceMonitor:
    @pytest.fixture(scope="class")
    def digits_data(self):
        xtr, ytr, _, _ = digits()
        return xtr[:200], ytr[:200]

    def test_tracin_accumulates_the_checkpoints_and_is_logged(self, tmp_path, digits_data):
        from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator

        x, y = digits_data
        module = MLPModule([64, 16, 10], x, y, lr=1e-2)
        snaps = Snapshots()
        probe = (x[:50], y[:50])
        monitor = InfluenceMonitor(probe=probe)
        logger = TensorBoardLogger(tmp_path, name="tb", version=0)
        t = trainer(tmp_path, callbacks=[snaps, monitor], max_epochs=3, logger=logger)
        t.fit(module)
        assert len(monitor.steps) == 3 and len(snaps.nets) == 3
        expected = tracin_self_influence(snaps.nets, *probe, snaps.lrs)
        torch.testing.assert_close(monitor.tracin, expected)
        torch.testing.assert_close(monitor.el2n, el2n_scores(snaps.nets[-1], *probe))
        acc = EventAccumulator(t.log_dir, size_guidance={HISTOGRAMS: 0})
        acc.Reload()
        assert {"swim/influence/el2n", "swim/influence/tracin"} <= set(acc.Tags()[HISTOGRAMS])
        assert {"swim/influence/el2n_mean", "swim/influence/tracin_mean"} <= set(acc.Tags()["scalars"])

    def test_correlation_with_the_pair_monitor_on_its_probe(self, tmp_path, digits_data):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        x, y = digits_data
        module = MLPModule([64, 16, 10], x, y, lr=1e-2)
        pair = PairImportanceMonitor(every_n_epochs=1, probe_size=64, fidelity=False, log_images=False, backend="torch")
        monitor = InfluenceMonitor(every_n_epochs=1)  # after the pair monitor: sees this epoch's map
        logger = TensorBoardLogger(tmp_path, name="tb", version=0)
        t = trainer(tmp_path, callbacks=[pair, monitor], max_epochs=2, logger=logger)
        t.fit(module)
        px, py = pair.probe
        assert torch.equal(monitor._x, px)
        acc = EventAccumulator(t.log_dir)
        acc.Reload()
        events = acc.Scalars("swim/net.0/spearman_el2n")
        assert len(events) == 2
        record = pair.latest_record  # the map of the last epoch end (the fit-end map falls on the same step)
        assert record.step == events[-1].step == t.global_step
        rho = spearman(record.importance["net.0"], monitor.el2n)
        assert events[-1].value == pytest.approx(rho, abs=1e-6)
        torch.testing.assert_close(monitor.el2n, el2n_scores(module, px, py))
        assert "swim/net.0/spearman_tracin" in acc.Tags()["scalars"]
        # EL2N's chance reference: a uniform prediction over the 10 classes
        assert acc.Scalars("swim/influence/el2n_chance")[-1].value == pytest.approx(math.sqrt(1 - 1 / 10))
        # the pair monitor's custom-scalar layout charts the influence tags, and only tags that are written
        layout = _layout(t.log_dir)
        charted = {tag for charts in layout.values() for tags in charts.values() for tag in tags}
        influence = {tag for tag in charted if "influence" in tag or "spearman" in tag}
        assert influence == {
            "swim/influence/el2n_mean",
            "swim/influence/el2n_chance",
            "swim/influence/tracin_mean",
            "swim/net.0/spearman_el2n",
            "swim/net.0/spearman_tracin",
        }
        assert influence <= set(acc.Tags()["scalars"])
        assert any("Spearman" in title for title in layout["SWIM: layer net.0"])

    def test_without_a_public_record_the_correlation_is_skipped(self, tmp_path, digits_data):
        x, y = digits_data
        module = MLPModule([64, 16, 10], x, y, lr=1e-2)
        pair = PairImportanceMonitor(every_n_epochs=1, probe_size=48, fidelity=False, log_images=False, backend="torch")
        monitor = InfluenceMonitor()
        t = trainer(tmp_path, callbacks=[pair, monitor], max_epochs=1)
        t.fit(module)
        assert monitor.tracin is not None and monitor.tracin.shape == (48,)  # the pair monitor's probe size

    def test_state_round_trip(self, tmp_path, digits_data):
        x, y = digits_data
        module = MLPModule([64, 8, 10], x, y, lr=1e-2)
        monitor = InfluenceMonitor(probe=(x[:20], y[:20]))
        trainer(tmp_path, callbacks=[monitor], max_epochs=2).fit(module)
        state = monitor.state_dict()
        other = InfluenceMonitor(probe=(x[:20], y[:20]))
        other.load_state_dict(state)
        assert other.steps == monitor.steps
        torch.testing.assert_close(other.state_dict()["tracin"], monitor.tracin)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"every_n_epochs": 1, "every_n_train_steps": 2}, "mutually exclusive"),
            ({"el2n": False, "tracin": False}, "at least one"),
            ({"probe": torch.zeros(3, 2)}, "tuple"),
            ({"probe_size": 1}, "probe_size"),
        ],
    )
    def test_validated_in_init(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            InfluenceMonitor(**kwargs)


def _layout(log_dir: str) -> dict[str, dict[str, set[str]]]:
    """The custom-scalar layout in a run's event files: category -> chart title -> its tags."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2

    for path in Path(log_dir).glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "custom_scalars":
                    layout = layout_pb2.Layout()
                    layout.ParseFromString(value.tensor.string_val[0])
                    return {
                        cat.title: {
                            c.title: {
                                t for series in c.margin.series for t in (series.value, series.lower, series.upper)
                            }
                            for c in cat.chart
                        }
                        for cat in layout.category
                    }
    return {}

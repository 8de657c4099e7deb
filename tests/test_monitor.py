"""PairImportanceMonitor in a real Trainer: event files read back, resume, bit-identity, DDP, arguments."""

from __future__ import annotations

import ast
import copy
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers import MLPModule, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_swim import PairImportanceMonitor, load_history, load_probe, map_network
from lightning_swim._datasets import digits, log_2d
from lightning_swim._schedule import plan_steps
from lightning_swim.callbacks import pair_importance

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def data():
    xtr, ytr, _, _ = digits()
    return xtr[:300], ytr[:300]


def fit(tmp_path, module, monitor, **kwargs):
    kwargs.setdefault("logger", TensorBoardLogger(tmp_path, name="tb", version=0))
    t = trainer(tmp_path, callbacks=[monitor], **kwargs)
    t.fit(module)
    return t


def read_events(log_dir):
    from tbparse import SummaryReader

    return SummaryReader(str(log_dir), pivot=False, event_types={"scalars"})


class TestLogging:
    def test_scalars_histograms_images_and_layout_in_the_event_files(self, tmp_path, data):
        x, y = data
        module = MLPModule([64, 24, 16, 10], x, y, lr=1e-2)
        monitor = PairImportanceMonitor(every_n_epochs=1, probe_size=96, top_k=8, transport=True, n_candidates=128)
        t = fit(tmp_path, module, monitor, max_epochs=2)
        reader = read_events(t.log_dir)
        scalars = reader.scalars
        tags = set(scalars.tag)
        for layer in ("net.0", "net.2"):
            for suffix in (
                "param_cost_median",
                "func_error_median",
                "importance_entropy",
                "effective_points",
                "turnover",
                "js_divergence",
                "topk_overlap",
                "cross_class_share",
                "sinkhorn_divergence",
                "fidelity",
            ):
                assert f"swim/{layer}/{suffix}" in tags, suffix
        assert {"swim/network/fidelity_keep", "swim/network/fidelity_refit", "swim/map_seconds"} <= tags
        # maps at fit start (step 0) and after each epoch (steps 5, 10); turnover only from the second map
        steps = sorted(set(scalars[scalars.tag == "swim/net.0/effective_points"].step))
        assert steps == [0, 5, 10]
        assert sorted(scalars[scalars.tag == "swim/net.0/turnover"].step) == [5, 10]
        eff = scalars[scalars.tag == "swim/net.0/effective_points"].value
        assert ((eff >= 1) & (eff <= 96)).all()
        histograms = _histograms(Path(t.log_dir))
        for layer in ("net.0", "net.2"):
            steps_and_counts = [(h.step, h.histogram_value.num) for h in histograms[f"swim/{layer}/importance"]]
            assert steps_and_counts == [(0, 96), (5, 96), (10, 96)]  # one value per probe point, every map
        images = _images(Path(t.log_dir))
        for layer in ("net.0", "net.2"):
            for name in ("top_points", "top_pairs", "importance_over_time"):
                img = images[f"swim/{layer}/{name}"]
                assert img.size[0] > 200 and img.size[1] > 150  # a readable PNG, decoded
        assert _custom_scalar_layout(Path(t.log_dir))
        # the history on disk matches what was logged
        history = load_history(t.log_dir)
        assert [r.step for r in history] == [0, 5, 10]
        last = scalars[(scalars.tag == "swim/net.0/effective_points") & (scalars.step == 10)].value.item()
        assert abs(history[-1].scalars["swim/net.0/effective_points"] - last) < 1e-4
        px, py = load_probe(t.log_dir)
        assert px.shape == (96, 64) and py is not None and py.shape == (96,)

    @pytest.mark.parametrize(("log_images", "steps"), [("end", [10]), ("ends", [0, 10]), (True, [0, 5, 10])])
    def test_figures_at_the_maps_asked_for(self, tmp_path, data, log_images, steps):
        # the last epoch's map falls on the last step and stands in for the map at fit end
        x, y = data
        monitor = PairImportanceMonitor(every_n_epochs=1, probe_size=40, top_k=4, fidelity=False, log_images=log_images)
        t = fit(tmp_path, MLPModule([64, 8, 10], x, y), monitor, max_epochs=2)
        assert monitor._steps == [0, 5, 10]
        assert _image_steps(Path(t.log_dir), "swim/net.0/top_points") == steps
        assert _image_steps(Path(t.log_dir), "swim/net.0/importance_over_time") == steps

    def test_history_is_the_map_of_the_final_weights(self, tmp_path, data):
        x, y = data
        module = MLPModule([64, 20, 10], x, y, lr=1e-2)
        monitor = PairImportanceMonitor(every_n_epochs=1, probe_size=80, top_k=8, log_images=False)
        t = fit(tmp_path, module, monitor, max_epochs=2)
        px, _ = load_probe(t.log_dir)
        final = load_history(t.log_dir)[-1]
        direct = map_network(module, px, top_k=8)
        assert torch.equal(final.maps["net.0"].idx_from, direct["net.0"].idx_from)
        assert torch.equal(final.maps["net.0"].idx_to, direct["net.0"].idx_to)

    def test_two_dimensional_inputs_get_the_pair_figure(self, tmp_path):
        x, y = log_2d(200, seed=0, dtype=torch.float32)
        module = MLPModule([2, 16, 1], x, y, regression=True, lr=1e-2)
        monitor = PairImportanceMonitor(every_n_epochs=1, probe_size=100, top_k=8)
        t = fit(tmp_path, module, monitor, max_epochs=1)
        reader = read_events(t.log_dir)
        assert "swim/net.0/pairs" in _images(Path(t.log_dir))
        assert "swim/net.0/cross_class_share" not in set(reader.scalars.tag)  # regression targets: no classes
        fid = reader.scalars[reader.scalars.tag == "swim/network/fidelity_refit"].value
        assert (fid <= 1.0).all()

    def test_every_n_train_steps_and_other_loggers(self, tmp_path, data):
        x, y = data
        module = MLPModule([64, 12, 10], x, y)
        monitor = PairImportanceMonitor(every_n_train_steps=2, probe_size=64, top_k=4, fidelity=False)
        t = fit(tmp_path, module, monitor, max_steps=5, logger=CSVLogger(tmp_path, name="csv"))
        assert [r.step for r in load_history(t.log_dir)] == [0, 2, 4, 5]
        metrics = (Path(t.log_dir) / "metrics.csv").read_text()
        assert "swim/net.0/effective_points" in metrics

    def test_layer_patterns_and_given_probe(self, tmp_path, data):
        x, y = data
        module = MLPModule([64, 12, 8, 10], x, y)
        monitor = PairImportanceMonitor(probe=(x[:50], y[:50]), layers=["*.2"], top_k=4, log_images=False)
        t = fit(tmp_path, module, monitor, max_epochs=1)
        history = load_history(t.log_dir)
        assert list(history[0].maps) == ["net.2"]
        assert torch.equal(load_probe(t.log_dir)[0], x[:50])

    @pytest.mark.parametrize(("cost", "kept_indices"), [(0.1, list(range(20))), (0.5, [0, 3, 6, 9, 12, 15, 18, 19])])
    def test_default_schedule_plans_evenly_and_thins_to_the_budget(
        self, tmp_path, data, monkeypatch, cost, kept_indices
    ):
        # A virtual clock: a training step takes 1 s, a map `cost` s, the warm-up (compilation) 100 s.
        # 8 epochs of 5 steps: 20 maps planned at round(k 40 / 19); 10% of 40 s of training is 4 s.
        # At 0.1 s a map all 20 fit (2 s). At 0.5 s, when the second planned map is due (0.5 s spent),
        # every 3rd planned map is the densest plan whose 7 maps still fit (0.5 + 3.5 s): the second is
        # skipped, and every 3rd is kept to the end (4.0 s). The 100 s warm-up is never charged.
        clock = [0.0]
        monkeypatch.setattr(pair_importance, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
        real_analyse, real_warm_up = pair_importance.analyse_network, pair_importance.warm_up

        def analyse(*args, **kwargs):
            clock[0] += cost
            return real_analyse(*args, **kwargs)

        def warm_up(*args, **kwargs):
            clock[0] += 100.0
            return real_warm_up(*args, **kwargs)

        class Tick(pl.Callback):
            def on_train_batch_start(self, *args):
                clock[0] += 1.0

        monkeypatch.setattr(pair_importance, "analyse_network", analyse)
        monkeypatch.setattr(pair_importance, "warm_up", warm_up)
        x, y = data
        monitor = PairImportanceMonitor(probe_size=32, top_k=4, fidelity=False, log_images=False)
        said: list[str] = []
        monkeypatch.setattr(pair_importance, "rank_zero_info", said.append)
        t = trainer(tmp_path, callbacks=[Tick(), monitor], max_epochs=8, logger=TensorBoardLogger(tmp_path))
        t.fit(MLPModule([64, 8, 10], x, y))
        plan = plan_steps(40, 20)
        assert monitor._plan == plan and len(plan) == 20
        assert monitor._steps == [plan[k] for k in kept_indices]
        assert monitor._map_seconds == pytest.approx(cost * len(kept_indices))
        assert monitor._map_seconds <= 0.1 * monitor._train_seconds + 1e-9
        planned = [m for m in said if "maps planned" in m]
        assert len(planned) == 1 and "20 maps planned over 40 steps" in planned[0]
        thinned = [m for m in said if "thinned" in m]
        assert len(thinned) == (cost > 0.1)

    @pytest.mark.slow
    def test_forty_epochs_with_empty_caches_get_every_planned_map(self, tmp_path):
        """Issue 12: the default schedule on a 40-epoch fit (200 steps) in a fresh process whose compiled-kernel
        and KeOps caches start empty: the compilation happens in the warm-up, before the first map, and is
        not charged to the budget, so all 20 planned maps are made, evenly spaced, none on consecutive steps."""
        env = {
            **os.environ,
            "LIGHTNING_SWIM_KEOPS_CACHE": str(tmp_path / "keops"),
            "LIGHTNING_SWIM_CPU_KERNEL_CACHE": str(tmp_path / "kernel"),
        }
        out = subprocess.run(
            [sys.executable, str(HERE / "schedule_fit_script.py"), str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["total"] == 200 and got["plan"] == plan_steps(200, 20)
        assert got["steps"] == got["plan"]  # every planned map, at its planned step
        assert min(b - a for a, b in zip(got["steps"], got["steps"][1:], strict=False)) >= 10
        assert got["before"] == 0 < got["after_warm_up"]  # compiled in the warm-up, from an empty cache
        assert got["map_seconds"] <= 0.1 * got["train_seconds"]

    def test_epochs_are_zero_based_also_at_fit_end(self, tmp_path, data):
        # 2 epochs of 5 steps: maps at steps 0, 4, 8 and at fit end (10), during epochs 0, 0, 1, 1
        x, y = data
        monitor = PairImportanceMonitor(every_n_train_steps=4, probe_size=32, top_k=4, fidelity=False, log_images=False)
        t = fit(tmp_path, MLPModule([64, 8, 10], x, y), monitor, max_epochs=2)
        history = load_history(t.log_dir)
        assert [(r.step, r.epoch) for r in history] == [(0, 0), (4, 0), (8, 1), (10, 1)]

    def test_skipped_in_fast_dev_run(self, tmp_path, data):
        x, y = data
        module = MLPModule([64, 12, 10], x, y)
        monitor = PairImportanceMonitor(probe_size=32)
        fit(tmp_path, module, monitor, fast_dev_run=2, logger=False)
        assert monitor._steps == []


def _histograms(log_dir: Path) -> dict:
    """Histogram events by tag, with TensorBoard's EventAccumulator (tbparse needs TensorFlow for these)."""
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={HISTOGRAMS: 0})
    acc.Reload()
    return {tag: acc.Histograms(tag) for tag in acc.Tags()[HISTOGRAMS]}


def _image_steps(log_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in log_dir.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return sorted(steps)


def _images(log_dir: Path) -> dict:
    """The last image of every image tag in the event files, decoded (tbparse needs TensorFlow for this)."""
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    found = {}
    for path in log_dir.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:  # the loader turns image summaries into [w, h, png] tensors
                if value.metadata.plugin_data.plugin_name == "images":
                    found[value.tag] = Image.open(io.BytesIO(value.tensor.string_val[2]))
    return found


def _custom_scalar_layout(log_dir: Path) -> bool:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for path in log_dir.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "custom_scalars":
                    from tensorboard.plugins.custom_scalar import layout_pb2

                    layout = layout_pb2.Layout()
                    layout.ParseFromString(value.tensor.string_val[0])
                    (net0,) = [cat for cat in layout.category if cat.title == "SWIM: layer net.0"]
                    (chart,) = [c for c in net0.chart if c.title.startswith("effective number of points")]
                    series = chart.margin.series[0]  # a line with its reference shaded
                    return (series.value, series.lower) == (
                        "swim/net.0/effective_points",
                        "swim/net.0/effective_points_random_pairs",
                    )
    return False


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (558, 340)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_png_encoder_round_trips_every_pixel(shape, mode):
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (*shape, len(mode)), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode=mode)
    back = Image.open(io.BytesIO(pair_importance._png(image)))
    back.load()
    assert back.format == "PNG" and back.mode == "RGB" and back.size == image.size
    assert np.array_equal(np.asarray(back), np.asarray(image.convert("RGB")))


class TestWarmUp:
    def test_once_per_process_for_the_same_layers_and_options(self, data, monkeypatch):
        from lightning_swim import analysis

        monkeypatch.setattr(analysis, "_WARMED", set())
        ran: list[tuple[int, int]] = []
        real = analysis._map_shard
        monkeypatch.setattr(analysis, "_map_shard", lambda *a: ran.append(a[3]) or real(*a))
        x = data[0][:64]
        net = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))
        analysis.warm_up(net, x)
        analysis.warm_up(net, x)
        analysis.warm_up(copy.deepcopy(net), x)  # another model of the same layers: nothing new to compile
        assert ran == [(0, 1)]
        analysis.warm_up(net, x, shard=(1, 2))  # another share
        analysis.warm_up(net, x[:32])  # another probe size (refine="auto" may choose another search)
        analysis.warm_up(net, x, config=analysis.AnalysisConfig(refine="function"))
        analysis.warm_up(torch.nn.Sequential(torch.nn.Linear(64, 9), torch.nn.Tanh(), torch.nn.Linear(9, 10)), x)
        analysis.warm_up(net.double(), x.double())
        assert len(ran) == 6


class TestNeverDisturbsTraining:
    def _weights_after(self, tmp_path, data, callbacks):
        x, y = data
        pl.seed_everything(7, verbose=False)
        module = MLPModule([64, 16, 10], x, y, lr=1e-2)
        trainer(
            tmp_path, callbacks=callbacks, max_steps=12, max_epochs=10, logger=TensorBoardLogger(tmp_path, name="b")
        ).fit(module)
        return copy.deepcopy(module.state_dict()), torch.random.get_rng_state()

    def test_bit_identical_weights_and_rng(self, tmp_path, data):
        plain, rng_plain = self._weights_after(tmp_path / "a", data, [])
        monitor = PairImportanceMonitor(every_n_train_steps=3, probe_size=64, top_k=4, transport=True, n_candidates=64)
        watched, rng_watched = self._weights_after(tmp_path / "b", data, [monitor])
        assert len(monitor._steps) >= 4
        for k, v in plain.items():
            assert torch.equal(v, watched[k]), k
        assert torch.equal(rng_plain, rng_watched)

    def test_the_figure_thread_never_touches_the_random_streams(self, tmp_path, data, monkeypatch):
        """Figures are drawn beside training: a forward pass there would fork and restore (rewind) the global
        RNGs, or draw from them (a stochastic forward), while training draws from them."""
        import random
        import threading

        from torch.nn.modules.module import register_module_forward_pre_hook

        seen: list[str] = []

        def spy(real):
            def call(*args, **kwargs):
                seen.append(f"{real.__name__} on {threading.current_thread().name}")
                return real(*args, **kwargs)

            return call

        monkeypatch.setattr(torch, "set_rng_state", spy(torch.set_rng_state))
        monkeypatch.setattr(random, "setstate", spy(random.setstate))
        hook = register_module_forward_pre_hook(
            lambda module, args: seen.append(f"forward on {threading.current_thread().name}")
        )
        x, y = data
        monitor = PairImportanceMonitor(every_n_train_steps=4, probe_size=48, top_k=4, fidelity=False)
        try:
            fit(tmp_path, MLPModule([64, 12, 10], x, y), monitor, max_steps=12, max_epochs=10)
        finally:
            hook.remove()
        assert len(_image_steps(tmp_path / "tb" / "version_0", "swim/net.0/top_pairs"))  # figures were drawn
        assert any("main" in e.lower() for e in seen)  # the spies work: maps fork the RNGs on the training thread
        assert not [e for e in seen if "swim-figures" in e]

    def test_a_failing_map_warns_once_and_training_goes_on(self, tmp_path, data, monkeypatch):
        import lightning_swim.callbacks.pair_importance as mod

        def broken(*args, **kwargs):
            raise RuntimeError("KeOps could not compile")

        monkeypatch.setattr(mod, "analyse_network", broken)
        x, y = data
        module = MLPModule([64, 12, 10], x, y)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = fit(tmp_path, module, PairImportanceMonitor(every_n_epochs=1, probe_size=32), max_epochs=2)
        msgs = [str(w.message) for w in caught if "PairImportanceMonitor" in str(w.message)]
        assert len(msgs) == 1 and "KeOps could not compile" in msgs[0] and "training goes on" in msgs[0]
        assert t.current_epoch == 2


class _Augmented(torch.utils.data.Dataset):
    """Each item is the digit plus fresh noise from the global torch RNG (a random augmentation)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.01 * torch.randn(self.x.shape[1]), self.y[i]


class _AugmentedModule(MLPModule):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(_Augmented(self.x, self.y), batch_size=self.batch_size, shuffle=True)


class TestRobustness:
    def test_random_augmentation_in_the_dataset_is_not_disturbed(self, tmp_path, data):
        x, y = data

        def run(callbacks, root):
            pl.seed_everything(3, verbose=False)
            module = _AugmentedModule([64, 12, 10], x, y)
            trainer(root, callbacks=callbacks, max_steps=8, max_epochs=5, logger=False).fit(module)
            return copy.deepcopy(module.state_dict()), torch.random.get_rng_state()

        plain, rng = run([], tmp_path / "a")
        from lightning_swim import SWIMInit

        monitor = PairImportanceMonitor(every_n_train_steps=4, probe_size=40, top_k=4, log_images=False)
        watched, rng_watched = run([monitor], tmp_path / "b")
        assert torch.equal(rng, rng_watched)
        for k, v in plain.items():
            assert torch.equal(v, watched[k]), k
        # SWIMInit changes the weights by design, but not the data order or the augmentations drawn
        pl.seed_everything(3, verbose=False)
        _AugmentedModule([64, 12, 10], x, y).train_dataloader()
        _, rng_swim = run([SWIMInit(probe_size=40)], tmp_path / "c")
        assert torch.equal(rng, rng_swim)

    def test_a_probe_that_cannot_be_drawn_warns_and_training_goes_on(self, tmp_path, data):
        x, y = data

        class TwoLoaders(MLPModule):
            def train_dataloader(self):
                loader = super().train_dataloader()
                return {"a": loader, "b": loader}

            def training_step(self, batch, batch_idx):
                return super().training_step(batch["a"], batch_idx)

        with pytest.warns(UserWarning, match="could not draw a probe set.*training goes on"):
            t = fit(tmp_path, TwoLoaders([64, 8, 10], x, y), PairImportanceMonitor(probe_size=20), max_epochs=2)
        assert t.current_epoch == 2

    def test_a_failed_first_map_does_not_stop_later_ones(self, tmp_path, data, monkeypatch):
        import lightning_swim.callbacks.pair_importance as mod

        real = mod.analyse_network
        calls = {"n": 0}

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("transient")
            return real(*args, **kwargs)

        monkeypatch.setattr(mod, "analyse_network", flaky)
        x, y = data
        monitor = PairImportanceMonitor(max_overhead=10.0, probe_size=32, top_k=4, fidelity=False)
        with pytest.warns(UserWarning, match="transient"):
            fit(tmp_path, MLPModule([64, 8, 10], x, y), monitor, max_epochs=6)
        assert 0 not in monitor._steps and len(monitor._steps) > 1


class TestCheckpoints:
    def test_resume_continues_the_same_history(self, tmp_path, data):
        x, y = data

        def run(root, epochs, ckpt=None, every=True):
            module = MLPModule([64, 12, 10], x, y, shuffle=False)
            monitor = PairImportanceMonitor(
                every_n_epochs=1, probe_size=48, top_k=4, log_images=False, history_dir=tmp_path / root / "maps"
            )
            cb = ModelCheckpoint(dirpath=tmp_path / root / "ckpt", save_top_k=-1, every_n_epochs=1) if every else None
            t = trainer(
                tmp_path / root,
                callbacks=[monitor] + ([cb] if cb else []),
                max_epochs=epochs,
                logger=TensorBoardLogger(tmp_path / root, name="tb"),
                enable_checkpointing=every,
            )
            t.fit(module, ckpt_path=ckpt)
            return monitor

        straight = run("straight", 4)
        run("first", 3)  # interrupted after epoch 3, whose maps are on disk
        ckpt = sorted((tmp_path / "first" / "ckpt").glob("epoch=1*.ckpt"))[0]  # resume from the epoch-2 checkpoint
        resumed_monitor = PairImportanceMonitor(
            every_n_epochs=1, probe_size=48, top_k=4, log_images=False, history_dir=tmp_path / "first" / "maps"
        )
        module = MLPModule([64, 12, 10], x, y, shuffle=False)
        trainer(
            tmp_path / "first",
            callbacks=[resumed_monitor],
            max_epochs=4,
            logger=TensorBoardLogger(tmp_path / "first", name="tb"),
        ).fit(module, ckpt_path=ckpt)
        steps = [r.step for r in load_history(tmp_path / "first" / "maps")]
        assert steps == [r.step for r in load_history(tmp_path / "straight" / "maps")] == straight._steps
        assert len(steps) == len(set(steps)) == 5  # start + 4 epochs: nothing lost, nothing twice
        # the turnover after resuming compares with the map restored from the checkpoint
        resumed = load_history(tmp_path / "first" / "maps")
        assert "swim/net.0/turnover" in resumed[3].scalars

    def test_state_round_trip_and_pickle(self, tmp_path, data):
        x, y = data
        monitor = PairImportanceMonitor(every_n_epochs=1, probe_size=40, top_k=4, log_images=False)
        fit(tmp_path, MLPModule([64, 8, 10], x, y), monitor, max_epochs=1)
        state = monitor.state_dict()
        other = PairImportanceMonitor(every_n_epochs=1, probe_size=40, top_k=4, log_images=False)
        other.load_state_dict(copy.deepcopy(state))
        assert other._steps == monitor._steps and torch.equal(other._x, monitor._x)
        assert torch.equal(other._previous.maps["net.0"].idx_to, monitor._previous.maps["net.0"].idx_to)
        clone = pickle.loads(pickle.dumps(monitor))
        assert clone.state_key == monitor.state_key
        assert "'every_n_epochs': 1" in monitor.state_key

    def test_monitors_of_two_submodules_keep_separate_states(self):
        """Two monitors on one Trainer that differ only in ``module=`` must not share a checkpoint slot;
        a monitor without ``module=`` keeps the key it always had (older checkpoints still resume)."""
        a, b = PairImportanceMonitor(module="encoder"), PairImportanceMonitor(module="decoder")
        plain = PairImportanceMonitor()
        assert len({a.state_key, b.state_key, plain.state_key}) == 3
        assert "module" not in plain.state_key


class TestArguments:
    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"every_n_train_steps": 5, "every_n_epochs": 1}, "mutually exclusive"),
            ({"every_n_train_steps": 0}, "`every_n_train_steps`"),
            ({"every_n_epochs": -1}, "`every_n_epochs`"),
            ({"max_overhead": 0}, "`max_overhead`"),
            ({"probe_size": 1}, "`probe_size`"),
            ({"refine": "greedy"}, "Invalid `refine`"),
            ({"backend": "gpu"}, "Invalid `backend`"),
            ({"neuron_weights": "gradient"}, "Invalid `neuron_weights`"),
            ({"log_images": "sometimes"}, "`log_images` can be True, False, 'end' or 'ends'"),
            ({"layers": "net.0"}, "`layers`"),
            ({"image_shape": [8, 8]}, "`image_shape`"),
            ({"top_k": 0}, "`top_k`"),
            ({"probe": torch.ones(1, 3)}, "at least 2 examples"),
            ({"task": "ranking"}, "Invalid `task`"),
        ],
    )
    def test_validated_in_init(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            PairImportanceMonitor(**kwargs)

    def test_layer_patterns_that_match_nothing_warn_and_training_goes_on(self, tmp_path, data):
        x, y = data
        with pytest.warns(UserWarning, match="match none"):
            fit(
                tmp_path,
                MLPModule([64, 8, 10], x, y),
                PairImportanceMonitor(layers=["head*"], probe_size=20),
                max_epochs=1,
            )


@pytest.mark.slow
def test_ddp_on_cpu(tmp_path):
    """Two processes (gloo, Lightning's `ddp`): each rank maps one of the two hidden layers, rank zero
    gathers them and logs; the sharded map equals the single-process map exactly, tensor for tensor;
    both ranks leave every map together (same steps); SWIMInit gives both replicas one initialisation."""
    out = subprocess.run(
        [sys.executable, str(HERE / "ddp_monitor_script.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    history = load_history(tmp_path / "maps")
    assert [r.step for r in history] == [0, 3, 6]
    steps = [ast.literal_eval((tmp_path / f"rank{r}_steps.txt").read_text()) for r in (0, 1)]
    assert steps == [[0, 3, 6], [0, 3, 6]]
    shares = [ast.literal_eval((tmp_path / f"rank{r}_shares.txt").read_text()) for r in (0, 1)]
    # every map: each rank one whole layer (the wider-first deal gives ties to the lower rank)
    assert shares == [[[("net.0", 0, 12)]] * 3, [[("net.2", 0, 12)]] * 3]
    px, _ = load_probe(tmp_path / "maps")
    module = MLPModule([64, 12, 12, 10], *digits()[:2])
    module.load_state_dict(torch.load(tmp_path / "final.pt"))
    direct = map_network(module, px, top_k=4)
    assert list(history[-1].maps) == list(direct) == ["net.0", "net.2"]
    for name, pm in direct.items():
        shared = history[-1].maps[name]
        for key, value in pm.tensors().items():
            got = getattr(shared, key)
            if value is None:
                assert got is None, (name, key)
            else:  # bit for bit (NaN where a neuron is not mapped)
                torch.testing.assert_close(got, value, rtol=0, atol=0, equal_nan=True, msg=f"{name} {key}")
    # SWIMInit under DDP: both replicas start from rank zero's sample
    r0, r1 = torch.load(tmp_path / "initial_rank0.pt"), torch.load(tmp_path / "initial_rank1.pt")
    for k, v in r0.items():
        assert torch.equal(v, r1[k]), k

"""Drawing the probe set: never touching the training loader, traceable to dataset indices (issue 11 item 2,
issue 12 item 2)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from helpers import MLPModule, trainer
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lightning_swim import PairImportanceMonitor, load_history, load_probe
from lightning_swim._data import draw_probe, probe_from_dataloader
from lightning_swim._datasets import digits


@pytest.fixture(scope="module")
def data():
    xtr, ytr, _, _ = digits()
    return xtr[:240], ytr[:240]


class _NoisyStream(IterableDataset):
    """Each worker streams its share of the examples, with noise from the (worker's) global torch RNG."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        info = get_worker_info()
        k, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(k, len(self.x), n):
            yield self.x[i] + 0.05 * torch.randn(self.x.shape[1]), self.y[i]


class _StreamModule(MLPModule):
    def train_dataloader(self):
        return DataLoader(
            _NoisyStream(self.x, self.y), batch_size=self.batch_size, num_workers=2, persistent_workers=True
        )


class TestIterableDatasetWithPersistentWorkers:
    def _fit(self, root, data, callbacks):
        x, y = data
        pl.seed_everything(11, verbose=False)
        module = _StreamModule([64, 12, 10], x, y, batch_size=40)
        trainer(root, callbacks=callbacks, max_epochs=3).fit(module)
        return copy.deepcopy(module.state_dict()), torch.random.get_rng_state()

    @pytest.mark.slow
    def test_training_is_bit_identical_with_the_monitor(self, tmp_path, data):
        """The probe used to be drawn by iterating the trainer's own loader: its persistent workers were started
        and their random streams advanced, and the final weights differed (max |diff| 0.119)."""
        plain, rng = self._fit(tmp_path / "a", data, [])
        monitor = PairImportanceMonitor(every_n_epochs=1, probe_size=50, top_k=4, fidelity=False, log_images=False)
        watched, rng_watched = self._fit(tmp_path / "b", data, [monitor])
        assert len(monitor._steps) == 4  # start + 3 epochs
        assert torch.equal(rng, rng_watched)
        for k, v in plain.items():
            assert torch.equal(v, watched[k]), k
        probe = load_probe(tmp_path / "b")
        assert probe.index_source == "stream" and probe.index.tolist() == list(range(50))


class _Shuffling(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class TestTraceablePoints:
    def test_map_style_probe_rows_are_the_dataset_examples_at_their_indices(self, data):
        x, y = data
        loader = DataLoader(_Shuffling(x, y), batch_size=17, shuffle=True)
        drawn = draw_probe(loader, 30, torch.Generator().manual_seed(2))
        assert drawn.source == "dataset" and drawn.index.dtype == torch.long and len(set(drawn.index.tolist())) == 30
        assert torch.equal(drawn.x, x[drawn.index]) and torch.equal(drawn.y, y[drawn.index])
        px, py = probe_from_dataloader(loader, 30, torch.Generator().manual_seed(2))  # the old pair
        assert torch.equal(px, drawn.x) and torch.equal(py, drawn.y)

    def test_stream_without_workers_is_counted_from_its_start(self, data):
        x, y = data
        drawn = draw_probe(DataLoader(_NoisyStream(x, y), batch_size=8), 20, torch.Generator().manual_seed(0))
        assert drawn.source == "stream" and drawn.index.tolist() == list(range(20))
        torch.testing.assert_close(drawn.x, x[:20], atol=0.3, rtol=0)  # the stream's order, with its noise
        assert torch.equal(drawn.y, y[:20])

    def test_indices_round_trip_through_probe_npz_and_reach_the_records(self, tmp_path, data):
        x, y = data
        monitor = PairImportanceMonitor(every_n_epochs=1, probe_size=40, top_k=4, fidelity=False, log_images=False)
        t = trainer(tmp_path, callbacks=[monitor], max_epochs=2, logger=pl.loggers.TensorBoardLogger(tmp_path))
        t.fit(MLPModule([64, 12, 10], x, y))
        probe = load_probe(t.log_dir)
        assert probe.index_source == "dataset" and probe.index.shape == (40,)
        assert torch.equal(probe.x, x[probe.index]) and torch.equal(probe.y, y[probe.index])
        px, py = load_probe(t.log_dir)  # still unpacks as (x, y)
        assert torch.equal(py, probe.y)
        assert torch.equal(px, probe.x)
        history = load_history(t.log_dir)
        assert torch.equal(history.probe.index, probe.index)
        for record in history:
            assert torch.equal(record.probe_index, probe.index)
            pm = record.maps["net.0"]
            ok = pm.valid
            # a pair's dataset examples, through the index, are the probe rows it names
            assert torch.equal(x[record.probe_index[pm.idx_from[ok]]], probe.x[pm.idx_from[ok]])

    def test_a_given_probe_is_indexed_by_its_rows(self, tmp_path, data):
        x, y = data
        monitor = PairImportanceMonitor(probe=(x[:30], y[:30]), every_n_epochs=1, top_k=4, fidelity=False)
        t = trainer(tmp_path, callbacks=[monitor], max_epochs=1)
        t.fit(MLPModule([64, 12, 10], x, y))
        probe = load_probe(monitor.history_dir)
        assert probe.index_source == "given" and probe.index.tolist() == list(range(30))

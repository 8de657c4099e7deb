"""Batches of any format reach both callbacks: the documented keys, `batch_to_input`, `probe=`, and errors
that name the fix."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import MLPModule, trainer
from torch.utils.data import DataLoader, Dataset

from lightning_swim import PairImportanceMonitor, SWIMInit
from lightning_swim._data import draw_probe, read_batch, split_batch
from lightning_swim._datasets import digits


class _DictDataset(Dataset):
    """Examples as dicts under the given keys (what Hugging Face datasets and many DataModules give)."""

    def __init__(self, x, y, kx, ky):
        self.x, self.y, self.kx, self.ky = x, y, kx, ky

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {self.kx: self.x[i], self.ky: self.y[i], "id": i}


class _DictModule(MLPModule):
    def __init__(self, x, y, kx, ky):
        super().__init__([64, 16, 10], x, y, lr=0.0)  # lr 0: the weights stay as SWIMInit left them
        self.kx, self.ky = kx, ky

    def training_step(self, batch, batch_idx):
        return super().training_step((batch[self.kx], batch[self.ky]), batch_idx)

    def train_dataloader(self):
        return DataLoader(_DictDataset(self.x, self.y, self.kx, self.ky), batch_size=64, shuffle=True)


@pytest.fixture(scope="module")
def data():
    xtr, ytr, _, _ = digits()
    return xtr[:200], ytr[:200]


def _pixels_and_class(batch):  # module level: picklable
    return batch["pixels"], batch["class"]


class TestFormats:
    def test_the_documented_formats(self, data):
        x, y = data
        for batch in (x, (x, y), [x, y, "extra"], {"image": x, "label": y}, {"inputs": x}, {"features": x, "y": y}):
            got_x, got_y = split_batch(batch)
            assert torch.equal(got_x, x)
            assert got_y is None or torch.equal(got_y, y)
        assert split_batch({"image": x, "label": y})[1] is not None and split_batch({"inputs": x})[1] is None

    def test_an_unknown_batch_names_the_keys_and_the_fix(self, data):
        x, y = data
        with pytest.raises(TypeError, match=r"keys \['class', 'pixels'\].*`batch_to_input`.*probe=") as info:
            split_batch({"pixels": x, "class": y})
        assert "'image'" in str(info.value) and "'label'" in str(info.value)  # the accepted keys are listed

    def test_batch_to_input_and_its_errors(self, data):
        x, y = data
        batch = {"pixels": x, "class": y}
        got = read_batch(batch, _pixels_and_class)
        assert torch.equal(got[0], x) and torch.equal(got[1], y)
        assert read_batch(batch, lambda b: b["pixels"])[1] is None
        with pytest.raises(TypeError, match=r"Expected `batch_to_input` to return a tensor `x` or a pair"):
            read_batch(batch, lambda b: (b["pixels"], b["class"], b["pixels"]))
        for cls in (PairImportanceMonitor, SWIMInit):
            with pytest.raises(ValueError, match="Expected argument `batch_to_input` to be a function"):
                cls(batch_to_input="pixels")


class TestInATrainer:
    @pytest.mark.parametrize(("kx", "ky", "reader"), [("image", "label", None), ("pixels", "class", _pixels_and_class)])
    def test_dict_batches_reach_both_callbacks(self, tmp_path, data, kx, ky, reader):
        x, y = data
        module = _DictModule(x, y, kx, ky)
        fresh = copy.deepcopy(module)
        monitor = PairImportanceMonitor(
            every_n_epochs=1, probe_size=48, top_k=4, log_images=False, batch_to_input=reader
        )
        init = SWIMInit(probe_size=100, seed=3, batch_to_input=reader)
        trainer(tmp_path, max_epochs=1, callbacks=[init, monitor]).fit(module)
        # the monitor's probe: the dataset rows at its drawn indices, labels included
        assert monitor._x is not None and monitor._y is not None and len(monitor._steps) == 2
        assert torch.equal(monitor._x, x[monitor._index]) and torch.equal(monitor._y, y[monitor._index])
        # SWIMInit sampled from the same draw as from a plain loader with its seed
        plain = draw_probe(DataLoader(torch.utils.data.TensorDataset(x, y)), 100, torch.Generator().manual_seed(3))
        SWIMInit(seed=3).apply(fresh, plain.x, plain.y)
        for k, v in fresh.state_dict().items():
            torch.testing.assert_close(module.state_dict()[k], v)

    def test_an_unreadable_batch_warns_with_the_fix_and_training_goes_on(self, tmp_path, data):
        x, y = data
        monitor = PairImportanceMonitor(probe_size=48, log_images=False)
        t = trainer(tmp_path, max_epochs=1, callbacks=[monitor])
        with pytest.warns(UserWarning, match="batch_to_input"):
            t.fit(_DictModule(x, y, "pixels", "class"))
        assert monitor._steps == [] and t.current_epoch == 1

    def test_a_dict_probe_with_batch_to_input(self, tmp_path, data):
        x, y = data
        probe = {"pixels": x[:40], "class": y[:40]}
        monitor = PairImportanceMonitor(probe=probe, batch_to_input=_pixels_and_class, top_k=4, log_images=False)
        init = SWIMInit(probe=probe, batch_to_input=_pixels_and_class, seed=1)
        module = _DictModule(x, y, "pixels", "class")
        fresh = copy.deepcopy(module)
        trainer(tmp_path, max_steps=1, callbacks=[init, monitor]).fit(module)
        assert torch.equal(monitor._x, x[:40]) and torch.equal(monitor._y, y[:40])
        SWIMInit(seed=1).apply(fresh, x[:40], y[:40])
        for k, v in fresh.state_dict().items():
            torch.testing.assert_close(module.state_dict()[k], v)

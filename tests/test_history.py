"""Histories on disk (issue 11, items 5-8; issue 12, items 2 and 5): one run per history, resumes, corrupt files.

The runs are real `Trainer.fit`s of a tiny MLP on 240 digits (batch 48: 5 steps an epoch) with a map at
fit start and after every epoch, so a run of E epochs has maps at steps 0, 5, ..., 5 E.
"""

from __future__ import annotations

import hashlib
import math
import os
import pathlib
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MLPModule, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_swim import MapRecord, PairImportanceMonitor, PairMap, load_history, load_probe
from lightning_swim._datasets import digits
from lightning_swim.history import History, list_runs, remove_after, save_map, save_probe, start_run_folder


@pytest.fixture(scope="module")
def data():
    xtr, ytr, _, _ = digits()
    return xtr[:240], ytr[:240]


def _monitor(**kwargs):
    kwargs = {"every_n_epochs": 1, "probe_size": 40, "top_k": 4, "fidelity": False, "log_images": False, **kwargs}
    return PairImportanceMonitor(**kwargs)


def _module(data):
    return MLPModule([64, 12, 10], *data, batch_size=48, shuffle=False)


def _fit(root, data, monitor, *, epochs, ckpt=None, callbacks=(), **kwargs):
    t = trainer(root, callbacks=[monitor, *callbacks], max_epochs=epochs, **kwargs)
    t.fit(_module(data), ckpt_path=ckpt)
    return t


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


class TestOneRunPerHistory:
    @pytest.mark.parametrize("reuse", [True, False], ids=["one-monitor", "two-monitors"])
    def test_two_runs_in_one_root_never_share_a_history(self, tmp_path, data, reuse):
        """Two fits with logger=False in one default_root_dir (by one monitor or two) used to write into the same
        swim_maps: the second overwrote the first's maps and load_history interleaved the two runs."""
        first = _monitor()
        _fit(tmp_path, data, first, epochs=3)
        second = first if reuse else _monitor()
        _fit(tmp_path, data, second, epochs=2)
        one, two = load_history(tmp_path / "swim_maps"), load_history(tmp_path / "swim_maps-v1")
        assert [r.step for r in one] == [0, 5, 10, 15] and [r.step for r in two] == [0, 5, 10]
        assert one.run_id != two.run_id and {r.run_id for r in one} == {one.run_id}
        assert second.history_dir == tmp_path / "swim_maps-v1" and second._steps == [0, 5, 10]
        assert "swim/net.0/turnover" not in two[0].scalars  # the second run's first map compares with nothing
        with pytest.raises(ValueError, match=r"holds the histories of 2 runs(.|\n)*" + one.run_id):
            load_history(tmp_path)
        assert [r.step for r in load_history(tmp_path, run="latest")] == [0, 5, 10]
        assert load_history(tmp_path, run=one.run_id[:6]).run_id == one.run_id
        assert [r.run_id for r in list_runs(tmp_path)] == [one.run_id, two.run_id]

    def test_a_folder_holding_two_runs_is_never_mixed(self, tmp_path):
        rec = _record(step=3, run_id="aaaa")
        save_map(tmp_path, rec)
        save_map(tmp_path, _record(step=4, run_id="bbbb"))
        with pytest.raises(ValueError, match="2 runs(.|\n)*aaaa(.|\n)*bbbb"):
            load_history(tmp_path)
        assert [r.step for r in load_history(tmp_path, run="bbbb")] == [4]
        remove_after(tmp_path, 0, "aaaa")  # deletes run aaaa's maps after step 0, never bbbb's
        assert [p.name for p in sorted(tmp_path.glob("*.npz"))] == ["map_step000000004.npz"]

    def test_legacy_files_without_ids_are_one_run(self, tmp_path):
        rec = _record(step=2, run_id="")
        save_map(tmp_path, rec)
        np.savez(tmp_path / "probe.npz", x=np.zeros((6, 2), np.float32))  # an old probe.npz: x only
        history = load_history(tmp_path)
        assert [r.step for r in history] == [2] and history.run_id == ""
        x, y = load_probe(tmp_path)
        assert x.shape == (6, 2) and y is None and load_probe(tmp_path).index is None

    def test_two_runs_claiming_one_folder_at_once_get_two(self, tmp_path):
        from lightning_swim.history import ProbeSet

        x = torch.zeros(4, 2)
        a, _ = start_run_folder(tmp_path / "maps", ProbeSet(x, None, run_id="a"))
        b, _ = start_run_folder(tmp_path / "maps", ProbeSet(x, None, run_id="b"))
        assert (a.name, b.name) == ("maps", "maps-v1")
        with pytest.raises(FileExistsError):  # the claim is exclusive
            save_probe(a, x, None, run_id="c", exclusive=True)


def _record(step, run_id, m=3, n=6):
    pm = PairMap(torch.arange(m), torch.arange(m) + 1, torch.ones(m), torch.zeros(m), torch.zeros(m))
    return MapRecord(step, 0, {"h": pm}, {"h": torch.full((n,), 1 / n)}, {"swim/h/turnover": 0.5}, run_id=run_id)


class TestResume:
    def _interrupted(self, root, data, **monitor_kwargs):
        """A 3-epoch run with a checkpoint every epoch; returns the monitor and the epoch-2 checkpoint (step 10)."""
        monitor = _monitor(**monitor_kwargs)
        cb = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1)
        _fit(root, data, monitor, epochs=3, callbacks=[cb], enable_checkpointing=True, logger=TensorBoardLogger(root))
        return monitor, sorted((root / "ckpt").glob("epoch=1*.ckpt"))[0]

    @pytest.mark.slow
    def test_resume_into_a_new_logger_version(self, tmp_path, data):
        """fit(ckpt_path=...) in a new Trainer (log dir version_1): maps used to go on into version_0/swim_maps,
        deleting that run's end map, and load_history(trainer.log_dir) raised FileNotFoundError."""
        first, ckpt = self._interrupted(tmp_path, data)
        old = tmp_path / "lightning_logs" / "version_0" / "swim_maps"
        assert first.history_dir == old
        before = _digests(old)
        resumed = _monitor()
        t = _fit(tmp_path, data, resumed, epochs=4, ckpt=ckpt, logger=TensorBoardLogger(tmp_path))
        assert Path(t.log_dir).name == "version_1"
        history = load_history(t.log_dir)
        assert [r.step for r in history] == [0, 5, 10, 15, 20]  # continuous: the maps up to the checkpoint linked
        assert history.run_id == load_history(old).run_id
        assert "swim/net.0/turnover" in history[3].scalars  # compared with the map restored from the checkpoint
        assert _digests(old) == before  # version_0's files, its end map at step 15 included, untouched
        assert [r.step for r in load_history(old)] == [0, 5, 10, 15]
        # the logger root holds one run in two folders: its latest generation is the history
        root_history = load_history(tmp_path / "lightning_logs")
        assert root_history.folder == Path(t.log_dir) / "swim_maps" and [r.step for r in root_history] == [
            0,
            5,
            10,
            15,
            20,
        ]
        assert [r.generation for r in list_runs(tmp_path / "lightning_logs")] == [0, 1]
        # the resumed run's new maps are in version_1's event file
        assert _scalar_steps(Path(t.log_dir), "swim/net.0/effective_points") == [15, 20]
        assert _has_layout(Path(t.log_dir))  # the custom-scalar charts, in the new version's event file too

    def test_resume_into_the_same_folder_redoes_the_abandoned_maps(self, tmp_path, data):
        _, ckpt = self._interrupted(tmp_path, data, history_dir=tmp_path / "maps")
        (tmp_path / "maps" / ".tmp_killed.npz").write_bytes(b"half a write")
        resumed = _monitor(history_dir=tmp_path / "maps")
        _fit(tmp_path, data, resumed, epochs=4, ckpt=ckpt, logger=TensorBoardLogger(tmp_path))
        assert resumed.history_dir == tmp_path / "maps"
        assert [r.step for r in load_history(tmp_path / "maps")] == [0, 5, 10, 15, 20]
        assert not list((tmp_path / "maps").glob(".tmp_*"))  # a killed write's leftover is removed

    def test_resume_with_a_read_only_history_folder(self, tmp_path, data, read_only):
        """The clean-up at train start raised OSError outside the never-crash guard and stopped the fit."""
        _, ckpt = self._interrupted(tmp_path, data, history_dir=tmp_path / "maps")
        before = _digests(tmp_path / "maps")
        read_only(tmp_path / "maps")
        resumed = _monitor(history_dir=tmp_path / "maps")
        with pytest.warns(UserWarning, match="cannot write the map history.*training goes on"):
            t = _fit(tmp_path, data, resumed, epochs=4, ckpt=ckpt, logger=TensorBoardLogger(tmp_path))
        assert t.current_epoch == 4 and resumed._steps == [0, 5, 10, 15, 20]  # mapped and logged, not saved
        assert _digests(tmp_path / "maps") == before


@pytest.fixture
def read_only(monkeypatch):
    """Make a folder unwritable: by its mode, or where that does not bind (root), by refusing writes there."""
    folders: list[Path] = []

    def make(folder: Path) -> None:
        folders.append(folder)
        os.chmod(folder, 0o555)
        try:
            (folder / ".probe").write_bytes(b"")
        except PermissionError:
            return
        (folder / ".probe").unlink()
        _refuse_writes_in(folder, monkeypatch)

    yield make
    for folder in folders:
        os.chmod(folder, 0o755)


def _refuse_writes_in(folder: Path, monkeypatch) -> None:

    def inside(path) -> bool:
        return Path(path).resolve().is_relative_to(folder.resolve())

    def refuse(real, arg_of):
        def patched(*args, **kwargs):
            if inside(arg_of(args, kwargs)):
                raise PermissionError(13, "Permission denied", str(arg_of(args, kwargs)))
            return real(*args, **kwargs)

        return patched

    monkeypatch.setattr(pathlib.Path, "unlink", refuse(pathlib.Path.unlink, lambda a, k: a[0]))
    monkeypatch.setattr(os, "replace", refuse(os.replace, lambda a, k: a[1]))
    monkeypatch.setattr(os, "link", refuse(os.link, lambda a, k: a[1]))
    monkeypatch.setattr(tempfile, "mkstemp", refuse(tempfile.mkstemp, lambda a, k: k.get("dir", ".")))


def _scalar_steps(log_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in log_dir.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return sorted(steps)


def _has_layout(log_dir: Path) -> bool:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return any(
        value.metadata.plugin_data.plugin_name == "custom_scalars"
        for path in log_dir.glob("events.out.tfevents.*")
        for event in EventFileLoader(str(path)).Load()
        for value in event.summary.value
    )


@pytest.fixture(scope="module")
def one_history(tmp_path_factory, data):
    """A 3-epoch run's history folder (maps at steps 0, 5, 10, 15) and its TensorBoard log dir."""
    root = tmp_path_factory.mktemp("one")
    t = _fit(root, data, _monitor(), epochs=3, logger=TensorBoardLogger(root, name="tb"))
    return Path(t.log_dir) / "swim_maps"


class TestCorruptFiles:
    @pytest.fixture
    def folder(self, tmp_path, one_history):
        return Path(shutil.copytree(one_history, tmp_path / "swim_maps"))

    @pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
    def test_a_damaged_map_is_named_and_skipped(self, folder, damage):
        """One truncated or zero-length file made the whole history unloadable, with an error naming no file."""
        bad = folder / "map_step000000005.npz"
        content = bad.read_bytes()
        bad.write_bytes({"truncated": content[: len(content) // 2], "empty": b"", "garbage": b"x" * 100}[damage])
        with pytest.warns(UserWarning, match=r"1 map file\(s\) cannot be used(.|\n)*map_step000000005.npz") as rec:
            history = load_history(folder)
        assert [r.step for r in history] == [0, 10, 15]
        if damage == "empty":
            assert "zero bytes" in str(rec[0].message)
        with pytest.raises(ValueError, match="map_step000000005.npz"):
            load_history(folder, strict=True)

    def test_a_file_whose_name_and_content_disagree_is_refused(self, folder):
        shutil.copy(folder / "map_step000000005.npz", folder / "map_step000000007.npz")
        with pytest.warns(UserWarning, match="map_step000000007.npz: its name says step 7 but it holds .* step 5"):
            history = load_history(folder)
        assert [r.step for r in history] == [0, 5, 10, 15]

    def test_nothing_usable_is_an_error_naming_the_files(self, tmp_path):
        (tmp_path / "map_step000000001.npz").write_bytes(b"")
        with pytest.raises(ValueError, match=r"map_step000000001.npz: an empty file"):
            load_history(tmp_path)

    def test_a_damaged_probe_leaves_the_maps_readable(self, folder):
        (folder / "probe.npz").write_bytes(b"")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            history = load_history(folder)  # the run is named by its maps; the probe is not needed for them
        assert [r.step for r in history] == [0, 5, 10, 15] and history.probe is None


class TestWhereTheHistoryGoes:
    def test_load_history_accepts_the_logger_root_and_the_root_dir(self, tmp_path, one_history):
        tb_root = one_history.parent.parent  # <root>/tb
        for path in (one_history, one_history.parent, tb_root, tb_root.parent):
            assert [r.step for r in load_history(path)] == [0, 5, 10, 15], path
        with pytest.raises(FileNotFoundError, match="No history"):
            load_history(tmp_path)

    def test_history_and_figures_follow_the_first_tensorboard_logger(self, tmp_path, data):
        """With a CSVLogger listed first, maps went to its folder and figures to TensorBoard's."""
        csv, tb = CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")
        monitor = _monitor(log_images="end")
        t = _fit(tmp_path, data, monitor, epochs=1, logger=[csv, tb])
        assert Path(t.log_dir) == Path(csv.log_dir)
        assert monitor.history_dir == Path(tb.log_dir) / "swim_maps"
        assert [r.step for r in load_history(tb.log_dir)] == [0, 5]
        assert not (Path(csv.log_dir) / "swim_maps").exists()

    def test_to_dataframe_has_one_row_per_map_and_layer(self, one_history):
        history = load_history(one_history)
        assert isinstance(history, History) and isinstance(history, list)
        df = history.to_dataframe()
        assert len(df) == 4 and list(df["step"]) == [0, 5, 10, 15] and set(df["layer"]) == {"net.0"}
        assert set(df["run_id"]) == {history.run_id} and (df["neurons"] == 12).all()
        for row, rec in zip(df.itertuples(), history, strict=True):
            assert row.effective_points == rec.scalars["swim/net.0/effective_points"]
            assert row.map_seconds == rec.scalars["swim/map_seconds"]
        assert math.isnan(df["turnover"].iloc[0]) and df["turnover"].iloc[1:].notna().all()

"""Map histories on disk: one ``.npz`` file per map, written atomically, read without pickle.

A history belongs to one run. Every file carries the run's id (``run_id``, a random hex string
drawn when the run starts): ``probe.npz`` (the probe set the maps' indices refer to, with the
dataset index of every probe row) and one ``map_step<step>.npz`` per map. A run writes into a
folder no other run has written into: where the chosen folder (``<log_dir>/swim_maps`` by default)
holds another run's history, the run takes the next free ``swim_maps-v1``, ``swim_maps-v2``, ...
(as Lightning's checkpoints take ``-v1``), so no file of another run is ever overwritten or deleted.

A run resumed from a checkpoint keeps its id. Resumed into the folder it wrote, it continues there
(its own maps after the checkpoint's step, made by the abandoned continuation, are redone and
replaced). Resumed into another folder (a new logger version), it links (or copies) its maps up to the
checkpoint's step into the new folder, which then holds the whole continuous history, with the
``generation`` in ``probe.npz`` one higher; the old folder is left untouched.

:func:`load_history` never mixes runs: given a folder that holds several runs, or a log root with
several run folders below it, it lists them and asks which one (``run=``); the same run found in
several folders (a resume into a new version) is read from its latest generation.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
import uuid
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lightning_swim.pairmap import PairMap

if TYPE_CHECKING:  # pragma: no cover
    import pandas

__all__ = ["History", "MapRecord", "ProbeSet", "RunInfo", "list_runs", "load_history", "load_probe", "save_map"]

_FILE = re.compile(r"^map_step(\d{9})\.npz$")
_PAIRMAP_FIELDS = ("idx_from", "idx_to", "scale", "param_cost", "func_error")  # in every file
_PAIRMAP_OPTIONAL = (  # written since the exact search; older files get PairMap's defaults
    "status",
    "n_near",
    "n_near_points",
    "soft_neuron",
    "soft_from",
    "soft_to",
    "soft_weight",
)
_SEARCH_DEPTH = 3  # <root>/lightning_logs/version_0/swim_maps
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile)
INDEX_SOURCES = ("dataset", "stream", "given", "")


@dataclass
class MapRecord:
    """One map of a training run.

    Attributes:
        step: the trainer's global step when the map was made.
        epoch: the epoch.
        maps: layer name -> :class:`~lightning_swim.PairMap`.
        importance: layer name -> per-point pair importance ``[N]``.
        scalars: the logged numbers, by TensorBoard tag.
        extra: layer name -> further per-neuron or per-point arrays (e.g. the transport assignment).
        run_id: the run the map belongs to (``""`` for files written before runs had ids).
        probe_index: the dataset index of every probe row, ``[N]`` int64 (see :class:`ProbeSet`), so
            that ``probe_index[pm.idx_from]`` names the dataset examples of the pairs; None if unknown.
    """

    step: int
    epoch: int
    maps: dict[str, PairMap]
    importance: dict[str, Tensor]
    scalars: dict[str, float] = field(default_factory=dict)
    extra: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    run_id: str = ""
    probe_index: Tensor | None = None


@dataclass
class ProbeSet:
    """The probe set of a run, as :func:`load_probe` returns it.

    It behaves as the pair ``(x, y)`` that earlier versions returned: ``x, y = load_probe(path)``,
    ``load_probe(path)[0]``.

    Attributes:
        x: the probe's inputs, ``[N, ...]``.
        y: its targets (``[N]`` or ``[N, k]``), or None.
        index: ``[N]`` int64, where each probe row comes from, by ``index_source``: ``"dataset"``, the
            index into a map-style train dataset (``dataset[index[r]]``); ``"stream"``, the position in
            the first pass over an iterable dataset; ``"given"``, the row of the probe passed to the
            monitor. None for histories written before indices were saved.
        index_source: one of ``"dataset"``, ``"stream"``, ``"given"``, or ``""`` (unknown).
        run_id: the run.
    """

    x: Tensor
    y: Tensor | None
    index: Tensor | None = None
    index_source: str = ""
    run_id: str = ""

    def __iter__(self) -> Iterator[Any]:
        return iter((self.x, self.y))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> Any:
        return (self.x, self.y)[i]


@dataclass(frozen=True)
class RunInfo:
    """One run found by :func:`list_runs`: its id, folder, generation (resumes into a new folder) and steps."""

    run_id: str
    folder: Path
    generation: int
    steps: tuple[int, ...]
    created: float

    def describe(self) -> str:
        span = f"steps {self.steps[0]}..{self.steps[-1]}" if self.steps else "no map yet"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created)) if self.created else "?"
        gen = f", generation {self.generation}" if self.generation else ""
        return f"run {self.run_id or '(no id)'} in {self.folder}: {len(self.steps)} map(s), {span}{gen}, started {when}"


class History(list[MapRecord]):
    """The maps of one run in order of step (a ``list`` of :class:`MapRecord`), with the run's probe set.

    Attributes:
        run_id: the run.
        folder: the folder it was read from.
        probe: the run's :class:`ProbeSet` (None if ``probe.npz`` is missing or unreadable).
    """

    def __init__(
        self, records: list[MapRecord], run_id: str = "", folder: Path | None = None, probe: ProbeSet | None = None
    ) -> None:
        super().__init__(records)
        self.run_id, self.folder, self.probe = run_id, folder, probe

    def to_dataframe(self) -> pandas.DataFrame:
        """The logged numbers as a table: one row per map and layer.

        Columns: ``run_id``, ``step``, ``epoch``, ``layer``, ``neurons``, one column per per-layer
        quantity (``param_cost_median``, ``fidelity``, ... : the tag ``swim/<layer>/<quantity>``), and
        the network-wide numbers (``network/fidelity_keep``, ``map_seconds``, ...) repeated on each of
        the map's rows. A quantity a map did not log is NaN.

        Raises:
            ModuleNotFoundError: if pandas is not installed (``pip install pandas``).
        """
        try:
            import pandas as pd
        except ModuleNotFoundError as err:  # pragma: no cover - pandas is in the test extra
            raise ModuleNotFoundError(
                "History.to_dataframe needs pandas: `pip install pandas` (or `pip install lightning-swim[dataframe]`)."
            ) from err
        rows: list[dict[str, Any]] = []
        for rec in self:
            layer_tags = {f"swim/{name}/" for name in rec.maps}
            network = {
                tag.removeprefix("swim/"): v
                for tag, v in rec.scalars.items()
                if not any(tag.startswith(p) for p in layer_tags)
            }
            for name, pm in rec.maps.items():
                prefix = f"swim/{name}/"
                row: dict[str, Any] = {
                    "run_id": rec.run_id,
                    "step": rec.step,
                    "epoch": rec.epoch,
                    "layer": name,
                    "neurons": len(pm),
                }
                row.update({tag[len(prefix) :]: v for tag, v in rec.scalars.items() if tag.startswith(prefix)})
                row.update(network)
                rows.append(row)
        return pd.DataFrame(rows)


def new_run_id() -> str:
    """A fresh run id (from the OS's entropy: no global RNG is touched)."""
    return uuid.uuid4().hex[:12]


# -- writing ---------------------------------------------------------------------------------------


def _atomic_savez(path: Path, arrays: dict[str, Any], *, exclusive: bool = False) -> None:
    """Write ``path`` so that a reader sees the old file or the whole new one, never a part.

    With ``exclusive``, fail with ``FileExistsError`` if ``path`` exists (an atomic claim: of two
    writers, one wins).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        if not exclusive:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and fails if the name is taken
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: check, then rename
                if path.exists():
                    raise FileExistsError(f"{path} exists") from None
                os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def map_path(directory: str | os.PathLike[str], step: int) -> Path:
    return Path(directory) / f"map_step{step:09d}.npz"


def save_map(directory: str | os.PathLike[str], record: MapRecord) -> Path:
    """Write one map record to ``directory/map_step<step>.npz`` (atomically: write, then rename).

    Everything is stored in float32 or wider and int64 (numpy has no bfloat16), with the record's
    ``run_id``.
    """
    layers = list(record.maps)
    arrays: dict[str, Any] = {
        "step": np.array(record.step),
        "epoch": np.array(record.epoch),
        "run_id": np.array(record.run_id, dtype=np.str_),
        "layers": np.array(layers, dtype=np.str_),
        "activations": np.array([record.maps[n].activation for n in layers], dtype=np.str_),
        "refines": np.array([record.maps[n].refine for n in layers], dtype=np.str_),
        "scalar_names": np.array(list(record.scalars), dtype=np.str_),
        "scalar_values": np.array(list(record.scalars.values()), dtype=np.float64),
    }
    for k, name in enumerate(layers):
        for f, value in record.maps[name].tensors().items():
            arrays[f"L{k}/{f}"] = _numpy(value)
        arrays[f"L{k}/importance"] = _numpy(record.importance[name])
        for key, value in record.extra.get(name, {}).items():
            arrays[f"L{k}/extra/{key}"] = _numpy(value)
    path = map_path(directory, record.step)
    _atomic_savez(path, arrays)
    return path


def _numpy(t: Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.is_floating_point() and t.element_size() < 4:  # bfloat16 / float16: numpy cannot hold bfloat16
        t = t.float()
    return t.numpy()


def save_probe(
    directory: str | os.PathLike[str],
    x: Tensor,
    y: Tensor | None,
    *,
    index: Tensor | None = None,
    index_source: str = "",
    run_id: str = "",
    generation: int = 0,
    exclusive: bool = False,
) -> Path:
    """Write the probe set that the maps' indices refer to (``probe.npz``), with its run id.

    Args:
        directory: the history folder.
        x, y: the probe's inputs and targets.
        index: the dataset index of every row (see :class:`ProbeSet`).
        index_source: what ``index`` counts (``"dataset"``, ``"stream"`` or ``"given"``).
        run_id, generation: the run, and how many times it was resumed into a new folder.
        exclusive: fail with ``FileExistsError`` if the folder already has a ``probe.npz``.
    """
    if index_source not in INDEX_SOURCES:
        raise ValueError(f"Invalid `index_source` {index_source!r}. Must be one of {sorted(INDEX_SOURCES)}.")
    arrays: dict[str, Any] = {
        "x": _numpy(x),
        "run_id": np.array(run_id, dtype=np.str_),
        "generation": np.array(generation),
        "created": np.array(time.time()),
        "index_source": np.array(index_source, dtype=np.str_),
    }
    if y is not None:
        arrays["y"] = _numpy(y)
    if index is not None:
        arrays["index"] = index.detach().cpu().long().numpy()
    path = Path(directory) / "probe.npz"
    _atomic_savez(path, arrays, exclusive=exclusive)
    return path


# -- reading ---------------------------------------------------------------------------------------


def _text(z: Any, key: str) -> str:
    return str(z[key]) if key in z.files else ""


def _read(path: Path) -> MapRecord:
    with np.load(path, allow_pickle=False) as z:
        layers = [str(s) for s in z["layers"]]
        acts = [str(s) for s in z["activations"]]
        refines = [str(s) for s in z["refines"]] if "refines" in z.files else ["function"] * len(layers)
        maps, importance, extra = {}, {}, {}
        for k, name in enumerate(layers):
            fields = [f for f in (*_PAIRMAP_FIELDS, *_PAIRMAP_OPTIONAL) if f"L{k}/{f}" in z.files]
            tensors = {f: torch.from_numpy(z[f"L{k}/{f}"]) for f in fields}
            maps[name] = PairMap(**tensors, activation=acts[k], refine=refines[k])
            importance[name] = torch.from_numpy(z[f"L{k}/importance"])
            prefix = f"L{k}/extra/"
            extra[name] = {key[len(prefix) :]: torch.from_numpy(z[key]) for key in z.files if key.startswith(prefix)}
        scalars = {str(n): float(v) for n, v in zip(z["scalar_names"], z["scalar_values"], strict=True)}
        return MapRecord(int(z["step"]), int(z["epoch"]), maps, importance, scalars, extra, _text(z, "run_id"))


def _peek(path: Path) -> tuple[str, int]:
    """``(run_id, step)`` of a map file, reading only those two arrays."""
    with np.load(path, allow_pickle=False) as z:
        return _text(z, "run_id"), int(z["step"])


def _probe_meta(folder: Path) -> tuple[str, int, float] | None:
    """``(run_id, generation, created)`` of a folder's ``probe.npz``, or None if missing or unreadable."""
    file = folder / "probe.npz"
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            gen = int(z["generation"]) if "generation" in z.files else 0
            created = float(z["created"]) if "created" in z.files else file.stat().st_mtime
            return _text(z, "run_id"), gen, created
    except _READ_ERRORS:
        return None


def _read_probe(folder: Path) -> ProbeSet:
    with np.load(folder / "probe.npz", allow_pickle=False) as z:
        return ProbeSet(
            x=torch.from_numpy(z["x"]),
            y=torch.from_numpy(z["y"]) if "y" in z.files else None,
            index=torch.from_numpy(z["index"]) if "index" in z.files else None,
            index_source=_text(z, "index_source"),
            run_id=_text(z, "run_id"),
        )


def _map_files(folder: Path) -> list[tuple[int, Path]]:
    """``(step from the name, path)`` of the map files in ``folder``, by step."""
    found = []
    for p in folder.glob("map_step*.npz"):
        m = _FILE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def _is_history_folder(folder: Path) -> bool:
    return (folder / "probe.npz").is_file() or bool(_map_files(folder))


def _history_folders(path: Path) -> list[Path]:
    """``path`` if it is a history folder, else the history folders up to ``_SEARCH_DEPTH`` levels below."""
    if not path.exists():
        raise FileNotFoundError(f"No such folder: {path}.")
    if not path.is_dir():
        raise NotADirectoryError(f"Expected a history folder or a log directory but got the file {path}.")
    if _is_history_folder(path):
        return [path]
    found: list[Path] = []
    level = [path]
    for _ in range(_SEARCH_DEPTH):
        below: list[Path] = []
        for folder in level:
            try:
                subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
            except OSError:
                continue
            for sub in subs:
                (found if _is_history_folder(sub) else below).append(sub)
        level = below
    return found


@dataclass
class _Group:
    run_id: str
    folder: Path
    files: list[tuple[int, int, Path]] = field(default_factory=list)  # (step in name, step inside, path)
    bad: list[tuple[Path, str]] = field(default_factory=list)
    generation: int = 0
    created: float = 0.0
    has_probe: bool = False

    def info(self) -> RunInfo:
        return RunInfo(self.run_id, self.folder, self.generation, tuple(s for _, s, _ in self.files), self.created)


def _scan(folders: list[Path]) -> list[_Group]:
    groups: dict[tuple[Path, str], _Group] = {}
    for folder in folders:
        meta = _probe_meta(folder)
        probe_run = meta[0] if meta is not None else None
        if meta is not None:
            g = groups.setdefault((folder, meta[0]), _Group(meta[0], folder))
            g.generation, g.created, g.has_probe = meta[1], meta[2], True
        unreadable: list[tuple[Path, str]] = []
        for name_step, p in _map_files(folder):
            try:
                run_id, step = _peek(p)
            except _READ_ERRORS as err:
                unreadable.append((p, _reason(err, p)))
                continue
            g = groups.setdefault((folder, run_id), _Group(run_id, folder))
            g.files.append((name_step, step, p))
            if not g.has_probe:
                g.created = max(g.created, _mtime(p))
        if unreadable:  # whose they are is unknown: the folder's run (its probe's, or its only one)
            in_folder = [g for (f, _), g in groups.items() if f == folder]
            owner = next((g for g in in_folder if g.run_id == probe_run), in_folder[0] if len(in_folder) == 1 else None)
            if owner is None:
                owner = groups.setdefault((folder, ""), _Group("", folder))
            owner.bad.extend(unreadable)
    return list(groups.values())


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _reason(err: BaseException, path: Path) -> str:
    size = path.stat().st_size if path.exists() else -1
    if size == 0:
        return "an empty file (zero bytes)"
    return f"{type(err).__name__}: {err}"


def list_runs(path: str | os.PathLike[str]) -> list[RunInfo]:
    """The runs whose histories are in ``path`` (a history folder, a log directory or a logger root).

    Returns:
        One :class:`RunInfo` per run and folder, oldest first.

    Raises:
        FileNotFoundError: if there is no history there.
    """
    folders = _history_folders(Path(path))
    if not folders:
        raise FileNotFoundError(
            f"No history (probe.npz or map_step*.npz) in {path} or up to {_SEARCH_DEPTH} folder levels below it."
        )
    return sorted((g.info() for g in _scan(folders)), key=lambda r: (r.created, str(r.folder)))


def _choose(path: Path, run: str | None) -> _Group:
    folders = _history_folders(path)
    if not folders:
        raise FileNotFoundError(
            f"No history (probe.npz or map_step*.npz) in {path} or up to {_SEARCH_DEPTH} folder levels below it."
        )
    groups = [g for g in _scan(folders) if g.files or g.bad or g.has_probe]
    listing = "\n  ".join(g.info().describe() for g in sorted(groups, key=lambda g: (g.created, str(g.folder))))
    if run == "latest":
        latest = max(groups, key=lambda g: g.created)
        candidates = [g for g in groups if g.run_id == latest.run_id]
    elif run is not None:
        candidates = [g for g in groups if g.run_id == run]
        ids = {g.run_id for g in groups if run and g.run_id.startswith(run)}
        if not candidates and len(ids) == 1:  # a unique prefix
            candidates = [g for g in groups if g.run_id in ids]
        if not candidates:
            raise FileNotFoundError(f"No run {run!r} in {path}; the runs there are:\n  {listing}")
    else:
        ids = {g.run_id for g in groups}
        if len(ids) > 1:
            raise ValueError(
                f"{path} holds the histories of {len(ids)} runs; a history belongs to one run. Pass the folder of "
                f"one, or `run=` with its id (or run='latest'). The runs:\n  {listing}"
            )
        candidates = groups
    top = max(g.generation for g in candidates)
    newest = [g for g in candidates if g.generation == top]
    if len(newest) > 1:
        raise ValueError(
            f"Run {newest[0].run_id!r} was continued in {len(newest)} folders from one checkpoint; pass the folder "
            "to read:\n  " + "\n  ".join(g.info().describe() for g in newest)
        )
    return newest[0]


def load_history(path: str | os.PathLike[str], *, run: str | None = None, strict: bool = False) -> History:
    """The maps of one run, in order of step.

    Args:
        path: a history folder (``monitor.history_dir``, by default ``<log_dir>/swim_maps``), a log
            directory with one in it (``trainer.log_dir``), or a logger's root folder (e.g.
            ``lightning_logs``) with one run below it.
        run: the run to read where ``path`` holds several: its id (or a unique prefix of it), or
            ``"latest"`` (the run started last).
        strict: raise on an unreadable map file instead of skipping it with a warning.

    Returns:
        A :class:`History`: a list of :class:`MapRecord` with the run's id, folder and probe set.

    Raises:
        FileNotFoundError: if there is no history there (or no run ``run``).
        ValueError: if ``path`` holds several runs and ``run`` does not say which (the message lists
            them), or, with ``strict``, if a map file is corrupt, truncated, empty, or its name and
            content disagree on the step.
    """
    group = _choose(Path(path), run)
    bad = list(group.bad)
    records: list[MapRecord] = []
    for name_step, step, p in sorted(group.files, key=lambda t: t[1]):
        if name_step != step:
            bad.append((p, f"its name says step {name_step} but it holds the map of step {step}"))
            continue
        try:
            records.append(_read(p))
        except _READ_ERRORS as err:
            bad.append((p, _reason(err, p)))
    probe: ProbeSet | None = None
    if group.has_probe:
        try:
            probe = _read_probe(group.folder)
        except _READ_ERRORS as err:
            warnings.warn(
                f"{group.folder / 'probe.npz'} cannot be read ({err}); the maps are read without it.", stacklevel=2
            )
    if bad:
        what = "\n  ".join(f"{p}: {why}" for p, why in bad)
        if strict or not records:
            raise ValueError(f"{len(bad)} map file(s) of run {group.run_id!r} cannot be used:\n  {what}")
        warnings.warn(f"{len(bad)} map file(s) cannot be used and are skipped:\n  {what}", stacklevel=2)
    for rec in records:
        rec.run_id = group.run_id
        rec.probe_index = probe.index if probe is not None and probe.run_id == group.run_id else None
    if not records:
        raise FileNotFoundError(f"No map files (map_step*.npz) of run {group.run_id!r} in {group.folder}.")
    return History(records, group.run_id, group.folder, probe)


def load_probe(path: str | os.PathLike[str], *, run: str | None = None) -> ProbeSet:
    """The probe set of a run: a :class:`ProbeSet` (``x``, ``y``, ``index``, ...), which unpacks as ``(x, y)``.

    Args:
        path, run: as for :func:`load_history`.
    """
    group = _choose(Path(path), run)
    if not group.has_probe:
        raise FileNotFoundError(f"No readable probe.npz in {group.folder}.")
    return _read_probe(group.folder)


# -- the monitor's folder management ---------------------------------------------------------------


def _owner(folder: Path) -> str | None:
    """The run whose history ``folder`` holds: None if it holds none, ``"?"`` if that cannot be read."""
    meta = _probe_meta(folder)
    if meta is not None:
        return meta[0]
    if (folder / "probe.npz").exists():
        return "?"
    for _, p in _map_files(folder):
        with contextlib.suppress(*_READ_ERRORS):
            return _peek(p)[0]
    return "?" if _map_files(folder) else None


def _versions(base: Path) -> Iterator[Path]:
    yield base
    k = 1
    while True:
        yield base.with_name(f"{base.name}-v{k}")
        k += 1


def start_run_folder(
    base: str | os.PathLike[str],
    probe: ProbeSet,
    *,
    generation: int = 0,
    resume: tuple[str | os.PathLike[str] | None, int] | None = None,
) -> tuple[Path, int]:
    """Choose and claim the history folder of a run, writing its ``probe.npz``; returns it and its generation.

    ``base`` or the first ``base-v<k>`` that holds no history is claimed (an exclusive write of
    ``probe.npz``: two runs starting at once never share a folder). A resumed run
    (``resume=(its previous folder, the checkpoint's last map step)``) continues in a candidate that
    already holds its history, where its maps after that step are removed (the abandoned
    continuation's, about to be redone); otherwise it claims a free one, links (or copies) its maps up
    to that step from the previous folder into it, and its generation goes up by one. Leftover
    ``.tmp_*.npz`` files of killed writes are removed from the folder chosen; nothing else is deleted.
    """
    base = Path(base)
    run_id = probe.run_id
    if resume is not None:
        for folder in _versions(base):
            owner = _owner(folder)
            if owner is None:
                break
            if owner == run_id:
                remove_leftovers(folder)
                remove_after(folder, resume[1], run_id)
                if not (folder / "probe.npz").is_file():
                    _write_probe(folder, probe, generation, exclusive=False)
                return folder, generation
        generation += 1
    for folder in _versions(base):
        if _owner(folder) is not None:
            continue
        try:
            _write_probe(folder, probe, generation, exclusive=True)
        except FileExistsError:  # another run claimed it first
            continue
        remove_leftovers(folder)
        if resume is not None and resume[0] is not None:
            _link_maps(Path(resume[0]), folder, run_id, resume[1])
        return folder, generation
    raise AssertionError("unreachable")  # pragma: no cover


def _write_probe(folder: Path, probe: ProbeSet, generation: int, *, exclusive: bool) -> None:
    save_probe(
        folder,
        probe.x,
        probe.y,
        index=probe.index,
        index_source=probe.index_source,
        run_id=probe.run_id,
        generation=generation,
        exclusive=exclusive,
    )


def _link_maps(source: Path, target: Path, run_id: str, up_to: int) -> int:
    """Hard-link (or copy) the map files of ``run_id`` with step <= ``up_to`` from ``source`` into ``target``."""
    if not source.is_dir():
        warnings.warn(
            f"The history of run {run_id!r} before step {up_to} was in {source}, which is not here; {target} "
            "holds only the maps made from now on.",
            stacklevel=3,
        )
        return 0
    linked = 0
    for name_step, p in _map_files(source):
        if name_step > up_to:
            continue
        try:
            if _peek(p)[0] != run_id:
                continue
        except _READ_ERRORS:
            continue  # not copied: the reader would skip it anyway
        dest = target / p.name
        try:
            os.link(p, dest)  # files are never rewritten in place (atomic replace), so sharing is safe
        except OSError:
            shutil.copy2(p, dest)
        linked += 1
    return linked


def remove_leftovers(directory: str | os.PathLike[str]) -> int:
    """Delete ``.tmp_*.npz`` files left by writes that were killed; returns how many."""
    removed = 0
    for p in Path(directory).glob(".tmp_*.npz"):
        p.unlink(missing_ok=True)
        removed += 1
    return removed


def remove_after(directory: str | os.PathLike[str], step: int, run_id: str) -> int:
    """Delete the map files of run ``run_id`` after ``step`` (a resumed run redoes them); returns how many.

    Files of other runs are never deleted, whatever their step.
    """
    removed = 0
    for name_step, p in _map_files(Path(directory)):
        if name_step <= step:
            continue
        try:
            owner: str | None = _peek(p)[0]
        except _READ_ERRORS:
            owner = None  # unreadable: left for load_history to name (a redone map of its step replaces it)
        if owner == run_id:
            p.unlink(missing_ok=True)
            removed += 1
    return removed

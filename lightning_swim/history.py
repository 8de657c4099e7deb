"""Map histories on disk: one ``.npz`` file per map, written atomically, read without pickle."""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_swim.pairmap import PairMap

__all__ = ["MapRecord", "load_history", "load_probe", "save_map", "save_probe"]

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
    """

    step: int
    epoch: int
    maps: dict[str, PairMap]
    importance: dict[str, Tensor]
    scalars: dict[str, float] = field(default_factory=dict)
    extra: dict[str, dict[str, Tensor]] = field(default_factory=dict)


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``path`` so that a reader sees the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub mistypes **kwds
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def map_path(directory: str | os.PathLike[str], step: int) -> Path:
    return Path(directory) / f"map_step{step:09d}.npz"


def save_map(directory: str | os.PathLike[str], record: MapRecord) -> Path:
    """Write one map record to ``directory/map_step<step>.npz`` (atomically: write, then rename)."""
    layers = list(record.maps)
    arrays: dict[str, Any] = {
        "step": np.array(record.step),
        "epoch": np.array(record.epoch),
        "layers": np.array(layers, dtype=np.str_),
        "activations": np.array([record.maps[n].activation for n in layers], dtype=np.str_),
        "refines": np.array([record.maps[n].refine for n in layers], dtype=np.str_),
        "scalar_names": np.array(list(record.scalars), dtype=np.str_),
        "scalar_values": np.array(list(record.scalars.values()), dtype=np.float64),
    }
    for k, name in enumerate(layers):
        for f, value in record.maps[name].tensors().items():
            arrays[f"L{k}/{f}"] = value.detach().cpu().numpy()
        arrays[f"L{k}/importance"] = record.importance[name].detach().cpu().numpy()
        for key, value in record.extra.get(name, {}).items():
            arrays[f"L{k}/extra/{key}"] = value.detach().cpu().numpy()
    path = map_path(directory, record.step)
    _atomic_savez(path, arrays)
    return path


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
        return MapRecord(int(z["step"]), int(z["epoch"]), maps, importance, scalars, extra)


def load_history(path: str | os.PathLike[str]) -> list[MapRecord]:
    """The maps of a run, in order of step.

    Args:
        path: the history folder (``<log_dir>/swim_maps`` for :class:`PairImportanceMonitor`), or a
            log directory that contains one.

    Raises:
        FileNotFoundError: if there is no map file there.
    """
    folder = Path(path)
    if not any(_FILE.match(p.name) for p in folder.glob("map_step*.npz")) and (folder / "swim_maps").is_dir():
        folder = folder / "swim_maps"
    files = sorted((p for p in folder.glob("map_step*.npz") if _FILE.match(p.name)), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(f"No map files (map_step*.npz) in {folder}.")
    return [_read(p) for p in files]


def save_probe(directory: str | os.PathLike[str], x: Tensor, y: Tensor | None) -> Path:
    """Write the probe set that the maps' indices refer to (``probe.npz``)."""
    arrays = {"x": x.detach().cpu().numpy()}
    if y is not None:
        arrays["y"] = y.detach().cpu().numpy()
    path = Path(directory) / "probe.npz"
    _atomic_savez(path, arrays)
    return path


def load_probe(path: str | os.PathLike[str]) -> tuple[Tensor, Tensor | None]:
    """The probe set of a history folder: ``(x, y or None)``."""
    folder = Path(path)
    file = folder / "probe.npz" if (folder / "probe.npz").exists() else folder / "swim_maps" / "probe.npz"
    with np.load(file, allow_pickle=False) as z:
        return torch.from_numpy(z["x"]), torch.from_numpy(z["y"]) if "y" in z.files else None


def remove_after(directory: str | os.PathLike[str], step: int) -> int:
    """Delete map files of steps after ``step`` (a resumed run redoes them); returns how many."""
    removed = 0
    for p in Path(directory).glob("map_step*.npz"):
        m = _FILE.match(p.name)
        if m and int(m.group(1)) > step:
            p.unlink(missing_ok=True)
            removed += 1
    return removed

"""Probe sets: a fixed random sample of a training set, drawn without touching the global RNG."""

from __future__ import annotations

import contextlib
import copy
import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset


def split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(x, y)`` of a batch: a tensor, a ``(x, y, ...)`` sequence, or a mapping with ``x``/``y`` keys."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        for kx in ("x", "input", "inputs", "features"):
            if kx in batch and isinstance(batch[kx], Tensor):
                y = next((batch[k] for k in ("y", "target", "targets", "label", "labels") if k in batch), None)
                return batch[kx], y if isinstance(y, Tensor) else None
    if isinstance(batch, Sequence) and not isinstance(batch, str) and batch and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], y
    raise TypeError(
        f"Cannot find the inputs in a batch of type {type(batch).__name__}: expected a tensor, a "
        "(x, y) tuple or a dict with an 'x' key. Pass the probe set explicitly instead."
    )


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Leave torch's (CPU and CUDA), Python's and NumPy's global random states as they were.

    A dataset's ``__getitem__`` may draw random augmentations from any of them; drawing a probe
    set must not change what the training run sees afterwards.
    """
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002 - saving the legacy global
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002


@dataclass(frozen=True)
class DrawnProbe:
    """A probe set drawn from a train loader, with where each row came from (see ``ProbeSet``)."""

    x: Tensor
    y: Tensor | None
    index: Tensor  # [N] int64
    source: str  # "dataset" (index into a map-style dataset) or "stream" (position in an iterable's first pass)


def probe_from_dataloader(loader: Any, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """``(x, y)`` of :func:`draw_probe` (for callers that do not need the indices)."""
    drawn = draw_probe(loader, size, generator)
    return drawn.x, drawn.y


def draw_probe(loader: Any, size: int, generator: torch.Generator) -> DrawnProbe:
    """A probe set of ``size`` examples from a ``DataLoader``'s dataset, never from the loader itself.

    For a map-style dataset, ``size`` indices are drawn without replacement from the whole dataset
    with ``generator`` and the items collated with the loader's ``collate_fn``: the result does not
    depend on the loader's shuffling, workers or batch size, and ``index`` holds the dataset indices.

    For an iterable dataset, the first ``size`` examples of one pass over it are taken, through a
    fresh ``DataLoader`` over a copy of the dataset (``copy.deepcopy``; the dataset itself if it
    cannot be copied) with ``num_workers=0`` and the loader's batch size and ``collate_fn``: the
    training loader is never iterated, so its workers (persistent ones included) are not started and
    its streams not advanced. ``index`` holds the positions in that pass (in the main process, the
    whole stream as a single worker sees it).

    Either way every global RNG is left as it was (:func:`isolated_rng`).
    """
    with isolated_rng():
        return _probe(loader, size, generator)


def _probe(loader: Any, size: int, generator: torch.Generator) -> DrawnProbe:
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"Expected the train dataloader to be a torch DataLoader but got {type(loader).__name__}; "
            "pass the probe set explicitly."
        )
    dataset = loader.dataset
    if not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__"):
        n = len(dataset)
        take = min(size, n)
        idx = torch.randperm(n, generator=generator)[:take].sort().values
        collate = loader.collate_fn
        batch = collate([dataset[int(i)] for i in idx])
        x, y = split_batch(batch)
        return DrawnProbe(x, y, idx, "dataset")
    try:
        own = copy.deepcopy(dataset)  # state the dataset keeps while it streams stays the trainer's
    except Exception:
        own = dataset
    fresh = DataLoader(own, batch_size=loader.batch_size, collate_fn=loader.collate_fn, num_workers=0)
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    for batch in fresh:
        x, y = split_batch(batch)
        xs.append(x)
        if y is not None:
            ys.append(y)
        if sum(len(t) for t in xs) >= size:
            break
    if not xs:
        raise ValueError("The train dataloader yielded no batches; cannot draw a probe set.")
    x = torch.cat(xs)[:size]
    y = torch.cat(ys)[:size] if len(ys) == len(xs) else None
    if len(x) < size:
        warnings.warn(
            f"The train data have only {len(x)} examples; the probe set is smaller than {size}.", stacklevel=2
        )
    return DrawnProbe(x, y, torch.arange(len(x)), "stream")

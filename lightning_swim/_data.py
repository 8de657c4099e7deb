"""Probe sets: a fixed random sample of a training set, drawn without touching the global RNG."""

from __future__ import annotations

import contextlib
import copy
import random
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

INPUT_KEYS = ("x", "input", "inputs", "features", "image", "images")
"""The keys under which :func:`split_batch` looks for the inputs of a mapping batch, in this order."""
TARGET_KEYS = ("y", "target", "targets", "label", "labels")
"""The keys under which :func:`split_batch` looks for the targets of a mapping batch, in this order."""
BatchToInput = Callable[[Any], Any]


def split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(x, y)`` of a batch, read by default rules.

    A batch is read as: a tensor (the inputs ``x``, no targets); a sequence ``(x, y, ...)`` whose first
    element is a tensor (the second, if a tensor, is ``y``); or a mapping with one of the keys
    :data:`INPUT_KEYS` (``"x"``, ``"input"``, ``"inputs"``, ``"features"``, ``"image"``, ``"images"``,
    the first present) for ``x`` and optionally one of :data:`TARGET_KEYS` (``"y"``, ``"target"``,
    ``"targets"``, ``"label"``, ``"labels"``) for ``y``. Other batches need a ``batch_to_input``
    function (:func:`read_batch`) or an explicit probe set.
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        for kx in INPUT_KEYS:
            if kx in batch and isinstance(batch[kx], Tensor):
                y = next((batch[k] for k in TARGET_KEYS if k in batch), None)
                return batch[kx], y if isinstance(y, Tensor) else None
    if isinstance(batch, Sequence) and not isinstance(batch, str) and batch and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], y
    what = f"keys {sorted(map(str, batch))}" if isinstance(batch, Mapping) else f"type {type(batch).__name__}"
    raise TypeError(
        f"Cannot find the inputs in a batch with {what}: expected a tensor, an (x, y) tuple, or a dict with one "
        f"of the keys {list(INPUT_KEYS)} (and optionally one of {list(TARGET_KEYS)} for the targets). Pass "
        "`batch_to_input`, a function from a batch to `x` or `(x, y)` (e.g. `lambda b: (b['pixels'], b['class'])`), "
        "or the probe set itself (`probe=(x, y)`)."
    )


def read_batch(batch: Any, batch_to_input: BatchToInput | None) -> tuple[Tensor, Tensor | None]:
    """``(x, y)`` of a batch: ``batch_to_input(batch)`` (``x`` or ``(x, y)``) if given, else :func:`split_batch`."""
    if batch_to_input is None:
        return split_batch(batch)
    out = batch_to_input(batch)
    if isinstance(out, Tensor):
        return out, None
    pair = isinstance(out, (tuple, list)) and len(out) == 2
    if pair and isinstance(out[0], Tensor) and (out[1] is None or isinstance(out[1], Tensor)):
        return out[0], out[1]
    got = type(out).__name__ if not isinstance(out, (tuple, list)) else f"a {type(out).__name__} of {len(out)}"
    raise TypeError(f"Expected `batch_to_input` to return a tensor `x` or a pair `(x, y)` of tensors but got {got}.")


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


def probe_from_dataloader(
    loader: Any, size: int, generator: torch.Generator, *, batch_to_input: BatchToInput | None = None
) -> tuple[Tensor, Tensor | None]:
    """``(x, y)`` of :func:`draw_probe` (for callers that do not need the indices)."""
    drawn = draw_probe(loader, size, generator, batch_to_input=batch_to_input)
    return drawn.x, drawn.y


def draw_probe(
    loader: Any, size: int, generator: torch.Generator, *, batch_to_input: BatchToInput | None = None
) -> DrawnProbe:
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

    Batches are read by ``batch_to_input`` if given, else by :func:`split_batch`'s rules. Either way
    every global RNG is left as it was (:func:`isolated_rng`).
    """
    with isolated_rng():
        return _probe(loader, size, generator, batch_to_input)


def _probe(loader: Any, size: int, generator: torch.Generator, batch_to_input: BatchToInput | None) -> DrawnProbe:
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
        x, y = read_batch(batch, batch_to_input)
        return DrawnProbe(x, y, idx, "dataset")
    try:
        own = copy.deepcopy(dataset)  # state the dataset keeps while it streams stays the trainer's
    except Exception:
        own = dataset
    fresh = DataLoader(own, batch_size=loader.batch_size, collate_fn=loader.collate_fn, num_workers=0)
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    for batch in fresh:
        x, y = read_batch(batch, batch_to_input)
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

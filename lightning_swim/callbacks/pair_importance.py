"""PairImportanceMonitor: map the network to data pairs during training and log it to TensorBoard."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import io
import math
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch import Tensor
from typing_extensions import override

from lightning_swim._checks import check_positive_int, split_probe
from lightning_swim._data import draw_probe
from lightning_swim._modelio import ActivationSpec, read_model
from lightning_swim.analysis import AnalysisConfig, analyse_network, neuron_weights_of
from lightning_swim.callbacks.swim_init import module_hint
from lightning_swim.history import MapRecord, ProbeSet, new_run_id, save_map, start_run_folder

__all__ = ["PairImportanceMonitor"]

# The custom-scalar charts. TensorBoard draws every series of one run in the run's colour and tells them
# apart only by a marker, assigned in an order that changes from one TensorBoard session to the next (its
# data server lists tags in hash order), with the legend folded away; so no chart holds two series of this
# run as lines. A quantity and its references go on one "Margin" chart instead: a line for the quantity and,
# shaded, the band between its references (or between the quantity and its one reference); a quantity
# without a reference is a margin chart with an empty band. Margin charts are drawn unsmoothed, which suits
# a few dozen maps. Per layer: (title, tag suffixes), one suffix (a line) or three (line, band, band).
_QUANTITIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "fidelity, this layer rebuilt: line from its pairs, shaded down to random pairs",
        ("fidelity", "fidelity_random_pairs", "fidelity"),
    ),
    (
        "effective number of points: line from its pairs, shaded up to random pairs",
        ("effective_points", "effective_points_random_pairs", "effective_points"),
    ),
    ("turnover of the pairs since the previous map", ("turnover",)),
    ("top-k overlap of the important points with the previous map", ("topk_overlap",)),
    ("median function-space error of a neuron's pair", ("func_error_median",)),
    ("median parameter-space cost of a neuron's pair", ("param_cost_median",)),
    ("share of neurons with near-tied pairs", ("ambiguous_share",)),
    ("unmapped neurons (dead ones included)", ("unmapped_neurons",)),
    ("share of pair weight joining two classes", ("cross_class_share",)),
    ("Sinkhorn divergence to SWIM's distribution", ("sinkhorn_divergence",)),
)
_NETWORK_CHARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "fidelity, all layers rebuilt, output layer kept: line from the pairs, band from chance to random pairs",
        ("fidelity_keep", "fidelity_chance", "fidelity_keep_random_pairs"),
    ),
    (
        "fidelity, all layers rebuilt, output layer refitted: line from the pairs, band from chance to random pairs",
        ("fidelity_refit", "fidelity_chance", "fidelity_refit_random_pairs"),
    ),
)


def _chart(prefix: str, title: str, suffixes: tuple[str, ...]) -> tuple[str, list[Any]]:
    """One chart in ``SummaryWriter.add_custom_scalars``'s format: a margin chart of the tags (value, lower,
    upper), the one tag three times for a quantity without a reference."""
    tags = [f"{prefix}/{s}" for s in suffixes]
    return title, ["Margin", tags * 3 if len(tags) == 1 else tags]


class PairImportanceMonitor(Callback):
    r"""Map every dense layer to the data pairs that explain it, periodically, while the network trains.

    At fit start (after the sanity check), every ``every_n_train_steps`` steps or ``every_n_epochs``
    epochs (by default: whenever all maps of the fit, the next one and the one at fit end included,
    stay within ``max_overhead`` of the training time so far), and at fit end, the monitor runs
    :func:`~lightning_swim.analysis.analyse_network` on a fixed probe set: each hidden ``nn.Linear``
    is mapped in its own input space (:func:`~lightning_swim.map_network`), the maps give a
    per-point *pair importance*, successive maps are compared, and the network rebuilt from its
    pairs is compared with the original. Every map is also written to
    ``<log_dir>/swim_maps/map_step<step>.npz`` (atomically, readable without pickle by
    :func:`~lightning_swim.load_history`), next to ``probe.npz``.

    The probe set is given, or drawn once from the train dataset with the monitor's own generator
    (``seed``) and then fixed for the whole run, so that maps are comparable; labels are kept when the
    batches carry them. The monitor never changes training: no global RNG, no parameter, mode, grad
    state or hook is left touched, and a map that fails is skipped with one warning. Under DDP the
    maps are computed and logged by global rank zero only.

    Logged tags (``<layer>`` is the qualified name of a mapped ``nn.Linear``):

    - ``swim/<layer>/param_cost_median``, ``swim/<layer>/func_error_median``: median
      parameter-space cost and relative function-space error of the layer's mapped neurons;
    - ``swim/<layer>/unmapped_neurons``: neurons no pair explains (zero or non-finite weights, or
      dead: zero on every probe point), of which ``swim/<layer>/dead_neurons`` are dead; they are
      left out of every other number;
    - ``swim/<layer>/near_pairs_median``, ``swim/<layer>/near_points_median``: per neuron, the
      ordered pairs whose error is within ``atol`` (+ ``rtol`` of it) of the best, and the distinct
      points they use (median over neurons); ``swim/<layer>/ambiguous_share``: the share of neurons
      with more than one such pair;
    - ``swim/<layer>/importance_entropy`` (nats), ``swim/<layer>/effective_points`` (its exp), and
      ``swim/<layer>/effective_points_random_pairs``: the same for the same neurons, weights and
      soft weights on uniformly random pairs (the reference);
    - ``swim/<layer>/turnover``: share of neurons whose previous pair no longer explains them within
      the tolerance (near-tie swaps are not change); ``swim/<layer>/js_divergence``,
      ``swim/<layer>/topk_overlap``: Jensen-Shannon divergence of the importances and overlap of the
      ``topk_points`` most important points, since the previous map;
    - ``swim/<layer>/cross_class_share``: share of pair weight joining two classes (with labels);
    - ``swim/<layer>/sinkhorn_divergence``: Sinkhorn divergence of the layer to SWIM candidates
      (with ``transport=True``);
    - ``swim/<layer>/fidelity``: prediction agreement (classification) or output R² (regression) on
      the probe set of the network with only this layer rebuilt from its pairs, output layer kept,
      and ``swim/<layer>/fidelity_random_pairs``: the same rebuilt from uniformly random pairs (each
      with its best scale): the reference that says how much the mapped pairs add;
    - ``swim/network/fidelity_keep``, ``swim/network/fidelity_refit``: every mapped layer rebuilt,
      the output layer kept (the number that measures the map) or refitted to the original outputs
      on the probe (which random pairs also reach); ``..._random_pairs`` beside each; and
      ``swim/network/fidelity_chance``: the agreement of a constant predictor (the share of the
      original's most frequent prediction; 0 for regression);
    - ``swim/map_seconds``: the duration of the map;
    - histogram ``swim/<layer>/importance``: the per-point importance;
    - images (TensorBoard, :mod:`lightning_swim.plotting`, drawn for its default card size):
      ``swim/<layer>/top_points`` (the most important probe points) and ``swim/<layer>/top_pairs``
      (the pairs of the weightiest neurons), drawn as pictures for images, lines for signals and rows
      of feature cells for tabular data, or ``swim/<layer>/pairs`` (arrows) for 2-D inputs; and
      ``swim/<layer>/importance_over_time``; points named by their dataset index;
    - a custom-scalar layout: a section for the network and one per layer, a chart per quantity with
      its references shaded (only charts of what is logged).

    Args:
        every_n_train_steps: map every this many optimizer steps (exclusive with ``every_n_epochs``).
        every_n_epochs: map every this many epochs.
        max_overhead: without either, map as often as keeps the maps' time, those at fit start and
            end included, below this share of the training time (only a fit too short to pay for
            those two goes over; the steps depend on the machine's speed: give a frequency for
            reproducible schedules).
        probe: the probe set, ``x`` or ``(x, y)``; by default drawn from the train dataset.
        probe_size: examples drawn when ``probe`` is not given. A small probe keeps the maps cheap
            enough to make often (about 40 ms for the demo's network at 256 points, 70 ms at 512);
            a larger one gives a finer picture of the data (the pair search grows as its square).
        seed: seed of the probe draw and of the transport's candidate draw.
        layers: names (``fnmatch`` patterns) of the layers to map; default every ``nn.Linear`` but the
            output layer.
        activations: overrides activation detection (one for all, or by layer name).
        top_k, refine, local_search, backend, atol, rtol, temperature: options of
            :func:`~lightning_swim.map_layer`, with its defaults: the exact function-space search
            whenever it is affordable (``refine="auto"``; at the default probe of 256 points it is).
        importance: ``"soft"`` (each neuron's weight spread over its near-optimal pairs) or
            ``"argmin"`` (its best pair only).
        neuron_weights: ``"contribution"`` (:math:`|w_m| |a_m|`) or ``"uniform"`` weights of the
            neurons in the importance.
        topk_points: ``k`` of the top-k overlap and of the figure of the most important points.
        fidelity: rebuild the network from its pairs and log its fidelity.
        task: ``"classification"`` (prediction agreement) or ``"regression"`` (R²) for the fidelity;
            default from the probe's targets (integer: classification), else from the output width.
        transport: also run :func:`~lightning_swim.transport_map` on every layer.
        n_candidates, blur, reach: options of the transport.
        log_images: log the figures at every map (True), at fit end (``"end"``, the default), at fit
            start and end (``"ends"``), or never (False).
        image_shape: the shape of one example as an image, e.g. ``(1, 28, 28)`` (default: guessed from the
            probe set by :func:`~lightning_swim.plotting.guess_image_shape`: flat vectors only when their
            neighbouring pixels are correlated, so tabular data is never drawn as a pseudo-image).
        save_history: write every map to ``<log_dir>/swim_maps`` (``log_dir`` of the first
            TensorBoardLogger, else the trainer's), or the next free ``swim_maps-v<k>`` if that folder
            holds another run's history; the folder in use is ``monitor.history_dir``.
        history_dir: where to write instead (the same rule: ``<history_dir>-v<k>`` if taken).
        dtype: compute the maps in this dtype (default: the model's; float32 for half precision).
        module: the qualified name of the submodule to map, e.g. ``"net"`` for a LightningModule without
            ``forward`` whose ``training_step`` calls ``self.net(x)``; layer names are then relative to
            it. Default: the LightningModule itself. At fit start the monitor reads the model on the
            probe set once and raises, with the fix, if no map can run; hidden layers that cannot be
            mapped (a ``LayerNorm`` before the activation, an activation SWIM does not know) are
            named in one warning and skipped, the others mapped.
        output_key: selects the output tensor the fidelity compares when the model returns several: a
            dict key, a tuple index or a callable; by default the output itself, the first element of
            a tuple, or the ``"logits"`` entry of a dict.
        patches: a convolutional layer (``nn.Conv1d``, ``nn.Conv2d``) is mapped on this many of the
            ``N L`` patches of its input on the probe (``L`` locations per example), drawn once with a
            fixed generator (``seed``); its importance is summed per example, and the patches'
            examples, locations and importances are saved with every map (``extra``).

    Example::

        trainer = Trainer(callbacks=[PairImportanceMonitor(every_n_epochs=5, probe_size=1000)])
        trainer.fit(model)
        records = load_history(trainer.log_dir)
    """

    def __init__(
        self,
        *,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        max_overhead: float = 0.1,
        probe: Tensor | tuple[Tensor, Tensor | None] | None = None,
        probe_size: int = 256,
        seed: int = 0,
        layers: list[str] | None = None,
        activations: ActivationSpec = None,
        top_k: int = 128,
        refine: str = "auto",
        local_search: int = 0,
        backend: str = "auto",
        atol: float = 0.01,
        rtol: float = 0.0,
        temperature: float | None = None,
        importance: str = "soft",
        neuron_weights: str = "contribution",
        topk_points: int = 16,
        fidelity: bool = True,
        task: str | None = None,
        transport: bool = False,
        n_candidates: int = 1024,
        blur: float = 0.1,
        reach: float | None = None,
        log_images: bool | str = "end",
        image_shape: tuple[int, ...] | None = None,
        save_history: bool = True,
        history_dir: str | os.PathLike[str] | None = None,
        dtype: torch.dtype | None = None,
        module: str | None = None,
        output_key: str | int | Callable[[Any], Tensor] | None = None,
        patches: int = 4096,
    ) -> None:
        if module is not None and not isinstance(module, str):  # (issue 11.15) the submodule to map
            raise ValueError(f"Expected argument `module` to be a submodule's name but got {module!r}.")
        self.module = module
        if every_n_train_steps is not None and every_n_epochs is not None:
            raise ValueError(
                f"`every_n_train_steps` and `every_n_epochs` are mutually exclusive; got {every_n_train_steps} and "
                f"{every_n_epochs}."
            )
        check_positive_int(every_n_train_steps, "every_n_train_steps", allow_none=True)
        check_positive_int(every_n_epochs, "every_n_epochs", allow_none=True)
        if not isinstance(max_overhead, (int, float)) or not 0 < max_overhead <= 10:
            raise ValueError(f"Expected argument `max_overhead` in (0, 10] but got {max_overhead!r}.")
        check_positive_int(probe_size, "probe_size", minimum=2)
        if log_images not in (True, False, "end", "ends"):
            raise ValueError(f"`log_images` can be True, False, 'end' or 'ends', got {log_images!r}.")
        if image_shape is not None and (
            not isinstance(image_shape, tuple) or not all(isinstance(s, int) for s in image_shape)
        ):
            raise ValueError(f"Expected argument `image_shape` to be a tuple of ints but got {image_shape!r}.")
        if layers is not None and (isinstance(layers, str) or not all(isinstance(p, str) for p in layers)):
            raise ValueError(f"Expected argument `layers` to be a list of layer names or patterns but got {layers!r}.")
        self.config = AnalysisConfig(  # validates the map and transport options
            activations=activations,
            top_k=top_k,
            refine=refine,
            local_search=local_search,
            backend=backend,
            atol=atol,
            rtol=rtol,
            temperature=temperature,
            importance=importance,
            neuron_weights=neuron_weights,
            topk_points=topk_points,
            fidelity=fidelity,
            task=task,
            transport=transport,
            n_candidates=n_candidates,
            blur=blur,
            reach=reach,
            seed=seed,
            dtype=dtype,
            output_key=output_key,
            patches=patches,
        )
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.max_overhead = float(max_overhead)
        self.probe_size = probe_size
        self.seed = seed
        self.layer_patterns = list(layers) if layers is not None else None
        self.log_images = log_images
        self.image_shape = image_shape
        self.save_history = save_history
        self._history_root = Path(history_dir) if history_dir is not None else None
        self._given_probe = self._split_probe(probe)
        self._state_key = self._generate_state_key(
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=every_n_epochs,
            max_overhead=self.max_overhead,
            layers=self.layer_patterns,
            seed=seed,
        )
        # state (saved in checkpoints)
        self._x: Tensor | None = None
        self._y: Tensor | None = None
        self._previous: MapRecord | None = None
        self._steps: list[int] = []
        self._importances: dict[str, list[Tensor]] = {}
        self._failed: set[str] = set()
        self._layout_written = False
        self._fit_start: float | None = None  # perf_counter at this fit's start; its maps' total and last time
        self._map_seconds = 0.0
        self._last_map_seconds = 0.0
        self._figures_step: int | None = None
        # the run's identity and its history folder (see `_begin_run`, `_start_history`)
        self.history_dir: Path | None = None  # the folder this run writes to (set at train start)
        self._run_id: str | None = None
        self._generation = 0
        self._index: Tensor | None = None
        self._index_source = ""
        self._resume: tuple[str | None, int, int] | None = None  # (old folder, last map step, generation)
        self._run_trainer: weakref.ref[pl.Trainer] | None = None

    @staticmethod
    def _split_probe(probe: Any) -> tuple[Tensor, Tensor | None] | None:
        return None if probe is None else split_probe(probe, "probe")

    @property
    @override
    def state_key(self) -> str:
        return self._state_key  # Lightning reads it at every hook: computed once, in __init__

    # -- when ------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers) and trainer.loggers:
            rank_zero_info(
                "PairImportanceMonitor: no TensorBoardLogger; scalars go to the loggers, figures and histograms are "
                "not logged."
            )

    def _skip(self, trainer: pl.Trainer) -> bool:
        # `fast_dev_run` is set on the Trainer at init (Lightning's own callbacks read it the same way)
        return bool(trainer.sanity_checking or getattr(trainer, "fast_dev_run", False))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._skip(trainer):
            return
        self._fit_start, self._map_seconds, self._last_map_seconds = time.perf_counter(), 0.0, 0.0
        self._begin_run(trainer)
        if self._x is None:
            try:
                self._draw_probe(trainer)
            except Exception as err:  # the monitor never stops training
                self._warn_once(err, "could not draw a probe set; no map will be made")
                return
        self._check_model(pl_module)  # (issue 11.15) a map that cannot run is a configuration error
        self._start_history(trainer)
        if not self._steps:  # a resumed run continues its history: no extra map at its start
            self._run(trainer, pl_module, "start")

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._skip(trainer) or (self._steps and self._steps[-1] == trainer.global_step):
            return  # (several batches per step under gradient accumulation)
        n = self.every_n_train_steps
        if (n is not None and trainer.global_step % n == 0) or self._budget_allows():
            self._run(trainer, pl_module, "step")

    def _budget_allows(self) -> bool:
        """Without a fixed frequency: map if the maps so far, the next and the one at fit end (each as
        long as the last) stay within ``max_overhead`` of the training time since fit start."""
        if self.every_n_train_steps is not None or self.every_n_epochs is not None or self._fit_start is None:
            return False
        training = time.perf_counter() - self._fit_start - self._map_seconds
        return self._map_seconds + 2 * self._last_map_seconds <= self.max_overhead * training

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = self.every_n_epochs
        if n is None or self._skip(trainer) or (trainer.current_epoch + 1) % n != 0:
            return
        if self._steps and self._steps[-1] == trainer.global_step:
            return
        self._run(trainer, pl_module, "epoch")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._skip(trainer):
            return
        if not (self._steps and self._steps[-1] == trainer.global_step):
            self._run(trainer, pl_module, "end")
        elif self._previous is not None and self._figures_step != trainer.global_step and self._figures_due("end"):
            try:  # the last scheduled map fell on the last step: it is the end map, figures included
                self._log_figures(trainer, pl_module, self._previous)
            except Exception as err:
                self._warn_once(err, "the figures at fit end failed")

    # -- what ------------------------------------------------------------------------------------

    def _draw_probe(self, trainer: pl.Trainer) -> None:
        """The given probe, or ``probe_size`` examples of the train dataset drawn with the monitor's seed from
        the dataset itself (:func:`~lightning_swim._data.draw_probe`): the trainer's loader is never iterated."""
        if self._given_probe is not None:
            self._x, self._y = self._given_probe
            self._index, self._index_source = torch.arange(len(self._x)), "given"
            return
        loader = trainer.train_dataloader
        drawn = draw_probe(loader, self.probe_size, torch.Generator().manual_seed(self.seed))
        self._x, self._y, self._index, self._index_source = drawn.x, drawn.y, drawn.index, drawn.source

    # -- the model to map (issues 11.15, 13.4) ------------------------------------------------------

    def _target(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError as err:
            children = [n for n, _ in pl_module.named_children()]
            raise MisconfigurationException(
                f"PairImportanceMonitor: `module={self.module!r}` names no submodule of {type(pl_module).__name__}; "
                f"its submodules are {children}."
            ) from err

    def _check_model(self, pl_module: pl.LightningModule) -> None:
        """Read the model on a few probe rows: raise, with the fix, if no map can run; name skipped layers once."""
        if self._x is None:
            return
        target = self._target(pl_module)
        try:
            reading = read_model(
                target,
                self._x[: min(len(self._x), 8)],
                activations=self.config.activations,
                output_key=self.config.output_key,
            )
            if self.config.fidelity:
                _ = reading.output  # the output tensor can be found
        except Exception as err:
            hint = "" if self.module is not None else " " + module_hint(target, "PairImportanceMonitor")
            raise MisconfigurationException(
                f"PairImportanceMonitor cannot map {type(target).__name__}: {type(err).__name__}: {err}{hint}"
            ) from err
        names = [la.name for la in reading.layers]
        pats = self.layer_patterns
        wanted = [la for la in reading.hidden if pats is None or any(fnmatch.fnmatchcase(la.name, p) for p in pats)]
        if pats is None and not any(la.mappable for la in wanted):  # (patterns matching nothing: each map warns)
            why = "; ".join(f"{la.name!r}: {la.reason}" for la in wanted) or f"it has only an output layer ({names})"
            raise MisconfigurationException(
                f"PairImportanceMonitor cannot map any layer of {type(target).__name__}: {why}."
                + ("" if self.module is not None else " " + module_hint(target, "PairImportanceMonitor"))
            )
        skipped = "; ".join(f"{la.name!r}: {la.reason}" for la in wanted if not la.mappable)
        if skipped:
            rank_zero_warn(f"PairImportanceMonitor: these layers cannot be mapped and are skipped ({skipped}).")
        no_bias = [la.name for la in wanted if la.mappable and not la.has_bias]
        if self.config.fidelity and no_bias:
            rank_zero_warn(
                f"PairImportanceMonitor: layers {no_bias} have no bias: they are mapped, but keep their weights in the "
                "networks rebuilt for the fidelity (a SWIM neuron needs a bias)."
            )

    # -- (end of the model to map) -----------------------------------------------------------------

    # -- the run and its history folder ----------------------------------------------------------

    def _begin_run(self, trainer: pl.Trainer) -> None:
        """A fit restored from a checkpoint resumes its run; another fit of the same trainer continues it;
        any other fit (this monitor used by a new Trainer) is a new run, with a fresh state and history."""
        continuing = self._run_trainer is not None and self._run_trainer() is trainer
        if self._run_id is not None and self._resume is None and not continuing:
            self._x = self._y = self._index = self._previous = None
            self._index_source, self._steps, self._importances, self._failed = "", [], {}, set()
            self._layout_written, self._figures_step = False, None
            self._run_id, self._generation, self.history_dir = None, 0, None
        if self._run_id is None:
            self._run_id = new_run_id()
        self._run_trainer = weakref.ref(trainer)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_run_trainer"] = None  # a weak reference (to tell a new Trainer from the same one) cannot be pickled
        return state

    def _log_dir(self, trainer: pl.Trainer) -> Path:
        """The first TensorBoardLogger's log dir (where the figures go), else the trainer's."""
        tb = self._tb_logger(trainer)
        if tb is not None:
            return Path(tb.log_dir)
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _start_history(self, trainer: pl.Trainer) -> None:
        """Claim this run's history folder and write its probe (rank zero). Never raises: a folder that
        cannot be written is reported once, and the maps are then logged but not saved."""
        resume, self._resume = self._resume, None
        if not self.save_history or not trainer.is_global_zero or self._x is None or self.history_dir is not None:
            return
        assert self._run_id is not None
        base = self._history_root if self._history_root is not None else self._log_dir(trainer) / "swim_maps"
        probe = ProbeSet(self._x, self._y, self._index, self._index_source, self._run_id)
        try:
            if resume is not None:
                old, last_step, generation = resume
                folder, self._generation = start_run_folder(base, probe, generation=generation, resume=(old, last_step))
            else:
                folder, self._generation = start_run_folder(base, probe)
        except Exception as err:  # e.g. a read-only folder: the monitor never stops training
            self._warn_once(err, f"cannot write the map history under {base}; maps are logged but not saved")
            return
        self.history_dir = folder
        if folder != base:
            rank_zero_info(f"PairImportanceMonitor: {base} holds another run's history; this run writes to {folder}.")

    def _history_path(self, trainer: pl.Trainer) -> Path | None:
        """The folder this run's maps are written to (None if none could be claimed)."""
        return self.history_dir

    def _save_record(self, trainer: pl.Trainer, record: MapRecord) -> None:
        """Write a map into the run's history folder; a failed write is reported once, never raised."""
        if not self.save_history or self.history_dir is None:
            return
        record.run_id = self._run_id or ""
        try:
            save_map(self.history_dir, record)
        except Exception as err:
            self._warn_once(err, f"cannot write the map of step {record.step} to {self.history_dir}; it is logged only")

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        if not trainer.is_global_zero or self._x is None:
            return
        t0 = time.perf_counter()
        try:
            patterns = tuple(self.layer_patterns) if self.layer_patterns is not None else None
            config = dataclasses.replace(self.config, layers=patterns)  # resolved on the map's one reading
            with self._progress(trainer) as progress:
                record = analyse_network(
                    self._target(pl_module),
                    self._x,
                    self._y,
                    config=config,
                    previous=self._previous,
                    step=trainer.global_step,
                    epoch=trainer.current_epoch,
                    progress=progress,
                )
            self._log(trainer, record)
            self._save_record(trainer, record)
            self._previous = record
            self._steps.append(record.step)
            for name, imp in record.importance.items():
                self._importances.setdefault(name, []).append(imp.float())
            if self._figures_due(when):
                self._log_figures(trainer, pl_module, record)
            elapsed = time.perf_counter() - t0
            if elapsed > 5:
                n_layers, step = len(record.maps), record.step
                rank_zero_info(f"PairImportanceMonitor: mapped {n_layers} layer(s) at step {step} in {elapsed:.1f} s.")
        except Exception as err:  # a map never stops training
            self._warn_once(err, f"the map at step {trainer.global_step} failed and is skipped")
        finally:  # also after a failure: the overhead budget counts the time spent
            self._last_map_seconds = time.perf_counter() - t0
            self._map_seconds += self._last_map_seconds

    def _warn_once(self, err: Exception, what: str) -> None:
        key = type(err).__name__
        if key not in self._failed:
            self._failed.add(key)
            rank_zero_warn(f"PairImportanceMonitor: {what}; training goes on. {key}: {err}")

    @contextlib.contextmanager
    def _progress(self, trainer: pl.Trainer) -> Iterator[Callable[[str], None] | None]:
        """A transient spinner with the map's current stage, when the trainer shows progress."""
        if trainer.progress_bar_callback is None or not sys.stdout.isatty():
            yield None
            return
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True)
        try:
            bar.start()
        except Exception:  # another live display (RichProgressBar) owns the console: no spinner then
            yield None
            return
        try:
            task = bar.add_task(f"SWIM map at step {trainer.global_step}")
            yield lambda stage: bar.update(task, description=f"SWIM map at step {trainer.global_step}: {stage}")
        finally:
            bar.stop()

    # -- logging ---------------------------------------------------------------------------------

    def _log(self, trainer: pl.Trainer, record: MapRecord) -> None:
        scalars = {k: v for k, v in record.scalars.items() if math.isfinite(v)}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=record.step)
        writer = self._writer(trainer)
        if writer is None:
            return
        if not self._layout_written:
            writer.add_custom_scalars(self._layout(list(record.maps)))
            self._layout_written = True
        for name, imp in record.importance.items():
            writer.add_histogram(f"swim/{name}/importance", imp.float(), global_step=record.step)

    @staticmethod
    def _tb_logger(trainer: pl.Trainer) -> TensorBoardLogger | None:
        """The first TensorBoardLogger: figures, histograms and the history follow it (other loggers get scalars)."""
        return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)

    def _writer(self, trainer: pl.Trainer) -> Any:
        tb = self._tb_logger(trainer)
        return tb.experiment if tb is not None else None

    def _figures_due(self, when: str) -> bool:
        figures_at = {True: ("start", "step", "epoch", "end"), "end": ("end",), "ends": ("start", "end")}
        return when in figures_at.get(self.log_images, ())

    def _layout(self, layers: list[str]) -> dict[str, Any]:
        """The custom-scalar layout: a category for the whole network, then one per layer, with a chart per
        quantity and its references (see ``_QUANTITIES``); only charts of what this monitor logs.

        TensorBoard (2.21) draws a category's margin charts last first: they are listed in reverse.
        """
        skip = set()
        if not self.config.fidelity:
            skip |= {"fidelity", "fidelity_random_pairs"}
        if not self.config.transport:
            skip.add("sinkhorn_divergence")
        if self._y is None or self._y.is_floating_point():  # no class labels: no cross-class share
            skip.add("cross_class_share")
        network = [_chart("swim/network", t, s) for t, s in _NETWORK_CHARTS] if self.config.fidelity else []
        network.append(_chart("swim", "seconds per map", ("map_seconds",)))
        layout = {"SWIM: whole network": dict(reversed(network))}
        for name in layers:
            charts = [_chart(f"swim/{name}", t, s) for t, s in _QUANTITIES if not skip.intersection(s)]
            layout[f"SWIM: layer {name}"] = dict(reversed(charts))
        return layout

    def _log_figures(self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: MapRecord) -> None:
        """The figures of ``record``, the last map made (its importance is the last in the history).

        Per layer: the most important points and the pairs of the weightiest neurons (drawn as images,
        signals or rows of feature cells, see :mod:`lightning_swim.plotting`), or the pair arrows of 2-D
        inputs, and the importance over training; points are named by their dataset index.
        """
        from lightning_swim import plotting

        writer = self._writer(trainer)
        if writer is None:
            return
        self._figures_step = record.step
        assert self._x is not None
        x, y, index = self._x, self._y, self._index
        shape = self.image_shape or plotting.guess_image_shape(tuple(x.shape[1:]), x)
        layers = read_model(self._target(pl_module), x[:2], activations=self.config.activations).layers
        k = self.config.topk_points
        step = record.step
        for name, pm in record.maps.items():
            imp = record.importance[name]
            omega = neuron_weights_of(layers, name, self.config.neuron_weights)
            figs: dict[str, Any] = {}
            conv = next((la for la in layers if la.name == name), None)
            if conv is not None and conv.locations > 1:  # a convolution: its pairs are patches of examples
                from lightning_swim.patches import top_patch_pairs

                figs["top_points"] = plotting.top_points(
                    x, imp, shape, k=k, y=y, index=index, title=f"{name}: the most important examples, step {step}"
                )
                figs["top_pairs"] = top_patch_pairs(
                    x,
                    pm,
                    layers,
                    name,
                    neuron_weights=omega,
                    k=min(6, k),
                    y=y,
                    index=index,
                    title=f"{name}: the top patch pairs at step {step}",
                )
            elif len(imp) != len(x):  # the layer's points are not the probe's examples
                pass
            elif shape is None and x.ndim == 2 and x.shape[1] == 2:
                figs["pairs"] = plotting.pair_arrows(
                    x, pm, importance=imp, neuron_weights=omega, y=y, title=f"{name}: its pairs at step {step}"
                )
            else:
                figs["top_points"] = plotting.top_points(
                    x, imp, shape, k=k, y=y, index=index, title=f"{name}: the most important points, step {step}"
                )
                figs["top_pairs"] = plotting.top_pairs(
                    x,
                    pm,
                    shape,
                    neuron_weights=omega,
                    k=6,
                    y=y,
                    index=index,
                    title=f"{name}: the pairs of its weightiest neurons, step {step}",
                )
            figs["importance_over_time"] = plotting.importance_heatmap(
                self._importances[name], self._steps, title=f"{name}: pair importance over training", index=index, y=y
            )
            for key, fig in figs.items():
                if isinstance(fig, Image.Image):
                    _add_png(writer, f"swim/{name}/{key}", fig, step)
                else:
                    writer.add_figure(f"swim/{name}/{key}", fig, global_step=step, close=False)

    # -- what other callbacks read ----------------------------------------------------------------

    @property
    def latest_record(self) -> MapRecord | None:
        """The last map of this run (``None`` before the first): its pairs, importances and scalars."""
        return self._previous

    @property
    def probe(self) -> tuple[Tensor, Tensor | None] | None:
        """The probe set ``(x, y)`` the maps index (``None`` before it is drawn at fit start)."""
        return None if self._x is None else (self._x, self._y)

    # -- checkpoints -----------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        prev = None
        if self._previous is not None:
            prev = {
                "step": self._previous.step,
                "epoch": self._previous.epoch,
                "maps": {n: {**pm.tensors(), "activation": pm.activation} for n, pm in self._previous.maps.items()},
                "importance": self._previous.importance,
            }
        return {
            "x": self._x,
            "y": self._y,
            "steps": list(self._steps),
            "importances": self._importances,
            "previous": prev,
            "history_dir": str(self.history_dir) if self.history_dir is not None else None,
            "run_id": self._run_id,
            "generation": self._generation,
            "index": self._index,
            "index_source": self._index_source,
            "layout_written": self._layout_written,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from lightning_swim.pairmap import PairMap

        self._x, self._y = state_dict["x"], state_dict["y"]
        self._steps = list(state_dict["steps"])
        self._importances = {k: list(v) for k, v in state_dict["importances"].items()}
        prev = state_dict["previous"]
        if prev is not None:
            maps = {n: PairMap(**d) for n, d in prev["maps"].items()}
            self._previous = MapRecord(prev["step"], prev["epoch"], maps, dict(prev["importance"]))
        # the run resumes: at train start its history continues in its folder, or in a new one that gets a
        # link to its maps up to here (a new logger version); the abandoned continuation's maps are redone
        self._run_id = state_dict.get("run_id") or ""  # "": a checkpoint from before runs had ids
        self._generation = int(state_dict.get("generation", 0))
        self._index, self._index_source = state_dict.get("index"), state_dict.get("index_source", "")
        last = self._steps[-1] if self._steps else -1
        self._resume = (state_dict.get("history_dir"), last, self._generation)
        self.history_dir = None
        self._layout_written = False  # the resumed fit may log to a new event file (a new logger version)


def _add_png(writer: Any, tag: str, image: Image.Image, step: int) -> None:
    """Log an RGB image, PNG-encoded at a low compression level (a third of the time of ``add_image``)."""
    from torch.utils.tensorboard import SummaryWriter

    if not isinstance(writer, SummaryWriter):  # e.g. tensorboardX's writer, with its own protos
        writer.add_image(tag, np.asarray(image), global_step=step, dataformats="HWC")
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    png = Summary.Image(height=image.height, width=image.width, colorspace=3, encoded_image_string=buffer.getvalue())
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=png)]), step)

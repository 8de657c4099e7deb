"""InfluenceMonitor: EL2N and TracIn self-influence of a probe set during training, next to pair importance."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_swim._checks import check_frequency, check_positive_int, check_probe
from lightning_swim._data import draw_probe
from lightning_swim._modelio import model_device_dtype
from lightning_swim._tensorboard import speed_up
from lightning_swim.evaluate import spearman
from lightning_swim.influence import LossFn, TracInAccumulator, _eval_mode, el2n_scores

__all__ = ["InfluenceMonitor"]


class InfluenceMonitor(Callback):
    r"""Log the influence baselines EL2N and TracIn self-influence of a probe set while the network trains.

    At the end of every ``every_n_epochs`` epochs (or every ``every_n_train_steps`` steps), on rank
    zero, the monitor computes the probe set's EL2N (:func:`~lightning_swim.influence.el2n_scores`,
    the current network only; class labels needed) and adds the current network as a TracIn
    checkpoint (:class:`~lightning_swim.influence.TracInAccumulator`: :math:`\eta_t \lVert\nabla_\theta
    \ell(z_i;\theta_t)\rVert^2` with the learning rates read from the optimizers' parameter groups).

    If a :class:`~lightning_swim.callbacks.PairImportanceMonitor` is attached to the same Trainer, its
    latest map is read through its public ``latest_record`` attribute (a
    :class:`~lightning_swim.history.MapRecord`, or None before the first map) and the Spearman
    correlation of each layer's pair importance with EL2N and TracIn is logged, so the two views
    stand side by side in TensorBoard. The correlation needs both monitors to score the *same*
    probe: this monitor then uses the other's ``probe`` attribute if it has one, else draws its probe
    with the other's ``probe_size`` and ``seed`` (the same draw as the other's default probe). A pair
    monitor given an explicit probe needs the same probe here.

    Logged tags:

    - ``swim/influence/el2n``, ``swim/influence/tracin``: histograms of the probe's EL2N and
      accumulated TracIn;
    - ``swim/influence/el2n_mean``, ``swim/influence/tracin_mean``: their means, and
      ``swim/influence/el2n_chance``: the EL2N of a uniform prediction over the ``C`` classes,
      :math:`\sqrt{1 - 1/C}` (the chance reference);
    - ``swim/<layer>/spearman_el2n``, ``swim/<layer>/spearman_tracin``: Spearman's :math:`\rho` of the
      layer's latest pair importance with EL2N and TracIn on the probe (0: unrelated), when a
      ``PairImportanceMonitor`` with a ``latest_record`` is attached.

    Attributes:
        el2n: the latest EL2N of the probe, ``[N]`` (None before the first checkpoint).
        tracin: the accumulated TracIn self-influence of the probe, ``[N]`` (None before the first).
        steps: the global steps of the checkpoints so far.

    Args:
        every_n_epochs: checkpoint every this many epochs (default 1 when neither frequency is given).
        every_n_train_steps: checkpoint every this many optimizer steps instead.
        probe: the probe set ``(x, y)`` (labels or targets needed).
        probe_size: examples drawn from the train dataset when no probe is given or found.
        seed: seed of that draw.
        el2n: compute EL2N (classification only).
        tracin: accumulate TracIn.
        loss_fn: per-example loss of TracIn (default: cross-entropy for class labels, MSE for floats).

    Example::

        trainer = Trainer(callbacks=[PairImportanceMonitor(every_n_epochs=5), InfluenceMonitor(every_n_epochs=5)])
    """

    def __init__(
        self,
        *,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        probe: tuple[Tensor, Tensor] | None = None,
        probe_size: int = 256,
        seed: int = 0,
        el2n: bool = True,
        tracin: bool = True,
        loss_fn: LossFn | None = None,
    ) -> None:
        check_frequency(every_n_train_steps, every_n_epochs)
        check_positive_int(probe_size, "probe_size", minimum=2)
        if not (el2n or tracin):
            raise ValueError("Expected at least one of `el2n` and `tracin` to be True.")
        if probe is not None:
            if not isinstance(probe, tuple) or len(probe) != 2:
                raise ValueError("Expected argument `probe` to be a tuple `(x, y)`: both scores need targets.")
            check_probe(probe[0], "probe")
            if not isinstance(probe[1], Tensor) or probe[1].shape[0] != probe[0].shape[0]:
                raise ValueError("Expected the probe's targets `y` to be a tensor with one row per example.")
        self.every_n_epochs = every_n_epochs if every_n_epochs is not None or every_n_train_steps else 1
        self.every_n_train_steps = every_n_train_steps
        self.probe_size = probe_size
        self.seed = seed
        self.compute_el2n = el2n
        self.compute_tracin = tracin
        self.loss_fn = loss_fn
        self._given = probe
        self._x: Tensor | None = None
        self._y: Tensor | None = None
        self._acc: TracInAccumulator | None = None
        self._pending_tracin: Tensor | None = None  # restored from a checkpoint before the probe exists
        self.el2n: Tensor | None = None
        self.steps: list[int] = []
        self._warned: set[str] = set()
        self._state_key = self._generate_state_key(
            every_n_epochs=self.every_n_epochs, every_n_train_steps=every_n_train_steps, seed=seed
        )

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    @property
    def tracin(self) -> Tensor | None:
        return self._acc.scores if self._acc is not None and self._acc.n_checkpoints else None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(f"InfluenceMonitor: {message}")

    @staticmethod
    def _pair_monitor(trainer: pl.Trainer) -> Any:
        from lightning_swim.callbacks.pair_importance import PairImportanceMonitor

        return next((cb for cb in trainer.callbacks if isinstance(cb, PairImportanceMonitor)), None)  # type: ignore[attr-defined]

    def _draw_probe(self, trainer: pl.Trainer) -> None:
        if self._given is not None:
            self._x, self._y = self._given
            return
        pair = self._pair_monitor(trainer)
        shared = getattr(pair, "probe", None) if pair is not None else None
        if isinstance(shared, tuple) and len(shared) == 2 and isinstance(shared[0], Tensor):
            self._x, self._y = shared
            return
        size, seed = (pair.probe_size, pair.seed) if pair is not None else (self.probe_size, self.seed)
        drawn = draw_probe(trainer.train_dataloader, size, torch.Generator().manual_seed(seed))  # as the pair monitor
        self._x, self._y = drawn.x, drawn.y

    # -- when ------------------------------------------------------------------------------------

    def _skip(self, trainer: pl.Trainer) -> bool:
        return bool(trainer.sanity_checking or getattr(trainer, "fast_dev_run", False)) or not trainer.is_global_zero

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        n = self.every_n_train_steps
        if n is None or self._skip(trainer) or trainer.global_step % n != 0:
            return
        if self.steps and self.steps[-1] == trainer.global_step:
            return
        self._checkpoint(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = self.every_n_epochs
        if n is None or self._skip(trainer) or (trainer.current_epoch + 1) % n != 0:
            return
        if self.steps and self.steps[-1] == trainer.global_step:
            return
        self._checkpoint(trainer, pl_module)

    # -- what ------------------------------------------------------------------------------------

    def _checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            if self._x is None:
                self._draw_probe(trainer)
            x, y = self._x, self._y
            if x is None or y is None:
                self._warn_once("labels", "the probe set has no labels or targets; nothing to compute.")
                return
            scalars: dict[str, float] = {}
            if self.compute_el2n and not y.is_floating_point():
                self.el2n = el2n_scores(pl_module, x, y)
                scalars["swim/influence/el2n_mean"] = float(self.el2n.mean())
                classes = _n_classes(pl_module, x, y)
                scalars["swim/influence/el2n_chance"] = math.sqrt(1 - 1 / classes)
            if self.compute_tracin:
                if self._acc is None:
                    self._acc = TracInAccumulator(x, y, loss_fn=self.loss_fn)
                    if self._pending_tracin is not None:
                        self._acc.load_state_dict({"scores": self._pending_tracin, "n_checkpoints": len(self.steps)})
                self._acc.update(pl_module, list(trainer.optimizers))
                scalars["swim/influence/tracin_mean"] = float(self._acc.scores.mean())
            self.steps.append(trainer.global_step)
            scalars.update(self._correlations(trainer, x.shape[0]))
            self._log(trainer, scalars)
        except Exception as err:  # the monitor never stops training
            self._warn_once(type(err).__name__, f"a checkpoint failed and is skipped; training goes on. {err}")

    def _correlations(self, trainer: pl.Trainer, n: int) -> dict[str, float]:
        pair = self._pair_monitor(trainer)
        if pair is None:
            return {}
        record = pair.latest_record
        out: dict[str, float] = {}
        if record is None:
            return out
        for layer, imp in record.importance.items():
            if imp.shape[0] != n:
                self._warn_once("probe", "the pair monitor's probe differs from this one; no correlations.")
                return {}
            for key, score in (("el2n", self.el2n), ("tracin", self.tracin)):
                if score is not None:
                    rho = spearman(imp, score)
                    if math.isfinite(rho):
                        out[f"swim/{layer}/spearman_{key}"] = rho
        return out

    def _log(self, trainer: pl.Trainer, scalars: dict[str, float]) -> None:
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        writer = next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if writer is None:
            return
        speed_up(writer)  # records checksummed by the compiled kernel: the same bytes, faster
        if self.el2n is not None:
            writer.add_histogram("swim/influence/el2n", self.el2n.float(), global_step=step)
        if self.tracin is not None:
            writer.add_histogram("swim/influence/tracin", self.tracin.float(), global_step=step)

    # -- checkpoints -----------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "x": self._x,
            "y": self._y,
            "tracin": self._acc.scores if self._acc is not None else self._pending_tracin,
            "steps": list(self.steps),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._x, self._y = state_dict["x"], state_dict["y"]
        self.steps = list(state_dict["steps"])
        self._acc = None
        self._pending_tracin = state_dict["tracin"]


def _n_classes(model: nn.Module, x: Tensor, y: Tensor) -> int:
    """The number of classes ``C`` of a classifier: the width of its logits on one probe example (at least
    the labels' count); one forward pass in eval mode, every module's mode restored."""
    device, dtype = model_device_dtype(model)
    xb = x[:1].to(device=device, dtype=dtype) if x.is_floating_point() else x[:1].to(device)
    with _eval_mode(model), torch.no_grad():
        width = int(model(xb).shape[-1])
    return max(width, int(y.max()) + 1, 2)

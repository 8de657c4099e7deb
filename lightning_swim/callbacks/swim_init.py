"""SWIMInit: sample a network's dense layers from data pairs, as a function and as a callback."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_swim._checks import check_choice, check_positive_int, check_probe, check_targets, split_probe
from lightning_swim._data import BatchToInput, probe_from_dataloader, read_batch
from lightning_swim._modelio import (
    ActivationSpec,
    LayerReading,
    Replacement,
    compute_dtype,
    read_model,
    submodule,
    submodules_with_layers,
)
from lightning_swim._solve import ridge_lstsq
from lightning_swim.sampling import TASKS, sample_pairs, swim_neurons

__all__ = ["SWIMInit"]


def output_targets(y: Tensor, out_features: int) -> Tensor:
    """Least-squares targets ``[N, out_features]`` for the output layer: one-hot rows for integer labels."""
    if not y.is_floating_point() and y.ndim == 1:
        labels = y.long()
        if out_features == 1:
            return labels.unsqueeze(1).double()
        if int(labels.min()) < 0 or int(labels.max()) >= out_features:
            raise ValueError(
                f"Expected class labels in [0, {out_features - 1}] for an output layer of "
                f"{out_features} units but got labels in [{int(labels.min())}, {int(labels.max())}]."
            )
        return torch.nn.functional.one_hot(labels, out_features).double()
    t = y.reshape(y.shape[0], -1).double()
    if t.shape[1] != out_features:
        raise ValueError(f"Expected targets with {out_features} column(s), one per output unit, but got {t.shape[1]}.")
    return t


def _output_solver(output: LayerReading, y: Tensor, ridge: float) -> Callable[[Tensor], Replacement]:
    """The output layer solved by ridge least squares to the targets, from its input in the sampled network."""

    def derive(h: Tensor) -> Replacement:
        h = h.to(compute_dtype(h.dtype))
        w0 = output.parameters()[0]
        t = output_targets(y.to(h.device), w0.shape[0])
        w, b = ridge_lstsq(h, t, ridge)
        return Replacement(w, b, torch.ones(w.shape[0], dtype=torch.bool, device=w.device))

    return derive


def module_hint(model: nn.Module, callback: str) -> str:
    """How to name the module to map when ``model``'s own forward does not take the data."""
    names = submodules_with_layers(model)
    example = names[0] if names else "net"
    return (
        f"If the forward of {type(model).__name__} does not take the data (e.g. a LightningModule without `forward` "
        f"whose `training_step` calls `self.{example}(x)`), name the module that does: `{callback}(module={example!r})`"
        + (f" (submodules with nn.Linear layers: {names})." if names else ".")
    )


class SWIMInit(Callback):
    r"""Initialise a network's dense layers with SWIM (Bolager et al., 2023).

    Every hidden ``nn.Linear`` (every one but the last called by ``forward``) is sampled layer by
    layer: its neurons are the SWIM neurons (:func:`~lightning_swim.swim_neurons`) of pairs drawn with
    :func:`~lightning_swim.sample_pairs` from its own input space, i.e. the activations of the layers
    before it, already sampled, on the probe data. With targets and ``fit_output=True`` the output
    layer is then solved by ridge least squares (:math:`\lambda` = ``ridge`` times the mean eigenvalue
    of the centred feature Gram matrix): one-hot rows for class labels, the values for regression.

    Use it as a function, ``SWIMInit(...).apply(model, x, y)``, or as a Lightning callback: at the
    start of fit it applies itself to the LightningModule with the ``probe`` set, or with ``probe_size``
    examples drawn from the train dataset with its own seeded generator. Batches are read by
    ``batch_to_input`` if given, else as a tensor ``x``, a sequence ``(x, y, ...)``, or a mapping with
    one of the keys ``"x"``, ``"input"``, ``"inputs"``, ``"features"``, ``"image"``, ``"images"`` (the
    inputs) and optionally one of ``"y"``, ``"target"``, ``"targets"``, ``"label"``, ``"labels"``
    (the targets).

    Activations are detected from what consumes each layer's output (modules such as ``nn.ReLU`` and
    functional calls in ``forward`` alike); pass ``activations`` where they cannot be.

    Args:
        task: how pairs are scored: ``"regression"``, ``"classification"`` or ``"uniform"``; by
            default inferred from the targets (none: uniform; integer: classification).
        activations: one activation for every hidden layer, or a mapping from layer name to
            activation, overriding detection.
        layers: names of the hidden layers to sample (default: all); the others keep their weights
            and are still applied when later layers' inputs are computed.
        fit_output: solve the output layer by ridge least squares when targets are given.
        ridge: relative ridge regularisation of that solve.
        candidates_per_point: candidate pairs scored per point and per ``ceil(width / N)``, as
            ``swimnetworks``' ``repetition_scaler``.
        probe_size: examples drawn from the train data when used as a callback.
        probe: the data to sample from when used as a callback, ``x`` or ``(x, y)`` (or a batch that
            ``batch_to_input`` reads); by default ``probe_size`` examples of the train dataset.
        batch_to_input: a function from a batch of the train loader (after its ``collate_fn``) to its
            inputs ``x``, or ``(x, y)``, e.g. ``lambda b: (b["pixels"], b["class"])``.
        seed: seed of the generator used for the probe set and every pair draw.
        batch_size: forward the probe set in batches of this size (default: all at once).
        module: the qualified name of the submodule to initialise, e.g. ``"net"`` for a LightningModule
            without ``forward`` whose ``training_step`` calls ``self.net(x)``; layer names are then
            relative to it. Default: the model itself.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
        >>> pairs = SWIMInit(seed=0).apply(model, x, x.sum(1, keepdim=True))
        >>> list(pairs), tuple(pairs["0"][0].shape)
        (['0'], (8,))
    """

    def __init__(
        self,
        *,
        task: str | None = None,
        activations: ActivationSpec = None,
        layers: list[str] | None = None,
        fit_output: bool = True,
        ridge: float = 1e-8,
        candidates_per_point: int = 1,
        probe_size: int = 1000,
        seed: int = 0,
        batch_size: int | None = None,
        module: str | None = None,
        probe: Any = None,
        batch_to_input: BatchToInput | None = None,
    ) -> None:
        if task is not None:
            check_choice(task, "task", TASKS)
        if not isinstance(ridge, (int, float)) or ridge < 0:
            raise ValueError(f"Expected argument `ridge` to be a number >= 0 but got {ridge!r}.")
        check_positive_int(candidates_per_point, "candidates_per_point")
        check_positive_int(probe_size, "probe_size", minimum=2)
        check_positive_int(batch_size, "batch_size", allow_none=True)
        if not isinstance(seed, int):
            raise ValueError(f"Expected argument `seed` to be an int but got {seed!r}.")
        if module is not None and not isinstance(module, str):
            raise ValueError(f"Expected argument `module` to be a submodule's name but got {module!r}.")
        if batch_to_input is not None and not callable(batch_to_input):
            raise ValueError(
                f"Expected argument `batch_to_input` to be a function from a batch to `x` or `(x, y)` but got "
                f"{batch_to_input!r}."
            )
        if probe is not None:
            if batch_to_input is not None and not isinstance(probe, (Tensor, tuple, list)):
                probe = read_batch(probe, batch_to_input)
            probe = split_probe(probe, "probe")
        self.probe: tuple[Tensor, Tensor | None] | None = probe
        self.batch_to_input = batch_to_input
        self.task = task
        self.activations = activations
        self.layers = list(layers) if layers is not None else None
        self.fit_output = fit_output
        self.ridge = float(ridge)
        self.candidates_per_point = candidates_per_point
        self.probe_size = probe_size
        self.seed = seed
        self.batch_size = batch_size
        self.module = module

    def apply(self, model: nn.Module, x: Tensor, y: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """Sample the hidden layers of ``model`` from pairs of ``x`` (and solve its output layer).

        The model is read once (:func:`~lightning_swim._modelio.read_model`), then one more forward
        pass samples every layer in call order from its input in the network sampled so far (forward
        hooks) and the new weights are written at the end, through an eval-mode ``BatchNorm`` folded
        into a layer and through ``weight_norm``. Hidden layers that cannot be sampled (no activation
        SWIM knows, a ``LayerNorm`` before it, no bias, ``spectral_norm``) keep their weights, with one
        warning that names them; naming one in ``layers`` is an error.

        Args:
            model: a module whose forward takes ``x`` (with ``module``, the LightningModule holding it).
            x: the data, ``[N, ...]``.
            y: targets ``[N]`` (labels or values) or ``[N, k]``; optional.

        Returns:
            Layer name -> ``(idx_from, idx_to)``: the indices into ``x`` of each neuron's pair, for the
            layers it sampled and wrote (and only those); for a convolution, indices into the ``N L``
            patches of its input (example ``q // L``, location ``q % L``), whose pairs are pairs of patches.
        """
        x = check_probe(x)
        if y is not None:
            y = check_targets(y, x.shape[0])
        task = self.task or ("uniform" if y is None else ("regression" if y.is_floating_point() else "classification"))
        if task != "uniform" and y is None:
            raise ValueError(f"`task={task!r}` needs targets `y`; pass them or use task='uniform'.")
        target = self._target(model)
        try:
            reading = read_model(target, x, activations=self.activations, batch_size=self.batch_size, capture=False)
        except (RuntimeError, ValueError) as err:
            if self.module is not None:
                raise
            raise type(err)(f"SWIMInit cannot read the model: {err} {module_hint(target, 'SWIMInit')}") from err
        hidden = reading.select(self.layers, hidden_only=True)
        skipped = {} if self.layers is not None else reading.skipped()
        output = reading.output_layer
        chosen = []
        for layer in hidden:
            why = reading.unwritable(layer)
            if why is None:
                chosen.append(layer)
            elif self.layers is not None:
                raise ValueError(f"Cannot sample layer {layer.name!r}: {why}.")
            else:
                skipped[layer.name] = why
        if skipped:
            items = "; ".join(f"{name!r}: {why}" for name, why in skipped.items())
            if not chosen:
                raise ValueError(f"SWIMInit cannot sample any hidden layer of {type(target).__name__}: {items}.")
            warnings.warn(
                f"SWIMInit: layers not sampled, they keep their weights ({items}).", UserWarning, stacklevel=2
            )
        fit_output = self.fit_output and y is not None
        if fit_output and (why := output.kind.problem(output.module) or reading.unwritable(output)) is not None:
            raise ValueError(f"Cannot solve the output layer {output.name!r}: {why}; pass fit_output=False to keep it.")
        generator = torch.Generator().manual_seed(self.seed)
        pairs: dict[str, tuple[Tensor, Tensor]] = {}
        derive = {layer.name: self._sampler(layer, y, task, generator, pairs) for layer in chosen}
        if fit_output:
            assert y is not None
            derive[output.name] = _output_solver(output, y, self.ridge)
        replacements, _ = reading.run(derive, batch_size=self.batch_size, keep_output=False)
        reading.write(replacements)  # all or nothing
        return pairs

    def _target(self, model: nn.Module) -> nn.Module:
        return submodule(model, self.module)

    def _sampler(
        self,
        layer: LayerReading,
        y: Tensor | None,
        task: str,
        generator: torch.Generator,
        pairs: dict[str, tuple[Tensor, Tensor]],
    ) -> Callable[[Tensor], Replacement]:
        act = layer.activation
        assert act is not None

        def derive(h: Tensor) -> Replacement:
            h = h.to(compute_dtype(h.dtype))
            width = layer.parameters()[0].shape[0]
            n_cand = h.shape[0] * max(1, -(-width // h.shape[0])) * self.candidates_per_point
            # a convolution's points are the L patches of every example: each has its example's target
            targets = y if y is None or layer.locations == 1 else y.repeat_interleave(layer.locations, dim=0)
            try:
                i, j = sample_pairs(h, targets, width, task=task, candidates=n_cand, generator=generator)
            except ValueError as err:
                raise ValueError(f"Layer {layer.name!r}: {err}") from err
            w, b = swim_neurons(h[i], h[j], act)
            pairs[layer.name] = (i, j)
            return Replacement(w, b, torch.ones(width, dtype=torch.bool, device=w.device))

        return derive

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is not None:
            rank_zero_info("SWIMInit: resuming from a checkpoint, so the restored weights are kept.")
            return
        if self.probe is not None:
            x, y = self.probe
        else:
            if trainer.train_dataloader is None:
                trainer.fit_loop.setup_data()  # what Trainer.estimated_stepping_batches does, too
            x, y = probe_from_dataloader(
                trainer.train_dataloader,
                self.probe_size,
                torch.Generator().manual_seed(self.seed),
                batch_to_input=self.batch_to_input,
            )
        pairs = self.apply(pl_module, x, y)
        if trainer.world_size > 1:
            # DDP broadcast the initial weights when it wrapped the model, before this hook: make every
            # replica start from rank zero's sample (probes differ per rank with sharded datasets)
            state = trainer.strategy.broadcast({k: v.detach().cpu() for k, v in pl_module.state_dict().items()}, src=0)
            with torch.no_grad():
                for k, v in pl_module.state_dict().items():
                    v.copy_(state[k].to(v.device))
        rank_zero_info(
            f"SWIMInit: sampled {len(pairs)} hidden layer(s) from {len(x)} probe examples"
            + (" and solved the output layer." if self.fit_output and y is not None else ".")
        )

"""SWIMInit: sample a network's dense layers from data pairs, as a function and as a callback."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_swim._checks import check_choice, check_positive_int, check_probe, check_targets
from lightning_swim._data import probe_from_dataloader
from lightning_swim._modelio import (
    ActivationSpec,
    LinearLayer,
    capture_inputs,
    linear_layers,
    preserved,
    require_activation,
)
from lightning_swim._solve import ridge_lstsq
from lightning_swim.activations import Activation
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


class SWIMInit(Callback):
    r"""Initialise a network's dense layers with SWIM (Bolager et al., 2023).

    Every hidden ``nn.Linear`` (every one but the last called by ``forward``) is sampled layer by
    layer: its neurons are the SWIM neurons (:func:`~lightning_swim.swim_neurons`) of pairs drawn with
    :func:`~lightning_swim.sample_pairs` from its own input space, i.e. the activations of the layers
    before it, already sampled, on the probe data. With targets and ``fit_output=True`` the output
    layer is then solved by ridge least squares (:math:`\lambda` = ``ridge`` times the mean eigenvalue
    of the centred feature Gram matrix): one-hot rows for class labels, the values for regression.

    Use it as a function, ``SWIMInit(...).apply(model, x, y)``, or as a Lightning callback: at the
    start of fit it draws ``probe_size`` examples from the train dataset with its own seeded
    generator and applies itself to the LightningModule.

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
        seed: seed of the generator used for the probe set and every pair draw.
        batch_size: forward the probe set in batches of this size (default: all at once).

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
        self.task = task
        self.activations = activations
        self.layers = list(layers) if layers is not None else None
        self.fit_output = fit_output
        self.ridge = float(ridge)
        self.candidates_per_point = candidates_per_point
        self.probe_size = probe_size
        self.seed = seed
        self.batch_size = batch_size

    def apply(self, model: nn.Module, x: Tensor, y: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """Sample the hidden layers of ``model`` from pairs of ``x`` (and solve its output layer).

        Args:
            model: a module whose forward takes ``x``.
            x: the data, ``[N, ...]``.
            y: targets ``[N]`` (labels or values) or ``[N, k]``; optional.

        Returns:
            Layer name -> ``(idx_from, idx_to)``: the indices into ``x`` of each neuron's pair.
        """
        x = check_probe(x)
        if y is not None:
            y = check_targets(y, x.shape[0])
        task = self.task or ("uniform" if y is None else ("regression" if y.is_floating_point() else "classification"))
        if task != "uniform" and y is None:
            raise ValueError(f"`task={task!r}` needs targets `y`; pass them or use task='uniform'.")
        layers = linear_layers(model, x[: min(len(x), 8)], self.activations)
        hidden, output = layers[:-1], layers[-1]
        if self.layers is not None:
            known = {layer.name for layer in hidden}
            unknown = sorted(set(self.layers) - known)
            if unknown:
                raise ValueError(
                    f"`layers` names {unknown}, which are not hidden nn.Linear layers; they are {sorted(known)}."
                )
            hidden = [layer for layer in hidden if layer.name in self.layers]
        acts = {layer.name: require_activation(layer) for layer in hidden}
        for layer in hidden:
            if layer.module.bias is None:
                raise ValueError(f"Layer {layer.name!r} has no bias; a SWIM neuron needs one.")
        fit_output = self.fit_output and y is not None
        if fit_output and output.module.bias is None:
            raise ValueError(f"Output layer {output.name!r} has no bias; pass fit_output=False to keep it.")
        touched = [layer.module for layer in hidden] + ([output.module] if fit_output else [])
        backup = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in touched]
        generator = torch.Generator().manual_seed(self.seed)
        pairs: dict[str, tuple[Tensor, Tensor]] = {}
        try:
            with preserved(model):
                for layer in hidden:
                    pairs[layer.name] = self._sample_layer(model, layer, acts[layer.name], x, y, task, generator)
                if fit_output:
                    assert y is not None
                    h = capture_inputs(model, x, [output.name], batch_size=self.batch_size)[output.name]
                    t = output_targets(y.to(h.device), output.module.out_features)
                    w, b = ridge_lstsq(h, t, self.ridge)
                    output.module.weight.copy_(w)
                    output.module.bias.copy_(b)
        except BaseException:
            with torch.no_grad():  # leave the model as it was found
                for m, state in zip(touched, backup, strict=True):
                    m.load_state_dict(state)
            raise
        return pairs

    def _sample_layer(
        self,
        model: nn.Module,
        layer: LinearLayer,
        act: Activation,
        x: Tensor,
        y: Tensor | None,
        task: str,
        generator: torch.Generator,
    ) -> tuple[Tensor, Tensor]:
        h = capture_inputs(model, x, [layer.name], batch_size=self.batch_size)[layer.name]
        width = layer.module.out_features
        n_cand = h.shape[0] * max(1, -(-width // h.shape[0])) * self.candidates_per_point
        try:
            i, j = sample_pairs(h, y, width, task=task, candidates=n_cand, generator=generator)
        except ValueError as err:
            raise ValueError(f"Layer {layer.name!r}: {err}") from err
        w, b = swim_neurons(h[i], h[j], act)
        layer.module.weight.copy_(w)
        layer.module.bias.copy_(b)
        return i, j

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is not None:
            rank_zero_info("SWIMInit: resuming from a checkpoint, so the restored weights are kept.")
            return
        if trainer.train_dataloader is None:
            trainer.fit_loop.setup_data()  # what Trainer.estimated_stepping_batches does, too
        x, y = probe_from_dataloader(
            trainer.train_dataloader, self.probe_size, torch.Generator().manual_seed(self.seed)
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

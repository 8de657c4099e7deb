"""Reading a model: its dense layers in call order, the activation after each, and their inputs.

Everything here runs the model forward on a probe set in eval mode under ``torch.no_grad`` and puts
it back exactly as it was found (mode of every submodule, no hooks left behind). Activations are
detected by watching what consumes each ``nn.Linear``'s output, with a ``TorchFunctionMode``, so
activation modules (``nn.ReLU()``) and functional calls in ``forward`` (``F.relu(self.fc(x))``,
``x.tanh()``) are both seen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_swim.activations import ACTIVATIONS, Activation, get_activation

ActivationSpec = str | Activation | Mapping[str, str | Activation] | None


@dataclass(frozen=True)
class LinearLayer:
    """One ``nn.Linear`` of a model, in the order the forward pass calls it.

    Attributes:
        name: qualified module name (``model.get_submodule(name)``).
        module: the layer.
        activation: the activation that follows it, or ``None`` if it is not followed by one SWIM
            supports.
        follower: what was seen consuming its output (``"relu"``, ``"gelu"``, ``"add"``, ``"output"``).
    """

    name: str
    module: nn.Linear
    activation: Activation | None
    follower: str


class _StopForward(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a hook once everything wanted from the forward pass has been captured."""


_PASS_THROUGH = {
    F.dropout,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    F.dropout1d,
    torch.dropout,
    Tensor.contiguous,
    Tensor.clone,
    Tensor.detach,
}


def _classify(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Activation | None, str]:
    name = getattr(func, "__name__", repr(func)).rstrip("_")
    if name == "leaky_relu":
        slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
        return Activation.leaky_relu(float(slope)), name
    if name in ACTIVATIONS:
        return ACTIVATIONS[name], name
    return None, name


class _FollowerRecorder(TorchFunctionMode):
    """Records, for every tracked tensor, the first torch function that consumes it."""

    def __init__(self) -> None:
        super().__init__()
        self.tracked: dict[int, str] = {}
        self.keep: list[Tensor] = []  # keep tracked tensors alive so that their ids stay unique
        self.found: dict[str, tuple[Activation | None, str]] = {}

    def track(self, tensor: Tensor, name: str) -> None:
        self.tracked[id(tensor)] = name
        self.keep.append(tensor)

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        first = args[0] if args else kwargs.get("input")
        if isinstance(first, Tensor) and isinstance(out, Tensor) and id(first) in self.tracked:
            name = self.tracked[id(first)]
            if name not in self.found:
                if func in _PASS_THROUGH and out.shape == first.shape:
                    self.track(out, name)
                else:
                    self.found[name] = _classify(func, args, kwargs)
        return out


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad inside; every submodule's mode restored on exit, whatever happens."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _as_input(model: nn.Module, x: Tensor) -> Tensor:
    device, dtype = model_device_dtype(model)
    return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)


def linear_layers(model: nn.Module, x: Tensor, activations: ActivationSpec = None) -> list[LinearLayer]:
    """The ``nn.Linear`` layers of ``model`` in call order on ``x``, each with its activation.

    Args:
        model: any module whose forward takes ``x``.
        x: a probe batch (a few rows suffice).
        activations: overrides detection: one activation for every layer, or a mapping from layer
            name to activation.

    Raises:
        ValueError: if the model has no ``nn.Linear`` called by its forward pass, or a name in
            ``activations`` is not such a layer.
    """
    names = {m: n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not names:
        raise ValueError(f"The model ({type(model).__name__}) has no nn.Linear layer: nothing for SWIM to do.")
    order: list[nn.Linear] = []
    recorder = _FollowerRecorder()

    def hook(module: nn.Module, _inp: Any, out: Any) -> None:
        if module not in order:
            order.append(module)  # type: ignore[arg-type]
            if isinstance(out, Tensor):
                recorder.track(out, names[module])  # type: ignore[index]

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with preserved(model), recorder:
            model(_as_input(model, x))
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError(f"The forward pass of {type(model).__name__} called none of its nn.Linear layers.")

    overrides: dict[str, Activation] = {}
    if isinstance(activations, (str, Activation)):
        overrides = {names[m]: get_activation(activations) for m in order[:-1]}
    elif activations is not None:
        known = {names[m] for m in order}
        for key, value in activations.items():
            if key not in known:
                raise ValueError(
                    f"`activations` names layer {key!r}, which is not an nn.Linear called by the "
                    f"model's forward; the layers are {sorted(known)}."
                )
            overrides[key] = get_activation(value)
    layers = []
    for m in order:
        name = names[m]
        act, follower = recorder.found.get(name, (None, "output"))
        if name in overrides:
            act, follower = overrides[name], "given"
        layers.append(LinearLayer(name, m, act, follower))
    return layers


def require_activation(layer: LinearLayer) -> Activation:
    """The layer's activation, or a clear error saying what follows it and how to fix it."""
    if layer.activation is None:
        raise ValueError(
            f"Cannot tell which activation follows layer {layer.name!r}: its output goes to "
            f"`{layer.follower}`, and SWIM supports {sorted(ACTIVATIONS)}. If the layer is followed by "
            f"one of those, pass it explicitly, e.g. `activations={{{layer.name!r}: 'relu'}}`."
        )
    return layer.activation


def capture_inputs(
    model: nn.Module, x: Tensor, names: list[str], *, batch_size: int | None = None
) -> dict[str, Tensor]:
    """The inputs of the named ``nn.Linear`` layers on ``x``, each ``[N, d]`` (detached).

    The forward pass stops as soon as the last wanted input is captured.
    """
    wanted = set(names)
    modules = {n: model.get_submodule(n) for n in names}
    chunks: dict[str, list[Tensor]] = {n: [] for n in names}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            inp = args[0]
            if inp.ndim != 2:
                raise ValueError(
                    f"Layer {name!r} receives inputs of shape {tuple(inp.shape)}; SWIM maps dense "
                    "layers applied to one vector per example, `[N, d]`."
                )
            if len(chunks[name]) == n_batches_seen[0]:
                chunks[name].append(inp.detach())
            if all(len(chunks[n]) > n_batches_seen[0] for n in wanted):
                raise _StopForward

        return hook

    n_batches_seen = [0]
    handles = [modules[n].register_forward_pre_hook(make_hook(n)) for n in names]
    xin = _as_input(model, x)
    step = batch_size or xin.shape[0]
    try:
        with preserved(model):
            for start in range(0, xin.shape[0], step):
                with contextlib.suppress(_StopForward):
                    model(xin[start : start + step])
                n_batches_seen[0] += 1
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if len(chunks[n]) != n_batches_seen[0]]
    if missing:
        raise ValueError(f"The forward pass did not call layer(s) {missing} on every probe batch.")
    return {n: torch.cat(chunks[n]) for n in names}


def capture_outputs(model: nn.Module, x: Tensor, name: str, *, batch_size: int | None = None) -> Tensor:
    """The outputs of module ``name`` on ``x`` (before any activation that follows it), detached."""
    chunks: list[Tensor] = []
    handle = model.get_submodule(name).register_forward_hook(lambda _m, _i, out: chunks.append(out.detach()))
    xin = _as_input(model, x)
    step = batch_size or xin.shape[0]
    try:
        with preserved(model):
            for start in range(0, xin.shape[0], step):
                model(xin[start : start + step])
    finally:
        handle.remove()
    return torch.cat(chunks)


def forward_outputs(model: nn.Module, x: Tensor, *, batch_size: int | None = None) -> Tensor:
    """``model(x)`` in eval mode without grad, batched, with the model's state preserved."""
    xin = _as_input(model, x)
    step = batch_size or xin.shape[0]
    with preserved(model):
        outs = [model(xin[s : s + step]) for s in range(0, xin.shape[0], step)]
    out = torch.cat(outs)
    if not isinstance(out, Tensor):  # pragma: no cover - defensive
        raise TypeError("Expected the model to return a tensor.")
    return out

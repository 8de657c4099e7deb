"""Reading a model once per map: its mappable layers in call order, their inputs, and how to write them.

:func:`read_model` runs the model forward once on a probe set (eval mode, no grad, forked RNG) and
returns a :class:`ModelReading`: every layer of a known kind (``nn.Linear``; :class:`LayerKind` is where
new kinds plug in) in the order the forward pass calls it, each with the activation that follows it,
an eval-mode ``BatchNorm`` folded into it, or the reason it cannot be mapped, and its input and output
on the probe. The map, the rebuild of a network from its pairs and the fidelity are all served by this
one reading: a rebuilt network is evaluated by forward hooks that replace the outputs of its rebuilt
layers (:meth:`ModelReading.run`), never by a deep copy, and its new parameters are written back
through whatever computes them (a ``BatchNorm`` fold, ``weight_norm``; :meth:`ModelReading.write`).

Activations are detected by watching what consumes each layer's output with a ``TorchFunctionMode``,
so activation modules (``nn.GELU(approximate="tanh")``) and functional calls in ``forward``
(``F.silu(self.fc(x))``, ``x.tanh()``) are both seen.

Every forward pass made here runs under :func:`preserved`: eval mode entered and left through the
model's own ``train()``/``eval()`` (so overrides that freeze or unfreeze parameters run as in the
user's code), ``requires_grad`` of every parameter restored, no grad, and the global RNGs (torch's CPU
and the model's CUDA devices, Python's, NumPy's) forked, so that a model that draws random numbers in
eval mode (MC dropout, noise injection) trains bit-identically with and without the library.

Forward passes: a reading costs :data:`PASSES_PER_READING` pass and every rebuilt network evaluated
on the probe :data:`PASSES_PER_REBUILD` more (with ``batch_size`` smaller than the probe, a rebuild
costs one pass per rebuilt layer plus one, each in chunks).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lightning_swim._checks import check_model
from lightning_swim.activations import ACTIVATIONS, Activation, detect, function_name, get_activation

ActivationSpec = str | Activation | Mapping[str, str | Activation] | None
OutputKey = str | int | Callable[[Any], Tensor] | None

PASSES_PER_READING = 1
"""Forward passes of the model on the probe set that :func:`read_model` makes."""
PASSES_PER_REBUILD = 1
"""Forward passes of :meth:`ModelReading.run` (so of :func:`lightning_swim.network.rebuild`) without ``batch_size``."""

_OUTPUT_KEYS = ("logits", "output", "out", "y_hat", "preds", "prediction")


# -- forward passes that leave everything as it was ---------------------------------------------------


def model_devices(model: nn.Module) -> list[int]:
    """Indices of the CUDA devices that hold the model's parameters or buffers."""
    found = {t.device.index for t in (*model.parameters(), *model.buffers()) if t.device.type == "cuda"}
    return sorted(i if i is not None else torch.cuda.current_device() for i in found)


@contextlib.contextmanager
def forked_rng(model: nn.Module) -> Iterator[None]:
    """Every global RNG a forward pass may draw from, as it was on exit: torch's CPU generator and
    those of the model's CUDA devices, Python's ``random`` and NumPy's legacy global state."""
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002 - saving the legacy global
    try:
        with torch.random.fork_rng(devices=model_devices(model), device_type="cuda"):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Eval mode, no grad and forked RNGs inside; the model exactly as it was found on exit.

    Modes are changed through the same calls the user's code (and Lightning) makes, ``model.eval()``
    and ``module.train(mode)``, so that a ``train()`` override that also toggles ``requires_grad`` is
    undone by its own inverse; ``requires_grad`` of every parameter is then checked and restored too.
    """
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    with forked_rng(model):
        try:
            model.eval()
            with torch.no_grad():
                yield
        finally:
            _restore_modes(modes)
            for p, flag in grads:
                if p.requires_grad != flag:
                    p.requires_grad_(flag)


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    # pre-order: a parent's train(mode) sets its children, then the children that differ are set
    root, mode = modes[0]
    root.train(mode)
    for m, mode in modes[1:]:
        if m.training != mode:
            m.train(mode)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _as_input(model: nn.Module, x: Tensor) -> Tensor:
    device, dtype = model_device_dtype(model)
    return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the maths runs in for tensors of ``dtype``: float32 for half precision, else itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def select_output(out: Any, key: OutputKey = None) -> Tensor:
    """The tensor of a model's output that the fidelity compares.

    Args:
        out: what the model returned.
        key: a callable applied to ``out``, a key (dict) or attribute name (``str``), an index
            (``int``); by default ``out`` itself if it is a tensor, the first element of a tuple or
            list, or the ``"logits"`` (``"output"``, ``"out"``, ...) entry of a mapping.

    Raises:
        TypeError: if no tensor can be found; the message says how to pass ``output_key``.
    """
    chosen: Any
    if callable(key):
        chosen = key(out)
    elif isinstance(key, str):
        chosen = out[key] if isinstance(out, Mapping) else getattr(out, key, None)
    elif isinstance(key, int) and not isinstance(key, bool):
        chosen = out[key] if isinstance(out, Sequence) and -len(out) <= key < len(out) else None
    elif key is None:
        if isinstance(out, Tensor):
            chosen = out
        elif isinstance(out, Sequence) and not isinstance(out, str) and len(out) > 0:
            chosen = out[0]
        elif isinstance(out, Mapping):
            chosen = next((out[k] for k in _OUTPUT_KEYS if k in out), None)
        else:
            chosen = None
    else:
        raise TypeError(f"Expected argument `output_key` to be a str, an int or a callable but got {key!r}.")
    if not isinstance(chosen, Tensor):
        what = f"a mapping with keys {sorted(map(str, out))}" if isinstance(out, Mapping) else type(out).__name__
        raise TypeError(
            f"Cannot find the model's output tensor: the forward pass returned {what}"
            + (f" and `output_key={key!r}` selects no tensor in it" if key is not None else "")
            + ". Pass `output_key`: a dict key, a tuple index or a callable, e.g. `output_key='logits'`."
        )
    return chosen


# -- layer kinds: where new layer types plug in -------------------------------------------------------


class Unmappable(Exception):  # noqa: N818 - carries a reason, caught where layers are read
    """Raised by a :class:`LayerKind` for a layer it cannot map; the message is the reason."""


class Unwritable(Exception):  # noqa: N818
    """A parameter cannot be set to a given value (e.g. behind ``spectral_norm``); the message says why."""


class LayerKind:
    """How one kind of layer is read and written; subclass it to plug in a new kind.

    A layer of ``M`` neurons is seen as ``M`` dense neurons over points of its input space:
    :meth:`points` turns the layer's input into those points (``[n, d]``; a convolution would
    ``unfold`` its input into patches here and keep each patch's (example, location)),
    :meth:`parameters` gives the weights in the same layout (``[M, d]``), :meth:`replace` computes
    the layer's output with some neurons replaced, and :meth:`write` sets the weights back (a
    convolution would reshape ``[M, C_in k...]`` into kernels). ``neuron_dim`` is the dimension of the
    layer's output that indexes neurons (``-1`` for ``nn.Linear``, ``1`` for a convolution).
    """

    name: str = "layer"
    types: tuple[type[nn.Module], ...] = ()
    neuron_dim: int = -1
    subsample: bool = False
    """Whether a map draws a subsample of the layer's points (a convolution has ``N L`` of them)."""

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, self.types)

    def problem(self, module: nn.Module) -> str | None:
        """Why a layer of this kind can be neither mapped nor written whatever its input, or ``None``."""
        return None

    def points(self, module: nn.Module, inp: Tensor) -> Tensor:
        """The layer's input on a batch as points of its input space, ``[n, d]``; raises :class:`Unmappable`."""
        raise NotImplementedError

    def capture(self, module: nn.Module, inp: Tensor) -> Tensor:
        """What a reading keeps of the layer's input on a batch (``points`` by default; a convolution keeps
        its input itself, ``k...`` times smaller than its patches); raises :class:`Unmappable`."""
        return self.points(module, inp)

    def gather(self, module: nn.Module, captured: Tensor, index: Tensor | None = None) -> Tensor:
        """The points ``index`` (``[n]`` into the ``N L`` points, all if ``None``) of a captured input, ``[n, d]``."""
        return captured if index is None else captured[index.to(captured.device)]

    def grid(self, module: nn.Module, inp: Tensor) -> tuple[int, ...]:
        """The locations at which the layer applies its neurons to one example (``()``: one location)."""
        return ()

    def by_neuron(self, out: Tensor) -> Tensor:
        """The layer's output as ``[n, M]``, a row per point (``n = N L``)."""
        return out

    def parameters(self, module: nn.Module) -> tuple[Tensor, Tensor | None]:
        """``(weight [M, d], bias [M] or None)`` as the forward pass uses them (through any parametrization)."""
        raise NotImplementedError

    def replace(
        self, module: nn.Module, inp: Tensor, out: Tensor, rows: Tensor, weight: Tensor, bias: Tensor
    ) -> Tensor:
        """``out`` with the neurons ``rows`` (``[M]`` bool) recomputed from ``inp``: ``weight [R, d]``, ``bias [R]``."""
        raise NotImplementedError

    def write(self, module: nn.Module, weight: Tensor, bias: Tensor | None) -> None:
        """Set the layer's parameters to ``weight [M, d]`` (and ``bias [M]``); raises :class:`Unwritable`."""
        raise NotImplementedError


class LinearKind(LayerKind):
    """``nn.Linear`` applied to one vector per example, ``[N, d]``."""

    name = "linear"
    types = (nn.Linear,)
    neuron_dim = -1

    def problem(self, module: nn.Module) -> str | None:
        n_out, n_in = self.parameters(module)[0].shape
        if n_in == 0 or n_out == 0:
            return f"it has zero width (nn.Linear({n_in}, {n_out})): a SWIM neuron needs an input and a neuron"
        return None

    def points(self, module: nn.Module, inp: Tensor) -> Tensor:
        if inp.ndim != 2:
            raise Unmappable(
                f"it is applied to inputs of shape {tuple(inp.shape)}, and a dense layer is mapped on one vector "
                "per example, `[N, d]`"
            )
        return inp

    def parameters(self, module: nn.Module) -> tuple[Tensor, Tensor | None]:
        weight, bias = module.weight, module.bias
        assert isinstance(weight, Tensor)
        return weight, bias if isinstance(bias, Tensor) else None

    def replace(
        self, module: nn.Module, inp: Tensor, out: Tensor, rows: Tensor, weight: Tensor, bias: Tensor
    ) -> Tensor:
        new = F.linear(inp, weight.to(inp.dtype), bias.to(inp.dtype))
        if bool(rows.all()):
            return new
        out = out.clone()
        out[..., rows] = new
        return out

    def write(self, module: nn.Module, weight: Tensor, bias: Tensor | None) -> None:
        set_parameter(module, "weight", weight)
        if bias is not None:
            set_parameter(module, "bias", bias)


class ConvKind(LayerKind):
    r"""``nn.Conv1d`` and ``nn.Conv2d`` (any stride, padding, padding mode and dilation; ``groups=1``).

    A convolution is a dense layer applied to every patch of its input: output channel ``m`` computes
    :math:`z_m(p) = \langle w_m, p \rangle + b_m` on each patch ``p`` (``C_in`` channels times the
    kernel's window, unfolded channel-major as ``weight.reshape(C_out, -1)``). A batch of ``N``
    examples whose output has ``L`` locations (``grid``, e.g. ``(H', W')``) gives ``N L`` points,
    ordered example-major: point ``q`` is example ``q // L`` at location ``q % L`` (row-major over
    the grid). A reading keeps the input itself and unfolds the patches it is asked for.
    """

    name = "conv"
    types = (nn.Conv1d, nn.Conv2d)
    neuron_dim = 1
    subsample = True

    def problem(self, module: nn.Module) -> str | None:
        assert isinstance(module, nn.modules.conv._ConvNd)
        if module.groups != 1:
            return (
                f"it has groups={module.groups}: each output channel sees only a slice of the input channels, and "
                "grouped (depthwise) convolutions are not mapped yet"
            )
        n_out, n_in = self.parameters(module)[0].shape
        if n_in == 0 or n_out == 0:
            return f"it has zero width ({n_out} output channels over patches of size {n_in})"
        return None

    @staticmethod
    def _pads(module: Any) -> list[tuple[int, int]]:
        """``(before, after)`` padding of every spatial dimension, as the module pads."""
        nd = len(module.kernel_size)
        if isinstance(module.padding, str):
            if module.padding == "valid":
                return [(0, 0)] * nd
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
            return [(t // 2, t - t // 2) for t in total]  # "same": the extra one after, as torch pads
        return [(p, p) for p in module.padding]

    def _padded(self, module: Any, inp: Tensor) -> Tensor:
        nd = len(module.kernel_size)
        if inp.ndim != nd + 2:
            raise Unmappable(
                f"it is applied to inputs of shape {tuple(inp.shape)}, and a {type(module).__name__} is mapped on "
                f"batches `[N, C, {'L' if nd == 1 else 'H, W'}]`"
            )
        pads = [p for pair in reversed(self._pads(module)) for p in pair]
        if not any(pads):
            return inp
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return F.pad(inp, pads, mode=mode)

    def grid(self, module: nn.Module, inp: Tensor) -> tuple[int, ...]:
        m: Any = module
        spatial = inp.shape[2:]
        return tuple(
            (size + before + after - d * (k - 1) - 1) // s + 1
            for size, (before, after), d, k, s in zip(
                spatial, self._pads(m), m.dilation, m.kernel_size, m.stride, strict=True
            )
        )

    def capture(self, module: nn.Module, inp: Tensor) -> Tensor:
        self._padded(module, inp[:0])  # checks the shape
        return inp

    def points(self, module: nn.Module, inp: Tensor) -> Tensor:
        m: Any = module
        x = self._padded(m, inp)
        if len(m.kernel_size) == 1:  # unfold works on images: a signal is an image of height one
            cols = F.unfold(x.unsqueeze(2), (1, m.kernel_size[0]), dilation=(1, m.dilation[0]), stride=(1, m.stride[0]))
        else:
            cols = F.unfold(x, m.kernel_size, dilation=m.dilation, stride=m.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # [N L, C k...], example-major

    def gather(self, module: nn.Module, captured: Tensor, index: Tensor | None = None) -> Tensor:
        if index is None:
            return self.points(module, captured)
        m: Any = module
        x = self._padded(m, captured)
        grid = self.grid(m, captured)
        nd, n, c = len(grid), index.shape[0], x.shape[1]
        index = index.to(x.device)
        locations = math.prod(grid)
        loc = index % locations
        idx: list[Tensor] = [
            (index // locations).view(n, 1, *[1] * nd),
            torch.arange(c, device=x.device).view(1, c, *[1] * nd),
        ]
        for k in reversed(range(nd)):  # row-major: the last dimension varies fastest
            coord = loc % grid[k]
            loc = loc // grid[k]
            rows = coord[:, None] * m.stride[k] + torch.arange(m.kernel_size[k], device=x.device) * m.dilation[k]
            shape = [n, 1] + [1] * nd
            shape[2 + k] = m.kernel_size[k]
            idx.insert(2, rows.view(shape))
        return x[tuple(idx)].reshape(n, -1)

    def parameters(self, module: nn.Module) -> tuple[Tensor, Tensor | None]:
        weight, bias = module.weight, module.bias
        assert isinstance(weight, Tensor)
        return weight.reshape(weight.shape[0], -1), bias if isinstance(bias, Tensor) else None

    def replace(
        self, module: nn.Module, inp: Tensor, out: Tensor, rows: Tensor, weight: Tensor, bias: Tensor
    ) -> Tensor:
        m: Any = module
        conv = F.conv1d if len(m.kernel_size) == 1 else F.conv2d
        kernels = weight.to(inp.dtype).reshape(weight.shape[0], -1, *m.kernel_size)
        new = conv(self._padded(m, inp), kernels, bias.to(inp.dtype), m.stride, 0, m.dilation)
        if bool(rows.all()):
            return new
        out = out.clone()
        out[:, rows] = new
        return out

    def write(self, module: nn.Module, weight: Tensor, bias: Tensor | None) -> None:
        kernels = module.weight
        assert isinstance(kernels, Tensor)
        set_parameter(module, "weight", weight.reshape(kernels.shape))
        if bias is not None:
            set_parameter(module, "bias", bias)

    def by_neuron(self, out: Tensor) -> Tensor:
        return out.movedim(1, -1).reshape(-1, out.shape[1])


LAYER_KINDS: list[LayerKind] = [LinearKind(), ConvKind()]
"""The layer kinds a reading knows, tried in order."""


def kind_of(module: nn.Module) -> LayerKind | None:
    return next((k for k in LAYER_KINDS if k.matches(module)), None)


# -- writing parameters through whatever computes them -----------------------------------------------


def _check_written(actual: Tensor, wanted: Tensor, what: str) -> None:
    tol = max(16 * torch.finfo(wanted.dtype).eps, 1e-12)
    scale = float(wanted.abs().max()) if wanted.numel() else 0.0
    err = float((actual.detach().to(wanted.dtype) - wanted).abs().max()) if wanted.numel() else 0.0
    if not err <= tol * max(scale, torch.finfo(wanted.dtype).tiny):
        raise Unwritable(f"{what} cannot hold an arbitrary value (written and read back differ by {err:.3g})")


def set_parameter(module: nn.Module, name: str, value: Tensor) -> None:
    """Set ``module.<name>`` to ``value`` through whatever computes it, in place, and check it.

    A plain parameter is copied into; a ``torch.nn.utils.parametrize`` parametrization is set through
    its ``right_inverse`` (``parametrizations.weight_norm`` has an exact one); the deprecated
    ``torch.nn.utils.weight_norm`` gets ``g = |value|`` and ``v = value``. Whatever cannot hold
    ``value`` exactly (``spectral_norm`` divides by the largest singular value) raises
    :class:`Unwritable`; the caller restores the module.
    """
    with torch.no_grad():
        if parametrize.is_parametrized(module, name):
            setattr(module, name, value.to(getattr(module, name).dtype))
            kinds = ", ".join(type(p).__name__ for p in module.parametrizations[name])  # type: ignore[index]
            _check_written(getattr(module, name), value, f"`{name}`, computed by the parametrization {kinds},")
            return
        hook: Any
        for hook in module._forward_pre_hooks.values():
            if getattr(hook, "name", None) != name:
                continue
            if type(hook).__name__ == "WeightNorm" and hasattr(module, f"{name}_g"):
                g, v = getattr(module, f"{name}_g"), getattr(module, f"{name}_v")
                v.copy_(value)
                g.copy_(torch.norm_except_dim(value, 2, hook.dim))
                setattr(module, name, hook.compute_weight(module))
                _check_written(getattr(module, name), value, f"`{name}` (weight_norm)")
                return
            raise Unwritable(f"`{name}` is computed by {type(hook).__name__}, which cannot hold an arbitrary value")
        param = getattr(module, name)
        if not isinstance(param, Tensor):
            raise Unwritable(f"`{name}` is not a tensor")
        param.copy_(value)


def _backup(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


def _restore(module: nn.Module, backup: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for k, v in module.state_dict(keep_vars=True).items():
            v.detach().copy_(backup[k])
        hook: Any
        for hook in module._forward_pre_hooks.values():  # the deprecated weight_norm caches its weight
            if type(hook).__name__ == "WeightNorm" and hasattr(module, f"{hook.name}_g"):
                setattr(module, hook.name, hook.compute_weight(module))


# -- what follows a layer's output ----------------------------------------------------------------------

_PASS_THROUGH = {
    F.dropout,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    F.dropout1d,
    torch.dropout,
    Tensor.contiguous,
    Tensor.clone,
    Tensor.detach,
    Tensor.to,
    Tensor.float,
    Tensor.double,
    Tensor.view,
    Tensor.view_as,
    Tensor.reshape,
    torch.reshape,
    Tensor.flatten,
    torch.flatten,
}
_IGNORED = {  # read only the shape, dtype or device of a tensor, not its values
    torch.randn_like,
    torch.rand_like,
    torch.randint_like,
    torch.zeros_like,
    torch.ones_like,
    torch.empty_like,
    torch.full_like,
    Tensor.new_zeros,
    Tensor.new_ones,
    Tensor.new_empty,
    Tensor.new_full,
    Tensor.size,
    Tensor.dim,
}
_COMBINE = {
    "add",
    "radd",
    "iadd",
    "sub",
    "rsub",
    "isub",
    "mul",
    "rmul",
    "imul",
    "cat",
    "stack",
    "matmul",
    "bmm",
    "einsum",
}
_NORMS = {"layer_norm", "group_norm", "rms_norm", "instance_norm", "normalize", "local_response_norm"}


@dataclass(frozen=True)
class Fold:
    """An eval-mode ``BatchNorm`` between a layer and its activation, folded into the layer.

    The ``BatchNorm`` computes ``scale * z + shift`` per neuron (``scale = gamma / sqrt(var + eps)``,
    ``shift = beta - scale * mean``), so the layer and it together are a layer with weight
    ``scale * w`` and bias ``scale * b + shift``.
    """

    scale: Tensor
    shift: Tensor
    mean: Tensor
    bias_name: str | None  # the BatchNorm's beta, qualified (writable), if it has one
    module_name: str | None


@dataclass
class _Follow:
    fold: Fold | None = None
    activation: Activation | None = None
    follower: str | None = None
    blocker: str | None = None


class _FollowerRecorder(TorchFunctionMode):
    """Records what consumes every tracked tensor, through pass-through calls and one BatchNorm."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.tracked: dict[int, str] = {}
        self.keep: list[Tensor] = []  # keep tracked tensors alive so that their ids stay unique
        self.follow: dict[str, _Follow] = {}
        self.names = names  # id(parameter or buffer) -> qualified name
        self.paused = False  # while the reading's own hooks run

    def track(self, tensor: Tensor, name: str) -> None:
        self.tracked[id(tensor)] = name
        self.keep.append(tensor)
        self.follow.setdefault(name, _Follow())

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused or not self.tracked or func in _IGNORED:
            return out
        if not isinstance(out, Tensor) and not (
            isinstance(out, (tuple, list)) and any(isinstance(o, Tensor) for o in out)
        ):
            return out  # reads a shape, a dtype, a number
        first = args[0] if args else kwargs.get("input")
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, Tensor) and id(leaf) in self.tracked:
                name = self.tracked[id(leaf)]
                rec = self.follow[name]
                if rec.follower is None:
                    self._record(rec, name, func, args, kwargs, out, first if leaf is first else None)
                break
        return out

    def _record(
        self,
        rec: _Follow,
        name: str,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        out: Any,
        primary: Tensor | None,
    ) -> None:
        """``primary``: the tracked tensor if it is the call's first argument (the one an activation acts on)."""
        fname = function_name(func).strip("_")
        same_shape = isinstance(out, Tensor) and primary is not None and out.shape == primary.shape
        if func in _PASS_THROUGH and same_shape:
            self.track(out, name)
            return
        if func is F.batch_norm and rec.fold is None and same_shape:
            fold = self._fold(args, kwargs)
            if isinstance(fold, Fold):
                rec.fold = fold
                self.track(out, name)
            else:
                rec.follower, rec.blocker = fname, fold
            return
        rec.follower = fname
        if fname in _NORMS:
            rec.blocker = (
                f"a {fname} between it and its activation normalises across the layer's neurons, so no neuron is a "
                "function of its own weights alone"
            )
        elif primary is not None:
            rec.activation = detect(func, args, kwargs)

    def _fold(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Fold | str:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        a = dict(zip(names, args, strict=False)) | kwargs
        mean, var = a.get("running_mean"), a.get("running_var")
        if a.get("training", False) or mean is None or var is None:
            return (
                "a BatchNorm without running statistics follows it (it normalises with the batch's statistics even in "
                "eval mode), which cannot be folded into the layer"
            )
        gamma, beta, eps = a.get("weight"), a.get("bias"), float(a.get("eps", 1e-5))
        scale = torch.rsqrt(var.detach().double() + eps)
        if gamma is not None:
            scale = scale * gamma.detach().double()
        shift = -scale * mean.detach().double()
        if beta is not None:
            shift = shift + beta.detach().double()
        bias_name = self.names.get(id(beta)) if beta is not None else None
        module_name = bias_name.rsplit(".", 1)[0] if bias_name and "." in bias_name else None
        return Fold(scale, shift, mean.detach().double(), bias_name, module_name)


# -- the reading ----------------------------------------------------------------------------------------


@dataclass
class LayerReading:
    """One layer of a model as a reading found it, in the order the forward pass calls it.

    Attributes:
        name: qualified module name (``model.get_submodule(name)``).
        module: the layer.
        kind: its :class:`LayerKind`.
        activation: the activation that follows it, or ``None`` if none SWIM knows does.
        follower: what was seen consuming its output (``"relu"``, ``"gelu"``, ``"add"``, ``"output"``,
            ``"given"`` for an activation passed by the user).
        fold: an eval-mode ``BatchNorm`` between it and its activation, folded into it.
        blocker: why it cannot be mapped whatever its activation (a ``LayerNorm`` follows, it is called
            twice, ...), or ``None``.
        input: its input on the probe set as the reading keeps it (if captured): the points ``[N, d]`` of
            a dense layer, the input ``[N, C, ...]`` of a convolution (:meth:`ModelReading.points`
            gives its patches).
        output: its own output on the probe set (before the fold), ``[N, M]`` or ``[N, M, ...]`` (if captured).
        calls: how many times one forward pass called it.
        grid: the locations at which it applies its neurons to one example: ``()`` for a dense layer,
            the output's spatial shape for a convolution (``L = prod(grid)`` points per example).
    """

    name: str
    module: Any  # an nn.Module of its kind (nn.Linear for LinearKind)
    kind: LayerKind
    activation: Activation | None = None
    follower: str = "output"
    fold: Fold | None = None
    blocker: str | None = None
    input: Tensor | None = field(default=None, repr=False)
    output: Tensor | None = field(default=None, repr=False)
    calls: int = 0
    grid: tuple[int, ...] = ()

    @property
    def locations(self) -> int:
        """``L``: the points per example (1 for a dense layer, the output locations of a convolution)."""
        return math.prod(self.grid)

    @property
    def reason(self) -> str | None:
        """Why the layer cannot be mapped, or ``None`` if it can."""
        if self.blocker is not None:
            return self.blocker
        if self.activation is None:
            if self.follower == "output":
                return "no activation follows it (its output leaves the forward pass)"
            if self.follower in _COMBINE:
                return f"its output goes to `{self.follower}` (e.g. the end of a residual branch), not to an activation"
            return (
                f"its output goes to `{self.follower}`, not to an activation SWIM knows ({sorted(ACTIVATIONS)}); if "
                f"one follows, pass it, e.g. `activations={{{self.name!r}: 'relu'}}`"
            )
        return None

    @property
    def mappable(self) -> bool:
        return self.reason is None

    def parameters(self) -> tuple[Tensor, Tensor]:
        """``(weight [M, d], bias [M])`` of the layer with its fold: a missing bias is zeros (detached)."""
        w, b = self.kind.parameters(self.module)
        w = w.detach()
        b = b.detach() if b is not None else torch.zeros_like(w[:, 0])
        if self.fold is None:
            return w, b
        s, c = self.fold.scale.to(w), self.fold.shift.to(w)
        return w * s[:, None], b * s + c

    @property
    def weight(self) -> Tensor:
        """``[M, d]``: the layer's weight with its fold."""
        return self.parameters()[0]

    @property
    def bias(self) -> Tensor:
        """``[M]``: the layer's bias with its fold (zeros if it has none)."""
        return self.parameters()[1]

    @property
    def has_bias(self) -> bool:
        """Whether a bias can be written: the layer's own, or the folded ``BatchNorm``'s ``beta``."""
        return self.kind.parameters(self.module)[1] is not None or (
            self.fold is not None and self.fold.bias_name is not None
        )

    def unfold(self, weight: Tensor, bias: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Neurons ``rows`` of the folded layer, ``weight [R, d]``, ``bias [R]``, in the layer's own frame."""
        if self.fold is None:
            return weight, bias
        s, c = self.fold.scale.to(weight)[rows], self.fold.shift.to(weight)[rows]
        return weight / s[:, None], (bias - c) / s


Derive = Callable[[Tensor], "Replacement | None"]


@dataclass(frozen=True)
class Replacement:
    """New neurons for some rows of a layer, in its folded frame: ``weight [R, d]``, ``bias [R]``, ``rows [M]`` bool."""

    weight: Tensor
    bias: Tensor
    rows: Tensor


class _Stop(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a hook once everything wanted from a forward pass has been captured."""


class ModelReading:
    """One reading of a model on a probe set; see :func:`read_model`.

    Attributes:
        model: the model read.
        x: the probe set as the model takes it (on its device, floating inputs in its dtype).
        layers: every layer of a known kind that the forward pass called, in call order.
        output_key: how the model's output tensor is selected (:func:`select_output`).
        batch_size: the probe set went forward in batches of this size (``None``: at once).
    """

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        layers: list[LayerReading],
        raw_output: list[Any] | None,
        output_key: OutputKey,
        batch_size: int | None,
    ) -> None:
        self.model = model
        self.x = x
        self.layers = layers
        self.output_key = output_key
        self.batch_size = batch_size
        self._raw_output = raw_output
        self._output: Tensor | None = None

    # -- what was read

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def output(self) -> Tensor:
        """The model's output on the probe set (selected by ``output_key``)."""
        if self._output is None:
            if self._raw_output is None:
                raise ValueError("This reading did not keep the model's output.")
            self._output = torch.cat([select_output(o, self.output_key).detach() for o in self._raw_output])
        return self._output

    @property
    def output_layer(self) -> LayerReading:
        """The last layer the forward pass called."""
        return self.layers[-1]

    @property
    def hidden(self) -> list[LayerReading]:
        """Every layer but the output layer, in call order."""
        return self.layers[:-1]

    def layer(self, name: str) -> LayerReading:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise ValueError(
            f"{name!r} is not a layer called by forward; the layers are {[la.name for la in self.layers]}."
        )

    def select(self, names: Sequence[str] | None = None, *, hidden_only: bool = False) -> list[LayerReading]:
        """The layers a map covers, in call order: every mappable hidden layer, or those ``names``.

        Raises:
            ValueError: if ``names`` names a layer that is not called by forward (or not a hidden one,
                with ``hidden_only``), or one that cannot be mapped (the message says why).
        """
        if names is None:
            return [layer for layer in self.hidden if layer.mappable]
        pool = self.hidden if hidden_only else self.layers
        known = [layer.name for layer in pool]
        unknown = sorted(set(names) - set(known))
        if unknown:
            what = "hidden nn.Linear layers" if hidden_only else "nn.Linear layers called by forward"
            raise ValueError(f"`layers` names {unknown}, which are not {what}; they are {known}.")
        chosen = [layer for layer in pool if layer.name in names]
        bad = [layer for layer in chosen if not layer.mappable]
        if bad:
            raise ValueError("Cannot map " + "; ".join(f"layer {la.name!r}: {la.reason}" for la in bad) + ".")
        return chosen

    def skipped(self) -> dict[str, str]:
        """Hidden layers that cannot be mapped, with the reason."""
        return {layer.name: layer.reason for layer in self.hidden if layer.reason is not None}

    def note(self) -> str | None:
        """One sentence naming the hidden layers that are not mapped and why, or ``None``."""
        skipped = self.skipped()
        if not skipped:
            return None
        items = "; ".join(f"{name!r}: {why}" for name, why in skipped.items())
        n_ok = len(self.hidden) - len(skipped)
        return f"{len(skipped)} of {len(self.hidden)} hidden layer(s) cannot be mapped and are skipped ({items})" + (
            f"; the other {n_ok} are mapped." if n_ok else "."
        )

    def n_points(self, name: str) -> int:
        """The points of layer ``name`` on the probe set: ``N L`` (``N`` for a dense layer)."""
        return self.n * self.layer(name).locations

    def points(self, name: str, dtype: torch.dtype | None = None, index: Tensor | None = None) -> Tensor:
        """Layer ``name``'s input on the probe set as points, ``[n, d]``, in ``dtype`` (default: the model's,
        but float32 for half precision): all ``N L`` of them (for a convolution its patches, example-major),
        or those of ``index`` (``[n]``, e.g. from :meth:`sample`)."""
        layer = self.layer(name)
        if layer.input is None:
            raise ValueError(f"The inputs of layer {name!r} were not captured: {layer.reason}.")
        pts = layer.kind.gather(layer.module, layer.input, index)
        return pts.to(dtype or compute_dtype(pts.dtype))

    def sample(self, name: str, size: int, seed: int = 0) -> Tensor | None:
        """The points of layer ``name`` a map uses: ``None`` (all of them) for a dense layer or a convolution
        with at most ``size`` points, else ``size`` of its ``N L`` points drawn uniformly without
        replacement, ``[size]`` sorted flat indices (example ``q // L``, location ``q % L``).

        The draw uses its own generator, seeded by ``seed`` and the layer's position in call order,
        so that every map of one run with the same probe draws the same patches.
        """
        layer = self.layer(name)
        total = self.n_points(name)
        if not layer.kind.subsample or total <= size:
            return None
        position = [la.name for la in self.layers].index(name)
        generator = torch.Generator().manual_seed(seed + 1_000_003 * (position + 1))
        return torch.randperm(total, generator=generator)[:size].sort().values

    # -- rebuilt networks, evaluated by forward hooks

    def run(
        self, derive: Mapping[str, Derive], *, batch_size: int | None = None, keep_output: bool = True
    ) -> tuple[dict[str, Replacement], Tensor | None]:
        """Forward the probe set with layers replaced, each from its input in the network *as replaced so far*.

        For every layer in ``derive`` (in call order), ``derive[name](points)`` receives the layer's
        input on the probe set (``[n, d]``, the layers before it already replaced) and returns the
        :class:`Replacement` of some of its neurons (or ``None``: unchanged). Outputs are replaced by
        forward hooks: no parameter of the model changes and nothing is copied.

        Returns:
            ``(replacements by layer name, the model's output on the probe set)`` (output ``None``
            unless ``keep_output``). Costs :data:`PASSES_PER_REBUILD` forward pass when the probe goes
            forward at once, else one chunked pass per derived layer plus one.
        """
        for name in derive:
            layer = self.layer(name)
            if layer.calls != 1:
                raise ValueError(f"Layer {name!r} cannot be rebuilt: {layer.blocker}.")
        done: dict[str, Replacement | None] = {}
        step = batch_size or self.batch_size or self.n
        try:
            if step >= self.n:
                out = self._forward(derive, done, keep_output=keep_output)
            else:
                for layer in self.layers:  # in chunks: each layer's input in a pass of its own, then the output
                    if layer.name in derive:
                        done[layer.name] = derive[layer.name](self._capture(layer, done, step))
                out = self._forward({}, done, keep_output=keep_output, step=step)
        except Unmappable as err:
            raise ValueError(f"Cannot rebuild the network: a layer {err}.") from err
        return {k: v for k, v in done.items() if v is not None}, out

    def evaluate(self, replacements: Mapping[str, Replacement], *, batch_size: int | None = None) -> Tensor:
        """The model's output on the probe set with ``replacements`` applied: one forward pass."""
        done: dict[str, Replacement | None] = dict(replacements)
        out = self._forward({}, done, keep_output=True, step=batch_size or self.batch_size or self.n)
        assert out is not None
        return out

    def _hooks(self, derive: Mapping[str, Derive], done: dict[str, Replacement | None]) -> list[Any]:
        handles = []
        for layer in self.layers:
            if layer.name not in derive and done.get(layer.name) is None:
                continue

            def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor, layer: LayerReading = layer) -> Tensor:
                if layer.name not in done:
                    done[layer.name] = derive[layer.name](layer.kind.points(module, args[0]))
                rep = done[layer.name]
                if rep is None:
                    return out
                w, b = layer.unfold(rep.weight, rep.bias, rep.rows)
                return layer.kind.replace(module, args[0], out, rep.rows.to(out.device), w, b)

            handles.append(layer.module.register_forward_hook(hook, prepend=True))
        return handles

    def _forward(
        self,
        derive: Mapping[str, Derive],
        done: dict[str, Replacement | None],
        *,
        keep_output: bool,
        step: int | None = None,
    ) -> Tensor | None:
        step = step or self.n
        handles = self._hooks(derive, done)
        outs = []
        try:
            with preserved(self.model):
                for s in range(0, self.n, step):
                    out = self.model(self.x[s : s + step])
                    if keep_output:
                        outs.append(select_output(out, self.output_key).detach())
        finally:
            for h in handles:
                h.remove()
        return torch.cat(outs) if keep_output else None

    def _capture(self, target: LayerReading, done: dict[str, Replacement | None], step: int) -> Tensor:
        chunks: list[Tensor] = []

        def grab(module: nn.Module, args: tuple[Any, ...]) -> None:
            chunks.append(target.kind.points(module, args[0]).detach())
            raise _Stop

        handles = [*self._hooks({}, done), target.module.register_forward_pre_hook(grab)]
        try:
            with preserved(self.model):
                for s in range(0, self.n, step):
                    with contextlib.suppress(_Stop):
                        self.model(self.x[s : s + step])
        finally:
            for h in handles:
                h.remove()
        return torch.cat(chunks)

    # -- writing back

    def unwritable(self, layer: LayerReading, target: nn.Module | None = None) -> str | None:
        """Why the layer's parameters cannot be written, or ``None``: a trial write into ``target`` (default:
        the model read; or a copy of it), read back and undone."""
        target = self.model if target is None else target
        w, _ = layer.parameters()
        rows = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
        trial = Replacement(2 * w + 0.5 * float(w.abs().max().clamp_min(1e-3)), torch.zeros_like(w[:, 0]), rows)
        modules = [target.get_submodule(layer.name)]
        if layer.fold is not None and layer.fold.module_name is not None:
            modules.append(target.get_submodule(layer.fold.module_name))
        backups = [_backup(m) for m in modules]
        try:
            self._write_one(target, layer, trial)
        except Unwritable as err:
            return str(err)
        finally:
            for m, b in zip(modules, backups, strict=True):
                _restore(m, b)
        return None

    def write(self, replacements: Mapping[str, Replacement], target: nn.Module | None = None) -> None:
        """Write ``replacements`` into ``target`` (default: the model read; or a copy of it).

        The folded parameters are unfolded (a ``BatchNorm``-folded layer gets ``w / scale``, and its
        bias, if the layer has none, goes to the ``BatchNorm``'s ``beta``), and written through any
        parametrization. On error, ``target`` is left as it was.

        Raises:
            ValueError: if a layer cannot hold its new parameters (the message says why).
        """
        target = self.model if target is None else target
        touched: list[nn.Module] = []
        for name in replacements:
            layer = self.layer(name)
            touched.append(target.get_submodule(name))
            if layer.fold is not None and layer.fold.module_name is not None:
                touched.append(target.get_submodule(layer.fold.module_name))
        backups = [_backup(m) for m in touched]
        try:
            for name, rep in replacements.items():
                self._write_one(target, self.layer(name), rep)
        except BaseException as err:
            for m, b in zip(touched, backups, strict=True):
                _restore(m, b)
            if isinstance(err, Unwritable):
                raise ValueError(f"Cannot write the new parameters: {err}.") from err
            raise

    def _write_one(self, target: nn.Module, layer: LayerReading, rep: Replacement) -> None:
        module = target.get_submodule(layer.name)
        w_cur, b_cur = layer.kind.parameters(module)
        w_new, b_new = layer.unfold(rep.weight, rep.bias, rep.rows)
        rows = rep.rows.to(w_cur.device)
        w = w_cur.detach().clone()
        w[rows] = w_new.to(w)
        if b_cur is not None:
            b = b_cur.detach().clone()
            b[rows] = b_new.to(b)
            layer.kind.write(module, w, b)
        else:
            layer.kind.write(module, w, None)
            if bool(rows.any()):
                if layer.fold is None or layer.fold.bias_name is None:
                    raise Unwritable(f"layer {layer.name!r} has no bias, and a SWIM neuron needs one")
                # no bias of its own: BN(w x) = s w x + beta - s mean must equal the folded neuron's bias
                beta = target.get_parameter(layer.fold.bias_name)
                new = beta.detach().clone()
                s, mean = layer.fold.scale.to(rep.bias), layer.fold.mean.to(rep.bias)
                new[rows] = (rep.bias + (s * mean)[rows.to(rep.bias.device)]).to(new)
                with torch.no_grad():
                    beta.copy_(new)


def submodule(model: nn.Module, name: str | None) -> nn.Module:
    """The submodule ``name`` of ``model`` (``model`` itself for ``None``): what a callback's ``module=`` names."""
    if name is None:
        return model
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        children = [n for n, _ in model.named_children()]
        raise ValueError(
            f"Expected argument `module` to name a submodule of {type(model).__name__} but got {name!r}; "
            f"its submodules are {children}."
        ) from err


def _names_by_id(model: nn.Module) -> dict[int, str]:
    names = {id(t): n for n, t in model.named_buffers()}
    names.update({id(t): n for n, t in model.named_parameters()})
    return names


def read_model(
    model: nn.Module,
    x: Tensor,
    *,
    activations: ActivationSpec = None,
    output_key: OutputKey = None,
    batch_size: int | None = None,
    capture: bool = True,
) -> ModelReading:
    """Read ``model`` on the probe set ``x`` in one forward pass (:data:`PASSES_PER_READING`).

    Args:
        model: any module whose forward takes ``x``.
        x: the probe set, ``[N, ...]``.
        activations: overrides detection: one activation for every hidden layer, or a mapping from
            layer name to activation.
        output_key: selects the model's output tensor (:func:`select_output`).
        batch_size: forward the probe set in batches of this size.
        capture: keep every layer's input and output and the model's output (else only the structure).

    Returns:
        A :class:`ModelReading`.

    Raises:
        ValueError: if the model has no layer of a known kind, the forward pass calls none, or
            ``activations`` names a layer that is not called.
        RuntimeError: if the forward pass fails on ``x`` (the message has the error and what to check).
    """
    check_model(model)
    kinds = {m: (n, k) for n, m in model.named_modules() if (k := kind_of(m)) is not None}
    if not kinds:
        raise ValueError(f"The model ({type(model).__name__}) has no nn.Linear layer: nothing for SWIM to do.")
    xin = _as_input(model, x)
    step = batch_size or xin.shape[0]
    recorder = _FollowerRecorder(_names_by_id(model))
    found: dict[nn.Module, LayerReading] = {}
    inputs: dict[str, list[Tensor]] = {}
    outputs: dict[str, list[Tensor]] = {}
    chunk = [0]

    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        recorder.paused = True
        try:
            _read_call(module, args, out)
        finally:
            recorder.paused = False

    def _read_call(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        name, kind = kinds[module]
        layer = found.get(module)
        if layer is None:
            layer = found[module] = LayerReading(name, module, kind, blocker=kind.problem(module))
        layer.calls += 1 if chunk[0] == 0 else 0
        if layer.calls > 1 and chunk[0] == 0:
            layer.blocker = (
                f"the forward pass calls it {layer.calls} times (shared weights): each call has its own input space"
            )
            return
        if layer.blocker is None:
            try:
                pts = kind.capture(module, args[0])
                if chunk[0] == 0:
                    layer.grid = kind.grid(module, args[0])
            except Unmappable as err:
                layer.blocker = str(err)
            else:
                if capture:
                    inputs.setdefault(name, []).append(pts.detach().clone())
                    if isinstance(out, Tensor):
                        outputs.setdefault(name, []).append(out.detach().clone())
        if chunk[0] == 0 and isinstance(out, Tensor):
            recorder.track(out, name)

    handles = [m.register_forward_hook(hook) for m in kinds]
    raw: list[Any] = []
    try:
        with preserved(model):
            for s in range(0, xin.shape[0], step):
                mode = recorder if s == 0 else contextlib.nullcontext()
                try:
                    with mode:
                        out = model(xin[s : s + step])
                except Exception as err:
                    raise RuntimeError(
                        f"The forward pass of {type(model).__name__} on the probe set (shape {tuple(xin.shape)}) "
                        f"failed: {type(err).__name__}: {err}"
                    ) from err
                if capture:
                    raw.append(out)
                chunk[0] += 1
    finally:
        for h in handles:
            h.remove()
    if not found:
        raise ValueError(f"The forward pass of {type(model).__name__} called none of its nn.Linear layers.")
    layers = list(found.values())
    for layer in layers:
        if capture and layer.blocker is None and layer.name in inputs:  # called once per batch, on vectors
            if len(inputs[layer.name]) != chunk[0]:
                layer.blocker = "the forward pass did not call it on every probe batch"
            else:
                layer.input = torch.cat(inputs.pop(layer.name))
                layer.output = torch.cat(outputs.pop(layer.name)) if layer.name in outputs else None
        rec = recorder.follow.get(layer.name)
        if rec is not None:
            layer.fold = rec.fold
            layer.activation = rec.activation
            layer.follower = rec.follower or "output"
            layer.blocker = layer.blocker or rec.blocker
    _apply_overrides(layers, activations)
    return ModelReading(model, xin, layers, raw if capture else None, output_key, batch_size)


def _apply_overrides(layers: list[LayerReading], activations: ActivationSpec) -> None:
    if activations is None:
        return
    if isinstance(activations, (str, Activation)):
        act = get_activation(activations)
        for layer in layers[:-1]:
            layer.activation, layer.follower = act, "given"
        return
    if not isinstance(activations, Mapping):
        raise ValueError(
            f"Expected argument `activations` to be an activation name, an Activation or a mapping from layer name "
            f"to activation but got {type(activations).__name__}."
        )
    known = {layer.name: layer for layer in layers}
    for key, value in activations.items():
        if key not in known:
            raise ValueError(
                f"`activations` names layer {key!r}, which is not an nn.Linear called by the model's forward; the "
                f"layers are {sorted(known)}."
            )
        known[key].activation, known[key].follower = get_activation(value), "given"


# -- small helpers kept for callers that need one thing ------------------------------------------------

LinearLayer = LayerReading  # the name callers used before the reading


def linear_layers(model: nn.Module, x: Tensor, activations: ActivationSpec = None) -> list[LayerReading]:
    """The layers of ``model`` in call order on ``x`` (a few rows suffice), without capturing inputs."""
    return read_model(model, x, activations=activations, capture=False).layers


def require_activation(layer: LayerReading) -> Activation:
    """The layer's activation, or a clear error saying why it cannot be mapped and how to fix it."""
    if layer.activation is None or layer.blocker is not None:
        raise ValueError(f"Cannot map layer {layer.name!r}: {layer.reason}.")
    return layer.activation


def capture_inputs(
    model: nn.Module, x: Tensor, names: list[str], *, batch_size: int | None = None
) -> dict[str, Tensor]:
    """The inputs of the named layers on ``x``, each ``[N, d]`` (detached); the pass stops at the last."""
    wanted = set(names)
    modules = {n: model.get_submodule(n) for n in names}
    chunks: dict[str, list[Tensor]] = {n: [] for n in names}
    seen = [0]

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            kind = kind_of(module) or LAYER_KINDS[0]
            try:
                inp = kind.points(module, args[0])
            except Unmappable as err:
                raise ValueError(f"Layer {name!r}: {err}.") from None
            if len(chunks[name]) == seen[0]:
                chunks[name].append(inp.detach().clone())
            if all(len(chunks[n]) > seen[0] for n in wanted):
                raise _Stop

        return hook

    handles = [modules[n].register_forward_pre_hook(make_hook(n)) for n in names]
    xin = _as_input(model, x)
    step = batch_size or xin.shape[0]
    try:
        with preserved(model):
            for start in range(0, xin.shape[0], step):
                with contextlib.suppress(_Stop):
                    model(xin[start : start + step])
                seen[0] += 1
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if len(chunks[n]) != seen[0]]
    if missing:
        raise ValueError(f"The forward pass did not call layer(s) {missing} on every probe batch.")
    return {n: torch.cat(chunks[n]) for n in names}


def forward_outputs(
    model: nn.Module, x: Tensor, *, batch_size: int | None = None, output_key: OutputKey = None
) -> Tensor:
    """``model(x)`` in eval mode without grad, batched, with the model's state and the RNGs preserved."""
    xin = _as_input(model, x)
    step = batch_size or xin.shape[0]
    with preserved(model):
        outs = [select_output(model(xin[s : s + step]), output_key).detach() for s in range(0, xin.shape[0], step)]
    return torch.cat(outs)


def submodules_with_layers(model: nn.Module) -> list[str]:
    """Names of the direct children of ``model`` that hold a layer of a known kind (for error messages)."""
    return [n for n, child in model.named_children() if any(kind_of(m) is not None for m in child.modules())]

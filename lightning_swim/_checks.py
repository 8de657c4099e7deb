"""Input validation shared by the functional core. Every message names the argument and the problem."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_swim._search import duplicate_groups


def check_points(x: Any, name: str = "x", *, min_distinct: int = 2) -> Tensor:
    """Check a point cloud ``[N, d]``: a finite floating tensor with ``min_distinct`` distinct rows."""
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected argument `{name}` to be a torch.Tensor but got {type(x).__name__}.")
    check_not_meta(x, name)
    if x.ndim != 2:
        raise ValueError(
            f"Expected argument `{name}` to be a 2D tensor of shape `[N, d]` but got shape {tuple(x.shape)}."
        )
    if not x.is_floating_point():
        raise TypeError(
            f"Expected argument `{name}` to have a floating dtype (float32 or float64) but got "
            f"{x.dtype}; convert it with `.float()` or `.double()`."
        )
    if x.shape[1] == 0:
        raise ValueError(f"Expected argument `{name}` to have at least one feature but got shape {tuple(x.shape)}.")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ValueError(f"Argument `{name}` has non-finite values (NaN or Inf) in {bad} of its {x.shape[0]} rows.")
    if min_distinct > 0 and count_distinct(x, at_most=min_distinct) < min_distinct:
        raise ValueError(
            f"Expected argument `{name}` to hold at least {min_distinct} distinct points but got "
            f"{x.shape[0]} row(s) with fewer distinct ones: SWIM needs pairs of different points."
        )
    return x


def check_probe(x: Any, name: str = "x") -> Tensor:
    """Check a model's probe batch ``[N, ...]``: a tensor of at least 2 examples, finite if floating."""
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected argument `{name}` to be a torch.Tensor but got {type(x).__name__}.")
    check_not_meta(x, name)
    if x.ndim < 1 or x.shape[0] < 2:
        raise ValueError(f"Expected argument `{name}` to hold at least 2 examples but got shape {tuple(x.shape)}.")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"Argument `{name}` has non-finite values (NaN or Inf).")
    return x


def count_distinct(x: Tensor, at_most: int | None = None) -> int:
    """Number of distinct rows of ``x`` (capped at ``at_most`` when given, which is cheap)."""
    if x.shape[0] == 0:
        return 0
    if at_most is not None and at_most <= 2:
        return 1 + int(bool((x != x[:1]).any()))
    return int(duplicate_groups(x).max()) + 1


def check_targets(y: Any, n: int, name: str = "y") -> Tensor:
    """Check targets ``[N]`` or ``[N, k]`` matching ``n`` points; floating targets must be finite."""
    if not isinstance(y, Tensor):
        raise TypeError(f"Expected argument `{name}` to be a torch.Tensor but got {type(y).__name__}.")
    check_not_meta(y, name)
    if y.ndim not in (1, 2):
        raise ValueError(f"Expected argument `{name}` to have shape `[N]` or `[N, k]` but got shape {tuple(y.shape)}.")
    if y.shape[0] != n:
        raise ValueError(f"Expected argument `{name}` to have {n} rows, one per point of `x`, but got {y.shape[0]}.")
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):
        raise ValueError(f"Argument `{name}` has non-finite values (NaN or Inf).")
    return y


def check_frequency(every_n_train_steps: Any, every_n_epochs: Any) -> None:
    """A callback's frequency: at most one of the two, each a positive int or None."""
    if every_n_train_steps is not None and every_n_epochs is not None:
        raise ValueError(
            f"`every_n_train_steps` and `every_n_epochs` are mutually exclusive; got {every_n_train_steps} and "
            f"{every_n_epochs}."
        )
    check_positive_int(every_n_train_steps, "every_n_train_steps", allow_none=True)
    check_positive_int(every_n_epochs, "every_n_epochs", allow_none=True)


def check_positive_int(value: Any, name: str, *, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected argument `{name}` to be an integer >= {minimum} but got {value!r}.")


def check_choice(value: Any, name: str, choices: tuple[str, ...] | list[str]) -> str:
    if value not in choices:
        raise ValueError(f"Invalid `{name}` {value!r}. Must be one of {sorted(choices)}.")
    return str(value)


def check_positive_finite(value: Any, name: str, *, allow_none: bool = False, hint: str = "") -> None:
    """Refuse anything but a finite number > 0 (``inf`` and ``nan`` included), naming the argument."""
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        allowed = "None or a finite number > 0" if allow_none else "a finite number > 0"
        raise ValueError(f"Expected argument `{name}` to be {allowed} but got {value!r}.{hint}")


def check_not_meta(t: Tensor, name: str) -> None:
    """Refuse a tensor on the meta device (it has a shape but no values)."""
    if t.is_meta:
        raise ValueError(
            f"Expected argument `{name}` to hold values but it is a meta tensor (shape {tuple(t.shape)}, no data); "
            "materialise it first (e.g. `torch.empty_like(t, device='cpu')` and fill it, or load real data)."
        )


def check_model(model: nn.Module, name: str = "model") -> nn.Module:
    """Refuse a model whose parameters or buffers are meta tensors (declared, never materialised).

    Call it before the first forward pass: a meta model fails later with "Tensor.item() cannot be
    called on meta tensors", which says neither which tensor nor what to do.
    """
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for key, t in named:
            if t.is_meta:
                raise ValueError(
                    f"Expected argument `{name}` to have materialised weights but its {kind} `{key}` is a meta "
                    "tensor (no data): call `model.to_empty(device=...)` and load a state dict (or initialise "
                    "the weights) first."
                )
    return model


def check_layer_width(layer_name: str, module: nn.Linear) -> None:
    """Refuse an ``nn.Linear`` with zero inputs or zero outputs: there is no neuron (or no input) to sample or map."""
    if module.in_features == 0 or module.out_features == 0:
        raise ValueError(
            f"Layer {layer_name!r} has zero width (nn.Linear({module.in_features}, {module.out_features})): "
            "a SWIM neuron needs at least one input and a layer at least one neuron; remove the layer or "
            "give it a width >= 1."
        )


def split_probe(probe: Any, name: str = "probe") -> tuple[Tensor, Tensor | None]:
    """``(x, y or None)`` of a probe given as ``x``, ``(x, y)`` or ``[x, y]``; a clear error otherwise.

    A one-element sequence (``[x]``) is refused rather than guessed at: it reads as a list of batches.
    """
    if isinstance(probe, Tensor):
        x, y = probe, None
    elif isinstance(probe, Sequence) and not isinstance(probe, str) and len(probe) == 2:
        x, y = probe
    else:
        what = f"a {type(probe).__name__} of {len(probe)} element(s)" if isinstance(probe, Sequence) else repr(probe)
        raise ValueError(
            f"Expected argument `{name}` to be a tensor `x` or a pair `(x, y)` (targets may be None) but got "
            f"{what}; pass `{name}=x` or `{name}=(x, y)`."
        )
    check_probe(x, name)
    if y is not None:
        if not isinstance(y, Tensor) or y.ndim < 1 or y.shape[0] != x.shape[0]:
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(
                f"Expected the targets of `{name}` to be a tensor with one row per example ({x.shape[0]}) but got "
                f"{shape}."
            )
        check_not_meta(y, name)
    return x, y


def check_pairmap(pm: Any, n: int | None = None, name: str = "pairs") -> None:
    """Check a :class:`~lightning_swim.PairMap`'s structure, and its indices against ``n`` points if given.

    Every per-neuron tensor is 1D of one length, the indices are integers in ``[-1, n)``, and ``-1``
    in ``idx_from`` and ``idx_to`` together (an unmapped neuron).
    """
    tensors: dict[str, Tensor] = {}
    for f in ("idx_from", "idx_to", "scale", "param_cost", "func_error"):
        t = getattr(pm, f, None)
        if not isinstance(t, Tensor) or t.ndim != 1:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"Expected `{name}.{f}` to be a 1D tensor, one entry per neuron, but got {shape}.")
        tensors[f] = t
    lengths = {f: int(t.shape[0]) for f, t in tensors.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(
            f"Expected the tensors of `{name}` to have one length (one entry per neuron) but got {lengths}."
        )
    i, j = tensors["idx_from"], tensors["idx_to"]
    for f, t in (("idx_from", i), ("idx_to", j)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"Expected `{name}.{f}` to hold integer indices but got dtype {t.dtype}.")
    if i.is_meta or j.is_meta or i.numel() == 0:
        return
    low = int(torch.minimum(i.min(), j.min()))
    if low < -1:
        raise ValueError(f"Expected the indices of `{name}` to be >= -1 (-1: unmapped neuron) but found {low}.")
    if bool(((i == -1) != (j == -1)).any()):
        raise ValueError(f"Expected `{name}.idx_from` and `{name}.idx_to` to be -1 for the same (unmapped) neurons.")
    if n is not None:
        high = int(torch.maximum(i.max(), j.max()))
        if high >= n:
            raise ValueError(
                f"`{name}` refers to point {high} but the probe set has {n} points (indices 0 to {n - 1}): the map "
                "belongs to another probe set."
            )

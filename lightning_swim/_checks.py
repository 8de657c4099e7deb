"""Input validation shared by the functional core. Every message names the argument and the problem."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def check_points(x: Any, name: str = "x", *, min_distinct: int = 2) -> Tensor:
    """Check a point cloud ``[N, d]``: a finite floating tensor with ``min_distinct`` distinct rows."""
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected argument `{name}` to be a torch.Tensor but got {type(x).__name__}.")
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
    return int(torch.unique(x, dim=0).shape[0])


def check_targets(y: Any, n: int, name: str = "y") -> Tensor:
    """Check targets ``[N]`` or ``[N, k]`` matching ``n`` points; floating targets must be finite."""
    if not isinstance(y, Tensor):
        raise TypeError(f"Expected argument `{name}` to be a torch.Tensor but got {type(y).__name__}.")
    if y.ndim not in (1, 2):
        raise ValueError(f"Expected argument `{name}` to have shape `[N]` or `[N, k]` but got shape {tuple(y.shape)}.")
    if y.shape[0] != n:
        raise ValueError(f"Expected argument `{name}` to have {n} rows, one per point of `x`, but got {y.shape[0]}.")
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):
        raise ValueError(f"Argument `{name}` has non-finite values (NaN or Inf).")
    return y


def check_positive_int(value: Any, name: str, *, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected argument `{name}` to be an integer >= {minimum} but got {value!r}.")


def check_choice(value: Any, name: str, choices: tuple[str, ...] | list[str]) -> str:
    if value not in choices:
        raise ValueError(f"Invalid `{name}` {value!r}. Must be one of {sorted(choices)}.")
    return str(value)

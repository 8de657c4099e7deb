"""Fidelity of a rebuilt network to the original, as torchmetrics ``Metric`` s and as one function."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.regression import R2Score

from lightning_swim._checks import check_choice
from lightning_swim._modelio import forward_outputs

__all__ = ["FIDELITY_TASKS", "OutputR2", "PredictionAgreement", "fidelity"]

FIDELITY_TASKS = ("classification", "regression")


def _labels(out: Tensor) -> Tensor:
    """Predicted classes of logits: argmax of ``[B, C]``, sign of ``[B]`` or ``[B, 1]`` (binary)."""
    if out.ndim == 2 and out.shape[1] > 1:
        return out.argmax(1)
    return (out.reshape(out.shape[0]) > 0).long()


class PredictionAgreement(Metric):
    """Share of examples on which the rebuilt network predicts the original network's class.

    ``update(rebuilt, original)`` takes the two networks' logits, ``[B, C]`` (argmax) or ``[B]`` /
    ``[B, 1]`` (binary, by sign).

    Non-finite outputs: an example on which the rebuilt network's output is not finite counts as a
    disagreement (NaN is no prediction; argmax would call it class 0). If the *original* network's
    output is not finite on any example, there is nothing to agree with and the result is NaN.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    agree: Tensor
    total: Tensor
    undefined: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("agree", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("undefined", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, rebuilt: Tensor, original: Tensor) -> None:
        agree, undefined = _agreement_counts(rebuilt, original)
        self.agree += agree
        self.undefined += undefined
        self.total += original.shape[0]

    def compute(self) -> Tensor:
        share = self.agree.double() / self.total.clamp_min(1)
        return torch.where(self.undefined > 0, torch.full_like(share, float("nan")), share)


class OutputR2(R2Score):
    """R² of the rebuilt network's outputs against the original's (averaged over output units).

    ``update(rebuilt, original)``: the original network's outputs play the targets. Non-finite
    outputs: NaN if the original's are not finite anywhere (no reference), else ``-inf`` if the
    rebuilt network's are not (an unbounded residual).
    """

    bad_original: Tensor
    bad_rebuilt: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("bad_original", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("bad_rebuilt", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, rebuilt: Tensor, original: Tensor) -> None:
        n = original.shape[0]
        rebuilt, original = rebuilt.reshape(n, -1), original.reshape(n, -1)
        ok_r, ok_o = _finite_rows(rebuilt), _finite_rows(original)
        self.bad_original += (~ok_o).sum()
        self.bad_rebuilt += (~ok_r).sum()
        keep = ok_r & ok_o  # the sums stay finite; the flags decide the result
        super().update(rebuilt[keep].squeeze(1), original[keep].squeeze(1))

    def compute(self) -> Tensor:
        if int(self.bad_original) > 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        if int(self.bad_rebuilt) > 0:
            return torch.tensor(-float("inf"), dtype=torch.float64)
        return super().compute()


def _agreement_counts(rebuilt: Tensor, original: Tensor) -> tuple[Tensor, Tensor]:
    """``(examples agreed on, examples the original has no prediction for)`` (see :class:`PredictionAgreement`)."""
    if rebuilt.shape != original.shape:
        raise ValueError(f"Expected outputs of one shape but got {tuple(rebuilt.shape)} and {tuple(original.shape)}.")
    ok_r, ok_o = _finite_rows(rebuilt), _finite_rows(original)
    return ((_labels(rebuilt) == _labels(original)) & ok_r & ok_o).sum(), (~ok_o).sum()


def outputs_fidelity(original: Tensor, rebuilt: Tensor, task: str = "classification") -> float:
    """:func:`fidelity` of outputs already computed: the agreement counted directly (a tenth of the time of a
    ``PredictionAgreement``), the R² by :class:`OutputR2`."""
    check_choice(task, "task", FIDELITY_TASKS)
    rebuilt, original = rebuilt.double().cpu(), original.double().cpu()
    if task == "classification":
        agree, undefined = _agreement_counts(rebuilt, original)
        return float("nan") if int(undefined) > 0 else int(agree) / max(1, original.shape[0])
    metric = OutputR2(sync_on_compute=False)  # a local computation: never waits for other processes
    metric.update(rebuilt, original)
    return float(metric.compute())


def _finite_rows(out: Tensor) -> Tensor:
    """``[B]`` bool: examples whose outputs are all finite."""
    return torch.isfinite(out.reshape(out.shape[0], -1)).all(1)


def fidelity(
    original: nn.Module, rebuilt: nn.Module, x: Tensor, *, task: str = "classification", batch_size: int | None = None
) -> float:
    """Prediction agreement (classification) or output R² (regression) of ``rebuilt`` against ``original`` on ``x``.

    Returns:
        A float in ``[0, 1]`` (agreement) or ``(-inf, 1]`` (R²). Non-finite outputs are never read as
        predictions: where the rebuilt network's outputs are NaN or infinite it disagrees (R²:
        ``-inf``); where the original's are, fidelity is undefined and NaN is returned.
    """
    check_choice(task, "task", FIDELITY_TASKS)
    out_o = forward_outputs(original, x, batch_size=batch_size)
    out_r = forward_outputs(rebuilt, x, batch_size=batch_size)
    return outputs_fidelity(out_o, out_r, task)

"""Ridge-regularised least squares for an output layer."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import numpy as np
import scipy.linalg
import torch
from scipy.linalg import blas
from torch import Tensor

_SINGLE_THREAD_BELOW = 512  # Gram matrices up to this size: one OpenBLAS thread


@functools.cache
def _openblas() -> Any:
    try:
        from threadpoolctl import ThreadpoolController

        return ThreadpoolController().select(internal_api="openblas")
    except Exception:  # threadpoolctl missing or unable to inspect the loaded libraries
        return None


def _blas_threads(size: int) -> contextlib.AbstractContextManager[Any]:
    """One OpenBLAS thread for small systems. OpenBLAS's threads spin for a while after each call and
    then compete with torch's OpenMP threads for the cores: on two cores, SWIMInit at width 128 took
    8 ms with two OpenBLAS threads and 4 ms with one; from width 1,024 on, two threads win."""
    controller = _openblas()
    return (
        controller.limit(limits=1)
        if controller is not None and size <= _SINGLE_THREAD_BELOW
        else contextlib.nullcontext()
    )


def _solve_normal_cpu(hc: Tensor, rhs: Tensor, dual: bool, ridge: float) -> Tensor:
    with _blas_threads(min(hc.shape)):
        return _solve_normal_scipy(hc, rhs, dual, ridge)


def _solve_normal_scipy(hc: Tensor, rhs: Tensor, dual: bool, ridge: float) -> Tensor:
    # hc is C-contiguous [N, p], so hc.T is a Fortran-ordered view that BLAS takes without a copy.
    # dsyrk fills one triangle of the Gram matrix (half a GEMM's flops; 3-5x faster than
    # torch.matmul on the 2-core machine this was measured on) and dpotrf reads only that triangle.
    a = hc.numpy().T
    gram = blas.dsyrk(1.0, a, trans=1 if dual else 0)
    # the mean eigenvalue of the p x p primal Gram matrix; tr(H H^T) = tr(H^T H), so the dual agrees
    lam = ridge * max(float(np.trace(gram)) / hc.shape[1], np.finfo(np.float64).tiny)
    gram[np.diag_indices_from(gram)] += lam
    try:
        factor = scipy.linalg.cho_factor(gram, lower=False, overwrite_a=False, check_finite=False)
        sol = scipy.linalg.cho_solve(factor, rhs.numpy(), check_finite=False)
    except np.linalg.LinAlgError:  # singular even with the ridge (ridge=0, rank-deficient): least norm
        full = np.triu(gram) + np.triu(gram, 1).T
        sol = scipy.linalg.lstsq(full, rhs.numpy(), check_finite=False)[0]
    return torch.from_numpy(np.ascontiguousarray(sol))


def _solve_normal_torch(hc: Tensor, rhs: Tensor, dual: bool, ridge: float) -> Tensor:
    gram = hc @ hc.T if dual else hc.T @ hc
    lam = ridge * (torch.diagonal(gram).sum() / hc.shape[1]).clamp_min(torch.finfo(torch.float64).tiny)
    gram.diagonal().add_(lam)
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.lstsq(gram, rhs).solution


def ridge_lstsq(h: Tensor, t: Tensor, ridge: float = 1e-8) -> tuple[Tensor, Tensor]:
    r"""Solve :math:`\min_{W, b} \lVert h W^T + b - t\rVert^2 + \lambda \lVert W\rVert^2` (bias unpenalised).

    :math:`\lambda` is ``ridge`` times the mean eigenvalue of the centred Gram matrix, so ``ridge``
    is scale-free. The normal equations are formed and solved by Cholesky in float64 (SWIM
    features are ill-conditioned: a float32 Gram matrix loses the fit), in the primal (``[h, h]``)
    or dual (``[N, N]``) form, whichever is smaller; if even the regularised system is singular, by
    least squares.

    Args:
        h: features, ``[N, h]``.
        t: targets, ``[N, k]``.
        ridge: relative regularisation, ``>= 0``.

    Returns:
        ``(weight [k, h], bias [k])`` in the dtype and on the device of ``h``.
    """
    if ridge < 0:
        raise ValueError(f"Expected argument `ridge` to be >= 0 but got {ridge}.")
    h64, t64 = h.to(torch.float64), t.to(device=h.device, dtype=torch.float64)
    h_mean, t_mean = h64.mean(0), t64.mean(0)
    hc, tc = (h64 - h_mean).contiguous(), t64 - t_mean
    dual = hc.shape[1] > hc.shape[0]
    rhs = tc if dual else hc.T @ tc
    solve = _solve_normal_cpu if hc.device.type == "cpu" else _solve_normal_torch
    sol = solve(hc, rhs, dual, ridge)
    weight = (hc.T @ sol).T if dual else sol.T
    bias = t_mean - weight @ h_mean
    return weight.to(h.dtype), bias.to(h.dtype)

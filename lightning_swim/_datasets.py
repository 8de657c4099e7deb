"""Built-in data for the demo, the examples and the tests: scikit-learn's bundled sets, no downloads."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def digits(
    *, test_size: float = 0.25, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8x8 digits scaled to [0, 1]: ``(x_train [N, 64], y_train, x_test, y_test)``.

    A stratified split with ``seed``; 1,347 training and 450 test images by default.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=test_size, random_state=seed, stratify=y)
    return (
        torch.tensor(xtr, dtype=dtype),
        torch.tensor(ytr, dtype=torch.long),
        torch.tensor(xte, dtype=dtype),
        torch.tensor(yte, dtype=torch.long),
    )


def laplacian_of_gaussian(x: Tensor, sigma: float = 0.5) -> Tensor:
    r"""The 2-D Laplacian of Gaussian.

    .. math::
        f(x) = -\frac{1}{\pi\sigma^4}\Big(1 - \frac{|x|^2}{2\sigma^2}\Big) e^{-|x|^2 / 2\sigma^2}
    """
    r2 = (x * x).sum(-1)
    return -1.0 / (math.pi * sigma**4) * (1 - r2 / (2 * sigma**2)) * torch.exp(-r2 / (2 * sigma**2))


def log_2d(n: int = 500, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """``n`` uniform points on ``[-2, 2]^2`` and the Laplacian of Gaussian (sigma 0.5) on them, ``[n, 1]``."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 4 - 2).to(dtype)
    return x, laplacian_of_gaussian(x).unsqueeze(1)

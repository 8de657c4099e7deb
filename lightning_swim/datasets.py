"""Small built-in data sets for the demo, the examples and experiments: nothing is downloaded.

- :func:`digits`: scikit-learn's bundled 8x8 handwritten digits, scaled to ``[0, 1]``, split into
  training and test sets;
- :func:`log_2d`: a 2-D regression, the Laplacian of Gaussian (:func:`laplacian_of_gaussian`) on uniform
  points of ``[-2, 2]^2``;
- :func:`mnist1d`: MNIST-1D, generated offline by the optional ``mnist1d`` package
  (``pip install lightning-swim[examples]``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["digits", "laplacian_of_gaussian", "log_2d", "mnist1d"]


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


def mnist1d(*, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST-1D (Greydanus 2020, "Scaling down deep learning"), generated offline with the ``mnist1d``
    package's default arguments: ``(x_train [4000, 40], y_train, x_test [1000, 40], y_test)``.

    ``mnist1d.data.make_dataset`` seeds Python's and NumPy's global generators; their states are
    restored afterwards. Its reference test accuracies: an MLP about 68%, a CNN about 94%.

    Raises:
        ModuleNotFoundError: without the ``mnist1d`` package (``pip install lightning-swim[examples]``).
    """
    import random

    import numpy as np

    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "MNIST-1D needs the `mnist1d` package: `pip install mnist1d` (or `pip install lightning-swim[examples]`)."
        ) from err
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002 - restoring the legacy global
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
    return (
        torch.tensor(data["x"], dtype=dtype),
        torch.tensor(data["y"], dtype=torch.long),
        torch.tensor(data["x_test"], dtype=dtype),
        torch.tensor(data["y_test"], dtype=torch.long),
    )

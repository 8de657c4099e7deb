"""Former private name of :mod:`lightning_swim.datasets`, kept so that older imports keep working."""

from lightning_swim.datasets import digits, laplacian_of_gaussian, log_2d, mnist1d

__all__ = ["digits", "laplacian_of_gaussian", "log_2d", "mnist1d"]

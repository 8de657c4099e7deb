"""The activation registry: what SWIM needs to know about the nonlinearity after a dense layer.

A SWIM neuron of an ordered pair ``(x_i, x_j)`` (Bolager et al., 2023) has the pre-activation

.. math::
    z(x) = s_1 \\frac{\\langle x_j - x_i, x - x_i\\rangle}{\\lVert x_j - x_i\\rVert^2} - s_2,

so that :math:`z(x_i) = -s_2` and :math:`z(x_j) = s_1 - s_2`. The constants depend on the activation:

=========== ================= ================= ============
activation  :math:`s_1`       :math:`s_2`       homogeneous
=========== ================= ================= ============
relu        1                 0                 yes
leaky_relu  1                 0                 yes
tanh        :math:`\\ln 3`     :math:`\\ln 3 / 2` no
sigmoid     :math:`2 \\ln 3`   :math:`\\ln 3`     no
=========== ================= ================= ============

For tanh, :math:`\\tanh(-s_2) = -1/2` and :math:`\\tanh(s_1 - s_2) = 1/2`; sigmoid is
:math:`(1 + \\tanh(z / 2)) / 2`, so its constants are those of tanh doubled.

*Homogeneous* activations satisfy :math:`\\sigma(c z) = c \\sigma(z)` for :math:`c > 0`: a neuron
``(w, b)`` with outgoing weights ``a`` computes the same function as ``(c w, c b)`` with ``a / c``, so
only its direction matters and its magnitude is carried by a positive ``scale``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "Activation", "get_activation"]

_LN3 = math.log(3.0)


@dataclass(frozen=True)
class Activation:
    """An activation known to SWIM.

    Args:
        name: registry name.
        s1: output change of the pre-activation from ``x_from`` to ``x_to``.
        s2: minus the pre-activation at ``x_from``.
        homogeneous: ``sigma(c z) == c sigma(z)`` for every ``c > 0``.
        fn: the elementwise function itself.
        negative_slope: the slope of leaky ReLU for negative inputs (0 for the others).
    """

    name: str
    s1: float
    s2: float
    homogeneous: bool
    fn: Callable[[Tensor], Tensor] = field(compare=False, repr=False)
    negative_slope: float = 0.0

    def __call__(self, z: Tensor) -> Tensor:
        return self.fn(z)

    @staticmethod
    def leaky_relu(negative_slope: float = 0.01) -> Activation:
        """Leaky ReLU with the given slope (still positively homogeneous)."""
        if not math.isfinite(negative_slope):
            raise ValueError(f"Expected a finite `negative_slope` but got {negative_slope}.")
        return Activation(
            "leaky_relu",
            1.0,
            0.0,
            True,
            partial(F.leaky_relu, negative_slope=negative_slope),
            negative_slope,
        )


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation("relu", 1.0, 0.0, True, torch.relu),
    "leaky_relu": Activation.leaky_relu(0.01),
    "tanh": Activation("tanh", _LN3, _LN3 / 2, False, torch.tanh),
    "sigmoid": Activation("sigmoid", 2 * _LN3, _LN3, False, torch.sigmoid),
}
"""The registry: name -> :class:`Activation`."""


def get_activation(activation: str | Activation) -> Activation:
    """Look up an activation by name (or pass an :class:`Activation` through).

    Raises:
        ValueError: if the name is not in the registry; the message lists the valid names.
    """
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        key = activation.lower()
        if key in ACTIVATIONS:
            return ACTIVATIONS[key]
    raise ValueError(
        f"Invalid activation {activation!r}. Must be one of {sorted(ACTIVATIONS)} (or an `Activation` instance)."
    )

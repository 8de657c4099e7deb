r"""The activation registry: what SWIM needs to know about the nonlinearity after a dense layer.

A SWIM neuron of an ordered pair ``(x_i, x_j)`` (Bolager et al., 2023) has the pre-activation

.. math::
    z(x) = s_1 \frac{\langle x_j - x_i, x - x_i\rangle}{\lVert x_j - x_i\rVert^2} - s_2,

so that :math:`z(x_i) = -s_2` and :math:`z(x_j) = s_1 - s_2`. The constants depend on the activation:

=========== ======================= ================= ============
activation  :math:`s_1`             :math:`s_2`       homogeneous
=========== ======================= ================= ============
relu        1                       0                 yes
leaky_relu  1                       0                 yes
tanh        :math:`\ln 3`           :math:`\ln 3 / 2` no
sigmoid     :math:`2 \ln 3`         :math:`\ln 3`     no
gelu        :math:`2 z^*`             :math:`z^*`         no
silu        :math:`2 z^*`             :math:`z^*`         no
softplus    :math:`2 z^* / \beta`    :math:`z^* / \beta`  no
=========== ======================= ================= ============

For tanh, :math:`\tanh(-s_2) = -1/2` and :math:`\tanh(s_1 - s_2) = 1/2`; sigmoid is
:math:`(1 + \tanh(z / 2)) / 2`, so its constants are those of tanh doubled.

*Homogeneous* activations satisfy :math:`\sigma(c z) = c \sigma(z)` for :math:`c > 0`: a neuron
``(w, b)`` with outgoing weights ``a`` computes the same function as ``(c w, c b)`` with ``a / c``, so
only its direction matters and its magnitude is carried by a positive ``scale``.

**Smooth ReLUs (GELU, SiLU, Softplus).** They are not homogeneous, so a neuron's magnitude is matched
as for tanh. Each is linear far from 0 and bends around 0, where its curvature :math:`\sigma''` is
largest. The pair brackets that bend symmetrically, between the points where the curvature has
fallen to half its maximum: :math:`\sigma''(\pm z^*) = \sigma''(0) / 2`, :math:`s_2 = z^*`,
:math:`s_1 = 2 z^*` (GELU :math:`z^* = \sqrt{2 (1 - W(e/2))} \approx 0.7936`, its tanh approximation
0.7930, SiLU 1.1707, Softplus :math:`2 \ln(1 + \sqrt 2) \approx 1.7627`, divided by ``beta``).
``../docs/maths.md`` derives them and compares this rule, on trained GELU and SiLU networks, with
bracketing the zeros of :math:`\sigma''` (:math:`\pm\sqrt 2` for GELU) and with ReLU's constants.

:func:`detect` tells an activation from a torch function call (``F.gelu(z, approximate="tanh")``,
``torch.tanh``, ``F.leaky_relu(z, 0.2)``, ...), which is how modules (``nn.GELU``) and functional
calls in ``forward`` are both recognised.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "Activation", "detect", "get_activation"]

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

    @staticmethod
    def softplus(beta: float = 1.0, threshold: float = 20.0) -> Activation:
        """Softplus :math:`\\log(1 + e^{\\beta z}) / \\beta`: its bend has width :math:`1/\\beta`."""
        if not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"Expected a finite positive `beta` but got {beta}.")
        z = _HALF_CURVATURE["softplus"] / beta
        return Activation("softplus", 2 * z, z, False, partial(F.softplus, beta=beta, threshold=threshold))


# z* > 0 with sigma''(z*) = sigma''(0) / 2: the smooth ReLUs' pairs run from -z* to +z* (docs/maths.md)
_HALF_CURVATURE = {
    "gelu": 0.7936284493960711,  # sqrt(2 (1 - W(e / 2))), W the Lambert W function
    "gelu_tanh": 0.7929887111353349,  # numerically
    "silu": 1.1706859459296803,  # numerically
    "softplus": 1.7627471740390859,  # 2 ln(1 + sqrt(2)) = 2 arcosh(sqrt(2))
}

ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation("relu", 1.0, 0.0, True, torch.relu),
    "leaky_relu": Activation.leaky_relu(0.01),
    "tanh": Activation("tanh", _LN3, _LN3 / 2, False, torch.tanh),
    "sigmoid": Activation("sigmoid", 2 * _LN3, _LN3, False, torch.sigmoid),
    "gelu": Activation("gelu", 2 * _HALF_CURVATURE["gelu"], _HALF_CURVATURE["gelu"], False, F.gelu),
    "gelu_tanh": Activation(
        "gelu_tanh",
        2 * _HALF_CURVATURE["gelu_tanh"],
        _HALF_CURVATURE["gelu_tanh"],
        False,
        partial(F.gelu, approximate="tanh"),
    ),
    "silu": Activation("silu", 2 * _HALF_CURVATURE["silu"], _HALF_CURVATURE["silu"], False, F.silu),
    "softplus": Activation.softplus(1.0),
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


def function_name(func: Callable[..., Any]) -> str:
    """A torch function's name without the in-place suffix: ``relu_`` -> ``relu``, ``__add__`` kept."""
    name = getattr(func, "__name__", repr(func))
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    return name


def detect(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Activation | None:
    """The activation a torch function call computes, or ``None`` if it is none SWIM knows.

    ``func`` is what a ``TorchFunctionMode`` sees: ``F.gelu`` (also what ``nn.GELU`` calls, with its
    ``approximate``), ``F.silu``, ``F.softplus`` (with ``beta``), ``F.leaky_relu`` (with its slope),
    ``torch.relu``/``Tensor.relu_``, ``torch.tanh``, ``torch.sigmoid``, ...
    """
    name = function_name(func)
    if name == "leaky_relu":
        slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
        return Activation.leaky_relu(float(slope))
    if name == "gelu":
        approximate = args[1] if len(args) > 1 else kwargs.get("approximate", "none")
        return ACTIVATIONS["gelu_tanh" if approximate == "tanh" else "gelu"]
    if name == "softplus":
        beta = args[1] if len(args) > 1 else kwargs.get("beta", 1.0)
        threshold = args[2] if len(args) > 2 else kwargs.get("threshold", 20.0)
        return Activation.softplus(float(beta), float(threshold)) if float(beta) != 1.0 else ACTIVATIONS["softplus"]
    if name in ("relu", "tanh", "sigmoid", "silu"):
        return ACTIVATIONS[name]
    return None

"""lightning_swim: explain trained networks by the data pairs of SWIM neurons, and back.

The functional core (tensors in, tensors out) and the Lightning callbacks built on it.
"""

from lightning_swim.activations import ACTIVATIONS, Activation
from lightning_swim.callbacks import SWIMInit
from lightning_swim.sampling import sample_pairs, swim_neurons

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "SWIMInit",
    "sample_pairs",
    "swim_neurons",
]

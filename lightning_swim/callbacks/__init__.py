"""Lightning callbacks: thin shells that run the functional core inside a training loop."""

from lightning_swim.callbacks.influence import InfluenceMonitor
from lightning_swim.callbacks.pair_importance import PairImportanceMonitor
from lightning_swim.callbacks.swim_init import SWIMInit

__all__ = ["InfluenceMonitor", "PairImportanceMonitor", "SWIMInit"]

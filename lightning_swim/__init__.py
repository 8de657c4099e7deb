"""lightning_swim: explain trained networks by the data pairs of SWIM neurons, and back.

The functional core (tensors in, tensors out) and the Lightning callbacks built on it.
"""

from lightning_swim._keops import configure_keops
from lightning_swim.activations import ACTIVATIONS, Activation
from lightning_swim.analysis import AnalysisConfig, analyse_network
from lightning_swim.attribution import pair_importance_scores
from lightning_swim.callbacks import InfluenceMonitor, PairImportanceMonitor, SWIMInit
from lightning_swim.evaluate import Evaluation, evaluate_scores
from lightning_swim.history import History, MapRecord, ProbeSet, RunInfo, list_runs, load_history, load_probe
from lightning_swim.importance import (
    contribution_weights,
    cross_class_share,
    effective_points,
    entropy,
    js_divergence,
    pair_importance,
    topk_overlap,
    turnover,
)
from lightning_swim.influence import TracInAccumulator, el2n_scores, tracin_self_influence
from lightning_swim.metrics import OutputR2, PredictionAgreement, fidelity
from lightning_swim.network import convert_network, map_network
from lightning_swim.pairmap import PairMap, map_layer, pair_errors, random_map
from lightning_swim.sampling import sample_pairs, swim_neurons
from lightning_swim.transport import TransportMap, transport_map

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "AnalysisConfig",
    "Evaluation",
    "History",
    "InfluenceMonitor",
    "MapRecord",
    "OutputR2",
    "PairImportanceMonitor",
    "PairMap",
    "PredictionAgreement",
    "ProbeSet",
    "RunInfo",
    "SWIMInit",
    "TracInAccumulator",
    "TransportMap",
    "analyse_network",
    "configure_keops",
    "contribution_weights",
    "convert_network",
    "cross_class_share",
    "effective_points",
    "el2n_scores",
    "entropy",
    "evaluate_scores",
    "fidelity",
    "js_divergence",
    "list_runs",
    "load_history",
    "load_probe",
    "map_layer",
    "map_network",
    "pair_errors",
    "pair_importance",
    "pair_importance_scores",
    "random_map",
    "sample_pairs",
    "swim_neurons",
    "topk_overlap",
    "tracin_self_influence",
    "transport_map",
    "turnover",
]

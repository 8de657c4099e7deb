"""The digits study behind ``lightning-swim evaluate`` and ``benchmarks/bench_attribution.py``.

Trains one network per seed on scikit-learn's digits, computes every built-in per-point score from
that seed's run (pair importance and its loss-aware variants from the final network, EL2N from early
checkpoints, TracIn from checkpoints over the whole run), and puts them all through
:func:`~lightning_swim.evaluate.evaluate_scores`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_swim.attribution import (
    anchor_ablation_scores,
    leave_one_out_scores,
    pair_importance_scores,
)
from lightning_swim.datasets import digits
from lightning_swim.evaluate import (
    Evaluation,
    TrainConfig,
    counterfactuals,
    derive_seed,
    evaluate_scores,
    train_models,
)
from lightning_swim.influence import el2n_scores, tracin_self_influence
from lightning_swim.network import map_network

SCORES: dict[str, str] = {
    "pair": "argmin pair importance: each neuron's best pair (exact search), neuron weights |w||a|",
    "pair_soft": "soft pair importance (the monitor's): near-optimal pairs weighted, neuron weights |w||a|",
    "pair_loss_grad": "soft pair importance, neuron weights sum_n |dL_n/dh_nm h_nm| (loss gradient)",
    "pair_loss_abl": "soft pair importance, neuron weights = training-loss rise when the neuron is removed",
    "anchor_ablation": "training-loss rise of the pair-rebuilt network (output refit) without a point's neurons",
    "pair_loo": "leave-one-out error of a least-squares output layer on the pair-rebuilt features",
    "trained_loo": "control: the same leave-one-out error on the trained network's own features (no pairs)",
    "anchor_oracle": "bound: EL2N order among the points of the neurons' best pairs (others 0)",
    "soft_oracle": "bound: EL2N order among the points of any near-optimal pair (the soft support; others 0)",
    "el2n": "EL2N (Paul et al. 2021), mean over checkpoints early in training",
    "tracin": "TracIn self-influence (Pruthi et al. 2020), checkpoints over the whole run",
    "random": "a uniformly random score (must not beat random subsets)",
}
_SWIM_SCORES = (
    "pair",
    "pair_soft",
    "pair_loss_grad",
    "pair_loss_abl",
    "anchor_ablation",
    "pair_loo",
    "anchor_oracle",
    "soft_oracle",
)


def default_map_kwargs() -> dict[str, Any]:
    """The exact function-space search over all pairs (the maps' soft attribution needs it)."""
    return {"refine": "exact"}


@dataclass(frozen=True)
class StudyConfig:
    """What the digits study runs (defaults: the full benchmark of ``docs/attribution.md``)."""

    widths: tuple[int, ...] = (128,)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    remove: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)
    keep: tuple[float, ...] = (0.2, 0.3, 0.5)
    stratified: tuple[bool, ...] = (False, True)
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    n_random: int = 2
    scores: tuple[str, ...] = tuple(SCORES)
    test_size: float = 0.3
    split_seed: int = 0
    el2n_epochs: tuple[int, ...] = (2, 4, 6)
    tracin_every: int = 1
    map_kwargs: dict[str, Any] = field(default_factory=default_map_kwargs)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.scores) - set(SCORES))
        if unknown:
            raise ValueError(f"Unknown score(s) {unknown}. Must be among {list(SCORES)}.")
        if any(e < 1 or e > self.epochs for e in self.el2n_epochs):
            raise ValueError(f"Expected `el2n_epochs` within [1, {self.epochs}] but got {self.el2n_epochs}.")

    def describe(self) -> str:
        widths = "-".join(str(w) for w in (64, *self.widths, 10))
        return (
            f"digits (x/16, stratified {100 * (1 - self.test_size):g}/{100 * self.test_size:g} split, seed "
            f"{self.split_seed}); {widths} ReLU MLP, Adam lr {self.lr:g}, batch {self.batch_size}, {self.epochs} "
            f"epochs; seeds {list(self.seeds)}; remove top {[f'{100 * f:g}%' for f in self.remove]}, keep top "
            f"{[f'{100 * f:g}%' for f in self.keep]}, stratified {list(self.stratified)}; {self.n_random} random "
            f"subset(s) per seed and condition; maps {self.map_kwargs}; EL2N at epochs {list(self.el2n_epochs)}, "
            f"TracIn every {self.tracin_every} epoch(s)."
        )


def compute_scores(
    config: StudyConfig, x: Tensor, y: Tensor, *, say: Callable[[str], None] = print
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Every asked-for score of every seed, ``name -> [S, N]``, and the seconds each kind took."""
    tc = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr)
    per_epoch = tc.steps(x.shape[0]) // config.epochs
    el2n_steps = [e * per_epoch for e in config.el2n_epochs]
    tracin_steps = [e * per_epoch for e in range(config.tracin_every, config.epochs + 1, config.tracin_every)]
    wanted = list(config.scores)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    need_ckpt = {"el2n", "tracin", "anchor_oracle", "soft_oracle"} & set(wanted)
    run = train_models(
        [64, *config.widths, 10],
        x,
        y,
        seeds=config.seeds,
        config=tc,
        checkpoint_steps=sorted(set(el2n_steps + tracin_steps)) if need_ckpt else (),
    )
    seconds["train (full data, all seeds)"] = time.perf_counter() - t0
    out: dict[str, list[Tensor]] = {name: [] for name in wanted}

    def add(name: str, t0: float) -> None:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0

    for si, seed in enumerate(config.seeds):
        model = run.models[si]
        maps = None
        if set(_SWIM_SCORES) & set(wanted):
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                maps = map_network(model, x, **config.map_kwargs)
            add("maps", t)
        el2n = None
        if {"el2n", "anchor_oracle", "soft_oracle"} & set(wanted):
            t = time.perf_counter()
            el2n = el2n_scores([run.checkpoints[s][si] for s in el2n_steps], x, y)
            add("el2n", t)
        for name in wanted:
            t = time.perf_counter()
            if name == "pair":
                value = pair_importance_scores(model, x, y, maps=maps, soft=False)
            elif name == "pair_soft":
                value = pair_importance_scores(model, x, y, maps=maps, soft=True)
            elif name in ("pair_loss_grad", "pair_loss_abl"):
                kind = "loss_gradient" if name == "pair_loss_grad" else "loss_ablation"
                value = pair_importance_scores(model, x, y, maps=maps, neuron_weights=kind)
            elif name == "anchor_ablation":
                value = anchor_ablation_scores(model, x, y, maps=maps)
            elif name == "pair_loo":
                value = leave_one_out_scores(model, x, y, maps=maps)
            elif name == "trained_loo":
                value = leave_one_out_scores(model, x, y, rebuild=False)
            elif name in ("anchor_oracle", "soft_oracle"):
                assert maps is not None and el2n is not None
                anchored = torch.zeros(x.shape[0], dtype=torch.bool)
                for pm in maps.values():
                    ok = pm.valid.cpu()
                    anchored[pm.idx_from.cpu()[ok]] = True
                    anchored[pm.idx_to.cpu()[ok]] = True
                    if name == "soft_oracle" and pm.soft_from is not None and pm.soft_to is not None:
                        anchored[pm.soft_from.cpu()] = True
                        anchored[pm.soft_to.cpu()] = True
                value = torch.where(anchored, 1 + el2n, torch.zeros_like(el2n))
            elif name == "el2n":
                assert el2n is not None
                value = el2n
            elif name == "tracin":
                nets = [run.checkpoints[s][si] for s in tracin_steps]
                value = tracin_self_influence(nets, x, y, [tc.lr] * len(nets))
            else:  # "random"
                gen = torch.Generator().manual_seed(derive_seed(seed, 99))
                value = torch.rand(x.shape[0], generator=gen, dtype=torch.float64)
            out[name].append(value)
            if name not in ("el2n", "anchor_oracle", "soft_oracle", "random", "trained_loo"):
                add(name, t)
    return {k: torch.stack(v) for k, v in out.items()}, seconds


def data_geometry(x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Two reference orderings of the training points: closeness to another class (minus the distance to
    the nearest point of another class) and local density (minus the mean distance to the 10 nearest)."""
    d = torch.cdist(x.double(), x.double())
    d.fill_diagonal_(float("inf"))
    other = torch.where(y[:, None] != y[None, :], d, torch.full_like(d, float("inf"))).min(1).values
    return {"boundary": -other, "density": -d.topk(10, largest=False).values.mean(1)}


def run_study(
    config: StudyConfig, *, say: Callable[[str], None] = print
) -> tuple[Evaluation, dict[str, float], dict[str, Tensor]]:
    """Compute the scores and evaluate them: the evaluation, the seconds each stage took, and the scores
    (plus the two :func:`data_geometry` references, one row each)."""
    x, y, x_test, y_test = digits(test_size=config.test_size, seed=config.split_seed)
    say(f"Running: {config.describe()}")
    say(f"  {x.shape[0]} training and {x_test.shape[0]} test digits.")
    t0 = time.perf_counter()
    scores, seconds = compute_scores(config, x, y, say=say)
    say(f"  scores computed in {time.perf_counter() - t0:.1f} s; retraining without / with only the top points ...")
    t1 = time.perf_counter()
    evaluation = evaluate_scores(
        scores,
        x,
        y,
        x_test,
        y_test,
        model=[64, *config.widths, 10],
        seeds=config.seeds,
        conditions=counterfactuals(config.remove, config.keep, stratified=config.stratified),
        config=TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr),
        n_random=config.n_random,
    )
    seconds["retraining (evaluation)"] = time.perf_counter() - t1
    return evaluation, seconds, {**scores, **{k: v[None] for k, v in data_geometry(x, y).items()}}

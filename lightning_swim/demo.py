"""The demo behind ``lightning-swim demo``: a digits MLP trained with the PairImportanceMonitor attached, and the
InfluenceMonitor beside it (EL2N and TracIn self-influence of the same probe digits, for comparison)."""

from __future__ import annotations

import itertools
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_swim.callbacks import InfluenceMonitor, PairImportanceMonitor
from lightning_swim.datasets import digits
from lightning_swim.evaluate import spearman
from lightning_swim.history import load_history


class DigitsMLP(pl.LightningModule):
    """A 64-h1-h2-10 ReLU classifier of scikit-learn's 8x8 digits, trained with Adam."""

    def __init__(self, widths: tuple[int, ...] = (128, 64), lr: float = 1e-3, batch_size: int = 64, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        sizes = (64, *widths)
        layers: list[nn.Module] = []
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for a, b in itertools.pairwise(sizes):
                layers += [nn.Linear(a, b), nn.ReLU()]
            layers.append(nn.Linear(sizes[-1], 10))
        self.net = nn.Sequential(*layers)
        self.xtr, self.ytr, self.xte, self.yte = digits(seed=seed)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/accuracy", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            TensorDataset(self.xtr, self.ytr),
            batch_size=self.hparams["batch_size"],
            shuffle=True,
            generator=torch.Generator().manual_seed(self.hparams["seed"]),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.xte, self.yte), batch_size=len(self.xte))


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (".*does not have many workers.*", ".*LeafSpec.*", ".*smaller than the logging interval.*"):
        warnings.filterwarnings("ignore", message=message)


def _fmt(value: float, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def run_demo(
    *,
    logdir: str = "lightning_swim_runs",
    epochs: int = 10,
    every: int = 2,
    widths: tuple[int, ...] = (128, 64),
    probe_size: int = 512,
    seed: int = 0,
    progress: bool = True,
    compare: bool = True,
) -> dict[str, Any]:
    """Train the digits MLP with the monitor attached, write TensorBoard logs, print what it found.

    With ``compare`` an :class:`~lightning_swim.callbacks.InfluenceMonitor` scores the same probe digits
    with EL2N and TracIn self-influence at every map, and the demo prints their Spearman correlation
    with each layer's pair importance.
    """
    _quiet_lightning()
    t0 = time.perf_counter()
    model = DigitsMLP(widths=widths, seed=seed)
    monitor = PairImportanceMonitor(
        every_n_epochs=every, probe_size=probe_size, seed=seed, transport=True, log_images=True
    )
    # the influence baselines on the same probe, after each map: their Spearman correlation with pair importance
    influence = InfluenceMonitor(every_n_epochs=every) if compare else None
    logger = TensorBoardLogger(logdir, name="demo", default_hp_metric=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=logger,
        callbacks=[monitor] if influence is None else [monitor, influence],
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=5,
    )
    trainer.fit(model)
    log_dir = Path(str(trainer.log_dir))
    history = load_history(log_dir)
    last = history[-1]
    accuracy = float(trainer.callback_metrics["val/accuracy"])
    layers = list(last.maps)

    print()
    print(
        f"lightning-swim demo: a 64-{'-'.join(map(str, widths))}-10 ReLU network, {epochs} epochs of Adam on "
        f"scikit-learn's digits ({accuracy:.3f} test accuracy)"
    )
    print(
        f"every hidden neuron mapped to the pair of training digits that explains it, {len(history)} times, "
        f"on a probe of {probe_size} digits\n"
    )
    header = (
        f"{'layer':>6} | {'neurons':>7} | {'fidelity':>8} | {'random pairs':>12} | {'effective points':>16} | "
        f"{'random pairs':>12} | {'turnover':>8} | {'Sinkhorn div.':>13}"
    )
    print(header)
    print("-" * len(header))
    rows = {}
    keys = (
        "fidelity",
        "fidelity_random_pairs",
        "effective_points",
        "effective_points_random_pairs",
        "turnover",
        "sinkhorn_divergence",
    )
    for name in layers:
        s = last.scalars
        rows[name] = {k: s.get(f"swim/{name}/{k}", float("nan")) for k in keys}
        r = rows[name]
        print(
            f"{name:>6} | {len(last.maps[name]):>7} | {_fmt(r['fidelity'], '.3f'):>8} | "
            f"{_fmt(r['fidelity_random_pairs'], '.3f'):>12} | {_fmt(r['effective_points'], '.1f'):>16} | "
            f"{_fmt(r['effective_points_random_pairs'], '.1f'):>12} | {_fmt(r['turnover'], '.2f'):>8} | "
            f"{_fmt(r['sinkhorn_divergence'], '.3f'):>13}"
        )
    s = last.scalars
    print(
        f"{'all':>6} | {'':>7} | {_fmt(s['swim/network/fidelity_keep'], '.3f'):>8} | "
        f"{_fmt(s.get('swim/network/fidelity_keep_random_pairs', math.nan), '.3f'):>12} | chance "
        f"{_fmt(s.get('swim/network/fidelity_chance', math.nan), '.3f')}; output layer refitted: "
        f"{_fmt(s['swim/network/fidelity_refit'], '.3f')} (random pairs "
        f"{_fmt(s.get('swim/network/fidelity_refit_random_pairs', math.nan), '.3f')})"
    )
    print(
        "\nfidelity: share of probe digits on which the network rebuilt from its pairs predicts the original's class,"
        "\nnext to the same rebuilt from random pairs (chance: a constant prediction); effective points: exp(entropy)"
        f"\nof the pair importance (at most {probe_size}), next to that of random pairs; turnover: share of neurons "
        "whose pair\nchanged since the previous map; Sinkhorn divergence: distance of the layer to SWIM's sampling "
        "distribution\n"
    )
    first = layers[0]
    trail = ", ".join(
        f"{r.step}: {_fmt(r.scalars.get(f'swim/{first}/sinkhorn_divergence', float('nan')), '.3f')}" for r in history
    )
    print(f"Sinkhorn divergence of layer {first} over training (step: value): {trail}")
    correlations: dict[str, dict[str, float]] = {}
    if influence is not None and influence.el2n is not None:
        scores = {"el2n": influence.el2n, "tracin": influence.tracin}
        correlations = {
            name: {k: spearman(last.importance[name], v) if v is not None else math.nan for k, v in scores.items()}
            for name in layers
        }
        n = len(influence.el2n)
        print(
            "\nwhich probe digits matter to two influence baselines (EL2N: how wrong the network is on a digit;"
            "\nTracIn: how much the gradient steps on a digit lowered its own loss), against pair importance:"
            f"\nSpearman correlation at the last map (0: unrelated; within +-{1.96 / math.sqrt(n - 1):.2f} for "
            f"unrelated scores of {n} digits)"
        )
        for name, c in correlations.items():
            print(f"{name:>6} | EL2N {_fmt(c['el2n'], '+.2f'):>5} | TracIn {_fmt(c['tracin'], '+.2f'):>5}")
    print(f"\ndone in {time.perf_counter() - t0:.0f} s. Look at the pairs, importances and curves with:")
    root = Path(logdir).resolve()  # the logger's root: TensorBoard names the run by its folder under it
    run = log_dir.resolve().relative_to(root).as_posix() if log_dir.resolve().is_relative_to(root) else log_dir.name
    print(f"  tensorboard --logdir {root}")
    print(f"(this run is {run!r} there)")
    return {
        "accuracy": accuracy,
        "layers": rows,
        "history": history,
        "log_dir": log_dir,
        "correlations": correlations,
    }

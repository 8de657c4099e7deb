"""The demo behind ``lightning-swim demo``: digits, a small MLP, SWIM initialisation, TensorBoard."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_swim._datasets import digits
from lightning_swim.callbacks import SWIMInit


class DigitsMLP(pl.LightningModule):
    """A 64-width-10 ReLU classifier of 8x8 digits, trained with Adam."""

    def __init__(self, width: int = 128, lr: float = 1e-3, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))
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
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def run_demo(
    *, logdir: str = "lightning_swim_runs", epochs: int = 8, width: int = 128, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Train the digits MLP from default and from SWIM initialisation; log both to TensorBoard."""
    _quiet_lightning()
    results: dict[str, Any] = {}
    runs: dict[str, list[pl.Callback]] = {"default_init": [], "swim_init": [SWIMInit(probe_size=2000, seed=seed)]}
    for name, callbacks in runs.items():
        model = DigitsMLP(width=width, seed=seed)
        logger = TensorBoardLogger(logdir, name="demo", version=name, default_hp_metric=False)
        trainer = pl.Trainer(
            max_epochs=epochs,
            logger=logger,
            callbacks=callbacks,
            accelerator="cpu",
            devices=1,
            enable_checkpointing=False,
            enable_progress_bar=progress,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=5,
        )
        trainer.fit(model)
        results[name] = float(trainer.callback_metrics["val/accuracy"])
    print()
    print(f"lightning-swim demo: a 64-{width}-10 ReLU network on scikit-learn's digits, {epochs} epochs of Adam")
    print(f"  test accuracy from default initialisation: {results['default_init']:.3f}")
    print(f"  test accuracy from SWIM initialisation:    {results['swim_init']:.3f}")
    print(f"\nLook at the runs with:\n  tensorboard --logdir {Path(logdir).resolve() / 'demo'}")
    return results

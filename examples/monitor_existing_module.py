"""Attach the monitor to a LightningModule you already have: the few lines a user adds.

The module below is an ordinary digits classifier; nothing in it knows about SWIM. The lines marked
`# <- added` are all it takes to see, in TensorBoard, which training points each layer leans on.

    python examples/monitor_existing_module.py [--epochs 6]
    tensorboard --logdir lightning_swim_runs/monitor_example
"""

from __future__ import annotations

import argparse
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_swim import PairImportanceMonitor, load_history  # <- added
from lightning_swim._datasets import digits


class DigitsClassifier(pl.LightningModule):
    """Someone's existing model: a 64-128-64-10 ReLU MLP trained with Adam."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)
        self.xtr, self.ytr, _, _ = digits()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.xtr, self.ytr), batch_size=64, shuffle=True)


def main(argv: list[str] | None = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--logdir", default="lightning_swim_runs")
    parser.add_argument("--probe-size", type=int, default=512)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    monitor = PairImportanceMonitor(every_n_epochs=2, probe_size=args.probe_size)  # <- added
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[monitor],  # <- added
        logger=TensorBoardLogger(args.logdir, name="monitor_example"),
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(DigitsClassifier())

    history = load_history(trainer.log_dir)  # every map, also readable after the run
    print(f"\n{'step':>5} | {'layer':>6} | {'func error':>10} | {'eff. points':>11} | {'turnover':>8} | fidelity")
    for record in history:
        for layer in record.maps:
            s = record.scalars
            turnover = s.get(f"swim/{layer}/turnover", float("nan"))
            print(
                f"{record.step:>5} | {layer:>6} | {s[f'swim/{layer}/func_error_median']:>10.3f} | "
                f"{s[f'swim/{layer}/effective_points']:>11.1f} | {turnover:>8.2f} | {s[f'swim/{layer}/fidelity']:.3f}"
            )
    print(f"\ntensorboard --logdir {trainer.log_dir}")
    return history


if __name__ == "__main__":
    main()

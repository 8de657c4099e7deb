"""Attach the monitor to a LightningModule you already have: the few lines a user adds.

The module below is an ordinary digits classifier; nothing in it knows about SWIM. The lines marked
`# <- added` are all it takes to see, in TensorBoard, which training points each layer leans on.

    python examples/monitor_existing_module.py [--epochs 6]
    tensorboard --logdir lightning_swim_runs/monitor_example
"""

from __future__ import annotations

import argparse
import math
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_swim import PairImportanceMonitor, load_history  # <- added
from lightning_swim.datasets import digits


class DigitsClassifier(pl.LightningModule):
    """Someone's existing model: a 64-128-64-10 ReLU MLP trained with Adam."""

    def __init__(self, lr: float = 1e-3, seed: int = 0) -> None:
        super().__init__()
        self.lr, self.seed = lr, seed
        with torch.random.fork_rng():  # a seeded initialisation that leaves the global RNG as it was
            torch.manual_seed(seed)
            self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
            self.head = nn.Linear(64, 10)
        self.xtr, self.ytr, _, _ = digits(seed=seed)

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
        shuffle = torch.Generator().manual_seed(self.seed)  # the same batches in every run
        return DataLoader(TensorDataset(self.xtr, self.ytr), batch_size=64, shuffle=True, generator=shuffle)


def _fmt(value: float, spec: str) -> str:
    return "-" if not math.isfinite(value) else format(value, spec)


def main(argv: list[str] | None = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--logdir", default="lightning_swim_runs")
    parser.add_argument("--probe-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="seeds the model, the batches and the probe")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    monitor = PairImportanceMonitor(every_n_epochs=2, probe_size=args.probe_size, seed=args.seed)  # <- added
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[monitor],  # <- added
        logger=TensorBoardLogger(args.logdir, name="monitor_example"),
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        log_every_n_steps=10,  # an epoch of digits is 22 batches
    )
    trainer.fit(DigitsClassifier(seed=args.seed))

    assert trainer.log_dir is not None  # the TensorBoardLogger's folder
    history = load_history(trainer.log_dir)  # every map, also readable after the run
    print(
        f"\n{'step':>5} | {'layer':>6} | {'func error':>10} | {'eff. points':>11} | {'random':>6} | {'turnover':>8} | "
        f"{'fidelity':>8} | {'random pairs':>12} | {'chance':>6}"
    )
    for record in history:
        s = record.scalars
        for layer in record.maps:
            # no turnover at the first map: there is no previous map to compare with
            turnover = s.get(f"swim/{layer}/turnover", float("nan"))
            print(
                f"{record.step:>5} | {layer:>6} | {s[f'swim/{layer}/func_error_median']:>10.3f} | "
                f"{s[f'swim/{layer}/effective_points']:>11.1f} | "
                f"{_fmt(s.get(f'swim/{layer}/effective_points_random_pairs', math.nan), '.1f'):>6} | "
                f"{_fmt(turnover, '.2f'):>8} | {s[f'swim/{layer}/fidelity']:>8.3f} | "
                f"{_fmt(s.get(f'swim/{layer}/fidelity_random_pairs', math.nan), '.3f'):>12} | "
                f"{_fmt(s.get('swim/network/fidelity_chance', math.nan), '.3f'):>6}"
            )
    n_probe = len(next(iter(history[-1].importance.values())))
    print(
        f"effective points: exp(entropy) of the pair importance over the {n_probe} probe digits, next to that of "
        "random pairs;\nturnover: share of neurons whose pair changed since the previous map ('-' at the first);\n"
        "fidelity: agreement of the network with the layer rebuilt from its pairs on the probe, next to the layer "
        "rebuilt\nfrom random pairs and to chance (the share of the most common prediction)"
    )
    print(f"\ntensorboard --logdir {trainer.log_dir}")
    return history


if __name__ == "__main__":
    main()

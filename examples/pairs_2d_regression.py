"""Which data pairs a network fitting a 2-D bump uses, over training.

A 2-64-1 ReLU network learns a Gaussian bump on [-2, 2]^2 with Adam. In two dimensions every neuron
is a line (where it switches on) and a direction; its SWIM pair is an arrow from a data point on the
line to the point where the neuron's output reaches 1. The PairImportanceMonitor logs that arrow
figure to TensorBoard at every map; this script also saves it as PNG files and prints how the pairs
settle: the median pair cost, the turnover between maps, and the fidelity of the network rebuilt
from its pairs.

    python examples/pairs_2d_regression.py [--epochs 60] [--out FOLDER]

The PNG files go into the run's log folder (``lightning_swim_runs/pairs_2d/version_N/png``) unless
``--out`` names another.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_swim import PairImportanceMonitor, contribution_weights, load_history, load_probe
from lightning_swim.plotting import pair_arrows


def bump(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 4 - 2
    y = torch.exp(-((x - torch.tensor([0.5, -0.3])) ** 2).sum(1, keepdim=True) / 0.5)
    return x, y


class BumpRegressor(pl.LightningModule):
    def __init__(self, width: int = 64, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, 1))
        self.x, self.y = bump(400, seed=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            TensorDataset(self.x, self.y), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0)
        )


def main(argv: list[str] | None = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--every", type=int, default=15, help="map every this many epochs")
    parser.add_argument("--logdir", default="lightning_swim_runs")
    parser.add_argument("--out", default=None, help="folder for the PNG figures (default: <the run's log dir>/png)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    model = BumpRegressor()
    monitor = PairImportanceMonitor(every_n_epochs=args.every, probe_size=400, log_images=True)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[monitor],
        accelerator="cpu",
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        logger=TensorBoardLogger(args.logdir, name="pairs_2d"),
    )
    trainer.fit(model)

    log_dir = trainer.log_dir
    assert log_dir is not None  # the TensorBoardLogger's folder
    history = load_history(log_dir)
    x, y = load_probe(log_dir)
    out = Path(args.out) if args.out else Path(log_dir) / "png"
    out.mkdir(parents=True, exist_ok=True)
    # the neuron weights of the last map: |w_m| |a_m| with the trained output weights
    hidden, output = model.net[0], model.net[2]
    assert isinstance(hidden, nn.Linear) and isinstance(output, nn.Linear)
    omega = contribution_weights(hidden.weight, output.weight)
    print(f"\n{'step':>5} | {'pair cost':>9} | {'turnover':>8} | {'eff. points':>11} | {'R2 rebuilt':>10}")
    for record in history:
        s = record.scalars
        print(
            f"{record.step:>5} | {s['swim/net.0/param_cost_median']:>9.4f} | "
            f"{s.get('swim/net.0/turnover', float('nan')):>8.2f} | {s['swim/net.0/effective_points']:>11.1f} | "
            f"{s['swim/network/fidelity_keep']:>10.4f}"
        )
        fig = pair_arrows(
            x,
            record.maps["net.0"],
            importance=record.importance["net.0"],
            neuron_weights=omega if record is history[-1] else None,
            y=y,
            title=f"pairs of the 64 neurons at step {record.step}",
        )
        fig.savefig(out / f"pairs_step{record.step:05d}.png")
    print(f"\nfigures: {out.resolve()}/pairs_step*.png\ntensorboard --logdir {trainer.log_dir}")
    return history


if __name__ == "__main__":
    main()

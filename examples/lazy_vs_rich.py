"""Lazy versus rich training (Chizat, Oyallon & Bach 2019), seen through the pair map.

One 64-128-10 ReLU network, trained on scikit-learn's digits from the same initialisation in two
regimes. Following Chizat et al., the model is scaled, ``alpha * (f(x; w) - f(x; w0))``, and trained
by gradient descent on ``loss / alpha**2``: for a large ``alpha`` training is *lazy* (the weights barely
move, the network behaves like its linearisation around the random initialisation), for a small one
it is *rich* (the hidden neurons move far and learn features).

A PairImportanceMonitor maps the hidden layer during training. The question it answers: do the
neurons move onto data pairs, i.e. does the median parameter-space cost of their best pair fall and
does the network rebuilt from the pairs agree more with the original, in one regime and not the
other? The script prints the numbers for both.

    python examples/lazy_vs_rich.py [--steps 1500]

References:
    L. Chizat, E. Oyallon, F. Bach. On lazy training in differentiable programming. NeurIPS 2019.
"""

from __future__ import annotations

import argparse
import copy
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_swim import PairImportanceMonitor, load_history
from lightning_swim._datasets import digits


class ScaledMLP(pl.LightningModule):
    """``alpha * (f(x; w) - f(x; w0))`` with squared loss / alpha^2, full-batch gradient descent."""

    def __init__(self, alpha: float, lr: float, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        self.alpha, self.lr, self.x, self.y = alpha, lr, x, y
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # the same initialisation in both regimes
            self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        self.net0 = copy.deepcopy(self.net).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * (self.net(x) - self.net0(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        target = nn.functional.one_hot(y, 10).to(x.dtype)
        return ((self(x) - target) ** 2).sum(1).mean() / self.alpha**2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=len(self.x))


def run(alpha: float, args: argparse.Namespace, data: tuple) -> list[dict[str, float]]:
    xtr, ytr, xte, yte = data
    model = ScaledMLP(alpha, args.lr, xtr, ytr)
    w0 = model.net[0].weight.detach().clone()
    every = max(1, args.steps // 3)
    monitor = PairImportanceMonitor(
        every_n_train_steps=every,
        probe=(xtr, ytr),
        layers=["net.0"],
        log_images="ends",
        top_k=16,
    )
    trainer = pl.Trainer(
        max_steps=args.steps,
        max_epochs=-1,
        callbacks=[monitor],
        accelerator="cpu",
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        logger=TensorBoardLogger(args.logdir, name="lazy_vs_rich", version=f"alpha_{alpha:g}"),
    )
    rows: dict[int, dict[str, float]] = {}

    class Record(pl.Callback):  # test accuracy and weight movement at the steps the monitor maps
        def on_train_start(self, trainer: pl.Trainer, pl_module: ScaledMLP) -> None:
            self.row(trainer, pl_module)

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: ScaledMLP, *args: object) -> None:
            if trainer.global_step % every == 0:
                self.row(trainer, pl_module)

        def on_train_end(self, trainer: pl.Trainer, pl_module: ScaledMLP) -> None:
            self.row(trainer, pl_module)

        def row(self, trainer: pl.Trainer, pl_module: ScaledMLP) -> None:
            with torch.no_grad():
                acc = float((pl_module(xte).argmax(1) == yte).float().mean())
            rows[trainer.global_step] = {
                "test_acc": acc,
                "moved": float((pl_module.net[0].weight - w0).norm() / w0.norm()),
            }

    trainer.callbacks.append(Record())
    trainer.fit(model)
    out = []
    for record in load_history(trainer.log_dir):
        s = record.scalars
        out.append(
            {
                "step": record.step,
                **rows[record.step],
                "param_cost": s["swim/net.0/param_cost_median"],
                "func_error": s["swim/net.0/func_error_median"],
                "fidelity": s["swim/net.0/fidelity"],
            }
        )
    return out


def main(argv: list[str] | None = None) -> dict[float, list[dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--points", type=int, default=600, help="training digits")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 100.0], help="small: rich, large: lazy")
    parser.add_argument("--logdir", default="lightning_swim_runs")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    xtr, ytr, xte, yte = digits()
    data = (xtr[: args.points], ytr[: args.points], xte, yte)

    results = {alpha: run(alpha, args, data) for alpha in args.alphas}
    print(
        f"\n{'alpha':>6} | {'step':>5} | {'test acc':>8} | {'|w-w0|/|w0|':>11} | {'pair cost':>9} | "
        f"{'func error':>10} | {'fidelity':>8}"
    )
    for alpha, rows in results.items():
        for r in rows:
            print(
                f"{alpha:>6g} | {r['step']:>5} | {r['test_acc']:>8.3f} | {r['moved']:>11.4f} | {r['param_cost']:>9.4f}"
                f" | {r['func_error']:>10.4f} | {r['fidelity']:>8.3f}"
            )
    for alpha, rows in results.items():
        first, last = rows[0], rows[-1]
        print(
            f"alpha={alpha:g}: pair cost {first['param_cost']:.3f} -> {last['param_cost']:.3f}, "
            f"fidelity {first['fidelity']:.3f} -> {last['fidelity']:.3f}, weights moved {last['moved']:.1%}"
        )
    return results


if __name__ == "__main__":
    main()

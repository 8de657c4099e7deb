"""Lazy versus rich training (Chizat, Oyallon & Bach 2019), seen through the pair map.

One 64-128-10 ReLU network, trained on scikit-learn's digits from the same initialisation in two
regimes. Following Chizat et al., the model is scaled, ``alpha * (f(x; w) - f(x; w0))``, and trained
by gradient descent on ``loss / alpha**2``: for a large ``alpha`` training is *lazy* (the weights barely
move, the network behaves like its linearisation around the random initialisation), for a small one
it is *rich* (the hidden neurons move far and learn features).

A PairImportanceMonitor maps the hidden layer during training, on a probe of 256 training digits. The
question it answers: do the neurons move onto data pairs, in one regime and not the other? The script
prints, for both regimes, each number next to its reference: the weights' movement, the median
parameter-space cost and function-space error of the neurons' best pairs next to those of the initial
map (step 0), and the fidelity of the network with the layer rebuilt from its pairs next to the same
network rebuilt from random pairs and to chance (a constant predictor).

What it shows: in the rich regime the weights move several times their initial norm, the pair cost
falls while the function-space error rises, and the rebuilt network agrees with the original far above
random pairs and chance. In the lazy regime the weights move by half a percent and the map stays the
initial map. Its fidelity sits at chance, and this says nothing about its pairs: the trained function is
``alpha (f - f0)``, so a rebuilt layer's error in ``f`` is magnified ``alpha = 100`` times against what
training changed (at step 0 the output is exactly zero, every prediction class 0, and chance is 1).

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
from lightning_swim.datasets import digits

PROBE = 256  # training digits the monitor maps on (the exact pair search grows as the cube of this)


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
        probe=(xtr[:PROBE], ytr[:PROBE]),
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
                "moved": float((pl_module.net[0].weight.detach() - w0).norm() / w0.norm()),
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
                "random_pairs": s["swim/net.0/fidelity_random_pairs"],
                "chance": s["swim/network/fidelity_chance"],
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
        f"\n{'alpha':>6} | {'step':>5} | {'test acc':>8} | {'|w-w0|/|w0|':>11} | {'pair cost':>9} | {'func error':>10} | "
        f"{'fidelity':>8} | {'random pairs':>12} | {'chance':>6}"
    )
    for alpha, rows in results.items():
        for r in rows:
            print(
                f"{alpha:>6g} | {r['step']:>5} | {r['test_acc']:>8.3f} | {r['moved']:>11.4f} | {r['param_cost']:>9.4f}"
                f" | {r['func_error']:>10.4f} | {r['fidelity']:>8.3f} | {r['random_pairs']:>12.3f} | {r['chance']:>6.3f}"
            )
    print("(pair cost, func error: medians over the neurons of their best pair's; the references of the fidelity: the")
    print(" layer rebuilt from random pairs, and a constant predictor)")
    for alpha, rows in results.items():
        first, last = rows[0], rows[-1]
        regime = "rich" if alpha < 1 else "lazy" if alpha > 1 else "neither"
        print(
            f"\n{regime} (alpha={alpha:g}): weights moved {last['moved']:.1%} of their initial norm; test accuracy "
            f"{last['test_acc']:.3f}\n"
            f"  pair cost {last['param_cost']:.3f}, function-space error {last['func_error']:.3f} "
            f"(the initial map's: {first['param_cost']:.3f}, {first['func_error']:.3f})\n"
            f"  fidelity of the rebuilt layer {last['fidelity']:.3f} (random pairs {last['random_pairs']:.3f}, "
            f"chance {last['chance']:.3f})"
        )
        if alpha > 1:
            print(
                f"  the output is {alpha:g} (f - f0): a rebuilt layer's error in f counts {alpha:g} times against what "
                "training changed, so this fidelity is low whatever the pairs"
            )
    return results


if __name__ == "__main__":
    main()

"""Lazy versus rich training (Chizat, Oyallon & Bach 2019), seen through the pair map.

One 64-128-10 ReLU network, trained on scikit-learn's digits from the same initialisation in two
regimes. Following Chizat et al., the model is scaled, ``alpha * (f(x; w) - f(x; w0))``, and trained
by gradient descent on ``loss / alpha**2``: for a large ``alpha`` training is *lazy* (the weights barely
move, the network behaves like its linearisation around the random initialisation), for a small one
it is *rich* (the hidden neurons move far and learn features).

A PairImportanceMonitor maps the hidden layer during training, on a probe of 256 training digits. The
question it answers: do the neurons move onto data pairs, in one regime and not the other? The script
prints, for both regimes, each number next to its reference: the weights' movement; the median
parameter-space cost and function-space error of the neurons' best pairs, the median share of digits a
neuron is active on and the share of neurons that keep their pair, next to the initial map (step 0);
and the agreement of the network with its hidden layer rebuilt from its pairs, next to the same layer
rebuilt from random pairs and to chance (the share of the most frequent prediction), both for the
trained model ``alpha (f - f0)`` and for the network ``f`` alone.

What it shows (defaults, seed 0): in the rich regime the weights move more than three times their
initial norm, 98% of the neurons change pair, and the rebuilt layer agrees with the trained model on
about 0.71 of the probe (random pairs 0.29, chance 0.15). The median pair cost falls (1.52 -> 1.41)
while the function-space error rises (0.39 -> 0.58): the random neurons of step 0 are active on about
45% of the digits, a broad, nearly linear response that many pairs imitate; the trained neurons are
selective (active on about 13%), and their cut through the digits is harder to hit with a pair.

In the lazy regime the weights move by half a percent, 95% of the neurons keep their pair of step 0,
and every number of the map stays at the initial map's: the map explains ``f``, which is still the
random ``f0`` (``f`` alone rebuilt from its pairs: 0.45, random pairs 0.21, chance 0.27, as at step
0), not what training changed. The trained model's agreement (0.10) sits even below chance (0.15), and
this says nothing about the pairs: the prediction ``alpha (f - f0)`` multiplies a rebuilt layer's
error in ``f`` by ``alpha = 100``, against a change of ``f`` that is ``1/alpha`` small, so any rebuilt
layer that is not exact scrambles it. (At step 0 that prediction is exactly zero, every digit is
predicted class 0 and chance is 1, so no agreement is printed there.)

    python examples/lazy_vs_rich.py [--steps 1500]

References:
    L. Chizat, E. Oyallon, F. Bach. On lazy training in differentiable programming. NeurIPS 2019.
"""

from __future__ import annotations

import argparse
import copy
import math
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_swim import PairImportanceMonitor, convert_network, fidelity, load_history
from lightning_swim.analysis import chance_fidelity
from lightning_swim.datasets import digits
from lightning_swim.pairmap import random_map

PROBE = 256  # training digits the monitor maps on (the exact pair search grows as the cube of this)


def linear(net: nn.Sequential, k: int) -> nn.Linear:
    """The ``k``-th module of ``net``, an ``nn.Linear``."""
    layer = net[k]
    assert isinstance(layer, nn.Linear)
    return layer


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

    @property
    def hidden(self) -> nn.Linear:
        """The hidden layer, ``net.0``."""
        return linear(self.net, 0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=len(self.x))


def run(alpha: float, args: argparse.Namespace, data: tuple) -> list[dict[str, float]]:
    xtr, ytr, xte, yte = data
    model = ScaledMLP(alpha, args.lr, xtr, ytr)
    w0 = model.hidden.weight.detach().clone()
    probe = xtr[:PROBE]
    every = max(1, args.steps // 3)
    monitor = PairImportanceMonitor(
        every_n_train_steps=every,
        probe=(probe, ytr[:PROBE]),
        layers=["net.0"],
        log_images="ends",
        top_k=16,
    )
    rows: dict[int, dict[str, float]] = {}
    nets: dict[int, nn.Sequential] = {}  # f at the steps the monitor maps, to rebuild it from the maps afterwards

    class Record(pl.Callback):  # test accuracy, weight movement and f at the steps the monitor maps
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.row(trainer, model)

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            if trainer.global_step % every == 0:
                self.row(trainer, model)

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.row(trainer, model)

        def row(self, trainer: pl.Trainer, pl_module: ScaledMLP) -> None:
            with torch.no_grad():
                acc = float((pl_module(xte).argmax(1) == yte).float().mean())
            rows[trainer.global_step] = {
                "test_acc": acc,
                "moved": float((pl_module.hidden.weight.detach() - w0).norm() / w0.norm()),
            }
            nets[trainer.global_step] = copy.deepcopy(pl_module.net).requires_grad_(False)

    trainer = pl.Trainer(
        max_steps=args.steps,
        max_epochs=-1,
        callbacks=[monitor, Record()],
        accelerator="cpu",
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        logger=TensorBoardLogger(args.logdir, name=f"lazy_vs_rich/alpha_{alpha:g}"),  # a new version per run
    )
    trainer.fit(model)
    assert trainer.log_dir is not None  # the TensorBoardLogger's folder
    history = load_history(trainer.log_dir)
    first = history[0].maps["net.0"]
    out = []
    for record in history:
        s, pm, f = record.scalars, record.maps["net.0"], nets[record.step]
        same = pm.valid & first.valid & (pm.idx_from == first.idx_from) & (pm.idx_to == first.idx_to)
        # f alone (the 64-128-10 network, without alpha (. - f0)) rebuilt from the same pairs, and from random ones
        generator = torch.Generator().manual_seed(0)
        w, b = linear(f, 0).weight, linear(f, 0).bias
        randoms = random_map(w, b, probe, activation="relu", generator=generator)
        with torch.no_grad():
            active = (f[1](f[0](probe)) > 0).float().mean(0)  # share of the probe each neuron is active on
            f_chance = chance_fidelity(f(probe), "classification")
        out.append(
            {
                "step": record.step,
                **rows[record.step],
                "param_cost": s["swim/net.0/param_cost_median"],
                "func_error": s["swim/net.0/func_error_median"],
                "active": float(active.median()),
                "same_pairs": float(same.float().sum() / first.valid.float().sum()),
                "fidelity": s["swim/net.0/fidelity"],
                "random_pairs": s["swim/net.0/fidelity_random_pairs"],
                "chance": s["swim/network/fidelity_chance"],
                "f_fidelity": fidelity(f, convert_network(f, {"0": pm}, probe), probe),
                "f_random_pairs": fidelity(f, convert_network(f, {"0": randoms}, probe), probe),
                "f_chance": f_chance,
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

    def fmt(value: float, spec: str) -> str:
        return "-" if not math.isfinite(value) else format(value, spec)

    print("\nwhat training does to the hidden layer (the step-0 row of each regime is the initial map: the reference)")
    print(
        f"{'alpha':>6} | {'step':>5} | {'test acc':>8} | {'|w-w0|/|w0|':>11} | {'pair cost':>9} | {'func error':>10} | "
        f"{'active on':>9} | {'same pair as step 0':>19}"
    )
    for alpha, rows in results.items():
        for r in rows:
            print(
                f"{alpha:>6g} | {r['step']:>5} | {r['test_acc']:>8.3f} | {r['moved']:>11.4f} | "
                f"{r['param_cost']:>9.3f} | {r['func_error']:>10.3f} | {r['active']:>9.1%} | {r['same_pairs']:>19.1%}"
            )
    print(
        "pair cost, func error: medians over the neurons of their best pair's parameter-space cost and function-space\n"
        f"error; active on: median share of the {min(PROBE, args.points)} probe digits on which a neuron is active; "
        f"test acc: chance {float(torch.bincount(yte).max()) / len(yte):.3f} (the most frequent test class)"
    )
    print(
        "\nthe hidden layer rebuilt from its pairs: agreement with the original on the probe, of the trained model"
        "\nalpha (f - f0) and of the network f alone, each next to the layer rebuilt from random pairs and to chance"
    )
    print(
        f"{'alpha':>6} | {'step':>5} | {'alpha (f - f0)':>14} | {'random pairs':>12} | {'chance':>6} | "
        f"{'f alone':>7} | {'random pairs':>12} | {'chance':>6}"
    )
    for alpha, rows in results.items():
        for r in rows:
            # at step 0, alpha (f - f0) is exactly 0: every prediction is class 0, nothing to agree with
            fid, rnd = (math.nan, math.nan) if r["step"] == 0 else (r["fidelity"], r["random_pairs"])
            print(
                f"{alpha:>6g} | {r['step']:>5} | {fmt(fid, '.3f'):>14} | {fmt(rnd, '.3f'):>12} | {r['chance']:>6.3f} | "
                f"{r['f_fidelity']:>7.3f} | {r['f_random_pairs']:>12.3f} | {r['f_chance']:>6.3f}"
            )
    print("(chance: the share of the original's most frequent prediction; '-' at step 0, where alpha (f - f0) = 0)")
    for alpha, rows in results.items():
        first, last = rows[0], rows[-1]
        regime = "rich" if alpha < 1 else "lazy" if alpha > 1 else "neither"
        print(
            f"\n{regime} (alpha={alpha:g}): weights moved {last['moved']:.1%} of their initial norm; test accuracy "
            f"{last['test_acc']:.3f};\n  {last['same_pairs']:.0%} of the neurons keep their pair of step 0\n"
            f"  pair cost {first['param_cost']:.3f} -> {last['param_cost']:.3f}, function-space error "
            f"{first['func_error']:.3f} -> {last['func_error']:.3f}, neurons active on {first['active']:.0%} -> "
            f"{last['active']:.0%} of the digits\n"
            f"  rebuilt from its pairs: alpha (f - f0) agrees on {last['fidelity']:.3f} (random pairs "
            f"{last['random_pairs']:.3f}, chance {last['chance']:.3f});\n  f alone on {last['f_fidelity']:.3f} "
            f"(random pairs {last['f_random_pairs']:.3f}, chance {last['f_chance']:.3f})"
        )
        if alpha > 1:
            print(
                f"  the map stays the initial map: it explains f, which is still the random f0, not what training "
                f"changed.\n  The prediction alpha (f - f0) multiplies a rebuilt layer's error in f by {alpha:g}, "
                "against a change\n  of f that is 1/alpha small: its agreement is low whatever the pairs, and says "
                "nothing about them"
            )
    return results


if __name__ == "__main__":
    main()

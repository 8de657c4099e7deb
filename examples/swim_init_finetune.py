"""SWIM-initialised fine-tuning next to default initialisation, and how far the pairs drift.

Two copies of one 64-256-10 ReLU network on scikit-learn's digits: one keeps PyTorch's default
initialisation, the other is sampled with SWIM (its hidden neurons from data pairs, its output layer
by least squares). Both are fine-tuned with Adam; after every epoch the script prints both test
accuracies and maps the SWIM-initialised network back to data pairs (the inverse direction): the
share of neurons still explained by the very pair they were built from, the median parameter-space
cost of their best pair, and how well the network rebuilt from its current pairs agrees with it
on held-out digits (keeping its output layer, or refitting it to the network's outputs).

The least-squares output layer of a SWIM network has large weights, so the small moves of the
hidden neurons are amplified: the pairs stay, yet a rebuild that keeps the output layer stops
agreeing after one epoch, while a refitted output layer restores the agreement.

    python examples/swim_init_finetune.py [--epochs 10]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_swim import SWIMInit, convert_network, fidelity, map_network
from lightning_swim._datasets import digits


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def drift(model: nn.Module, x: torch.Tensor, initial: tuple[torch.Tensor, torch.Tensor], x_test: torch.Tensor):
    """Map the hidden layer back to pairs and compare with the pairs it was sampled from."""
    maps = map_network(model, x, top_k=32)
    pm = maps["0"]
    kept = float(((pm.idx_from == initial[0]) & (pm.idx_to == initial[1])).float().mean())
    keep = fidelity(model, convert_network(model, maps, x), x_test)
    refit = fidelity(model, convert_network(model, maps, x, output="refit"), x_test)
    return kept, float(pm.param_cost.median()), keep, refit


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    xtr, ytr, xte, yte = digits()
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        default = nn.Sequential(nn.Linear(64, args.width), nn.ReLU(), nn.Linear(args.width, 10))
    swim = copy.deepcopy(default)
    initial = SWIMInit(seed=args.seed).apply(swim, xtr, ytr)["0"]

    loader = DataLoader(
        TensorDataset(xtr, ytr), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(args.seed)
    )
    models = {"default": default, "swim": swim}
    optims = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in models.items()}
    history: dict[str, list[float]] = {k: [] for k in ("default", "swim", "kept", "cost", "keep", "refit")}

    def report(epoch: int) -> None:
        for key, model in models.items():
            history[key].append(accuracy(model, xte, yte))
        for key, value in zip(("kept", "cost", "keep", "refit"), drift(swim, xtr, initial, xte), strict=True):
            history[key].append(value)
        print(
            f"{epoch:>5} | {history['default'][-1]:>12.3f} | {history['swim'][-1]:>9.3f} | "
            f"{history['kept'][-1]:>14.1%} | {history['cost'][-1]:>9.4f} | {history['keep'][-1]:>12.3f} | "
            f"{history['refit'][-1]:>13.3f}"
        )

    print(
        f"{'epoch':>5} | {'default init':>12} | {'SWIM init':>9} | {'on its 1st pair':>14} | {'pair cost':>9} | "
        f"{'rebuilt, keep':>12} | {'rebuilt, refit':>13}"
    )
    report(0)
    for epoch in range(1, args.epochs + 1):
        for x, y in loader:
            for key, model in models.items():
                optims[key].zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optims[key].step()
        report(epoch)
    return history


if __name__ == "__main__":
    main()

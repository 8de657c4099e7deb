"""SWIM-initialised fine-tuning next to default initialisation, on scikit-learn's digits.

Two copies of one 64-256-10 ReLU network: one keeps PyTorch's default initialisation, the other is
sampled with SWIM (its hidden layer from data pairs, its output layer by least squares). Both are then
fine-tuned with Adam; the script prints both test accuracies after every epoch.

    python examples/swim_init_finetune.py [--epochs 10]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_swim import SWIMInit
from lightning_swim._datasets import digits


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


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
    SWIMInit(seed=args.seed).apply(swim, xtr, ytr)

    loader = DataLoader(
        TensorDataset(xtr, ytr), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(args.seed)
    )
    models = {"default": default, "swim": swim}
    optims = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in models.items()}
    history = {k: [accuracy(m, xte, yte)] for k, m in models.items()}
    print(f"{'epoch':>5} | {'default init':>12} | {'SWIM init':>9}")
    print(f"{0:>5} | {history['default'][0]:>12.3f} | {history['swim'][0]:>9.3f}")
    for epoch in range(1, args.epochs + 1):
        for x, y in loader:
            for key, model in models.items():
                loss = nn.functional.cross_entropy(model(x), y)
                optims[key].zero_grad()
                loss.backward()
                optims[key].step()
        for key, model in models.items():
            history[key].append(accuracy(model, xte, yte))
        print(f"{epoch:>5} | {history['default'][-1]:>12.3f} | {history['swim'][-1]:>9.3f}")
    return history


if __name__ == "__main__":
    main()

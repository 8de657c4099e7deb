"""Rebuild a trained network from its data pairs, in plain PyTorch (no Lightning).

Train a 64-128-10 ReLU network on scikit-learn's digits with Adam, map every hidden neuron to the
ordered pair of training points whose SWIM neuron explains it (`map_network`), rebuild the network
from those pairs alone (`convert_network`), and compare it with the original on held-out digits:
keeping the trained output layer, and refitting it to the original's outputs by least squares.

    python examples/rebuild_without_lightning.py [--epochs 40]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from lightning_swim import convert_network, fidelity, map_network, pair_importance
from lightning_swim.datasets import digits


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), 32):
            idx = perm[s : s + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    xtr, ytr, xte, yte = digits(dtype=torch.float64)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        model = nn.Sequential(nn.Linear(64, args.width), nn.ReLU(), nn.Linear(args.width, 10)).double()
    train(model, xtr, ytr, args.epochs, args.seed)
    with torch.no_grad():
        accuracy = float((model(xte).argmax(1) == yte).double().mean())

    t0 = time.perf_counter()
    maps = map_network(model, xtr)  # layer name -> PairMap, on the training set
    seconds = time.perf_counter() - t0
    pm = maps["0"]
    keep = fidelity(model, convert_network(model, maps, xtr, output="keep"), xte)
    refit = fidelity(model, convert_network(model, maps, xtr, output="refit"), xte)
    imp = pair_importance(pm, len(xtr))

    print(f"trained network: {accuracy:.3f} test accuracy")
    print(f"mapped {len(pm)} neurons to pairs of {len(xtr)} training digits in {seconds:.1f} s")
    print(f"  median relative function-space error of a neuron: {float(pm.func_error.median()):.3f}")
    print(
        f"  neuron 0 is explained by the pair ({int(pm.idx_from[0])} -> {int(pm.idx_to[0])}), "
        f"labels {int(ytr[pm.idx_from[0]])} -> {int(ytr[pm.idx_to[0]])}, scale {float(pm.scale[0]):.2f}"
    )
    print(f"  {int((imp > 0).sum())} training digits take part in some pair")
    print("network rebuilt from the pairs alone, agreement with the original on held-out digits:")
    print(f"  output layer kept:    {keep:.3f}")
    print(f"  output layer refit:   {refit:.3f}")
    return {"accuracy": accuracy, "keep": keep, "refit": refit}


if __name__ == "__main__":
    main()

"""Keep-mode fidelity of CNNs rebuilt from their patch pairs, per layer and whole, on held-out data.

Two networks, each trained with Adam and mapped on a probe of its training examples with
``map_network`` (a conv layer on ``--patches`` of its probe patches), then rebuilt with the trained
output layer kept (``convert_network(output="keep")``):

- digits 8x8: ``Conv2d(1,16,3)-ReLU-Conv2d(16,32,3)-ReLU-flatten-Linear(512,64)-ReLU-Linear(64,10)``;
- MNIST-1D (Greydanus 2020): the paper's ``ConvBase``, three ``Conv1d(., 25, k, stride 2, padding 1)``
  with ReLU, flatten, ``Linear(125, 10)``.

For every layer alone and for the whole network: the held-out prediction agreement with the original,
next to the same network rebuilt from uniformly random pairs of the same points (``random_maps``,
each pair with its best scale) and to chance (the share of the original's most frequent prediction).

    python benchmarks/bench_conv_fidelity.py [--net digits|mnist1d] [--patches 4096] [--probe 512]
        [--refine auto|function|exact] [--seeds 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

from lightning_swim import convert_network, fidelity
from lightning_swim._modelio import read_model
from lightning_swim.analysis import chance_fidelity
from lightning_swim.datasets import digits, mnist1d
from lightning_swim.network import map_reading, random_maps


def digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(512, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def mnist1d_cnn(channels: int = 25) -> nn.Module:
    """Greydanus' ConvBase: three stride-2 convolutions and a linear read-out."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 40)),
        nn.Conv1d(1, channels, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 5, 10),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch: int, seed: int):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), batch):
            idx = perm[s : s + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def run(net: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    if net == "digits":
        xtr, ytr, xte, yte = digits()
        make, epochs, lr, batch = digits_cnn, 40, 1e-3, 32
    else:
        xtr, ytr, xte, yte = mnist1d()
        make, epochs, lr, batch = mnist1d_cnn, 40, 1e-2, 100
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = make()
    t0 = time.perf_counter()
    train(model, xtr, ytr, epochs=epochs, lr=lr, batch=batch, seed=seed)
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
    probe = xtr[torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))[: args.probe]]
    t1 = time.perf_counter()
    reading = read_model(model, probe)
    layers = reading.select()
    opts = {"refine": args.refine} if args.refine != "auto" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        maps = map_reading(reading, layers, patches=args.patches, seed=seed, **opts)
        t2 = time.perf_counter()
        randoms = random_maps(reading, layers, patches=args.patches, seed=seed)
        row = {"accuracy": acc, "train_s": t1 - t0, "map_s": t2 - t1}
        with torch.no_grad():
            row["chance"] = chance_fidelity(model(xte), "classification")
        for name in maps:
            row[f"{name} ({maps[name].refine})"] = fidelity(
                model, convert_network(model, {name: maps[name]}, probe), xte
            )
            row[f"{name} random"] = fidelity(model, convert_network(model, {name: randoms[name]}, probe), xte)
        row["whole"] = fidelity(model, convert_network(model, maps, probe), xte)
        row["whole random"] = fidelity(model, convert_network(model, randoms, probe), xte)
    return row


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", choices=["digits", "mnist1d"], default="digits")
    parser.add_argument("--patches", type=int, default=4096)
    parser.add_argument("--probe", type=int, default=512)
    parser.add_argument("--refine", choices=["auto", "function", "exact"], default="auto")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [run(args.net, seed, args) for seed in range(args.seeds)]
    mean = {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}
    print(
        f"{args.net}: probe {args.probe}, {args.patches} patches per conv layer, refine={args.refine}, "
        f"{args.seeds} seed(s); held-out agreement with the original (keep mode)"
    )
    for k, v in mean.items():
        print(f"  {k:>24}: {v:.3f}")
    return mean


if __name__ == "__main__":
    main()

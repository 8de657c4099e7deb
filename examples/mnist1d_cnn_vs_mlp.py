"""The pairs of a CNN against those of an MLP, on MNIST-1D.

MNIST-1D (Greydanus 2020, "Scaling down deep learning") is a 1-D stand-in for MNIST: 4,000 training
and 1,000 test signals of length 40, ten classes, generated offline by the ``mnist1d`` package. On it
an MLP reaches about 68% test accuracy and a small CNN about 94%: the task needs translation
invariance, which the convolution has built in.

Both networks are trained side by side (the paper's models: an MLP 40-100-100-10 and ``ConvBase``,
three stride-2 ``Conv1d`` with 25 channels and a linear read-out), each with a PairImportanceMonitor.
A conv layer is a dense layer over the patches of its input, so its SWIM pairs are pairs of *patches*
(of the same or of different signals, anywhere along them), where the MLP's are pairs of whole
signals. The script prints, each next to its reference:

- test accuracy (the paper's) and, on the held-out signals, the agreement with the original of each
  network rebuilt from its pairs, per layer and whole, with the trained output layer kept (random
  pairs of the same points, and chance, beside it);
- what the pairs look like: for the CNN the width of a patch in the signal, how often the two patches
  of a pair come from one signal and how far apart they sit, and for both networks the share of pair
  weight that joins two classes, each against uniformly random pairs;

and writes the top pairs of every layer as figures (patches outlined on their signals).

    python examples/mnist1d_cnn_vs_mlp.py [--epochs 25] [--probe-size 256] [--out DIR]

The figures go into ``lightning_swim_runs/mnist1d_cnn_vs_mlp`` unless ``--out`` names another folder.

Needs ``pip install mnist1d`` (or ``lightning-swim[examples]``).
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_swim import PairImportanceMonitor, convert_network, fidelity, load_history
from lightning_swim._modelio import LayerReading, read_model
from lightning_swim.analysis import chance_fidelity, neuron_weights_of
from lightning_swim.datasets import mnist1d
from lightning_swim.network import random_maps
from lightning_swim.pairmap import PairMap
from lightning_swim.patches import input_window, top_patch_pairs

REFERENCE_ACCURACY = {"CNN": 0.94, "MLP": 0.68}  # Greydanus 2020, Table 1 (full training)


class Net(pl.LightningModule):
    def __init__(self, kind: str, x: Tensor, y: Tensor, *, lr: float, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if kind == "CNN":
                self.net = nn.Sequential(
                    nn.Unflatten(1, (1, 40)),
                    nn.Conv1d(1, 25, 5, stride=2, padding=1),
                    nn.ReLU(),
                    nn.Conv1d(25, 25, 3, stride=2, padding=1),
                    nn.ReLU(),
                    nn.Conv1d(25, 25, 3, stride=2, padding=1),
                    nn.ReLU(),
                    nn.Flatten(),
                    nn.Linear(125, 10),
                )
            else:
                self.net = nn.Sequential(
                    nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10)
                )
        self.x, self.y, self.lr, self.seed = x, y, lr, seed

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(TensorDataset(self.x, self.y), batch_size=100, shuffle=True, generator=g)


class Plain(nn.Module):
    """The network alone (no Trainer attached), under the LightningModule's attribute name."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _cross_class(pm: PairMap, labels: Tensor, per_example: int) -> float:
    ok = pm.valid
    a, b = pm.idx_from[ok] // per_example, pm.idx_to[ok] // per_example
    return float((labels[a] != labels[b]).double().mean())


def _window(layers: list[LayerReading], name: str, location: int) -> tuple[int, int]:
    """The ``(start, stop)`` of the signal (length 40) that patch ``location`` of layer ``name`` sees."""
    window = input_window(layers, name, location, (1, 40))
    assert window is not None  # convolutions straight from the input
    return window[0]


def describe_pairs(model: nn.Module, probe: tuple[Tensor, Tensor], maps: dict[str, PairMap], randoms: dict) -> dict:
    """What the pairs of every mapped layer look like, each next to the same for random pairs."""
    x, y = probe
    layers = read_model(model, x[:2]).layers
    out: dict[str, dict[str, float]] = {}
    for name, pm in maps.items():
        layer = next(la for la in layers if la.name == name)
        L = layer.locations
        row: dict[str, float] = {}
        for tag, m in (("", pm), ("_random", randoms[name])):
            ok = m.valid
            i, j = m.idx_from[ok], m.idx_to[ok]
            row["cross_class" + tag] = _cross_class(m, y, L)
            if L > 1:
                row["same_signal" + tag] = float((i // L == j // L).double().mean())
                starts_i = torch.tensor([_window(layers, name, int(q % L))[0] for q in i])
                starts_j = torch.tensor([_window(layers, name, int(q % L))[0] for q in j])
                row["shift" + tag] = float((starts_i - starts_j).abs().double().mean())
        if L > 1:
            lo, hi = _window(layers, name, 0)
            row["patch_width"] = hi - lo
        out[name] = row
    return out


def train_and_map(kind: str, data: tuple, args: argparse.Namespace, logdir: Path) -> dict:
    xtr, ytr, xte, yte = data
    probe = (xtr[: args.probe_size], ytr[: args.probe_size])
    model = Net(kind, xtr, ytr, lr=args.lr)
    monitor = PairImportanceMonitor(
        every_n_epochs=max(1, args.epochs // 2),
        probe=probe,
        patches=args.patches,
        log_images=False,
        top_k=args.top_k,
        backend="torch",  # no KeOps compilation (one per layer width) in a one-minute example
        history_dir=logdir / kind / "swim_maps",
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[monitor],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        default_root_dir=logdir / kind,
    )
    trainer.fit(model)
    net = Plain(model.net).eval()  # the trained network, its layers named as the monitor saw them ("net.1")
    assert monitor.history_dir is not None
    history = load_history(monitor.history_dir)
    record = history[-1]
    maps = {name: pm for name, pm in record.maps.items()}
    reading = read_model(net, probe[0])
    randoms = random_maps(reading, reading.select(list(maps)), patches=args.patches, seed=0)
    with torch.no_grad():
        accuracy = float((net(xte).argmax(1) == yte).float().mean())
        chance = chance_fidelity(net(xte), "classification")
    result: dict[str, Any] = {"accuracy": accuracy, "chance": chance, "maps": len(history), "layers": {}}
    for name in maps:
        one = fidelity(net, convert_network(net, {name: maps[name]}, probe[0]), xte)
        rnd = fidelity(net, convert_network(net, {name: randoms[name]}, probe[0]), xte)
        result["layers"][name] = {"fidelity": one, "fidelity_random_pairs": rnd}
    result["fidelity"] = fidelity(net, convert_network(net, maps, probe[0]), xte)
    result["fidelity_random_pairs"] = fidelity(net, convert_network(net, randoms, probe[0]), xte)
    result["pairs"] = describe_pairs(net, probe, maps, randoms)
    layers = read_model(net, probe[0][:2].view(2, -1)).layers
    for name, pm in maps.items():
        omega = neuron_weights_of(layers, name, "contribution")
        signals = probe[0].view(len(probe[0]), 1, 40)
        image = top_patch_pairs(
            signals, pm, layers, name, neuron_weights=omega, k=4, y=probe[1], title=f"{kind} layer {name}: top pairs"
        )
        path = Path(args.out) / f"{kind.lower()}_{name}_top_pairs.png"
        image.save(path)
        result.setdefault("figures", []).append(str(path))
    return result


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--probe-size", type=int, default=256)
    parser.add_argument("--patches", type=int, default=2048, help="patches per conv layer in a map")
    parser.add_argument("--top-k", type=int, default=32, help="candidates re-ranked per neuron")
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument(
        "--out", default="lightning_swim_runs/mnist1d_cnn_vs_mlp", help="folder for the figures (created)"
    )
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = mnist1d()
    data = (xtr[: args.train_size], ytr[: args.train_size], xte, yte)
    results = {}
    with tempfile.TemporaryDirectory() as logdir, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(flagged|num_workers|does not have many workers).*")
        for kind in ("CNN", "MLP"):
            results[kind] = train_and_map(kind, data, args, Path(logdir))
    report(results, args)
    return results


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    print(f"MNIST-1D, {args.epochs} epochs; maps on {args.probe_size} training signals; held-out: 1,000 test signals")
    for kind, r in results.items():
        print(f"\n{kind}: test accuracy {r['accuracy']:.3f} (reference {REFERENCE_ACCURACY[kind]:.2f}, Greydanus 2020)")
        print("  agreement with the original on the test signals, rebuilt from pairs (output layer kept):")
        for name, f in r["layers"].items():
            print(f"    layer {name:>2} alone: {f['fidelity']:.3f}   (random pairs {f['fidelity_random_pairs']:.3f})")
        print(
            f"    whole network: {r['fidelity']:.3f}   (random pairs {r['fidelity_random_pairs']:.3f}, "
            f"chance {r['chance']:.3f})"
        )
        print("  what the pairs look like (random pairs of the same points beside each):")
        for name, p in r["pairs"].items():
            line = f"    layer {name:>2}: cross-class {p['cross_class']:.2f} ({p['cross_class_random']:.2f})"
            if "patch_width" in p:
                line += (
                    f", patch of {p['patch_width']} samples; same signal {p['same_signal']:.2f} "
                    f"({p['same_signal_random']:.3f}), shift {p['shift']:.1f} samples ({p['shift_random']:.1f})"
                )
            else:
                line += ", whole signals"
            print(line)
    print("\nfigures: " + ", ".join(f for r in results.values() for f in r.get("figures", [])))


if __name__ == "__main__":
    main()

"""SWIM initialisation against default initialisation, fine-tuned with Adam at the same settings.

Two copies of one 64-256-10 ReLU network on scikit-learn's digits: one keeps PyTorch's default
initialisation, the other is sampled with SWIM (Bolager et al. 2023: its hidden neurons from pairs of
training digits, its output layer by ridge least squares), which classifies 92-96% of the test digits
before any gradient step. Both are then trained with Adam (batches of 64, the same batches for all).

**Why SWIM initialisation lost accuracy when fine-tuned** (issue 12: 0.94 -> 0.79 in the first epoch
of Adam at 1e-3, and 0.918 against 0.940 after ten). Not mainly the learning rate: with SWIMInit's
default, nearly unregularised least squares (``ridge=1e-8``) the output layer fits the one-hot targets
with large weights that cancel each other (about 400 times those of a default layer), so a tiny change
of the hidden features swings the outputs: 1% noise on the hidden weights changes most test
predictions (the script measures it). Adam moves every weight by about its learning rate per step,
whatever its gradient, so even at 1e-4 the first epoch (17 steps) costs 5 to 22 points of accuracy,
and at any learning rate the network ends no better than default initialisation. A larger ridge gives
a tame output layer (ridge 1e-3: eight times a default layer's weights, about 2% of predictions changed
by the same noise) at no cost in accuracy before training, and most of the start survives Adam at 1e-3.

**The comparison.** The settings are chosen on held-out digits (a fifth of the training set): the
ridge of SWIM's output layer and Adam's learning rate, each initialisation by its mean held-out accuracy
over the epochs (a network that starts at a solution is worth its start only if training keeps it; the
last epoch alone, on 270 digits, is a noisy criterion that picks learning rates which throw the start
away). The script prints that whole grid, default and SWIM initialisation side by side at every
learning rate (after the first epoch, after the last, and the criterion), then follows on the test
digits: SWIM at its chosen settings, default initialisation at the *same* learning rate, default
initialisation at its own chosen learning rate, and SWIM with the recipe that fails (``ridge=1e-8``,
Adam 1e-3).

What it shows (seeds 0, 1, 2; test accuracies): SWIM's chosen ridge is 1e-3 (lr 3e-3, 3e-3, 1e-3). It
starts at 0.944-0.956 and is at 0.904-0.927 after the first epoch (the failing recipe: 0.55-0.76), ahead
of default initialisation at the same learning rate in 8, 5 and 10 of the 10 epochs, and ends at
0.958-0.971 against 0.940-0.967. But default initialisation at its own best learning rate (1e-2 for
all three seeds) catches up within two or three epochs and ends level or ahead (0.964-0.976); its mean
test accuracy over the ten epochs is about the same (0.948-0.955 against SWIM's 0.935-0.952). So SWIM
initialisation's advantage is the start: a network that classifies 94% of the digits before any
gradient step, and keeps most of that through fine-tuning when its output layer is regularised; with
ten epochs of a well-tuned Adam it is not a better end point.

After every epoch the script also maps the SWIM network back to data pairs (the inverse direction):
the share of neurons still explained by the very pair they were built from, the median
parameter-space cost of their best pair, and how well the network rebuilt from its current pairs agrees
with it on the test digits (keeping its output layer, or refitting it to the network's outputs).

    python examples/swim_init_finetune.py [--epochs 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_swim import SWIMInit, convert_network, fidelity, map_network
from lightning_swim.datasets import digits

LEARNING_RATES = (1e-4, 1e-3, 3e-3, 1e-2)
RIDGES = (1e-8, 1e-3, 1e-1)  # relative ridge of SWIM's output layer (1e-8: SWIMInit's default)


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def sensitivity(model: nn.Sequential, x: Tensor, *, size: float = 0.01, draws: int = 5) -> float:
    """Share of predictions on ``x`` that change when every hidden weight and bias is perturbed by ``size``
    (relative, Gaussian), averaged over ``draws`` perturbations of a fixed generator."""
    g = torch.Generator().manual_seed(0)
    changed = 0.0
    with torch.no_grad():
        before = model(x).argmax(1)
        for _ in range(draws):
            m = copy.deepcopy(model)
            for p in m[0].parameters():
                p.mul_(1 + size * torch.randn(p.shape, generator=g))
            changed += float((m(x).argmax(1) != before).float().mean()) / draws
    return changed


def epochs_of_training(model: nn.Module, lr: float, x: Tensor, y: Tensor, epochs: int, seed: int) -> Iterator[None]:
    """Train with Adam for ``epochs`` epochs (the same batches for every model), yielding after each."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        yield


def curve(model: nn.Module, lr: float, data: tuple[Tensor, ...], epochs: int, seed: int) -> list[float]:
    """Accuracy on ``(x_val, y_val)`` before training and after each epoch on ``(x, y)`` (a copy of ``model``)."""
    x, y, x_val, y_val = data
    model = copy.deepcopy(model)
    out = [accuracy(model, x_val, y_val)]
    for _ in epochs_of_training(model, lr, x, y, epochs, seed):
        out.append(accuracy(model, x_val, y_val))
    return out


def drift(model: nn.Module, x: Tensor, initial: tuple[Tensor, Tensor], x_test: Tensor) -> list[float]:
    """Map the hidden layer back to pairs and compare with the pairs it was sampled from."""
    with warnings.catch_warnings():  # a neuron that dies in training is flagged in the map: no news here
        warnings.filterwarnings("ignore", message=".*cannot be explained by a pair.*")
        maps = map_network(model, x, top_k=32)
    pm = maps["0"]
    kept = float(((pm.idx_from == initial[0]) & (pm.idx_to == initial[1])).float().mean())
    keep = fidelity(model, convert_network(model, maps, x), x_test)
    refit = fidelity(model, convert_network(model, maps, x, output="refit"), x_test)
    return [kept, float(pm.param_cost[pm.valid].median()), keep, refit]


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a network this small trains fastest on one thread, more so on a busy machine
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)


def _main(argv: list[str] | None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    seed, epochs = args.seed, args.epochs

    xtr, ytr, xte, yte = digits(seed=seed)
    perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))
    n_fit = int(0.8 * len(xtr))
    x, y, x_val, y_val = xtr[perm[:n_fit]], ytr[perm[:n_fit]], xtr[perm[n_fit:]], ytr[perm[n_fit:]]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        default = nn.Sequential(nn.Linear(64, args.width), nn.ReLU(), nn.Linear(args.width, 10))
    swims, pairs = {}, {}
    for ridge in RIDGES:
        swims[ridge] = copy.deepcopy(default)
        pairs[ridge] = SWIMInit(seed=seed, ridge=ridge).apply(swims[ridge], x, y)["0"]

    print(f"{len(x)} training digits ({len(x_val)} more held out to choose settings), {len(xte)} test digits\n")
    print("the output layer's scale, and what 1% noise on the hidden weights does to the test predictions:")
    print(
        f"{'initialisation':>22} | {'mean |output weight|':>20} | {'test accuracy':>13} | {'predictions changed':>19}"
    )
    for name, model in [("default", default)] + [(f"SWIM, ridge {r:g}", m) for r, m in swims.items()]:
        output = model[2]
        assert isinstance(output, nn.Linear)
        weight = float(output.weight.detach().abs().mean())
        print(f"{name:>22} | {weight:>20.3f} | {accuracy(model, xte, yte):>13.3f} | {sensitivity(model, xte):>19.1%}")

    # the grid on held-out digits: every initialisation at every learning rate, the same batches for all
    inits: dict[tuple[str, float], nn.Module] = {("default", 0.0): default}
    inits.update({("swim", r): m for r, m in swims.items()})
    curves = {
        (*k, lr): curve(m, lr, (x, y, x_val, y_val), epochs, seed) for k, m in inits.items() for lr in LEARNING_RATES
    }

    def score(c: list[float]) -> float:  # held-out accuracy throughout training: the mean over epochs 1..E
        return sum(c[1:]) / len(c[1:])

    print(
        f"\nheld-out accuracy of every initialisation at every learning rate: after epoch 1, after epoch {epochs}, and "
        f"(the\ncriterion) its mean over the {epochs} epoch(s)"
    )
    names = [("default" if i == "default" else f"SWIM, ridge {r:g}") for i, r in inits]
    print(f"{'lr':>6} | " + " | ".join(f"{n:>23}" for n in names))
    for lr in LEARNING_RATES:
        cells = [curves[(*k, lr)] for k in inits]
        print(f"{lr:>6g} | " + " | ".join(f"{c[1]:.3f}, {c[-1]:.3f} ({score(c):.3f})".rjust(23) for c in cells))
    print(f"{'before':>6} | " + " | ".join(f"{curves[(*k, LEARNING_RATES[0])][0]:>23.3f}" for k in inits))

    def best(init: str) -> tuple[float, float]:  # by the criterion; ties: the smaller ridge, then the smaller lr
        key = max((k for k in curves if k[0] == init), key=lambda k: score(curves[k]))
        return key[1], key[2]

    ridge_s, lr_s = best("swim")
    _, lr_d = best("default")
    print(
        f"chosen on held-out digits: SWIM init ridge {ridge_s:g}, lr {lr_s:g} "
        f"({score(curves[('swim', ridge_s, lr_s)]):.3f}); default init lr {lr_d:g} "
        f"({score(curves[('default', 0.0, lr_d)]):.3f})\n"
    )

    swim = copy.deepcopy(swims[ridge_s])
    runs = {
        "swim": (swim, lr_s),
        "default_same_lr": (copy.deepcopy(default), lr_s),  # the same settings as SWIM's
        "default": (copy.deepcopy(default), lr_d),  # default init at its own best
        "swim_usual": (copy.deepcopy(swims[RIDGES[0]]), 1e-3),  # SWIMInit's default ridge, Adam at 1e-3: fails
    }
    keys = (*runs, "kept", "cost", "keep", "refit")
    history: dict[str, list[float]] = {k: [] for k in keys}

    def report(epoch: int) -> None:
        for key, (model, _) in runs.items():
            history[key].append(accuracy(model, xte, yte))
        for key, value in zip(keys[len(runs) :], drift(swim, x, pairs[ridge_s], xte), strict=True):
            history[key].append(value)
        h = {k: v[-1] for k, v in history.items()}
        print(
            f"{epoch:>5} | {h['swim']:>9.3f} | {h['default_same_lr']:>13.3f} | {h['default']:>12.3f} | "
            f"{h['swim_usual']:>15.3f} | {h['kept']:>15.1%} | {h['cost']:>9.4f} | {h['keep']:>13.3f} | "
            f"{h['refit']:>14.3f}"
        )

    print(
        f"test accuracy after each epoch (chance {float(torch.bincount(yte).max()) / len(yte):.3f}: the most "
        f"frequent test class): SWIM init (ridge {ridge_s:g}, lr {lr_s:g}), default init "
        f"at the same lr\nand at its own ({lr_d:g}), SWIM with ridge {RIDGES[0]:g} and Adam 1e-3; the SWIM network "
        "mapped back"
    )
    print(
        f"{'epoch':>5} | {'SWIM init':>9} | {'default, same':>13} | {'default, own':>12} | {'SWIM, ridge 1e-8':>15} | "
        f"{'on its 1st pair':>15} | {'pair cost':>9} | {'rebuilt, keep':>13} | {'rebuilt, refit':>14}"
    )
    report(0)
    loops = [epochs_of_training(model, lr, x, y, epochs, seed) for model, lr in runs.values()]
    for epoch in range(1, epochs + 1):
        for loop in loops:
            next(loop)
        report(epoch)

    s, d, d_own = history["swim"], history["default_same_lr"], history["default"]
    mean = {k: sum(v[1:]) / epochs for k, v in (("swim", s), ("same", d), ("own", d_own))}
    ahead = sum(a > b for a, b in zip(s[1:], d[1:], strict=True))
    behind = sum(a < b for a, b in zip(s[1:], d[1:], strict=True))
    print(
        f"\nat the same settings, SWIM init is ahead of default init after {ahead} of the {epochs} epochs, behind "
        f"after {behind}; after the last: {s[-1]:.3f} against {d[-1]:.3f} (default at its own lr: {d_own[-1]:.3f}; "
        f"one test digit is {1 / len(xte):.3f})\nmean test accuracy over the epochs: SWIM init {mean['swim']:.3f}, "
        f"default init {mean['same']:.3f} at the same lr, {mean['own']:.3f} at its own"
    )
    u = history["swim_usual"]
    print(
        f"SWIM with ridge {RIDGES[0]:g} and Adam 1e-3: {u[0]:.3f} -> {u[1]:.3f} after one epoch, {u[-1]:.3f} at the end"
    )
    return history


if __name__ == "__main__":
    main()

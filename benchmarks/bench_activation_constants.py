"""SWIM constants for smooth ReLUs: keep-mode fidelity of trained GELU/SiLU MLPs for candidate constants.

For each seed an MLP is trained on scikit-learn's digits with Adam (40 epochs, batch 32), read once on
the training set, every hidden layer mapped with the candidate constants ``s1 = 2 z, s2 = z`` (or
ReLU's ``s1 = 1, s2 = 0``), rebuilt from its pairs with the trained output layer kept (and refitted),
and compared with the original on the held-out digits. Candidates: the zeros of the second derivative
(GELU ``z = sqrt 2``, SiLU 2.3994), its half maximum (the library's choice; GELU 0.7936, SiLU 1.1707),
tanh's ``ln(3) / 2`` and ReLU's constants. ``docs/maths.md`` reports the numbers.

    python benchmarks/bench_activation_constants.py --act gelu --widths 64,128,10 --seeds 0,1,2,3
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_swim._modelio import read_model
from lightning_swim.activations import ACTIVATIONS, Activation
from lightning_swim.datasets import digits
from lightning_swim.network import map_reading, output_fidelity, rebuild

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from helpers import train_mlp

ZEROS = {"gelu": math.sqrt(2.0), "silu": 2.399357280515597}
FUNCTIONS = {"gelu": (nn.GELU, F.gelu), "silu": (nn.SiLU, F.silu)}


def candidates(act: str) -> dict[str, tuple[float, float]]:
    half = ACTIVATIONS[act].s2
    return {
        f"zeros of sigma'' (+-{ZEROS[act]:.3f})": (2 * ZEROS[act], ZEROS[act]),
        f"half maximum (+-{half:.3f})": (2 * half, half),
        "tanh's (+-0.549)": (math.log(3.0), math.log(3.0) / 2),
        "ReLU's (1, 0)": (1.0, 0.0),
    }


def agreement(model: nn.Module, xtr: torch.Tensor, xte: torch.Tensor, act: Activation, output: str) -> float:
    hidden = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:-1]
    reading = read_model(model, xtr, activations=dict.fromkeys(hidden, act))
    maps = map_reading(reading, reading.select())
    result = rebuild(reading, maps, output=output, keep_output=False)
    rebuilt = copy.deepcopy(model)
    reading.write(result.replacements, rebuilt)
    with torch.no_grad():
        return output_fidelity(model(xte), rebuilt(xte))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--act", choices=sorted(FUNCTIONS), default="gelu")
    parser.add_argument("--widths", default="64,128,10")
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    module, fn = FUNCTIONS[args.act]
    xtr, ytr, xte, yte = digits(dtype=torch.float64)
    cands = candidates(args.act)
    results: dict[str, dict[str, list[float]]] = {c: {"keep": [], "refit": []} for c in cands}
    for seed in (int(s) for s in args.seeds.split(",")):
        model = train_mlp(widths, xtr, ytr, epochs=40, seed=seed, act=module)
        with torch.no_grad():
            acc = float((model(xte).argmax(1) == yte).double().mean())
        print(f"seed {seed}: test accuracy {acc:.4f}", flush=True)
        for name, (s1, s2) in cands.items():
            act = Activation(args.act, s1, s2, False, fn)
            for output in ("keep", "refit"):
                results[name][output].append(agreement(model, xtr, xte, act, output))
    print(f"\n{args.act} {widths}, held-out prediction agreement, mean of seeds {args.seeds}")
    for name, r in results.items():
        print(f"{name:32s} keep {statistics.fmean(r['keep']):.4f}   refit {statistics.fmean(r['refit']):.4f}")


if __name__ == "__main__":
    main()

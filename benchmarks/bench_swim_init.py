"""SWIMInit against the reference implementation, swimnetworks, in one run.

Both sample a one-hidden-layer ReLU network on scikit-learn's digits (1,347 training points, 64
features) at the same width and solve the output layer by least squares. Times are the median of
``--repeats`` runs (seeds 0, 1, ...) of the whole fit (pair sampling, hidden layer, output solve); the
accuracy is on the 450 held-out digits, averaged over the runs' seeds.

    python benchmarks/bench_swim_init.py [--widths 64 128 ...] [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from swimnetworks import Dense, Linear
from torch import nn

from lightning_swim import SWIMInit


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.25, random_state=0, stratify=y)
    return xtr, xte, ytr, yte


def run_reference(width: int, seed: int, data: tuple) -> tuple[float, float]:
    xtr, xte, ytr, yte = data
    t0 = time.perf_counter()
    pipe = Pipeline(
        [
            (
                "dense",
                Dense(
                    layer_width=width, activation="relu", parameter_sampler="relu", random_seed=seed, is_classifier=True
                ),
            ),
            ("linear", Linear(regularization_scale=1e-8, is_classifier=True)),
        ]
    ).fit(xtr, ytr)
    elapsed = time.perf_counter() - t0
    return elapsed, float((pipe.predict(xte).ravel() == yte).mean())


def run_ours(width: int, seed: int, data: tuple, dtype: torch.dtype) -> tuple[float, float]:
    xtr, xte, ytr, yte = data
    model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10)).to(dtype)
    x, y = torch.tensor(xtr, dtype=dtype), torch.tensor(ytr)
    t0 = time.perf_counter()
    SWIMInit(seed=seed).apply(model, x, y)
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        pred = model(torch.tensor(xte, dtype=dtype)).argmax(1).numpy()
    return elapsed, float((pred == yte).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    data = digits()
    run_ours(64, 0, data, torch.float32)  # warm-up: first-call overheads of torch
    run_reference(64, 0, data)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; N = {len(data[0])} points, d = 64")
    header = (
        f"{'width':>6} | {'swimnetworks s':>14} {'acc':>6} | {'ours f32 s':>10} {'acc':>6} {'speed-up':>8} |"
        f" {'ours f64 s':>10} {'acc':>6} {'speed-up':>8}"
    )
    print(header)
    print("-" * len(header))
    for width in args.widths:
        # One implementation at a time, after a pause and a warm-up run: interleaving them lets the
        # spinning threads of one BLAS runtime (OpenBLAS for numpy, OpenMP for torch) slow down the other.
        runs = {
            "ref": lambda seed, width=width: run_reference(width, seed, data),
            "f32": lambda seed, width=width: run_ours(width, seed, data, torch.float32),
            "f64": lambda seed, width=width: run_ours(width, seed, data, torch.float64),
        }
        results = {}
        for key, run in runs.items():
            time.sleep(0.5)  # the previous block's idle BLAS threads stop spinning
            run(0)
            results[key] = [run(seed) for seed in range(args.repeats)]
        ref, f32, f64 = results["ref"], results["f32"], results["f64"]
        t_ref, t32, t64 = (statistics.median(t for t, _ in r) for r in (ref, f32, f64))
        a_ref, a32, a64 = (statistics.fmean(a for _, a in r) for r in (ref, f32, f64))
        print(
            f"{width:>6} | {t_ref:>14.4f} {a_ref:>6.3f} | {t32:>10.4f} {a32:>6.3f} {t_ref / t32:>7.2f}x |"
            f" {t64:>10.4f} {a64:>6.3f} {t_ref / t64:>7.2f}x"
        )


if __name__ == "__main__":
    main()

"""Training with and without the PairImportanceMonitor at its default frequency, in one run.

The digits MLP of the demo (64-128-64-10 ReLU, Adam, batch 64, a validation pass per epoch) is fit
for ``--epochs`` epochs, alternately without and with ``PairImportanceMonitor()`` (default settings:
20 maps planned evenly over the fit, fit start and end included, thinned to keep within
``max_overhead=0.1`` of the training time; figures at fit end, drawn on a background thread),
``--repeats`` times each. A warm-up fit first pays the imports (the monitor compiles its kernels in
its own warm-up, outside its budget, in every fit). Prints the median wall time of ``Trainer.fit``
for both, the maps made and the time spent inside them, and the ratio. ``--refine function`` gives
the monitor the cheaper, non-exact search (the default ``auto`` is exact at the probe's size).

Then one map of the same network (``analyse_network`` with the monitor's default config, on the first
training digits), untrained and after a fit of ``--epochs`` epochs, at probes of 256 and 512 points:
the median of 5, what the monitor's start and end maps cost.

    python benchmarks/bench_monitor_overhead.py [--epochs 20] [--repeats 15] [--refine auto]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_swim import PairImportanceMonitor
from lightning_swim.demo import DigitsMLP


def fit(epochs: int, monitored: bool, root: str, refine: str = "auto") -> tuple[float, int, float]:
    monitor = PairImportanceMonitor(refine=refine) if monitored else None
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[monitor] if monitor else [],
        logger=TensorBoardLogger(root, name="bench"),
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = DigitsMLP()
    t0 = time.perf_counter()
    trainer.fit(model)
    seconds = time.perf_counter() - t0
    return seconds, len(monitor._steps) if monitor else 0, monitor._map_seconds if monitor else 0.0


def map_times(epochs: int) -> None:
    """Median seconds of one map of the demo's network, untrained and trained, at probes of 256 and 512."""
    from lightning_swim.analysis import AnalysisConfig, analyse_network

    untrained, trained = DigitsMLP(), DigitsMLP()
    pl.Trainer(
        max_epochs=epochs,
        logger=False,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(trained)
    print(f"one map of the network (median of 5; trained: after {epochs} epochs), seconds")
    print(f"{'probe':>6} | {'untrained':>9} | {'trained':>9}")
    for n in (256, 512):
        cells = []
        for model in (untrained, trained):
            x, y = model.xtr[:n], model.ytr[:n]
            analyse_network(model, x, y, config=AnalysisConfig())  # its compilations
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                analyse_network(model, x, y, config=AnalysisConfig())
                times.append(time.perf_counter() - t0)
            cells.append(statistics.median(times))
        print(f"{n:>6} | {cells[0]:>9.3f} | {cells[1]:>9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--refine", default="auto", help="the monitor's search (auto: exact at this size)")
    args = parser.parse_args()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as root:
        fit(2, True, root)  # warm-up: imports, KeOps compilation
        plain, watched, maps, inside = [], [], [], []
        for _ in range(args.repeats):
            plain.append(fit(args.epochs, False, root)[0])
            seconds, n, spent = fit(args.epochs, True, root, args.refine)
            watched.append(seconds)
            maps.append(n)
            inside.append(spent)
    p, w = statistics.median(plain), statistics.median(watched)
    print(f"digits MLP, {args.epochs} epochs, median of {args.repeats} fits each; monitor refine={args.refine!r}")
    print(f"  without monitor: {p:7.2f} s")
    spent = statistics.median(inside)
    print(f"  with monitor:    {w:7.2f} s  ({statistics.median(maps):.0f} maps, {spent:.2f} s in them)")
    print(f"  overhead:        {w / p:7.3f}x  (floor 1.25x, goal 1.10x)")
    map_times(args.epochs)


if __name__ == "__main__":
    main()

"""The cost of one monitor map of the digits CNN, next to the cost of training it.

``Conv2d(1,16,3)-ReLU-Conv2d(16,32,3)-ReLU-flatten-Linear(512,64)-ReLU-Linear(64,10)`` trained with
Adam on scikit-learn's digits, then mapped by ``analyse_network`` as the PairImportanceMonitor does
(default configuration: 4,096 patches per conv layer, ``refine="auto"``, fidelity on) on a probe of
512 training images. Prints the wall and CPU seconds of the map, what refine mode each layer ran, the
forward passes of the model it made (counted by a hook), and the seconds of one training epoch, so
that the map's share of a fit of a few minutes can be read off (the monitor keeps all its maps within
``max_overhead = 0.1`` of the training time by default).

    python benchmarks/bench_conv_map_cost.py [--epochs 10] [--probe 512] [--patches 4096] [--threads 0]
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_conv_fidelity import digits_cnn, train

from lightning_swim.analysis import AnalysisConfig, analyse_network, forward_passes
from lightning_swim.datasets import digits


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--probe", type=int, default=512)
    parser.add_argument("--patches", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    xtr, ytr, _, _ = digits()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = digits_cnn()  # flat digits, unflattened to 1x8x8 images by its first module
    t0 = time.perf_counter()
    train(model, xtr, ytr, epochs=args.epochs, lr=1e-3, batch=32, seed=0)
    epoch_s = (time.perf_counter() - t0) / args.epochs
    passes = [0]
    model.register_forward_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
    probe = xtr[: args.probe]
    config = AnalysisConfig(patches=args.patches)
    analyse_network(model, probe[:64], ytr[:64], config=AnalysisConfig(patches=256))  # warm-up (KeOps builds)
    passes[0] = 0
    w0, c0 = time.perf_counter(), time.process_time()
    record = analyse_network(model, probe, ytr[: args.probe], config=config)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    modes = {name: pm.refine for name, pm in record.maps.items()}
    print(f"digits CNN, probe {args.probe}, {args.patches} patches per conv layer, {torch.get_num_threads()} thread(s)")
    print(f"  one map: {wall:.1f} s wall, {cpu:.1f} s CPU; refine per layer: {modes}")
    print(
        f"  forward passes of the model: {passes[0]} "
        f"(stated: forward_passes({len(modes)}) = {forward_passes(len(modes))})"
    )
    print(
        f"  one training epoch (1,347 images, batch 32): {epoch_s:.2f} s; a 3-minute fit at max_overhead=0.1 "
        f"affords {0.1 * 180 / wall:.1f} such maps"
    )
    return {"wall": wall, "cpu": cpu, "epoch": epoch_s, "passes": passes[0]}


if __name__ == "__main__":
    main()

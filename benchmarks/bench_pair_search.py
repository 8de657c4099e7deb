"""Stage 1 of the pair map (exact all-pairs search) on both backends against a naive baseline.

For a layer of M = 256 ReLU neurons and N probe points in d dimensions, every method returns the
exact parameter-space optimum of every neuron:

- naive: every ordered pair's (normalised) SWIM neuron is materialised, in blocks of anchors, and
  compared with all neurons by ``torch.cdist`` (a GEMM inside); the best pair is kept;
- torch: ``map_layer(..., refine="none", backend="torch")``;
- keops: ``map_layer(..., refine="none", backend="keops")`` (the formula compiled beforehand).

Each (method, N, d) runs in a fresh process so that its peak resident memory can be read; the
table shows wall time, peak RSS above the process's baseline, and the speed-up over naive. Runs
predicted to exceed ``--budget`` seconds (from the N^2 scaling of the smaller runs) are skipped.

    python benchmarks/bench_pair_search.py [--sizes 1000 2000 5000 20000] [--dims 64 784]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

M = 256


def layer(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g)
    w = torch.randn(M, d, generator=g)
    b = -(w * x[torch.randint(0, n, (M,), generator=g)]).sum(1)  # hyperplanes through the data
    return w, b, x


def naive(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, block_bytes: int = 2**28) -> tuple[torch.Tensor, ...]:
    n, d = x.shape
    norm = w.norm(dim=1, keepdim=True)
    target = torch.cat([w / norm, b[:, None] / norm], 1)  # [M, d + 1] normalised neurons
    best = torch.full((M,), float("inf"))
    best_i = torch.zeros(M, dtype=torch.long)
    best_j = torch.zeros(M, dtype=torch.long)
    rows = max(1, block_bytes // (4 * n * (d + 1 + M)))
    for s in range(0, n, rows):
        anchors = torch.arange(s, min(n, s + rows))
        u = x[None, :, :] - x[anchors, None, :]  # [B, N, d]
        delta = u.norm(dim=2, keepdim=True)
        ok = (delta > 0).squeeze(2)
        delta = delta.clamp_min(1e-30)
        swim = torch.cat([u / delta, -(u * x[anchors, None, :]).sum(2, keepdim=True) / delta], 2)  # [B, N, d+1]
        cost = torch.cdist(swim.reshape(-1, d + 1), target) ** 2  # [B*N, M]
        cost[~ok.reshape(-1)] = float("inf")
        val, arg = cost.min(0)
        better = val < best
        best = torch.where(better, val, best)
        best_i = torch.where(better, anchors[arg // n], best_i)
        best_j = torch.where(better, arg % n, best_j)
    return best_i, best_j, best


def run_one(method: str, n: int, d: int) -> dict[str, float]:
    from lightning_swim import map_layer

    w, b, x = layer(n, d)
    if method == "keops":  # compile (or load) the formula outside the timing
        map_layer(w[:2], b[:2], x[:50], refine="none", backend="keops")
        map_layer(w, b, x[:50], refine="none", backend="keops")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if method == "naive":
        i, j, _ = naive(w, b, x)
    else:
        pm = map_layer(w, b, x, refine="none", backend=method)
        i, j = pm.idx_from, pm.idx_to
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": elapsed, "peak_mb": max(0, peak - base) / 1024, "checksum": int((i * n + j).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 5000, 20000])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 784])
    parser.add_argument("--methods", nargs="+", default=["naive", "torch", "keops"])
    parser.add_argument("--budget", type=float, default=900.0, help="skip runs predicted to take longer (s)")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "N", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), int(args.one[2]))))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; M = {M} ReLU neurons, float32")
    header = f"{'N':>6} {'d':>4} | " + " | ".join(f"{m + ' s':>10} {'MB':>6}" for m in args.methods)
    header += " | " + " ".join(f"{m + '/naive':>12}" for m in args.methods if m != "naive")
    print(header)
    print("-" * len(header))
    last: dict[tuple[str, int], tuple[int, float]] = {}
    for d in args.dims:
        for n in args.sizes:
            cells, results = [], {}
            for method in args.methods:
                prev = last.get((method, d))
                predicted = prev[1] * (n / prev[0]) ** 2 if prev else 0.0
                if predicted > args.budget:
                    cells.append(f"{f'~{predicted:.0f} skip':>10} {'':>6}")
                    continue
                out = subprocess.run(
                    [sys.executable, __file__, "--one", method, str(n), str(d)],
                    capture_output=True,
                    text=True,
                    check=True,
                    env=os.environ.copy(),
                )
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results[method] = res
                last[(method, d)] = (n, res["seconds"])
                cells.append(f"{res['seconds']:>10.2f} {res['peak_mb']:>6.0f}")
            sums = {r["checksum"] for r in results.values()}
            ratios = []
            for m in args.methods:
                if m == "naive":
                    continue
                ok = "naive" in results and m in results
                ratios.append(f"{results['naive']['seconds'] / results[m]['seconds']:>11.1f}x" if ok else f"{'-':>12}")
            flag = "" if len(sums) <= 1 else "  (pairs differ!)"
            print(f"{n:>6} {d:>4} | " + " | ".join(cells) + " | " + " ".join(ratios) + flag)


if __name__ == "__main__":
    main()

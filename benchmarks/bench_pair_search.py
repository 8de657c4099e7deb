"""Stage 1 of the pair map (exact all-pairs search) on every engine, against a naive baseline and the FLOP floor.

For a layer of M = 256 ReLU neurons and N probe points in d dimensions, every method returns the
exact parameter-space optimum of every neuron:

- naive: every ordered pair's (normalised) SWIM neuron is materialised, in blocks of anchors, and
  compared with all neurons by ``torch.cdist`` (a GEMM inside); the best pair is kept;
- eager: stage 1 of ``map_layer(..., refine="none", backend="torch")`` (``neuron_terms``, ``rowmin``,
  ``topk_pairs``) in plain PyTorch (the compiled CPU kernel turned off by ``LIGHTNING_SWIM_CPU_KERNEL=0``);
- kernel: the same with the compiled CPU kernel (what ``backend="auto"`` runs on a CPU);
- keops: the same with ``backend="keops"``.
Formulas and kernels are compiled (or loaded) before the timing. ``map_layer`` adds checks, the
function-space error of the chosen pairs and the costs: ``O(N (d + M))``, visible at N = 1,000 only.

**The floor.** Once the squared distances are known (a GEMM), the cost of a pair for one neuron is
about 15 flops (``_search.py``); the floor is ``15 N^2 M`` flops at the fp32 GEMM rate, measured in
the same process just before each run (``[2048, 2048] @ [2048, 2048]``, best of 5), so that the ratio
is taken under the same load. It leaves out the distance GEMM itself (``2 N^2 d`` flops, i.e.
``2 d / M`` per pair and neuron: 6 at d = 784, M = 256), so a method at GEMM speed everywhere would
show a ratio of about ``(15 + 2 d / M) / 15``. Goal: within 2x of the floor at N = 20,000, d = 784.

Each (method, N, d) runs in a fresh process so that its peak resident memory can be read; the table
shows wall time, peak RSS above the process's baseline, the ratio to the floor and the speed-up over
naive. Runs predicted to exceed ``--budget`` seconds (from the N^2 scaling of the smaller runs) are
skipped. The last column is the share of (anchor, neuron) scans that the anchor lower bound of
DESIGN.md §2, ``cost >= s_i^2 / (1 + |x_i|^2)``, would let an exact search skip.

Timings on a shared machine vary with the other load (OpenMP threads that wait for a descheduled
sibling slow small operations down tenfold): run it on a quiet machine, or with ``--threads 1``,

    python benchmarks/bench_pair_search.py [--sizes 1000 5000 20000] [--dims 784 64] [--methods ...] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import in_subprocess

M = 256
FLOPS_PER_PAIR_NEURON = 15
METHODS = ("naive", "eager", "kernel", "keops")


def layer(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g)
    w = torch.randn(M, d, generator=g)
    b = -(w * x[torch.randint(0, n, (M,), generator=g)]).sum(1)  # hyperplanes through the data
    return w, b, x


def gemm_rate(size: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """The fp32 GEMM rate of this process in flop/s of wall time and flop/s of CPU time (best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        a @ b
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return 2 * size**3 / best, 2 * size**3 / best_cpu


def floor_seconds(n: int, rate: float) -> float:
    return FLOPS_PER_PAIR_NEURON * n * n * M / rate


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


def bound_skip_share(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, best: torch.Tensor) -> float:
    """Share of (anchor, neuron) scans whose lower bound ``s_i^2 / (1 + |x_i|^2)`` is at least the optimum."""
    norm = w.norm(dim=1)
    s = (x @ w.T + b) / norm  # [N, M] signed distances to the hyperplanes
    bound = s * s / (1 + (x * x).sum(1, keepdim=True))
    return float((bound >= best[None, :]).float().mean())


def search(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, backend: str) -> tuple[torch.Tensor, ...]:
    """Stage 1 of ``map_layer(w, b, x, refine="none", backend=backend)``: the best pair of every neuron."""
    from lightning_swim import _search
    from lightning_swim.activations import get_activation
    from lightning_swim.pairmap import DEFAULT_MAX_MEMORY

    act = get_activation("relu")
    fam = _search.Family.of(act)
    v, gamma, c0 = _search.neuron_terms(w, b, x, act)
    fmin, engine = _search.rowmin(x, v, gamma, fam, backend=backend, max_memory=DEFAULT_MAX_MEMORY)
    i, j, cost = _search.topk_pairs(x, v, gamma, c0, fam, fmin, 1)
    return i[:, 0], j[:, 0], cost[:, 0], engine


def run_one(method: str, n: int, d: int) -> dict[str, float]:
    if os.environ.get("BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    if method == "eager":
        os.environ["LIGHTNING_SWIM_CPU_KERNEL"] = "0"
    backend = {"eager": "torch", "kernel": "torch", "keops": "keops"}.get(method, "")
    w, b, x = layer(n, d)
    if backend:  # compile (or load) formulas and kernels outside the timing
        search(w[:2], b[:2], x[:50], backend)
        engine = search(w, b, x[:50], backend)[3]
        expected = {"eager": "torch", "kernel": "cpu-kernel", "keops": "keops"}[method]
        if engine != expected:  # e.g. the kernel cannot be built here: no silent eager run under its name
            raise RuntimeError(f"{method} ran on {engine}")
    rate, cpu_rate = gemm_rate()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    c0, t0 = time.process_time(), time.perf_counter()
    if method == "naive":
        i, j, cost = naive(w, b, x)
    else:
        i, j, cost, _ = search(w, b, x, backend)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": elapsed,
        "peak_mb": max(0, peak - base) / 1024,
        "gemm_gflops": rate / 1e9,
        "floor_s": floor_seconds(n, rate),
        "cpu_ratio": cpu / floor_seconds(n, cpu_rate),
        "checksum": int((i * n + j).sum()),
        "bound_skip": bound_skip_share(w, b, x, cost) if method != "naive" else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--dims", type=int, nargs="+", default=[784, 64])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budget", type=float, default=600.0, help="skip runs predicted to take longer (s)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch (and kernel) threads of every run; 1 is steadiest where other processes share the cores",
    )
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "N", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), int(args.one[2]))))
        return

    if args.threads:
        os.environ["BENCH_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    rate, _ = gemm_rate()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; M = {M} ReLU neurons, float32; "
        f"fp32 GEMM here now: {rate / 1e9:.0f} GFLOP/s (each run measures its own just before it)"
    )
    print(
        f"floor = {FLOPS_PER_PAIR_NEURON} N^2 M flops at that run's GEMM rate; goal <= 2x, acceptable <= 4x; "
        "'cpu x' is the same ratio in CPU seconds (search CPU time over the floor at the GEMM's flops per CPU "
        "second), steadier than wall time where other processes share the cores\n"
    )
    header = (
        f"{'N':>6} {'d':>4} {'method':>7} | {'seconds':>8} {'peak MB':>8} | {'GEMM GF/s':>9} {'floor s':>8} "
        f"{'x floor':>8} {'cpu x':>6} | {'vs naive':>8} | {'LB skips':>8}"
    )
    print(header)
    print("-" * len(header))
    last: dict[tuple[str, int], tuple[int, float]] = {}
    for d in args.dims:
        for n in args.sizes:
            results: dict[str, dict[str, float]] = {}
            for method in args.methods:
                prev = last.get((method, d))
                predicted = prev[1] * (n / prev[0]) ** 2 if prev else 0.0
                if predicted > args.budget:
                    print(f"{n:>6} {d:>4} {method:>7} | skipped: predicted {predicted:.0f} s > --budget")
                    continue
                res = in_subprocess(__file__, method, str(n), str(d), timeout=2 * args.budget + 120)
                if "seconds" not in res:
                    print(f"{n:>6} {d:>4} {method:>7} | {res}")
                    continue
                results[method] = res
                last[(method, d)] = (n, res["seconds"])
                speedup = results["naive"]["seconds"] / res["seconds"] if "naive" in results else float("nan")
                skips = res["bound_skip"]
                print(
                    f"{n:>6} {d:>4} {method:>7} | {res['seconds']:>8.2f} {res['peak_mb']:>8.0f} | "
                    f"{res['gemm_gflops']:>9.0f} {res['floor_s']:>8.2f} {res['seconds'] / res['floor_s']:>7.2f}x "
                    f"{res['cpu_ratio']:>5.2f}x | "
                    + (f"{speedup:>7.1f}x" if speedup == speedup else f"{'-':>8}")
                    + " | "
                    + (f"{skips:>7.1%}" if skips == skips else f"{'-':>8}"),
                    flush=True,
                )
            if len({r["checksum"] for r in results.values()}) > 1:
                print(f"{'':>12} the methods returned different pairs at N = {n}, d = {d}!")


if __name__ == "__main__":
    main()

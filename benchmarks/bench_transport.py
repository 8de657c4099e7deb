"""The population map (GeomLoss + final Sinkhorn iterations) against POT's Sinkhorn, in one run.

M = 512 neurons against K SWIM candidate neurons in parameter space (dimension d + 1), entropic
transport at the same temperature eps = blur^2 (cost |x - y|^2 / 2, POT's `reg` = eps), both run to a
comparable tolerance:

- ours-dense / ours-online: ``transport_map(..., divergence=False)`` with GeomLoss' tensorized or
  KeOps online backend for the annealed solve, then the plan's summaries (hard assignment, mass
  share, column masses) in blocks;
- POT: ``ot.sinkhorn(a, b, C, reg, method="sinkhorn_log")`` (the plain method underflows at this
  temperature), dense cost and plan, float64 as POT computes, stopping at the same marginal error.

Each run is a fresh process (peak resident memory is read there); runs that predict past
``--budget`` seconds are skipped, and runs still going after twice that are stopped. A last column
times the debiased Sinkhorn divergence alone (its candidate self-transport costs O(K^2)).

    python benchmarks/bench_transport.py [--ks 2000 10000 50000] [--dims 64 784]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import in_subprocess, measure

M, N, BLUR = 512, 4000, 0.1


def clouds(k: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, d, generator=g)
    w = torch.randn(M, d, generator=g)
    b = -(w * x[torch.randint(0, N, (M,), generator=g)]).sum(1)
    ci = torch.randint(0, N, (k,), generator=g)
    cj = (ci + torch.randint(1, N, (k,), generator=g)) % N
    return w, b, x, (ci, cj)


def run_one(method: str, k: int, d: int) -> dict:
    from lightning_swim import ACTIVATIONS, swim_neurons, transport_map
    from lightning_swim.transport import _params

    w, b, x, cands = clouds(k, d)
    warnings.simplefilter("ignore")
    if method in ("dense", "online"):
        backend = "tensorized" if method == "dense" else "online"
        if method == "online":  # compile GeomLoss' KeOps formulas outside the timing
            transport_map(w[:4], b[:4], x, candidates=(cands[0][:8], cands[1][:8]), backend=backend, divergence=False)
        res = {}
        out = measure(
            lambda: res.setdefault(
                "tm",
                transport_map(
                    w, b, x, candidates=cands, blur=BLUR, backend=backend, divergence=False, max_memory=2**30
                ),
            )
        )
        out["iterations"] = res["tm"].iterations
        return out
    if method == "divergence":
        return measure(lambda: transport_map(w, b, x, candidates=cands, blur=BLUR, max_memory=2**30, max_iter=1))
    import ot

    act = ACTIVATIONS["relu"]
    cw, cb = swim_neurons(x[cands[0]], x[cands[1]], act)
    theta, cand = _params(w, b, act).double().numpy(), _params(cw, cb, act).double().numpy()

    def pot():
        c = ot.dist(theta, cand) / 2  # squared Euclidean / 2: the same cost
        a, bb = ot.unif(M), ot.unif(k)
        return ot.sinkhorn(a, bb, c, reg=BLUR**2, method="sinkhorn_log", numItermax=5000, stopThr=1e-5)

    return measure(pot)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[2000, 10000, 50000])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 784])
    parser.add_argument("--methods", nargs="+", default=["dense", "online", "pot", "divergence"])
    parser.add_argument("--budget", type=float, default=900.0)
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), int(args.one[2]))))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; M = {M} neurons, blur = {BLUR}, float32 "
        "(POT float64)"
    )
    header = f"{'K':>6} {'d+1':>4} | " + " | ".join(f"{m + ' s':>13} {'MB':>6}" for m in args.methods)
    header += " | pot/dense pot/online"
    print(header)
    print("-" * len(header))
    last: dict = {}
    for d in args.dims:
        for k in args.ks:
            cells, res = [], {}
            for method in args.methods:
                prev = last.get((method, d))
                predicted = prev[1] * (k / prev[0]) ** (2 if method == "divergence" else 1) if prev else 0.0
                if predicted > args.budget:
                    cells.append(f"{f'~{predicted:.0f} skip':>13} {'':>6}")
                    continue
                r = in_subprocess(__file__, method, str(k), str(d), timeout=2 * args.budget)
                if "timeout" in r:  # the prediction fell short (GeomLoss changes its backend with size)
                    stopped = f">{r['timeout']:.0f} stop"
                    cells.append(f"{stopped:>13} {'':>6}")
                    continue
                if "error" in r:
                    cells.append(f"{'failed':>13} {'':>6}")
                    continue
                res[method] = r
                last[(method, d)] = (k, r["seconds"])
                its = f" ({r['iterations']})" if "iterations" in r else ""
                cell = f"{r['seconds']:.2f}{its}"
                cells.append(f"{cell:>13} {r['peak_mb']:>6.0f}")
            ratio = [
                f"{res['pot']['seconds'] / res[m]['seconds']:>8.1f}x" if "pot" in res and m in res else f"{'-':>9}"
                for m in ("dense", "online")
            ]
            print(f"{k:>6} {d + 1:>4} | " + " | ".join(cells) + " | " + " ".join(ratio))


if __name__ == "__main__":
    main()

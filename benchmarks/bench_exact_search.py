"""The exact function-space search against a brute force and the top-k path, and its floor.

Part 1 (synthetic, M = 128 ReLU neurons whose hyperplanes pass near data points, d = 64, float32):

- brute force: every ordered pair's SWIM neuron built explicitly (``swim_neurons``), its activations on
  every probe point (a GEMM in ``d``), the optimally scaled error against every neuron (a GEMM in
  ``M``), in blocks of anchors; the exact optimum, ``2 N^3 (d + M)`` flops;
- exact: ``map_layer(refine="exact")`` (the Gram-matrix formulation, ``2 N^3 M`` flops in GEMMs),
  which also returns the ambiguity counts and the soft attribution; where the CPU has native
  bfloat16 (AVX512-BF16, AMX) its GEMMs run in bf16 behind a proven error bound, the entries near the
  window recomputed exactly (``docs/maths.md``);
- dense: the same search with the bf16 screen turned off (float32 GEMMs, as on CPUs without bf16);
- top-k: ``map_layer(refine="function", top_k=128)`` (not exact);
- floors: ``2 N^3 M`` flops at the fp32 and at the bf16 GEMM rates measured in the same run.

Each run is a fresh process (its peak resident memory above the baseline is reported). Runs
predicted (from the N^3 scaling of smaller runs) to exceed ``--budget`` seconds are skipped.

Part 2 (the network of issue 9): scikit-learn's digits, a 64-128-10 ReLU MLP trained with Adam
(lr 1e-3, batch 64, 60 epochs), probe = the 1,257 training digits: the time of the 128-neuron layer's
exact map, and the keep-mode fidelity on the 540 held-out digits of the network rebuilt from the
exact pairs, from the top-k + local-search pairs, and from random pairs, next to chance.

    python benchmarks/bench_exact_search.py [--sizes 256 1000 2000] [--budget 600] [--no-digits]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from _common import in_subprocess, measure

M, D = 128, 64


def layer(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, D, generator=g)
    w = torch.randn(M, D, generator=g)
    b = -(w * x[torch.randint(0, n, (M,), generator=g)]).sum(1) + 0.1 * torch.randn(M, generator=g)
    return w, b, x


def brute_force(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, block_bytes: int = 2**28) -> torch.Tensor:
    """The best error of every neuron over all ordered pairs of distinct points, built explicitly."""
    from lightning_swim import swim_neurons

    n = x.shape[0]
    a = torch.relu(x @ w.T + b)
    aa = (a * a).sum(0)
    best = torch.full((M,), float("inf"))
    rows = max(1, block_bytes // (4 * n * (n + D + M)))
    for s in range(0, n, rows):
        anchors = torch.arange(s, min(n, s + rows))
        ii = anchors.repeat_interleave(n)
        jj = torch.arange(n).repeat(len(anchors))
        ok = (x[ii] != x[jj]).any(1)
        sw, sb = swim_neurons(x[ii[ok]], x[jj[ok]])
        h = torch.relu(x @ sw.T + sb)  # [N, P]
        ha = (h.T @ a).clamp_min(0)  # [P, M]
        err = 1 - ha**2 / ((h * h).sum(0)[:, None] * aa)
        best = torch.minimum(best, err.amin(0))
    return best


def gemm_rate(dtype: torch.dtype = torch.float32) -> float:
    """GEMM flops per second on this machine, now (best of 5 at 2048^3)."""
    a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best


def run_one(method: str, n: int) -> dict[str, float]:
    from lightning_swim import _fsearch, map_layer

    w, b, x = layer(n)
    warnings.simplefilter("ignore", RuntimeWarning)  # dead neurons are counted, not warned about
    result: dict[str, float] = {}

    def go() -> None:
        if method == "brute":
            result["error_mean"] = float(brute_force(w, b, x).mean())
            return
        refine = "exact" if method in ("exact", "dense") else "function"
        _fsearch.SCREEN = False if method == "dense" else None
        pm = map_layer(w, b, x, refine=refine, top_k=128, backend="torch")
        result["error_mean"] = float(pm.func_error[pm.valid].mean())
        result["live"] = int(pm.valid.sum())

    result.update(measure(go))
    return result


def digits_table(rate: float, rate16: float) -> None:
    """Part 2, with the exact search's floors at the GEMM rates ``rate`` (fp32) and ``rate16`` (bf16) of this run."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from lightning_swim import _fsearch, convert_network, fidelity, map_layer, random_map
    from lightning_swim.analysis import chance_fidelity

    X, y = load_digits(return_X_y=True)
    xtr, xte, ytr, _ = train_test_split(X / 16.0, y, test_size=0.3, stratify=y, random_state=0)
    xtr, xte = torch.tensor(xtr, dtype=torch.float32), torch.tensor(xte, dtype=torch.float32)
    ytr = torch.tensor(ytr)
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(60):
        perm = torch.randperm(len(xtr), generator=g)
        for s in range(0, len(xtr), 64):
            idx = perm[s : s + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    w, b = model[0].weight.detach(), model[0].bias.detach()
    warnings.simplefilter("ignore", RuntimeWarning)
    rows = []
    t0 = time.perf_counter()
    exact = map_layer(w, b, xtr, refine="exact")
    rows.append(("exact (all pairs)", exact, time.perf_counter() - t0))
    if _fsearch.screens(xtr):
        _fsearch.SCREEN, t0 = False, time.perf_counter()
        rows.append(("exact, no bf16", map_layer(w, b, xtr, refine="exact"), time.perf_counter() - t0))
        _fsearch.SCREEN = None
    t0 = time.perf_counter()
    local = map_layer(w, b, xtr, refine="function", top_k=128, local_search=1)
    rows.append(("top-128 + 1 sweep", local, time.perf_counter() - t0))
    t0 = time.perf_counter()
    top16 = map_layer(w, b, xtr, refine="function", top_k=16)
    rows.append(("top-16", top16, time.perf_counter() - t0))
    rows.append(("random pairs", random_map(w, b, xtr, generator=torch.Generator().manual_seed(1)), 0.0))
    chance = chance_fidelity(model(xte), "classification")
    n_live = int(exact.valid.sum())
    print(f"\ndigits 64-128-10 ReLU, probe = {len(xtr)} training digits, {n_live} live neurons (of 128)")
    print(f"{'pairs':>18} | {'seconds':>7} | {'median error':>12} | {'optimal share':>13} | {'keep fidelity':>13}")
    for name, pm, seconds in rows:
        keep = fidelity(model, convert_network(model, {"0": pm}, xtr, output="keep"), xte)
        ok = exact.valid
        optimal = float((pm.func_error[ok] <= exact.func_error[ok] + 1e-6).double().mean())
        med = float(pm.func_error[pm.valid].median())
        print(f"{name:>18} | {seconds:>7.2f} | {med:>12.4f} | {optimal:>13.2f} | {keep:>13.3f}")
    print(f"{'chance':>18} | {'':>7} | {'':>12} | {'':>13} | {chance:>13.3f}")
    flops = 2 * len(xtr) ** 3 * n_live
    print(
        f"floors of the exact search (2 N^3 M flops, M = {n_live} live neurons): fp32 {flops / rate:.2f} s, "
        f"bf16 {flops / rate16:.2f} s"
    )
    near = exact.n_near[exact.valid]
    print(
        f"ambiguity (exact): {float((near > 1).double().mean()):.0%} of neurons have 2+ pairs within 0.01 of their "
        f"best; median {float(near.double().median()):.0f} pairs over "
        f"{float(exact.n_near_points[exact.valid].double().median()):.0f} points"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1000, 2000])
    parser.add_argument("--methods", nargs="+", default=["brute", "exact", "dense", "topk"])
    parser.add_argument("--budget", type=float, default=600.0, help="skip runs predicted to take longer (s)")
    parser.add_argument("--no-digits", action="store_true", help="skip part 2")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        import json

        print(json.dumps(run_one(args.one[0], int(args.one[1]))))
        return
    from lightning_swim._fsearch import screens

    rate, rate16 = gemm_rate(), gemm_rate(torch.bfloat16)
    screen = "on" if screens(torch.zeros(1)) else "off (no native bf16 here)"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; GEMM fp32 {rate / 1e9:.0f}, "
        f"bf16 {rate16 / 1e9:.0f} GFLOP/s; the exact search's bf16 screen: {screen}"
    )
    print(f"M = {M} ReLU neurons, d = {D}, float32; floors = 2 N^3 M flops at the fp32 / bf16 GEMM rates")
    head = f"{'N':>5} | {'floors s':>11} | " + " | ".join(f"{m + ' s':>9} {'MB':>5}" for m in args.methods)
    head += f" | {'exact/floor fp32, bf16':>22} | {'dense/exact':>11} | {'brute/exact':>11} | "
    head += f"{'mean error brute / exact / top-k':>32}"
    print(head)
    print("-" * len(head))
    last: dict[str, tuple[int, float]] = {}
    for n in args.sizes:
        floor, floor16 = 2 * n**3 * M / rate, 2 * n**3 * M / rate16
        cells, res = [], {}
        for method in args.methods:
            prev = last.get(method)
            predicted = prev[1] * (n / prev[0]) ** 3 if prev else 0.0
            if predicted > args.budget:
                cells.append(f"{f'~{predicted:.0f} skip':>9} {'':>5}")
                continue
            r = in_subprocess(__file__, method, str(n), timeout=2 * args.budget)
            if "seconds" not in r:
                cells.append(f"{'failed':>9} {'':>5}")
                continue
            res[method] = r
            last[method] = (n, r["seconds"])
            cells.append(f"{r['seconds']:>9.2f} {r['peak_mb']:>5.0f}")

        def ratio(a: str, b: str | float, res: dict[str, dict[str, float]] = res) -> str:
            if a not in res or (isinstance(b, str) and b not in res):
                return "-"
            den = b if isinstance(b, float) else res[b]["seconds"]
            return f"{res[a]['seconds'] / den:.1f}x"

        errs = " / ".join(f"{res[m]['error_mean']:.4f}" if m in res else "-" for m in ("brute", "exact", "topk"))
        floors = f"{ratio('exact', floor)}, {ratio('exact', floor16)}"
        print(
            f"{n:>5} | {floor:>5.2f} {floor16:>5.2f} | " + " | ".join(cells) + f" | {floors:>22} | "
            f"{ratio('dense', 'exact'):>11} | {ratio('brute', 'exact'):>11} | {errs:>32}"
        )
    if not args.no_digits:
        digits_table(rate, rate16)


if __name__ == "__main__":
    main()

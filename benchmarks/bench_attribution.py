"""Does pair importance say which training digits matter? The evaluation table of ``docs/attribution.md``.

On scikit-learn's digits (x/16, stratified 70/30 split), a 64-128-10 ReLU MLP trained with Adam
(lr 1e-3, batch 64, 60 epochs) for each of 5 seeds; every built-in score of every seed is computed
from that seed's run (pair importance and its loss-aware variants from the final network; EL2N from
the checkpoints at epochs 2, 4, 6; TracIn from a checkpoint at every epoch), then the network is
retrained with the top 5/10/20/40% removed and with only the top 20/30/50% kept (globally and per
class), each against random subsets of the same size (2 draws per seed and condition), from the same
initialisation and for the same number of steps. Prints the table (means, standard deviations,
per-seed differences to random, seeds that beat random by 2 points), seed stability and the
Spearman correlations between the scores.

    python benchmarks/bench_attribution.py [--seeds 5] [--json rows.json] [--threads 1]

About 10 minutes on two idle CPU cores (retraining ~1,600 small networks dominates; batched 128 at a time).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lightning_swim._study import SCORES, StudyConfig, run_study
from lightning_swim.evaluate import spearman


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--n-random", type=int, default=2)
    parser.add_argument("--scores", nargs="+", default=list(SCORES))
    parser.add_argument("--json", default=None, help="write the rows, stability and correlations here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = StudyConfig(seeds=tuple(range(args.seeds)), n_random=args.n_random, scores=tuple(args.scores))
    t0 = time.perf_counter()
    evaluation, seconds, scores = run_study(config)
    print()
    print(evaluation)
    print()
    print("Spearman ρ with the data's geometry (mean over seeds): closeness to another class, local density")
    geometry: dict[str, list[float]] = {}
    for name in evaluation.scores:
        per = scores[name]
        geometry[name] = [
            sum(spearman(per[s], scores[ref][0]) for s in range(per.shape[0])) / per.shape[0]
            for ref in ("boundary", "density")
        ]
        print(f"  {name:<16} {geometry[name][0]:+.2f}   {geometry[name][1]:+.2f}")
    print()
    print("Scores:")
    for name in evaluation.scores:
        print(f"  {name:<16} {SCORES[name]}")
    print("Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    print(f"Total {time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} torch thread(s).")
    if args.json:
        names, rho = evaluation.correlations or ([], torch.zeros(0, 0))
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "config": config.describe(),
                    "full_accuracy": [float(a) for a in evaluation.full_accuracy],
                    "rows": evaluation.rows(),
                    "stability": evaluation.stability,
                    "correlations": {"names": names, "rho": rho.tolist()},
                    "geometry": geometry,
                    "seconds": seconds,
                },
                fh,
                indent=1,
            )


if __name__ == "__main__":
    main()

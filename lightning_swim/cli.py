"""The ``lightning-swim`` command line."""

from __future__ import annotations

import argparse
import sys

from lightning_swim import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-swim",
        description="Explain trained networks by the data pairs of SWIM neurons.",
    )
    parser.add_argument("--version", action="version", version=f"lightning-swim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small network on scikit-learn's digits and show what SWIM sees")
    demo.add_argument(
        "--logdir", default="lightning_swim_runs", help="TensorBoard log directory (default: %(default)s)"
    )
    demo.add_argument("--epochs", type=int, default=10, help="training epochs (default: %(default)s)")
    demo.add_argument("--every", type=int, default=2, help="map every this many epochs (default: %(default)s)")
    demo.add_argument("--widths", type=int, nargs="+", default=[128, 64], help="hidden widths (default: 128 64)")
    demo.add_argument("--probe-size", type=int, default=512, help="probe digits (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument(
        "--no-influence",
        action="store_true",
        help="without the InfluenceMonitor (EL2N and TracIn of the probe digits beside pair importance)",
    )
    ev = sub.add_parser(
        "evaluate",
        help="does a per-point score say which training digits matter? retrain without / with only its top points",
        description=(
            "Train a 64-128-10 MLP on scikit-learn's digits per seed, compute the built-in per-point scores (pair "
            "importance and its loss-aware variants, EL2N, TracIn, random), retrain with each score's top points "
            "removed or kept (global and per class) against random subsets of the same size, and print the table. "
            "The defaults finish within a few minutes on two CPU cores; --full runs the benchmark's settings."
        ),
    )
    ev.add_argument("--seeds", type=int, default=5, help="training seeds 0..N-1 (default: %(default)s)")
    ev.add_argument("--remove", type=float, nargs="+", default=[0.1, 0.2], help="shares to remove (default: 0.1 0.2)")
    ev.add_argument("--keep", type=float, nargs="+", default=[0.3], help="shares to keep (default: 0.3)")
    ev.add_argument("--global-only", action="store_true", help="no class-stratified conditions")
    ev.add_argument("--epochs", type=int, default=60, help="epochs of the full-data run (default: %(default)s)")
    ev.add_argument("--n-random", type=int, default=1, help="random subsets per seed and condition (default: 1)")
    ev.add_argument("--scores", nargs="+", default=None, help="which built-in scores (default: all available)")
    ev.add_argument(
        "--refine",
        choices=["exact", "function"],
        default="exact",
        help="pair search of the maps: exact over all pairs (default; tens of seconds per seed on two cores) "
        "or the top-128 re-ranking (seconds)",
    )
    ev.add_argument("--full", action="store_true", help="the benchmark's settings (5 seeds, 7 shares; ~10+ min)")
    ev.add_argument("--json", default=None, help="also write the table's rows to this JSON file")
    ev.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default: 1; the small batched products gain little from a second thread and, with "
        "other processes on the cores, lost 5-15x with two threads where this was measured)",
    )
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "demo":
        from lightning_swim.demo import run_demo

        run_demo(
            logdir=args.logdir,
            epochs=args.epochs,
            every=args.every,
            widths=tuple(args.widths),
            probe_size=args.probe_size,
            seed=args.seed,
            progress=not args.quiet,
            compare=not args.no_influence,
        )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    import torch

    from lightning_swim._study import SCORES, StudyConfig, run_study

    if args.threads < 1:
        raise SystemExit(f"`--threads` must be >= 1, got {args.threads}.")
    torch.set_num_threads(args.threads)
    if args.full:
        config = StudyConfig()
    else:
        config = StudyConfig(
            seeds=tuple(range(args.seeds)),
            remove=tuple(args.remove),
            keep=tuple(args.keep),
            stratified=(False,) if args.global_only else (False, True),
            epochs=args.epochs,
            n_random=args.n_random,
            scores=tuple(args.scores) if args.scores else tuple(SCORES),
            el2n_epochs=tuple(e for e in (2, 4, 6) if e <= args.epochs) or (1,),
            tracin_every=max(1, args.epochs // 12),
            map_kwargs={"refine": "exact"} if args.refine == "exact" else {"refine": "function", "top_k": 128},
        )
    evaluation, seconds, _ = run_study(config)
    print()
    print(evaluation)
    print()
    print("Scores:")
    for name in evaluation.scores:
        print(f"  {name:<16} {SCORES[name]}")
    print("Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"config": config.describe(), "rows": evaluation.rows(), "seconds": seconds}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

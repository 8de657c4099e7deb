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
    args = parser.parse_args(argv)
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
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

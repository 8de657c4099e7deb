"""Wall time of one monitor map shared among DDP ranks (issue 14.1): 1 rank against 2 (gloo, CPU processes).

What the monitor does under DDP at each map: every rank runs the pair search of its share of the
layers (:func:`~lightning_swim.analysis.map_shard`), the shares are gathered over the process group
(``all_gather_object``), and rank zero completes the map (importance, drift, fidelity:
:func:`~lightning_swim.analysis.analyse_network` with the merged ``maps``). Timed per map, median
of ``--repeats``, from a barrier before the search to the merged maps on rank zero ("search") and to
the completed record ("whole map"). Every rank uses ``--threads`` threads (one per rank, as on a
machine with a core per rank); the one-process run is shown with the same threads and with all of
the machine's cores. The merged map is checked equal, tensor for tensor, to the one-process map.

The network is an MLP on the digits with ``--layers`` hidden layers of ``--width`` ReLU neurons
(wider layers cost more: the layers are dealt out by cost, widest first), the probe ``--probe``
digits, the monitor's default map options (``refine="auto"``: the exact search).

    python benchmarks/bench_ddp_map.py [--probe 512] [--width 256] [--layers 2] [--repeats 3]

On a machine with fewer cores than ranks x threads the ranks share cores, and the ratio says little:
the script prints the core count next to it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_swim.analysis import AnalysisConfig, analyse_network, map_shard, merge_shards, warm_up
from lightning_swim.datasets import digits


def model_and_probe(width: int, layers: int, probe: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x, y, _, _ = digits()
    widths = [64] + [width] * layers
    mods: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=gen) / a**0.5)
            lin.bias.copy_(torch.randn(b, generator=gen) * 0.1)
        mods += [lin, nn.ReLU()]
    head = nn.Linear(widths[-1], 10)
    with torch.no_grad():
        head.weight.copy_(torch.randn(10, widths[-1], generator=gen) / widths[-1] ** 0.5)
        head.bias.zero_()
    return nn.Sequential(*mods, head).eval(), x[:probe], y[:probe]


def one_map(model, x, y, config, rank, world, shared):
    """(search seconds, whole-map seconds, merged maps) of one map on this rank (None on the others)."""
    if shared:
        dist.barrier()
    t0 = time.perf_counter()
    part = map_shard(model, x, config=config, shard=(rank, world))
    if shared:
        parts: list = [None] * world
        dist.all_gather_object(parts, part)
    else:
        parts = [part]
    maps = merge_shards(parts) if rank == 0 else None
    t_search = time.perf_counter() - t0
    if rank == 0:
        analyse_network(model, x, y, config=config, maps=maps)
    t_whole = time.perf_counter() - t0
    if shared:
        dist.barrier()  # every rank returns to training together
    return t_search, t_whole, maps


def worker(rank: int, world: int, args: argparse.Namespace, port: int, out: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    shared = world > 1
    if shared:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model, x, y = model_and_probe(args.width, args.layers, args.probe)
    config = AnalysisConfig()
    warm_up(model, x, config=config, shard=(rank, world))
    times = [one_map(model, x, y, config, rank, world, shared) for _ in range(args.repeats)]
    if rank == 0:
        search = statistics.median(t[0] for t in times)
        whole = statistics.median(t[1] for t in times)
        maps = {name: pm.tensors() for name, pm in times[-1][2].items()}
        torch.save({"search": search, "whole": whole, "maps": maps}, out)
    if shared:
        dist.destroy_process_group()


def run(world: int, threads: int, args: argparse.Namespace) -> dict:
    args = argparse.Namespace(**{**vars(args), "threads": threads})
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.pt")
        if world == 1:
            worker(0, 1, args, 0, out)
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(worker, args=(world, args, port, out), nprocs=world, join=True)
        return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe", type=int, default=512)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per rank")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(
        f"map of {args.layers} x {args.width} ReLU neurons on {args.probe} digits; {cores} CPU cores; "
        f"median of {args.repeats}",
        flush=True,
    )
    alone = run(1, args.threads, args)
    alone_all = run(1, max(args.threads, min(cores, 2 * args.threads)), args)
    two = run(2, args.threads, args)
    for name, tensors in alone["maps"].items():  # the shared map is the one-process map
        for key, value in tensors.items():
            got = two["maps"][name][key]
            if value is None:
                assert got is None, (name, key)
            else:  # bit for bit (NaN where a neuron is not mapped)
                torch.testing.assert_close(got, value, rtol=0, atol=0, equal_nan=True, msg=f"{name} {key}")
    rows = [
        (f"1 rank, {args.threads} thread(s)", alone),
        (f"1 rank, {max(args.threads, min(cores, 2 * args.threads))} thread(s)", alone_all),
        (f"2 ranks, {args.threads} thread(s) each", two),
    ]
    print(f"{'':30} {'search (s)':>11} {'whole map (s)':>14} {'whole vs 1 rank':>16}")
    for label, r in rows:
        print(f"{label:30} {r['search']:11.3f} {r['whole']:14.3f} {r['whole'] / alone['whole']:15.2f}x")
    print("the 2-rank map equals the 1-rank map, tensor for tensor (goal: whole map <= 0.6x with 2 ranks)")
    if cores < 2 * args.threads:
        print(f"note: {cores} cores for 2 ranks x {args.threads} threads: the ranks share cores", file=sys.stderr)


if __name__ == "__main__":
    main()

"""The GPU check: lightning_swim's CUDA paths tested and timed against their CPU twins, in under 8 minutes.

On a machine with one CUDA GPU, in the repository's root (``benchmarks/gpu_check.sh`` checks the
environment first and calls this):

1. **environment**: versions, the GPU, whether KeOps compiles for CUDA, whether the compiled CPU kernel builds;
2. **search**: stage 1 of the pair map (``map_layer(..., refine="none")``, M = 256 ReLU neurons, d = 784)
   at N = 5,000 and 20,000 with KeOps and PyTorch on the GPU, against ``backend="auto"`` on the CPU;
3. **transport**: ``transport_map`` (M = 256, K = 4,096 candidates, N = 2,000, d = 64) on the GPU
   against the CPU;
4. **fit**: a monitored fit (``PairImportanceMonitor`` on the digits MLP of ``lightning_swim.demo``,
   3 epochs) with ``accelerator="gpu"`` against ``"cpu"``, each against the same fit unmonitored;
5. **exact**: the exact function-space search ``map_layer(..., refine="exact")`` (N = 1,000, d = 64,
   M = 128) on the GPU (KeOps, torch, and torch with the bfloat16 screen forced on) against the CPU,
   skipped with a line where this checkout's ``lightning_swim.pairmap.REFINE`` has no ``"exact"``;
6. **tests**: ``pytest -m cuda`` (the device-parametrised parity tests of the search, transport and
   monitor).

Every timed section runs in its own process under its own time limit (a hung compile costs that
section only), checks that the GPU and the CPU agree, and adds rows to one table, printed and written
to ``$OUT/gpu_check.md`` (``$OUT`` unset: the current folder). Times are wall-clock seconds after a
warm-up run of the same call (compilation is timed on its own row).

Without CUDA, or with ``GPU_CHECK_DRY_RUN=1`` or ``--dry-run``, it is a dry run: every section runs
on the CPU in place of the GPU (``--tiny`` shrinks the problems to seconds) and ``pytest -m cuda`` only
collects, so that a broken script shows up before a GPU is lent.

    python benchmarks/gpu_check.py [--dry-run] [--tiny] [--budget 450] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# section name, share of the time budget, what it does
SECTIONS = (
    ("environment", 0.1, "versions, GPU, KeOps on CUDA, CPU kernel"),
    ("search", 0.2, "stage-1 pair search"),
    ("transport", 0.12, "transport_map (GeomLoss)"),
    ("fit", 0.2, "monitored digits fit"),
    ("exact", 0.12, "exact function-space search"),
    ("tests", 0.26, "pytest -m cuda"),
)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _timed(device: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """``(seconds, fn(*args, **kwargs))``, the device synchronised before and after."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    _sync(device)
    return time.perf_counter() - t0, out


def _row(
    case: str, gpu: str = "", gpu_s: float | None = None, cpu: str = "", cpu_s: float | None = None, check: str = ""
) -> dict[str, Any]:
    return {"case": case, "gpu": gpu, "gpu_s": gpu_s, "cpu": cpu, "cpu_s": cpu_s, "check": check}


def _twin(case: str, cpu: str, cpu_s: float, checks: dict[str, str]) -> dict[str, Any]:
    """The CPU twin of the rows of ``case`` measured before it, with each GPU engine's check."""
    return {**_row(case, cpu=cpu, cpu_s=cpu_s), "twin_checks": checks}


def merge_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill the CPU columns (and the checks) of the rows that a later twin row names; drop the twins
    that found their rows."""
    out: list[dict[str, Any]] = []
    for row in rows:
        checks = row.pop("twin_checks", None)
        if checks is None:
            out.append(row)
            continue
        matched = [r for r in out if r["case"] == row["case"] and r["gpu"] and not r["cpu"]]
        for r in matched:
            r.update(cpu=row["cpu"], cpu_s=row["cpu_s"])
            if r["gpu"] in checks and not r["check"]:
                r["check"] = checks[r["gpu"]]
        if not matched:
            out.append(row)
    return out


def _layer(n: int, d: int, m: int, seed: int = 0) -> tuple[Any, Any, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g)
    w = torch.randn(m, d, generator=g)
    b = -(w * x[torch.randint(0, n, (m,), generator=g)]).sum(1)
    return w, b, x


def _same_pairs(a: Any, b: Any) -> str:
    differ = int(((a.idx_from.cpu() != b.idx_from.cpu()) | (a.idx_to.cpu() != b.idx_to.cpu())).sum())
    return "same pairs" if differ == 0 else f"{differ} of {len(a)} pairs differ"


# ---------------------------------------------------------------------------------------------- sections


def section_environment(device: str, tiny: bool) -> list[dict[str, Any]]:
    import torch

    rows = [_row("python / platform", check=f"{platform.python_version()} on {platform.platform()}")]
    rows.append(
        _row("torch", check=f"{torch.__version__}, CUDA {torch.version.cuda}, {torch.get_num_threads()} CPU threads")
    )
    if torch.cuda.is_available():
        rows.append(_row("GPU", check=f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible)"))
    for module in ("pykeops", "geomloss", "lightning"):
        try:
            mod = __import__(module)
            rows.append(_row(module, check=str(getattr(mod, "__version__", "?"))))
        except Exception as err:
            rows.append(_row(module, check=f"import failed: {type(err).__name__}: {err}"))
    try:
        from lightning_swim._keops import pykeops_torch

        LazyTensor = pykeops_torch().LazyTensor
        x = torch.randn(100, 3, device=device)
        t, _ = _timed(device, lambda: LazyTensor(x[:, None]).sqdist(LazyTensor(x[None])).min(dim=1))
        rows.append(
            _row(f"KeOps on {device}", gpu="keops", gpu_s=t, check="a reduction compiles and runs (first call)")
        )
    except Exception as err:
        rows.append(_row(f"KeOps on {device}", check=f"unavailable: {type(err).__name__}: {str(err)[:300]}"))
    try:
        from lightning_swim import _search

        t, kern = _timed("cpu", _search.cpu_kernel)
        rows.append(_row("compiled CPU kernel", cpu="cpu-kernel", cpu_s=t, check=f"built or loaded: {kern.path.name}"))
    except Exception as err:
        rows.append(_row("compiled CPU kernel", check=f"unavailable: {err}"))
    return rows


def section_search(device: str, tiny: bool) -> Iterator[dict[str, Any]]:
    from lightning_swim import map_layer

    m = 16 if tiny else 256
    sizes = [(200, 16)] if tiny else [(5000, 784), (20000, 784)]
    w, b, x = _layer(64, sizes[0][1], m)
    for backend in ("keops", "torch"):  # compile or load the formulas: their own rows
        t, _ = _timed(device, map_layer, w.to(device), b.to(device), x.to(device), refine="none", backend=backend)
        yield _row(f"warm-up N=64 (compiles) {backend}", gpu=backend, gpu_s=t)
    t, _ = _timed("cpu", map_layer, w, b, x, refine="none", backend="auto")
    yield _row("warm-up N=64 (compiles) auto", cpu="auto", cpu_s=t)
    for n, d in sizes:  # the GPU first: a slow CPU twin cut off by the time limit loses only itself
        case = f"N={n} d={d} M={m}"
        w, b, x = _layer(n, d, m)
        wd, bd, xd = w.to(device), b.to(device), x.to(device)
        maps = {}
        for backend in ("keops", "torch"):
            try:
                t, maps[backend] = _timed(device, map_layer, wd, bd, xd, refine="none", backend=backend)
                yield _row(case, gpu=backend, gpu_s=t)
            except Exception as err:
                yield _row(case, gpu=backend, check=f"FAILED: {type(err).__name__}: {str(err)[:200]}")
        cpu_t, cpu_map = _timed("cpu", map_layer, w, b, x, refine="none", backend="auto")
        yield _twin(case, "auto", cpu_t, {k: _same_pairs(pm, cpu_map) for k, pm in maps.items()})


def section_transport(device: str, tiny: bool) -> list[dict[str, Any]]:
    import warnings

    import torch

    from lightning_swim import transport_map

    n, d, m, k = (150, 8, 16, 128) if tiny else (2000, 64, 256, 4096)
    w, b, x = _layer(n, d, m)
    cands = tuple(torch.randint(0, n, (k,), generator=torch.Generator().manual_seed(1)) for _ in range(2))
    cands = (cands[0], (cands[0] + 1 + cands[1] % (n - 1)) % n)  # i != j
    kw = dict(candidates=cands, blur=0.3 if tiny else 0.1)  # tiny: a blur that converges in few iterations
    warm = dict(candidates=(cands[0][:32], cands[1][:32]), max_iter=20)  # compiles formulas; need not converge
    warnings.filterwarnings("ignore", "Sinkhorn did not converge")
    transport_map(w[:16], b[:16], x, backend="auto", **warm)
    cpu_t, ref = _timed("cpu", transport_map, w, b, x, backend="auto", **kw)
    rows = []
    wd, bd, xd = w.to(device), b.to(device), x.to(device)
    for backend in ("auto", "online", "tensorized"):
        try:
            transport_map(wd[:16], bd[:16], xd, backend=backend, **warm)
            t, tm = _timed(device, transport_map, wd, bd, xd, backend=backend, **kw)
            rel = float((tm.divergence.cpu() - ref.divergence).abs() / ref.divergence.abs().clamp_min(1e-12))
            agree = float((tm.assignment.cpu() == ref.assignment).float().mean())
            df = float((tm.f.cpu() - ref.f).abs().max() / tm.eps)
            check = (
                f"{tm.backend} vs {ref.backend}: divergence rel. diff {rel:.1e}, max |f - f_cpu| / eps {df:.1e}, "
                f"{agree:.0%} same assignment (near-ties flip where plan mass is spread)"
            )
        except Exception as err:
            t, check = None, f"FAILED: {type(err).__name__}: {str(err)[:200]}"
        rows.append(_row(f"M={m} K={k} N={n} d={d}", gpu=backend, gpu_s=t, cpu="auto", cpu_s=cpu_t, check=check))
    return rows


def _fit(accelerator: str, monitored: bool, epochs: int, tiny: bool, root: str) -> tuple[float, int]:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_swim import PairImportanceMonitor
    from lightning_swim.demo import DigitsMLP

    kw: dict[str, Any] = dict(probe_size=32, top_k=4, fidelity=False) if tiny else {}
    monitor = PairImportanceMonitor(every_n_epochs=1, **kw) if monitored else None
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[monitor] if monitor else [],
        logger=TensorBoardLogger(root, name=f"{accelerator}-{monitored}"),
        accelerator=accelerator,
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = DigitsMLP(widths=(16,) if tiny else (128, 64))
    t0 = time.perf_counter()
    trainer.fit(model)
    return time.perf_counter() - t0, len(monitor._steps) if monitor else 0


def section_fit(device: str, tiny: bool) -> list[dict[str, Any]]:
    import logging
    import warnings

    epochs = 1 if tiny else 3
    accelerator = "gpu" if device == "cuda" else "cpu"
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as root:
            warnings.simplefilter("ignore")
            if not tiny:
                _fit(accelerator, True, 1, True, root)  # warm-up: imports, CUDA, formulas
            times = {}
            for acc in dict.fromkeys((accelerator, "cpu")):
                plain, _ = _fit(acc, False, epochs, tiny, root)
                watched, n_maps = _fit(acc, True, epochs, tiny, root)
                times[acc] = (plain, watched, n_maps)
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    gp, gw, gn = times[accelerator]
    cp, cw, cn = times["cpu"]
    return [
        _row(f"{epochs} epochs, unmonitored", gpu=accelerator, gpu_s=gp, cpu="cpu", cpu_s=cp),
        _row(
            f"{epochs} epochs, monitored (every epoch)",
            gpu=accelerator,
            gpu_s=gw,
            cpu="cpu",
            cpu_s=cw,
            check=f"{gn} maps vs {cn}; monitored/unmonitored {gw / gp:.2f}x vs {cw / cp:.2f}x",
        ),
    ]


def section_exact(device: str, tiny: bool) -> Iterator[dict[str, Any]]:
    from lightning_swim import map_layer
    from lightning_swim.pairmap import REFINE

    if "exact" not in REFINE:
        yield _row("skipped", check=f"map_layer(refine='exact') is not in this checkout (REFINE = {REFINE})")
        return
    # O(N^3 M): the CPU twin is timed beside it in this table (bench_exact_search.py has the CPU's floors)
    n, d, m = (60, 8, 8) if tiny else (1000, 64, 128)
    case = f"N={n} d={d} M={m}"
    w, b, x = _layer(n, d, m)
    wd, bd, xd = w.to(device), b.to(device), x.to(device)
    from lightning_swim import _fsearch

    maps = {}
    # "torch-bf16": the torch search with the bfloat16 screen forced on (by default only on CPUs with
    # native bf16; never run on a GPU before this check)
    for label in ("auto", "keops", "torch", "torch-bf16"):  # the GPU first, as in the search
        backend = label.split("-")[0]
        _fsearch.SCREEN = True if label == "torch-bf16" else None
        try:
            map_layer(wd[:2], bd[:2], xd[:20], refine="exact", backend=backend)  # warm-up
            t, maps[label] = _timed(device, map_layer, wd, bd, xd, refine="exact", backend=backend)
            yield _row(case, gpu=label, gpu_s=t)
        except Exception as err:
            yield _row(case, gpu=label, check=f"FAILED: {type(err).__name__}: {str(err)[:200]}")
        finally:
            _fsearch.SCREEN = None
    map_layer(w[:2], b[:2], x[:20], refine="exact", backend="auto")  # warm-up, CPU
    cpu_t, ref = _timed("cpu", map_layer, w, b, x, refine="exact", backend="auto")
    checks = {}
    for backend, pm in maps.items():
        gap = float((pm.func_error.cpu() - ref.func_error).abs().nan_to_num(0.0).max())  # NaN: dead neurons
        checks[backend] = f"{_same_pairs(pm, ref)}, max error gap {gap:.1e}"
    yield _twin(case, "auto", cpu_t, checks)


def section_tests(device: str, tiny: bool, timeout: float) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", "tests"]
    if device != "cuda":
        cmd.append("--collect-only")  # a dry run: the selection works; the tests themselves need a GPU
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        lines = (out.stdout + out.stderr).strip().splitlines()
        summary = next(
            (
                ln
                for ln in reversed(lines)
                if " in " in ln
                and ("passed" in ln or "error" in ln or "selected" in ln or "collected" in ln or "failed" in ln)
            ),
            lines[-1] if lines else "no output",
        )
        check = summary.strip("= ")
        failures = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
        rows = [_row(" ".join(cmd[3:]), gpu=device, check=check)]
        rows += [_row("", check=ln[:300]) for ln in failures[:20]]
        return rows
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"")[-600:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return [_row(" ".join(cmd[3:]), gpu=device, check=f"TIMED OUT after {timeout:.0f} s; last output: {tail!r}")]


SECTION_FUNCTIONS: dict[str, Callable[[str, bool], Iterable[dict[str, Any]]]] = {
    "environment": section_environment,
    "search": section_search,
    "transport": section_transport,
    "fit": section_fit,
    "exact": section_exact,
}


# ---------------------------------------------------------------------------------------------- driver


def run_section_here(name: str, device: str, tiny: bool) -> list[dict[str, Any]]:
    """One timed section in this process, its rows merged."""
    return merge_rows(list(SECTION_FUNCTIONS[name](device, tiny)))


def _rows_of(stdout: str | bytes | None) -> list[dict[str, Any]]:
    text = stdout.decode(errors="replace") if isinstance(stdout, bytes) else stdout or ""
    return [json.loads(line[4:]) for line in text.splitlines() if line.startswith("ROW ")]


def _run_section(name: str, device: str, tiny: bool, timeout: float) -> list[dict[str, Any]]:
    if name == "tests":
        return section_tests(device, tiny, timeout)
    cmd = [sys.executable, __file__, "--section", name, "--device", device] + (["--tiny"] if tiny else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as err:  # the rows printed so far, and why the others are missing
        rows = _rows_of(err.stdout)
        return [*merge_rows(rows), _row("", check=f"TIMED OUT after {timeout:.0f} s (section stopped here)")]
    rows = _rows_of(out.stdout)
    if out.returncode != 0:
        err = (out.stderr.strip().splitlines() or ["no output"])[-1]
        rows.append(_row("", check=f"FAILED (exit {out.returncode}): {err[:300]}"))
    return merge_rows(rows)


def _fmt(s: float | None) -> str:
    return "" if s is None else f"{s:.3f}" if s < 10 else f"{s:.1f}"


def table(results: list[tuple[str, list[dict[str, Any]]]], device: str, dry: bool, elapsed: float) -> str:
    gpu_col = "GPU" if not dry else "'GPU' (CPU, dry run)"
    lines = [
        "# lightning_swim GPU check",
        "",
        f"{'DRY RUN on the CPU: the GPU column ran on the CPU too. ' if dry else ''}"
        f"Wall-clock seconds after a warm-up; CPU/GPU > 1 means the GPU is faster. Total {elapsed:.0f} s.",
        "",
        f"| section | case | {gpu_col} engine | {gpu_col} s | CPU engine | CPU s | CPU/GPU | check |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results:
        for r in rows:
            ratio = f"{r['cpu_s'] / r['gpu_s']:.1f}x" if r.get("gpu_s") and r.get("cpu_s") else ""
            lines.append(
                f"| {name} | {r['case']} | {r['gpu']} | {_fmt(r['gpu_s'])} | {r['cpu']} | {_fmt(r['cpu_s'])} | "
                f"{ratio} | {r['check']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="run every section on the CPU")
    parser.add_argument("--tiny", action="store_true", help="problems of a few seconds (the dry run's test)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all sections together")
    parser.add_argument("--out", default=None, help="folder of gpu_check.md (default: $OUT, else .)")
    parser.add_argument("--only", nargs="+", choices=[s[0] for s in SECTIONS], help="run these sections only")
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("KEOPS_VERBOSE", "0")
    os.environ.setdefault("PYKEOPS_VERBOSE", "0")

    if args.section:  # a child process: one section, a JSON line per row as soon as it is measured
        try:
            for row in SECTION_FUNCTIONS[args.section](args.device, args.tiny):
                print("ROW " + json.dumps(row), flush=True)
        except Exception as err:
            trace = " | ".join(traceback.format_exc().strip().splitlines()[-3:])[:300]
            row = _row("", check=f"FAILED: {type(err).__name__}: {str(err)[:200]} ({trace})")
            print("ROW " + json.dumps(row), flush=True)
        return

    import torch

    dry = args.dry_run or os.environ.get("GPU_CHECK_DRY_RUN", "0") not in ("", "0") or not torch.cuda.is_available()
    device = "cpu" if dry else "cuda"
    if dry:
        why = "no CUDA device" if not torch.cuda.is_available() else "asked for"
        print(f"gpu_check: DRY RUN on the CPU ({why}): every path runs, the GPU column is the CPU", flush=True)
    start = time.monotonic()
    results = []
    sections = [s for s in SECTIONS if not args.only or s[0] in args.only]
    for k, (name, share, what) in enumerate(sections):
        left = args.budget - (time.monotonic() - start)
        # its share of the time left: what earlier sections did not use goes to the later ones
        timeout = left * share / sum(s for _, s, _ in sections[k:])
        if timeout < 5:
            results.append((name, [_row("", check="SKIPPED: out of time")]))
            continue
        print(f"gpu_check: {name} ({what}), up to {timeout:.0f} s ...", flush=True)
        t0 = time.monotonic()
        rows = _run_section(name, device, args.tiny, timeout)
        print(f"gpu_check: {name} done in {time.monotonic() - t0:.0f} s", flush=True)
        results.append((name, rows))
    text = table(results, device, dry, time.monotonic() - start)
    print()
    print(text)
    out_dir = Path(args.out or os.environ.get("OUT") or ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.md").write_text(text)
    print(f"gpu_check: table written to {out_dir / 'gpu_check.md'}")


if __name__ == "__main__":
    main()

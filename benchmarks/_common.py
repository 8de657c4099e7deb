"""Shared by the benchmarks: run one measurement in a fresh process and read its peak memory."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from typing import Any


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(fn: Callable[[], Any]) -> dict[str, float]:
    """Run ``fn`` and return its wall time and the growth of peak RSS it caused."""
    import time

    base = peak_rss_mb()
    t0 = time.perf_counter()
    fn()
    return {"seconds": time.perf_counter() - t0, "peak_mb": max(0.0, peak_rss_mb() - base)}


def in_subprocess(script: str, *args: str, timeout: float | None = None) -> dict[str, Any]:
    """Run ``script --one args...`` in a fresh interpreter; it prints one JSON line last.

    Past ``timeout`` seconds the run is stopped and reported as ``{"timeout": timeout}``.
    """
    try:
        out = subprocess.run(
            [sys.executable, script, "--one", *args],
            capture_output=True,
            text=True,
            env=os.environ.copy(),
            check=False,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"timeout": timeout}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])

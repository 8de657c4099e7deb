"""The GPU check's dry run on the CPU: every section and the driver work before a GPU is lent."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        pytest.param("search", marks=pytest.mark.keops),
        pytest.param("transport", marks=pytest.mark.keops),
        "fit",
        "exact",
    ],
)
def test_each_timed_section_runs_on_the_cpu(gpu_check, name):
    rows = gpu_check.run_section_here(name, "cpu", True)
    assert rows
    for row in rows:
        assert "FAILED" not in row["check"], row
        assert set(row) == {"case", "gpu", "gpu_s", "cpu", "cpu_s", "check"}
    if name == "search":
        timed = [r for r in rows if r["case"].startswith("N=")]
        assert sorted(r["gpu"] for r in timed) == ["keops", "torch"]
        assert all(r["check"] == "same pairs" and r["gpu_s"] > 0 and r["cpu_s"] > 0 for r in timed)
    if name == "exact":
        from lightning_swim.pairmap import REFINE

        assert ("exact" in REFINE) == (rows[0]["case"] != "skipped")


def test_twin_rows_fill_the_cpu_columns(gpu_check):
    rows = [
        gpu_check._row("N=5", gpu="keops", gpu_s=0.5),
        gpu_check._row("N=5", gpu="torch", check="FAILED: x"),
        gpu_check._row("N=6", gpu="keops", gpu_s=0.1),
        gpu_check._twin("N=5", "auto", 2.0, {"keops": "same pairs", "torch": "ignored: it has a check"}),
        gpu_check._twin("N=7", "auto", 1.0, {}),
    ]
    merged = gpu_check.merge_rows(rows)
    assert [(r["case"], r["gpu"], r["cpu_s"], r["check"]) for r in merged] == [
        ("N=5", "keops", 2.0, "same pairs"),
        ("N=5", "torch", 2.0, "FAILED: x"),
        ("N=6", "keops", None, ""),
        ("N=7", "", 1.0, ""),  # a twin without rows stays
    ]
    assert all("twin_checks" not in r for r in merged)


def test_table_has_a_line_per_row_and_the_ratio(gpu_check):
    rows = [gpu_check._row("N=5", gpu="keops", gpu_s=0.5, cpu="auto", cpu_s=2.0, check="same pairs")]
    text = gpu_check.table([("search", rows), ("exact", [gpu_check._row("skipped", check="no")])], "cuda", False, 3.0)
    lines = text.splitlines()
    assert "| search | N=5 | keops | 0.500 | auto | 2.000 | 4.0x | same pairs |" in lines
    assert "| exact | skipped |  |  |  |  |  | no |" in lines
    assert "DRY RUN" not in text


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_shell_script_runs_the_driver_and_writes_the_table(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", GPU_CHECK_NO_PIP="1", OUT=str(tmp_path))
    out = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", "--only", "environment", "tests"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "DRY RUN" in out.stdout and "no pip install" not in out.stdout  # everything imports here
    text = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN on the CPU" in text
    for section in ("environment", "tests"):
        assert f"| {section} |" in text
    assert "FAILED" not in text and "TIMED OUT" not in text, text
    assert "compiled CPU kernel" in text and "tests collected" in text

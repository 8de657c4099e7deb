"""A damaged KeOps cache never kills the process (issue 11, item 9).

Each case runs a small KeOps formula in a fresh Python process on a private copy of a cache in which the
formula was built once: a truncated module used to kill that process with SIGBUS ("Fatal Python error:
Bus error"), a zero-byte one made every later run fall back to PyTorch for good, and a damaged formula
index made `import pykeops` fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_swim._keops import _ext_suffix, verify_binary

ROOT = Path(__file__).resolve().parents[1]
JOB = """
import sys
from pathlib import Path
import torch
from lightning_swim._keops import pykeops_torch
LazyTensor = pykeops_torch().LazyTensor
for arg in sys.argv[1:]:  # "<module>:<empty|truncated>": damaged after the start-up check, before its first use
    module, damage = arg.rsplit(":", 1)
    data = Path(module).read_bytes()
    Path(module).write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
x = torch.arange(10, dtype=torch.float32).reshape(5, 2)
print("RESULT", LazyTensor(x[:, None, :]).sqdist(LazyTensor(x[None, :, :] + 0.5)).min(dim=1).ravel().tolist())
"""
EXPECTED = "RESULT [0.5, 0.5, 0.5, 0.5, 0.5]"


def _run(cache: Path, *args: str, verbose: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("KEOPS_VERBOSE", "PYKEOPS_VERBOSE")}
    if verbose is not None:
        env["KEOPS_VERBOSE"] = verbose
    env["LIGHTNING_SWIM_KEOPS_CACHE"] = str(cache / "build")
    env["KEOPS_CACHE_FOLDER"] = str(cache / "keops")  # KeOps' own indexes: never the user's
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", JOB, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A cache with the formula's module built once (about 10 s)."""
    cache = tmp_path_factory.mktemp("keops_cache")
    out = _run(cache)
    assert out.returncode == 0 and EXPECTED in out.stdout, out.stderr[-2000:]
    _first_build["output"] = out.stdout + out.stderr
    return cache


_first_build: dict[str, str] = {}


def _module(cache: Path) -> Path:
    (module,) = (cache / "build").glob(f"pykeops_cpp_*{_ext_suffix()}")
    return module


pytestmark = [pytest.mark.keops, pytest.mark.slow]


@pytest.mark.parametrize(
    ("damage", "when"),
    [("truncated", "before the run"), ("empty", "after its start-up check")],
)
def test_a_damaged_module_is_rebuilt_not_imported(tmp_path, built, damage, when):
    """Before the run: found by the start-up check of the cache. After it (a module damaged by another process
    meanwhile): found by the check before import. Each rebuilds the module (a compilation, about 10 s)."""
    cache = Path(shutil.copytree(built, tmp_path / "cache"))
    module = _module(cache)
    whole = module.stat().st_size
    if when == "before the run":
        module.write_bytes(b"" if damage == "empty" else module.read_bytes()[: whole // 2])
        assert verify_binary(module) is not None
    out = _run(cache, *([] if when == "before the run" else [f"{module}:{damage}"]))
    assert out.returncode == 0, f"exit status {out.returncode} (SIGBUS is -7): {out.stderr[-2000:]}"
    assert EXPECTED in out.stdout
    assert "rebuilt" in out.stderr and module.name in out.stderr
    assert verify_binary(module) is None and module.stat().st_size == whole


def test_a_damaged_formula_index_does_not_break_the_import(tmp_path, built):
    cache = Path(shutil.copytree(built, tmp_path / "cache"))
    (index,) = (cache / "keops").glob("*/LoadKeOps_cpp_class_cache.pkl")
    index.write_bytes(index.read_bytes()[:10])
    out = _run(cache)
    assert out.returncode == 0 and EXPECTED in out.stdout, out.stderr[-2000:]
    assert "formula index" in out.stderr


def test_verify_binary_on_real_and_damaged_files(tmp_path, built):
    module = _module(built)
    assert verify_binary(module) is None
    for size, why in [(0, "empty"), (100, "truncated"), (module.stat().st_size - 1, "truncated")]:
        copy = tmp_path / f"m{size}.so"
        copy.write_bytes(module.read_bytes()[:size])
        assert why in verify_binary(copy)
    (tmp_path / "text.so").write_text("not a library")
    assert "not an ELF" in verify_binary(tmp_path / "text.so")


def test_quiet_on_a_cpu_unless_asked(tmp_path, built):
    """Issue 12.5: no "CUDA libraries not found ... Switching to CPU only" notice and no "[KeOps] Compiling"
    lines on a CPU run, even while a formula compiles; KEOPS_VERBOSE=1 brings KeOps' own output back."""
    quiet = _first_build["output"]  # the import and the first compilation of the formula
    assert "[KeOps]" not in quiet and "Switching to CPU only" not in quiet, quiet[-2000:]
    cache = tmp_path / "cache"
    shutil.copytree(built, cache)
    loud = _run(cache, verbose="1")
    assert loud.returncode == 0 and EXPECTED in loud.stdout, loud.stderr[-2000:]
    import torch

    if not torch.cuda.is_available():
        assert "Switching to CPU only" in loud.stdout + loud.stderr

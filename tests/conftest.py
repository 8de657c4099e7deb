"""Test set-up: quiet KeOps, a KeOps cache per xdist worker, no TF32, and the `keops` marker."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("KEOPS_VERBOSE", "0")
os.environ.setdefault("PYKEOPS_VERBOSE", "0")
worker = os.environ.get("PYTEST_XDIST_WORKER")
if worker:  # KeOps does not lock its cache against concurrent compilers: one folder per worker
    from lightning_swim._keops import keops_cache_dir

    os.environ["LIGHTNING_SWIM_KEOPS_CACHE"] = str(keops_cache_dir() / f"xdist-{worker}")

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

_keops_status: dict[str, str | None] = {}


def keops_works() -> str | None:
    """None if KeOps compiles and runs a formula here, else the reason it does not."""
    if "reason" not in _keops_status:
        try:
            from lightning_swim._keops import pykeops_torch

            LazyTensor = pykeops_torch().LazyTensor
            x = torch.randn(5, 2)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                LazyTensor(x[:, None, :]).sqdist(LazyTensor(x[None, :, :])).min(dim=1)
            _keops_status["reason"] = None
        except Exception as err:
            _keops_status["reason"] = f"KeOps does not work here: {type(err).__name__}: {err}"
    return _keops_status["reason"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs = [item for item in items if "keops" in item.keywords]
    if needs and (reason := keops_works()) is not None:
        if os.environ.get("LIGHTNING_SWIM_REQUIRE_KEOPS") == "1":  # CI: a skipped parity test is a failure
            raise pytest.UsageError(reason)
        for item in needs:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _fresh_keops_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts without the process's memory of a KeOps failure (``backend="auto"`` does not retry
    KeOps after one in a process; a test that breaks KeOps must not decide the engine of later tests)."""
    from lightning_swim import _search

    monkeypatch.setattr(_search, "_keops_failure", {})


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): small models gain
    nothing from more, and lose much when other processes share the cores (tiny products wait at every OpenMP
    barrier)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

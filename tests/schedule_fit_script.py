"""Run by test_monitor.test_forty_epochs_with_empty_caches: a 40-epoch fit with the default schedule in a
fresh process whose KeOps and CPU-kernel caches (set by the test) start empty.

The monitor's clock is the real one plus 5 s per training step (a network whose steps take that much
longer than this tiny one), so that a map at the measured cost takes a small share of the training time,
while whatever the monitor charges to the budget (a compilation included) is measured for real. Prints
one JSON line: the plan, the maps made, the seconds charged, and what the caches held when."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402
from helpers import MLPModule, trainer  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from lightning_swim import PairImportanceMonitor  # noqa: E402
from lightning_swim._cpu_kernel import kernel_cache_dir  # noqa: E402
from lightning_swim._datasets import digits  # noqa: E402
from lightning_swim._keops import keops_cache_dir  # noqa: E402
from lightning_swim.callbacks import pair_importance  # noqa: E402


def files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def main() -> None:
    out = Path(sys.argv[1])
    offset = [0.0]
    pair_importance.time = SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0])  # type: ignore[assignment]
    caches = {"before": files(kernel_cache_dir()) + files(keops_cache_dir())}
    real_warm_up = pair_importance.warm_up

    def warm_up(*args, **kwargs):
        t0 = time.perf_counter()
        real_warm_up(*args, **kwargs)
        caches["warm_up_seconds"] = time.perf_counter() - t0
        caches["after_warm_up"] = files(kernel_cache_dir()) + files(keops_cache_dir())

    pair_importance.warm_up = warm_up

    class SlowSteps(pl.Callback):
        def on_train_batch_start(self, *args):
            offset[0] += 5.0

    xtr, ytr, _, _ = digits()
    monitor = PairImportanceMonitor(probe_size=64)  # the default schedule; a small probe keeps the test short
    t = trainer(out, callbacks=[SlowSteps(), monitor], max_epochs=40, logger=TensorBoardLogger(out, name="tb"))
    t.fit(MLPModule([64, 12, 10], xtr[:300], ytr[:300]))
    print(
        json.dumps(
            {
                "total": t.global_step,
                "plan": monitor._plan,
                "steps": monitor._steps,
                "map_seconds": monitor._map_seconds,
                "train_seconds": monitor._train_seconds,
                **caches,
            }
        )
    )


if __name__ == "__main__":
    main()

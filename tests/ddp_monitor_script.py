"""Run by test_monitor.test_ddp_on_cpu: the monitor under Lightning's `ddp` strategy, 2 CPU processes."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from helpers import MLPModule  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from lightning_swim import PairImportanceMonitor, SWIMInit  # noqa: E402
from lightning_swim.callbacks import pair_importance  # noqa: E402


class SaveInitial(pl.Callback):
    """Every rank writes the weights it starts training from (after SWIMInit)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(pl_module.state_dict(), self.out / f"initial_rank{trainer.global_rank}.pt")


from lightning_swim._datasets import digits  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    xtr, ytr, _, _ = digits()
    shares: list[list[tuple[str, int, int]]] = []
    real_map_shard = pair_importance.map_shard

    def recording_map_shard(*args, **kwargs):  # what this rank mapped: (layer, first neuron, one past last)
        part = real_map_shard(*args, **kwargs)
        shares.append([(name, start, stop) for name, start, stop, _ in part.blocks])
        return part

    pair_importance.map_shard = recording_map_shard
    module = MLPModule([64, 12, 12, 10], xtr[:256], ytr[:256], batch_size=32)
    monitor = PairImportanceMonitor(
        every_n_train_steps=3, probe_size=64, top_k=4, log_images=False, history_dir=out / "maps"
    )
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_steps=6,
        callbacks=[SWIMInit(probe_size=64, seed=1), monitor, SaveInitial(out)],
        logger=TensorBoardLogger(out, name="tb"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    rank = trainer.global_rank
    (out / f"rank{rank}_shares.txt").write_text(repr(shares))
    (out / f"rank{rank}_steps.txt").write_text(repr(monitor._steps))
    if trainer.is_global_zero:
        torch.save(module.state_dict(), out / "final.pt")


if __name__ == "__main__":
    main()

"""Small models and data shared by the tests."""

from __future__ import annotations

import itertools

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def mlp(
    widths: list[int], act: type[nn.Module] = nn.ReLU, dtype: torch.dtype = torch.float32, seed: int = 0
) -> nn.Sequential:
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the test's own model init; the state is put back below
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), act()]
    model = nn.Sequential(*layers[:-1]).to(dtype)
    torch.random.set_rng_state(torch_state)
    return model


class MLPModule(pl.LightningModule):
    """A LightningModule holding an MLP; classification by default."""

    def __init__(
        self,
        widths: list[int],
        x: Tensor,
        y: Tensor,
        *,
        lr: float = 1e-2,
        batch_size: int = 64,
        regression: bool = False,
        act: type[nn.Module] = nn.ReLU,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.net = mlp(widths, act, x.dtype)
        self.x, self.y, self.lr, self.batch_size = x, y, lr, batch_size
        self.regression, self.shuffle = regression, shuffle

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        out = self(x)
        loss = nn.functional.mse_loss(out, y) if self.regression else nn.functional.cross_entropy(out, y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=self.shuffle)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def train_mlp(
    widths: list[int],
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 40,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    act: type[nn.Module] = nn.ReLU,
    full_batch_steps: int | None = None,
) -> nn.Sequential:
    """An MLP trained with Adam (cross-entropy for integer targets, MSE otherwise), deterministic per seed."""
    model = mlp(widths, act, x.dtype, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.functional.cross_entropy if not y.is_floating_point() else nn.functional.mse_loss
    g = torch.Generator().manual_seed(seed)
    if full_batch_steps is not None:
        for _ in range(full_batch_steps):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        return model
    return train(model, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, opt=opt, generator=g)


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    opt: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Minibatch Adam on ``model`` (cross-entropy for integer targets, MSE otherwise), shuffled by ``seed``."""
    opt = opt or torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.functional.cross_entropy if not y.is_floating_point() else nn.functional.mse_loss
    g = generator or torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), batch_size):
            idx = perm[s : s + batch_size]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


def pairmap_fields(idx_from: list[int], idx_to: list[int], m: int | None = None) -> dict[str, Tensor]:
    """The tensors of a plain :class:`~lightning_swim.PairMap` on given pairs (scale 1, costs 0)."""
    m = len(idx_from) if m is None else m
    return dict(
        idx_from=torch.tensor(idx_from),
        idx_to=torch.tensor(idx_to),
        scale=torch.ones(m),
        param_cost=torch.zeros(m),
        func_error=torch.zeros(m),
    )

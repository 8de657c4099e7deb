r"""Influence baselines: per-point EL2N and TracIn self-influence (pure functions, tensors in, tensors out).

Two standard answers to "which training points matter", against which pair importance is measured
(:mod:`lightning_swim.evaluate`):

- **EL2N** (Paul, Ganguli, Dziugaite 2021): the L2 norm of the error vector of the softmax output,

  .. math::
      \mathrm{EL2N}(x_i, y_i) = \big\lVert \mathrm{softmax}(f_\theta(x_i)) - e_{y_i} \big\rVert_2 ,

  averaged over networks early in training (the paper scores at epoch 20 of 200 and averages over
  10 initialisations; :func:`el2n_scores` averages over whatever networks it is given: checkpoints
  of one run, networks of several seeds, or both).
- **TracIn self-influence** (Pruthi, Liu, Kale, Sundararajan 2020, TracInCP): how much a point's
  own gradient steps reduce its own loss, summed over checkpoints :math:`\theta_t` with the
  learning rates :math:`\eta_t` in force there,

  .. math::
      \mathrm{TracIn}(z_i) = \sum_t \eta_t \,\big\lVert \nabla_\theta \ell(z_i; \theta_t) \big\rVert^2 .

  Per-sample gradients come from :func:`torch.func.vmap` over :func:`torch.func.grad`. With several
  parameter groups, each group's squared gradient norm is weighted by its own learning rate. For
  Adam the formula is the usual first-order proxy (the paper derives it for SGD).

:class:`TracInAccumulator` sums TracIn over checkpoints *during* training, reading the learning
rates from the optimizer's parameter groups (what :class:`~lightning_swim.callbacks.InfluenceMonitor`
calls).

References:
    Paul, Ganguli, Dziugaite. *Deep learning on a data diet: finding important examples early in
    training*. NeurIPS 2021.
    Pruthi, Liu, Kale, Sundararajan. *Estimating training data influence by tracing gradient
    descent*. NeurIPS 2020.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_swim._checks import check_positive_int
from lightning_swim._modelio import model_device_dtype

__all__ = [
    "TracInAccumulator",
    "el2n_scores",
    "learning_rates",
    "per_sample_grad_norms",
    "tracin_self_influence",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss(output [B, ...], target [B, ...]) -> scalar``, the mean over the batch (as ``F.cross_entropy``)."""


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside (no dropout), every submodule's mode restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _check_xy(x: Tensor, y: Tensor, *, classification: bool) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"Expected `x` and `y` to be tensors but got {type(x).__name__} and {type(y).__name__}.")
    if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"Expected `x` `[N, ...]` and `y` `[N, ...]` with one row per example but got {tuple(x.shape)} and "
            f"{tuple(y.shape)}."
        )
    if classification and (y.is_floating_point() or y.ndim != 1):
        raise ValueError(f"Expected argument `y` to be integer class labels `[N]` but got {y.dtype} {tuple(y.shape)}.")


def _models(models: nn.Module | Sequence[nn.Module], name: str) -> list[nn.Module]:
    out = [models] if isinstance(models, nn.Module) else list(models)
    if not out or not all(isinstance(m, nn.Module) for m in out):
        raise TypeError(f"Expected argument `{name}` to be an nn.Module or a non-empty sequence of them.")
    return out


def el2n_scores(models: nn.Module | Sequence[nn.Module], x: Tensor, y: Tensor, *, batch_size: int = 4096) -> Tensor:
    r"""EL2N of every example, averaged over ``models``: ``[N]`` float64 on the CPU.

    .. math::
        \mathrm{EL2N}_i = \frac{1}{T}\sum_{t=1}^T \big\lVert \mathrm{softmax}(f_{\theta_t}(x_i)) - e_{y_i}\big\rVert_2

    Args:
        models: one classifier or several (checkpoints, seeds) returning logits ``[B, C]``; each is
            evaluated in eval mode and left in its mode.
        x: inputs, ``[N, ...]``.
        y: class labels, ``[N]``.
        batch_size: examples per forward pass.

    Example:
        >>> net = nn.Linear(2, 3, device="meta").to_empty(device="cpu")
        >>> with torch.no_grad():
        ...     _ = net.weight.zero_(), net.bias.zero_()  # uniform softmax: |(1/3, 1/3, 1/3) - e_y| = sqrt(2/3)
        >>> el2n_scores(net, torch.zeros(2, 2), torch.tensor([0, 2]))
        tensor([0.8165, 0.8165], dtype=torch.float64)
    """
    nets = _models(models, "models")
    _check_xy(x, y, classification=True)
    check_positive_int(batch_size, "batch_size")
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for net in nets:
        device, dtype = model_device_dtype(net)
        with _eval_mode(net), torch.no_grad():
            for s in range(0, x.shape[0], batch_size):
                xb = x[s : s + batch_size].to(device=device, dtype=dtype)
                out = net(xb)
                if out.ndim != 2:
                    raise ValueError(f"Expected the model to return logits `[B, C]` but got {tuple(out.shape)}.")
                yb = y[s : s + batch_size].to(device)
                if bool((yb < 0).any() | (yb >= out.shape[1]).any()):
                    raise ValueError(f"Expected labels in [0, {out.shape[1]}) (the model's {out.shape[1]} logits).")
                err = out.double().softmax(1) - nn.functional.one_hot(yb, out.shape[1]).double()
                total[s : s + batch_size] += err.norm(dim=1).cpu()
    return total / len(nets)


def _default_loss(y: Tensor) -> LossFn:
    return nn.functional.cross_entropy if not y.is_floating_point() else nn.functional.mse_loss


def per_sample_grad_norms(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn | None = None,
    param_weights: Mapping[str, float] | None = None,
    batch_size: int = 512,
) -> Tensor:
    r"""Squared norms of per-example gradients, :math:`\sum_p w_p \lVert\nabla_{\theta_p}\ell(z_i)\rVert^2`: ``[N]``.

    Computed with ``vmap(grad(loss))`` over the examples (:mod:`torch.func`), in eval mode, for the
    parameters that require grad; the model's parameters, mode and grad state are left as they were.

    Args:
        model: the network.
        x: inputs, ``[N, ...]``.
        y: targets, ``[N]`` class labels (default loss: cross-entropy) or ``[N, ...]`` floats (MSE).
        loss_fn: ``loss(output [1, ...], target [1, ...]) -> scalar`` for one example.
        param_weights: parameter name -> weight :math:`w_p` (e.g. its learning rate); default 1 for
            every parameter, 0 for a parameter left out.
        batch_size: examples per vectorised gradient computation.

    Returns:
        ``[N]`` float64 on the CPU.
    """
    from torch.func import functional_call, grad, vmap

    _check_xy(x, y, classification=False)
    check_positive_int(batch_size, "batch_size")
    loss = loss_fn or _default_loss(y)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if param_weights is not None:
        unknown = sorted(set(param_weights) - set(names))
        if unknown:
            raise ValueError(f"`param_weights` names {unknown}, which are not trainable parameters of the model.")
        names = [n for n in names if param_weights.get(n, 0.0) != 0.0]
    if not names:
        raise ValueError("The model has no trainable parameter (with a non-zero weight) to take gradients of.")
    weights = {n: float(param_weights[n]) if param_weights is not None else 1.0 for n in names}
    params = {n: p.detach() for n, p in model.named_parameters() if n in weights}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in weights}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    device, dtype = model_device_dtype(model)

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, ({**p, **frozen}, buffers), (xi[None],))
        return loss(out, yi[None])

    per_example = vmap(grad(one), in_dims=(None, 0, 0))
    out = torch.empty(x.shape[0], dtype=torch.float64)
    with _eval_mode(model), torch.enable_grad():
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size].to(device)
            xb = xb.to(dtype) if xb.is_floating_point() else xb
            yb = y[s : s + batch_size].to(device)
            yb = yb.to(dtype) if yb.is_floating_point() else yb
            g = per_example(params, xb, yb)
            sq = sum(weights[n] * g[n].double().flatten(1).pow(2).sum(1) for n in names)
            out[s : s + batch_size] = torch.as_tensor(sq).cpu()
    return out


def learning_rates(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Parameter name -> the learning rate of the optimizer's parameter group that holds it.

    Parameters of ``model`` that the optimizer does not update are left out.
    """
    by_id = {id(p): float(group["lr"]) for group in optimizer.param_groups for p in group["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id and p.requires_grad}


def tracin_self_influence(
    checkpoints: Sequence[nn.Module],
    x: Tensor,
    y: Tensor,
    learning_rates: Sequence[float | Mapping[str, float]],
    *,
    loss_fn: LossFn | None = None,
    batch_size: int = 512,
) -> Tensor:
    r"""TracIn self-influence :math:`\sum_t \eta_t \lVert\nabla_\theta \ell(z_i;\theta_t)\rVert^2`: ``[N]`` float64.

    Args:
        checkpoints: the network at each checkpoint :math:`\theta_t`.
        x: inputs, ``[N, ...]``.
        y: targets (class labels ``[N]`` by default, with the cross-entropy).
        learning_rates: :math:`\eta_t`, one per checkpoint: a number, or parameter name -> learning
            rate (:func:`learning_rates`) when parameter groups differ.
        loss_fn: per-example loss, as in :func:`per_sample_grad_norms`.
        batch_size: examples per vectorised gradient computation.

    Example:
        >>> net = nn.Linear(1, 1, bias=False, device="meta").to_empty(device="cpu")  # l = (w x - y)^2
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(1.0)
        >>> x, y = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [0.0]])
        >>> tracin_self_influence([net, net], x, y, [0.1, 0.5])  # (0.1 + 0.5) * (2 w x^2)^2
        tensor([ 2.4000, 38.4000], dtype=torch.float64)
    """
    nets = _models(checkpoints, "checkpoints")
    if len(learning_rates) != len(nets):
        raise ValueError(
            f"Expected one learning rate per checkpoint ({len(nets)}) in `learning_rates` but got "
            f"{len(learning_rates)}."
        )
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for net, lr in zip(nets, learning_rates, strict=True):
        if isinstance(lr, Mapping):
            total += per_sample_grad_norms(net, x, y, loss_fn=loss_fn, param_weights=lr, batch_size=batch_size)
        else:
            if not float(lr) >= 0:
                raise ValueError(f"Expected non-negative learning rates but got {lr!r}.")
            total += float(lr) * per_sample_grad_norms(net, x, y, loss_fn=loss_fn, batch_size=batch_size)
    return total


class TracInAccumulator:
    """TracIn self-influence of a fixed set of examples, accumulated over checkpoints during training.

    Call :meth:`update` at each checkpoint with the model and its optimizer (or a learning rate);
    :attr:`scores` is the running sum :math:`\\sum_t \\eta_t \\lVert\\nabla\\ell(z_i;\\theta_t)\\rVert^2`.

    Args:
        x: the examples, ``[N, ...]``.
        y: their targets.
        loss_fn: per-example loss (default: cross-entropy for class labels, MSE for floats).
        batch_size: examples per vectorised gradient computation.

    Example:
        >>> net = nn.Linear(3, 2, device="meta").to_empty(device="cpu")
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(0.1), net.bias.zero_()
        >>> acc = TracInAccumulator(torch.eye(4, 3), torch.tensor([0, 1, 1, 0]))
        >>> acc.update(net, torch.optim.SGD(net.parameters(), lr=0.1)).shape, acc.n_checkpoints
        (torch.Size([4]), 1)
    """

    def __init__(self, x: Tensor, y: Tensor, *, loss_fn: LossFn | None = None, batch_size: int = 512) -> None:
        _check_xy(x, y, classification=False)
        check_positive_int(batch_size, "batch_size")
        self.x, self.y = x, y
        self.loss_fn = loss_fn
        self.batch_size = batch_size
        self.scores = torch.zeros(x.shape[0], dtype=torch.float64)
        self.n_checkpoints = 0
        self.last: Tensor | None = None  # the last checkpoint's squared gradient norms (learning-rate weighted)

    def update(
        self,
        model: nn.Module,
        lr: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | Mapping[str, float] | float,
    ) -> Tensor:
        """Add the checkpoint ``model`` with its learning rates.

        Args:
            model: the network at this checkpoint.
            lr: an optimizer (or several: Lightning's ``trainer.optimizers``) whose parameter groups give
                each parameter's learning rate, a mapping parameter name -> learning rate, or one number.

        Returns:
            This checkpoint's term, ``[N]``.
        """
        if isinstance(lr, torch.optim.Optimizer):
            lr = [lr]
        if isinstance(lr, Sequence):
            lrs: dict[str, float] = {}
            for opt in lr:
                lrs.update(learning_rates(model, opt))
            if not lrs:
                raise ValueError("The optimizer(s) update none of the model's trainable parameters.")
            lr = lrs
        if isinstance(lr, Mapping):
            term = per_sample_grad_norms(
                model, self.x, self.y, loss_fn=self.loss_fn, param_weights=lr, batch_size=self.batch_size
            )
        else:
            if not float(lr) >= 0:
                raise ValueError(f"Expected a non-negative learning rate but got {lr!r}.")
            term = float(lr) * per_sample_grad_norms(
                model, self.x, self.y, loss_fn=self.loss_fn, batch_size=self.batch_size
            )
        self.scores = self.scores + term
        self.n_checkpoints += 1
        self.last = term
        return term

    def state_dict(self) -> dict[str, object]:
        return {"scores": self.scores, "n_checkpoints": self.n_checkpoints}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        scores = state["scores"]
        if not isinstance(scores, Tensor) or scores.shape != self.scores.shape:
            raise ValueError(f"Expected saved TracIn scores of shape {tuple(self.scores.shape)}.")
        self.scores = scores.double()
        self.n_checkpoints = int(state["n_checkpoints"])  # type: ignore[call-overload]

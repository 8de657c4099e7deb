r"""Does a per-point score say which training data matter? A counterfactual evaluation by retraining.

A score ``s [N]`` over the training points makes a claim: the points it ranks first matter more to
the trained network than others. :func:`evaluate_scores` tests that claim the way a researcher would
(Paul et al. 2021; Hammoudeh & Lowd 2024), cheaply enough for a laptop:

- **remove** the top ``k`` share of the training set by score and retrain: if the score finds what
  training depends on, test accuracy drops more than when the same number of *random* points is
  removed;
- **keep** only the top ``f`` share and retrain: if the score finds the informative points, that
  subset trains a better network than a random subset of the same size;
- both also **class-stratified** (the top share *within each class*, against random subsets with the
  same per-class counts), so that a result cannot come from changing the class balance.

Every retrain of seed ``s`` starts from the same initialisation (drawn from seed ``s``) and takes the
same number of optimisation steps as the full-data run, ``epochs * ceil(N / batch_size)``: each step
is a full minibatch of ``batch_size`` indices taken from successive random permutations of the subset
(an explicit generator per model), so a smaller subset is seen for more epochs, never for fewer
steps. The random subsets are paired with the scores by seed (one set of draws per seed and
condition, shared by all scores). The result holds per-seed accuracies and their differences to
random, ``delta = acc(score) - acc(random)``, and counts the seeds in which a score *beats random by a
margin*: ``delta <= -margin`` for removal, ``delta >= +margin`` for keeping.

:func:`seed_stability` and :func:`score_correlations` say whether a score computed from networks
trained with different seeds names the same points (Spearman's :math:`\rho`, overlap of the top
10%), and how scores relate to one another.

Retraining hundreds of small networks is fast because they are trained at once, as one batched
ensemble (:func:`train_models`: parameters stacked with :func:`torch.func.stack_module_state`, the
forward pass vectorised with :func:`torch.func.vmap`, one Adam step on the stacked parameters, which
is exactly one Adam step per model since Adam acts element by element); it matches the plain
one-model loop :func:`train_model` to float tolerance. Nothing here touches a global RNG.

References:
    Paul, Ganguli, Dziugaite. *Deep learning on a data diet: finding important examples early in
    training*. NeurIPS 2021.
    Pruthi, Liu, Kale, Sundararajan. *Estimating training data influence by tracing gradient
    descent*. NeurIPS 2020.
    Hammoudeh, Lowd. *Training data influence analysis and estimation: a survey*. Machine Learning 2024.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from lightning_swim._checks import check_positive_int
from lightning_swim._data import isolated_rng

__all__ = [
    "Condition",
    "Evaluation",
    "ModelFactory",
    "TrainConfig",
    "TrainRun",
    "counterfactuals",
    "derive_seed",
    "evaluate_scores",
    "index_stream",
    "mlp_factory",
    "score_correlations",
    "seed_stability",
    "select_top",
    "spearman",
    "train_model",
    "train_models",
]

ModelFactory = Callable[[torch.Generator], nn.Module]
"""Builds a fresh, untrained model whose initial weights are drawn from the generator it is given."""

_UNSUPPORTED = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer ``keys`` (NumPy's ``SeedSequence``): independent streams.

    Example:
        >>> derive_seed(0, 1) == derive_seed(0, 1) != derive_seed(1, 0)
        True
    """
    a, b = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(a) << 31) ^ int(b)


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*keys))


# streams of the derived generators, so that no two purposes share one
_INIT, _ORDER, _TIES, _RANDOM = 0, 1, 2, 3


@dataclass(frozen=True)
class TrainConfig:
    """How every network of an evaluation is trained (Adam on the cross-entropy, full minibatches).

    Attributes:
        epochs: epochs of the *full-data* run; every run takes ``epochs * ceil(N / batch_size)`` steps.
        batch_size: examples per step.
        lr: Adam's learning rate.
        weight_decay: Adam's (L2) weight decay.
        max_models: networks trained at once in one batched ensemble (bounds memory:
            ``max_models * steps * batch_size`` int64 indices plus the stacked parameters).
    """

    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_models: int = 128

    def __post_init__(self) -> None:
        check_positive_int(self.epochs, "epochs")
        check_positive_int(self.batch_size, "batch_size")
        check_positive_int(self.max_models, "max_models")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"Expected argument `lr` to be a positive number but got {self.lr!r}.")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"Expected argument `weight_decay` to be >= 0 but got {self.weight_decay!r}.")

    def steps(self, n_train: int) -> int:
        """Optimisation steps of every run: those of ``epochs`` epochs over all ``n_train`` points."""
        return self.epochs * math.ceil(n_train / self.batch_size)


def mlp_factory(widths: Sequence[int], *, dtype: torch.dtype = torch.float32) -> ModelFactory:
    """A factory of ReLU MLPs ``widths[0] -> ... -> widths[-1]`` with PyTorch's default initialisation.

    Every weight and bias of a layer with ``fan_in`` inputs is drawn uniformly from
    :math:`[-1/\\sqrt{fan\\_in}, 1/\\sqrt{fan\\_in}]` (what ``nn.Linear.reset_parameters`` draws), but
    from the generator given to the factory, not from the global RNG.

    Example:
        >>> make = mlp_factory([64, 128, 10])
        >>> a, b = make(torch.Generator().manual_seed(0)), make(torch.Generator().manual_seed(0))
        >>> bool(torch.equal(a[0].weight, b[0].weight)), a
        (True, Sequential(
          (0): Linear(in_features=64, out_features=128, bias=True)
          (1): ReLU()
          (2): Linear(in_features=128, out_features=10, bias=True)
        ))
    """
    widths = [int(w) for w in widths]
    if len(widths) < 2 or any(w < 1 for w in widths):
        raise ValueError(f"Expected argument `widths` to be at least two positive layer sizes but got {widths}.")

    def make(generator: torch.Generator) -> nn.Module:
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            lin = nn.Linear(a, b, device="meta")
            bound = 1 / math.sqrt(a)
            lin.weight = nn.Parameter((torch.rand(b, a, generator=generator, dtype=torch.float64) * 2 - 1) * bound)
            lin.bias = nn.Parameter((torch.rand(b, generator=generator, dtype=torch.float64) * 2 - 1) * bound)
            layers += [lin.to(dtype), nn.ReLU()]
        return nn.Sequential(*layers[:-1])

    return make


def _check_factory(factory: ModelFactory) -> nn.Module:
    """Build one model and make sure the factory draws its weights from the generator it is given."""
    if not callable(factory):
        raise TypeError(f"Expected argument `model` to be a model factory or a list of widths but got {factory!r}.")
    with isolated_rng():  # a factory that draws from the global RNG must not move it
        a, b, c = (factory(torch.Generator().manual_seed(s)) for s in (0, 0, 1))
    for m in (a, b, c):
        if not isinstance(m, nn.Module):
            raise TypeError(f"Expected the model factory to return an nn.Module but got {type(m).__name__}.")
    bad = [type(m).__name__ for m in a.modules() if isinstance(m, _UNSUPPORTED)]
    if bad:
        raise ValueError(
            f"The model has {sorted(set(bad))}: dropout draws from the global RNG and batch norm keeps running "
            "statistics, neither of which the batched ensemble can reproduce; use a model without them."
        )
    sa, sb, sc = (m.state_dict() for m in (a, b, c))
    if not all(torch.equal(sa[k], sb[k]) for k in sa):
        raise ValueError(
            "The model factory returned different weights for two generators with the same seed: it must draw "
            "every initial weight from the `torch.Generator` it is given (not from the global RNG)."
        )
    if all(torch.equal(sa[k], sc[k]) for k in sa):
        raise ValueError(
            "The model factory returned the same weights for generators with different seeds: it must draw "
            "the initial weights from the `torch.Generator` it is given."
        )
    return a


def _as_factory(model: ModelFactory | Sequence[int]) -> ModelFactory:
    if isinstance(model, Sequence) and not isinstance(model, str):
        return mlp_factory(model)
    return model


def index_stream(subset: Tensor, steps: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """The minibatches of one run: ``[steps, batch_size]`` indices into the training set.

    Successive random permutations of ``subset`` (each drawn from ``generator``), concatenated and cut
    into full batches: every point of the subset is seen once before any is seen again, and an epoch
    boundary may fall inside a batch.

    Example:
        >>> s = index_stream(torch.tensor([3, 5, 7]), 2, 4, torch.Generator().manual_seed(0))
        >>> s.shape, sorted(s.ravel()[:3].tolist())
        (torch.Size([2, 4]), [3, 5, 7])
    """
    if subset.ndim != 1 or subset.numel() == 0:
        raise ValueError(f"Expected argument `subset` to be a non-empty 1D index tensor but got {tuple(subset.shape)}.")
    n = subset.numel()
    need = steps * batch_size
    perms = [torch.randperm(n, generator=generator) for _ in range(math.ceil(need / n))]
    return subset.cpu()[torch.cat(perms)[:need]].view(steps, batch_size)


@dataclass
class TrainRun:
    """Networks trained by :func:`train_models`.

    Attributes:
        models: the trained networks, one per run, in eval mode.
        checkpoints: step -> the networks after that step (one per run), for the steps asked for.
        lr: the learning rate of every step (Adam's, constant).
        steps: the number of optimisation steps each run took.
    """

    models: list[nn.Module]
    checkpoints: dict[int, list[nn.Module]]
    lr: float
    steps: int


def _check_data(x: Tensor, y: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"Expected `x_{name}` and `y_{name}` to be tensors.")
    if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"Expected `x_{name}` of shape `[N, ...]` and integer labels `y_{name}` of shape `[N]` but got "
            f"{tuple(x.shape)} and {tuple(y.shape)}."
        )
    if y.is_floating_point() or y.dtype == torch.bool:
        raise TypeError(f"Expected `y_{name}` to hold integer class labels but got {y.dtype}.")


def _stack(models: list[nn.Module]) -> tuple[nn.Module, dict[str, Tensor], dict[str, Tensor]]:
    from torch.func import stack_module_state

    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    return base, {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}, buffers


def _unstack(template: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], e: int) -> nn.Module:
    model = copy.deepcopy(template)
    model.load_state_dict(
        {**{k: v[e].detach().clone() for k, v in params.items()}, **{k: v[e] for k, v in buffers.items()}}
    )
    return model.eval()


def _ensemble_forward(base: nn.Module) -> Callable[[dict[str, Tensor], dict[str, Tensor], Tensor], Tensor]:
    from torch.func import functional_call, vmap

    def one(p: dict[str, Tensor], b: dict[str, Tensor], xb: Tensor) -> Tensor:
        return functional_call(base, (p, b), (xb,))

    return vmap(one)


def _train_chunk(
    factory: ModelFactory,
    x: Tensor,
    y: Tensor,
    subsets: list[Tensor],
    seeds: list[int],
    config: TrainConfig,
    steps: int,
    checkpoint_steps: set[int],
) -> tuple[dict[str, Tensor], dict[str, Tensor], Callable[..., Tensor], dict[int, dict[str, Tensor]]]:
    with isolated_rng():
        models = [factory(_generator(s, _INIT)) for s in seeds]
    base, params, buffers = _stack(models)
    device, dtype = x.device, next(iter(params.values())).dtype
    params = {k: v.detach().to(device).requires_grad_(True) for k, v in params.items()}
    buffers = {k: v.to(device) for k, v in buffers.items()}
    streams = torch.stack(
        [
            index_stream(sub, steps, config.batch_size, _generator(s, _ORDER))
            for sub, s in zip(subsets, seeds, strict=True)
        ]
    ).to(device)  # [E, steps, B]
    xin = x.to(dtype)
    forward = _ensemble_forward(base)
    opt = torch.optim.Adam(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    saved: dict[int, dict[str, Tensor]] = {}
    with torch.enable_grad():
        for t in range(steps):
            idx = streams[:, t]  # [E, B]
            out = forward(params, buffers, xin[idx])  # [E, B, C]
            per = nn.functional.cross_entropy(out.flatten(0, 1), y[idx].flatten(), reduction="none")
            loss = per.view(idx.shape).mean(1).sum()  # each model's mean loss: its gradient is its own
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if t + 1 in checkpoint_steps:
                saved[t + 1] = {k: v.detach().clone() for k, v in params.items()}
    return {k: v.detach() for k, v in params.items()}, buffers, forward, saved


def train_models(
    model: ModelFactory | Sequence[int],
    x: Tensor,
    y: Tensor,
    *,
    seeds: Sequence[int],
    subsets: Sequence[Tensor] | None = None,
    config: TrainConfig | None = None,
    checkpoint_steps: Sequence[int] = (),
) -> TrainRun:
    """Train one network per seed (and subset) at once, as a batched ensemble.

    Run ``e`` starts from ``model(generator)`` with a generator derived from ``seeds[e]``, sees the
    minibatches :func:`index_stream` draws from ``subsets[e]`` with another generator derived from
    ``seeds[e]``, and takes ``config.steps(len(x))`` Adam steps on the mean cross-entropy of its batch.
    The result equals :func:`train_model` run by run (to float tolerance).

    Args:
        model: a :data:`ModelFactory`, or the widths of a ReLU MLP (:func:`mlp_factory`).
        x: the training inputs, ``[N, ...]`` (their device is the training device).
        y: the integer class labels, ``[N]``.
        seeds: one seed per run.
        subsets: the training indices of each run (default: all of ``x`` for every run).
        config: the training settings.
        checkpoint_steps: steps after which to keep a copy of every network (e.g. for TracIn).

    Returns:
        A :class:`TrainRun`.
    """
    config = config or TrainConfig()
    factory = _as_factory(model)
    template = _check_factory(factory)
    _check_data(x, y, "train")
    seeds = [int(s) for s in seeds]
    n = x.shape[0]
    if subsets is None:
        subsets = [torch.arange(n)] * len(seeds)
    subsets = [_check_subset(s, n) for s in subsets]
    if len(subsets) != len(seeds):
        raise ValueError(f"Expected one subset per seed but got {len(subsets)} subsets and {len(seeds)} seeds.")
    steps = config.steps(n)
    ckpt = {int(s) for s in checkpoint_steps}
    if any(not 1 <= s <= steps for s in ckpt):
        raise ValueError(f"Expected `checkpoint_steps` within [1, {steps}] but got {sorted(ckpt)}.")
    y = y.to(x.device)
    models: list[nn.Module] = []
    checkpoints: dict[int, list[nn.Module]] = {s: [] for s in sorted(ckpt)}
    for c0 in range(0, len(seeds), config.max_models):
        sl = slice(c0, c0 + config.max_models)
        params, buffers, _, saved = _train_chunk(factory, x, y, subsets[sl], seeds[sl], config, steps, ckpt)
        template_dev = copy.deepcopy(template).to(x.device)
        for e in range(len(seeds[sl])):
            models.append(_unstack(template_dev, params, buffers, e))
            for s, p in saved.items():
                checkpoints[s].append(_unstack(template_dev, p, buffers, e))
    return TrainRun(models, checkpoints, float(config.lr), steps)


def train_model(
    model: ModelFactory | Sequence[int],
    x: Tensor,
    y: Tensor,
    *,
    seed: int,
    subset: Tensor | None = None,
    config: TrainConfig | None = None,
) -> nn.Module:
    """The plain one-model training loop (``torch.optim.Adam``, the same minibatches as :func:`train_models`).

    The reference that the batched ensemble is tested against; use :func:`train_models` for many runs.
    """
    config = config or TrainConfig()
    factory = _as_factory(model)
    _check_factory(factory)
    _check_data(x, y, "train")
    n = x.shape[0]
    subset = _check_subset(torch.arange(n) if subset is None else subset, n)
    with isolated_rng():
        net = factory(_generator(int(seed), _INIT)).to(x.device)
    steps = config.steps(n)
    stream = index_stream(subset, steps, config.batch_size, _generator(int(seed), _ORDER)).to(x.device)
    dtype = next(net.parameters()).dtype
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    net.train()
    y = y.to(x.device)
    with torch.enable_grad():
        for t in range(steps):
            idx = stream[t]
            loss = nn.functional.cross_entropy(net(x[idx].to(dtype)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


def _check_subset(subset: Tensor, n: int) -> Tensor:
    if not isinstance(subset, Tensor) or subset.ndim != 1 or subset.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"Expected every subset to be a 1D integer index tensor but got {subset!r}.")
    if subset.numel() == 0:
        raise ValueError("Expected every subset to hold at least one training index but got an empty one.")
    if bool((subset < 0).any() | (subset >= n).any()):
        raise ValueError(f"Expected subset indices in [0, {n}) but got some outside.")
    return subset.long().cpu()


# -- subsets chosen by a score -------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Condition:
    """One counterfactual: ``mode`` ``"remove"`` (drop the top share) or ``"keep"`` (train on it only),
    the ``fraction`` of the training set (or of each class, when ``stratified``)."""

    mode: str
    fraction: float
    stratified: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("remove", "keep"):
            raise ValueError(f"Invalid `mode` {self.mode!r}. Must be one of ['keep', 'remove'].")
        if not 0 < self.fraction < 1:
            raise ValueError(f"Expected argument `fraction` in (0, 1) but got {self.fraction!r}.")

    @property
    def sign(self) -> int:
        """-1 for removal (a score that finds what matters lowers accuracy), +1 for keeping."""
        return -1 if self.mode == "remove" else 1

    def __str__(self) -> str:
        return f"{self.mode} top {100 * self.fraction:g}%" + (" per class" if self.stratified else "")


def counterfactuals(
    remove: Sequence[float] = (0.05, 0.1, 0.2, 0.4),
    keep: Sequence[float] = (0.2, 0.3, 0.5),
    *,
    stratified: Sequence[bool] = (False, True),
) -> list[Condition]:
    """Every ``remove`` and ``keep`` fraction, global and (or) class-stratified."""
    return [Condition(mode, f, s) for s in stratified for mode, fs in (("remove", remove), ("keep", keep)) for f in fs]


def _top_count(n: int, fraction: float) -> int:
    return min(n, max(1, round(fraction * n))) if n else 0


def select_top(
    scores: Tensor, fraction: float, *, labels: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Indices of the ``fraction`` of points with the highest scores (of each class, given ``labels``).

    ``round(fraction * n)`` points (at least 1) of the ``n`` points (of each class). Equal scores are
    ordered at random with ``generator`` (default: a fixed one), so that a score with many ties, e.g.
    zero for every point no neuron is anchored on, does not fall back on the data's order.

    Returns:
        ``[k]`` int64, sorted.

    Example:
        >>> select_top(torch.tensor([0.1, 0.9, 0.5, 0.7]), 0.5)
        tensor([1, 3])
    """
    if scores.ndim != 1 or not bool(torch.isfinite(scores).all()):
        raise ValueError(f"Expected argument `scores` to be a finite 1D tensor but got shape {tuple(scores.shape)}.")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    s = scores.detach().double().cpu()
    groups = (
        [torch.arange(s.numel())]
        if labels is None
        else [torch.nonzero(labels.cpu() == c).ravel() for c in labels.cpu().unique()]
    )
    chosen = []
    for idx in groups:
        perm = idx[torch.randperm(idx.numel(), generator=gen)]  # random order first: ties broken at random
        order = perm[torch.argsort(s[perm], descending=True, stable=True)]
        chosen.append(order[: _top_count(idx.numel(), fraction)])
    return torch.cat(chosen).sort().values


def _random_like(n: int, fraction: float, labels: Tensor | None, generator: torch.Generator) -> Tensor:
    """A random subset with the size (per class, given ``labels``) of :func:`select_top`'s."""
    return select_top(torch.zeros(n, dtype=torch.float64), fraction, labels=labels, generator=generator)


def _training_subset(top: Tensor, n: int, condition: Condition) -> Tensor:
    if condition.mode == "keep":
        return top
    mask = torch.ones(n, dtype=torch.bool)
    mask[top] = False
    return torch.nonzero(mask).ravel()


# -- correlations ---------------------------------------------------------------------------------------------


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two score vectors ``[N]`` (average ranks for ties; NaN if one is constant).

    Example:
        >>> spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 30.0, 20.0]))
        0.5
    """
    from scipy.stats import rankdata

    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"Expected two score vectors of one shape `[N]` but got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    ra = rankdata(a.detach().double().cpu().numpy())
    rb = rankdata(b.detach().double().cpu().numpy())
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def seed_stability(scores: Tensor, *, top: float = 0.1) -> tuple[float, float]:
    """Agreement of one score computed from networks trained with different seeds.

    Args:
        scores: ``[S, N]``, row ``s`` computed from the network of seed ``s`` (``S >= 2``).
        top: the share of points whose overlap is measured.

    Returns:
        ``(rho, overlap)``: the mean over pairs of seeds of Spearman's :math:`\\rho` and of the share of
        one seed's top ``top`` points that are also in the other's (ties broken at random); a random
        score gives about ``(0, top)``.
    """
    if scores.ndim != 2 or scores.shape[0] < 2:
        raise ValueError(f"Expected argument `scores` of shape `[S >= 2, N]` but got {tuple(scores.shape)}.")
    rhos, overlaps = [], []
    k = _top_count(scores.shape[1], top)
    for a, b in itertools.combinations(range(scores.shape[0]), 2):
        rhos.append(spearman(scores[a], scores[b]))
        ta = set(select_top(scores[a], top, generator=_generator(a, _TIES)).tolist())
        tb = set(select_top(scores[b], top, generator=_generator(b, _TIES)).tolist())
        overlaps.append(len(ta & tb) / k)
    return float(np.nanmean(rhos)) if not all(math.isnan(r) for r in rhos) else float("nan"), float(np.mean(overlaps))


def score_correlations(scores: Mapping[str, Tensor]) -> tuple[list[str], Tensor]:
    """Spearman's :math:`\\rho` between every two scores, averaged over seeds.

    Args:
        scores: name -> ``[N]`` or ``[S, N]`` (row ``s`` from seed ``s``; a 1D score is used for every
            seed).

    Returns:
        ``(names, rho [K, K])``.
    """
    names = list(scores)
    per = {k: _per_seed(v, None, k) for k, v in scores.items()}
    n_seeds = max(v.shape[0] for v in per.values())
    rho = torch.eye(len(names), dtype=torch.float64)
    for (a, na), (b, nb) in itertools.combinations(enumerate(names), 2):
        vals = [
            spearman(per[na][min(s, per[na].shape[0] - 1)], per[nb][min(s, per[nb].shape[0] - 1)])
            for s in range(n_seeds)
        ]
        rho[a, b] = rho[b, a] = float(np.nanmean(vals)) if not all(math.isnan(v) for v in vals) else float("nan")
    return names, rho


def _per_seed(score: Tensor, n_seeds: int | None, name: str, n: int | None = None) -> Tensor:
    if not isinstance(score, Tensor) or score.ndim not in (1, 2):
        shape = tuple(score.shape) if isinstance(score, Tensor) else type(score).__name__
        raise ValueError(f"Expected score {name!r} to be a tensor of shape `[N]` or `[S, N]` but got {shape}.")
    s = score.detach().double().cpu()
    s = s[None] if s.ndim == 1 else s
    if n is not None and s.shape[1] != n:
        raise ValueError(f"Expected score {name!r} to have one value per training point ({n}) but got {s.shape[1]}.")
    if n_seeds is not None and s.shape[0] not in (1, n_seeds):
        raise ValueError(f"Expected score {name!r} to have 1 or {n_seeds} rows (one per seed) but got {s.shape[0]}.")
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"Score {name!r} has non-finite values.")
    return s


# -- the evaluation ---------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """The result of :func:`evaluate_scores`; ``str()`` prints it as a table.

    Attributes:
        seeds: the training seeds, ``S`` of them.
        conditions: the counterfactuals evaluated.
        margin: the accuracy margin (a share, 0.02 = 2 points) by which a score must beat random.
        n_random: random subsets drawn per seed and condition (their accuracies are averaged).
        n_classes: number of classes (chance accuracy is ``1 / n_classes`` for balanced classes).
        full_accuracy: ``[S]`` test accuracy of the full-data run of every seed.
        accuracy: score name -> condition -> ``[S]`` test accuracy after retraining.
        random_accuracy: condition -> ``[S]`` the same for random subsets (mean over ``n_random`` draws).
        class_accuracy: score name -> condition -> ``[S, C]`` per-class test accuracy.
        random_class_accuracy: condition -> ``[S, C]``.
        full_class_accuracy: ``[S, C]``.
        stability: score name -> ``(rho, top-10% overlap)`` across seeds (scores given per seed only).
        correlations: ``(names, rho [K, K])`` between the scores, averaged over seeds.
    """

    seeds: list[int]
    conditions: list[Condition]
    margin: float
    n_random: int
    n_classes: int
    full_accuracy: Tensor
    accuracy: dict[str, dict[Condition, Tensor]]
    random_accuracy: dict[Condition, Tensor]
    class_accuracy: dict[str, dict[Condition, Tensor]]
    random_class_accuracy: dict[Condition, Tensor]
    full_class_accuracy: Tensor
    stability: dict[str, tuple[float, float]] = field(default_factory=dict)
    correlations: tuple[list[str], Tensor] | None = None

    @property
    def scores(self) -> list[str]:
        return list(self.accuracy)

    def delta(self, score: str, condition: Condition) -> Tensor:
        """``[S]``: accuracy with the score's subset minus accuracy with the random subset, per seed."""
        return self.accuracy[score][condition] - self.random_accuracy[condition]

    def wins(self, score: str, condition: Condition) -> int:
        """Seeds in which the score beats random by ``margin`` (lower accuracy for removal, higher for keeping)."""
        return int((condition.sign * self.delta(score, condition) >= self.margin - 1e-12).sum())

    def class_delta(self, score: str, condition: Condition) -> Tensor:
        """``[S, C]``: per-class accuracy difference to the random subset."""
        return self.class_accuracy[score][condition] - self.random_class_accuracy[condition]

    def rows(self) -> list[dict[str, object]]:
        """One row per score and condition: accuracies, deltas (in points), wins (for tables and JSON)."""
        rows: list[dict[str, object]] = []
        for cond in self.conditions:
            for name in self.scores:
                d = 100 * self.delta(name, cond)
                rows.append(
                    {
                        "score": name,
                        "condition": str(cond),
                        "accuracy_mean": 100 * float(self.accuracy[name][cond].mean()),
                        "random_accuracy_mean": 100 * float(self.random_accuracy[cond].mean()),
                        "delta_mean": float(d.mean()),
                        "delta_std": float(d.std()) if d.numel() > 1 else 0.0,
                        "wins": self.wins(name, cond),
                        "delta_per_seed": [round(float(v), 2) for v in d],
                    }
                )
        return rows

    def __str__(self) -> str:
        s = len(self.seeds)
        full = 100 * self.full_accuracy
        lines = [
            f"Counterfactual evaluation: {s} seed(s) {self.seeds}, {self.n_random} random subset(s) per seed and "
            f"condition; test accuracy in % after retraining (same initialisation and steps as the full-data run).",
            f"Full training set: {float(full.mean()):.2f} ± {float(full.std()) if s > 1 else 0.0:.2f}; chance "
            f"{100 / self.n_classes:.1f}. Δ = score − random (points); 'beats' = seeds with "
            f"Δ <= −{100 * self.margin:g} (remove) or Δ >= +{100 * self.margin:g} (keep).",
        ]
        width = max(15, *(len(n) for n in self.scores))
        header = f"{'condition':<26} {'score':<{width}} {'acc':>7} {'Δ mean':>7} {'Δ std':>6} {'beats':>6}  per-seed Δ"
        lines += ["", header, "-" * len(header)]
        for cond in self.conditions:
            r = 100 * self.random_accuracy[cond]
            lines.append(f"{cond!s:<26} {'(random subset)':<{width}} {float(r.mean()):7.2f}   (the reference of Δ)")
            for name in self.scores:
                d = 100 * self.delta(name, cond)
                acc = 100 * float(self.accuracy[name][cond].mean())
                std = float(d.std()) if s > 1 else 0.0
                per = " ".join(f"{float(v):+.2f}" for v in d)
                wins = f"{self.wins(name, cond):>3}/{s:<2}"
                lines.append(f"{'':<26} {name:<{width}} {acc:7.2f} {float(d.mean()):+7.2f} {std:6.2f} {wins}  {per}")
        if self.stability:
            lines += ["", "Seed stability (score from networks of different seeds; random: ρ ≈ 0, overlap ≈ 0.10):"]
            for name, (srho, ov) in self.stability.items():
                lines.append(f"  {name:<{width}} Spearman ρ {srho:+.2f}   top-10% overlap {ov:.2f}")
        if self.correlations is not None:
            names, corr = self.correlations
            lines += ["", "Spearman ρ between scores (mean over seeds; 0 = unrelated):"]
            short = [n[:9] for n in names]
            lines.append(" " * (width + 2) + " ".join(f"{n:>9}" for n in short))
            for i, n in enumerate(names):
                lines.append(f"  {n:<{width}}" + " ".join(f"{float(corr[i, j]):+9.2f}" for j in range(len(names))))
        return "\n".join(lines)


def _accuracies(models_out: Tensor, y_test: Tensor, n_classes: int) -> tuple[Tensor, Tensor]:
    """``(accuracy [E], class accuracy [E, C])`` from predicted classes ``[E, T]``."""
    correct = (models_out == y_test[None]).double()
    acc = correct.mean(1)
    cls = torch.stack(
        [
            correct[:, y_test == c].mean(1) if bool((y_test == c).any()) else torch.full_like(acc, float("nan"))
            for c in range(n_classes)
        ],
        1,
    )
    return acc, cls


def _train_and_test(
    factory: ModelFactory,
    x: Tensor,
    y: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    jobs: list[tuple[int, Tensor]],
    config: TrainConfig,
    n_classes: int,
) -> tuple[Tensor, Tensor]:
    """Train one network per ``(seed, subset)`` job and return test ``(accuracy [J], class accuracy [J, C])``."""
    _check_factory(factory)
    steps = config.steps(x.shape[0])
    accs, clss = [], []
    for c0 in range(0, len(jobs), config.max_models):
        chunk = jobs[c0 : c0 + config.max_models]
        params, buffers, forward, _ = _train_chunk(
            factory, x, y, [j[1] for j in chunk], [j[0] for j in chunk], config, steps, set()
        )
        dtype = next(iter(params.values())).dtype
        with torch.no_grad():
            xt = x_test.to(device=x.device, dtype=dtype).expand(len(chunk), *x_test.shape)
            pred = forward(params, buffers, xt).argmax(-1).cpu()
        a, c = _accuracies(pred, y_test.cpu(), n_classes)
        accs.append(a)
        clss.append(c)
    return torch.cat(accs), torch.cat(clss)


def evaluate_scores(
    scores: Mapping[str, Tensor],
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    *,
    model: ModelFactory | Sequence[int],
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    conditions: Sequence[Condition] | None = None,
    config: TrainConfig | None = None,
    margin: float = 0.02,
    n_random: int = 1,
) -> Evaluation:
    """Retrain without (or with only) each score's top points, against random subsets; see the module doc.

    Args:
        scores: name -> per-point score, ``[N]`` (one score for every seed) or ``[S, N]`` (row ``s``
            computed from the network of seed ``s``, e.g. by :func:`train_models` on the full data with
            the same ``seeds`` and ``config``; only these get a seed stability).
        x_train: training inputs, ``[N, ...]`` (their device is the training device).
        y_train: integer labels, ``[N]``.
        x_test: test inputs, ``[T, ...]``.
        y_test: integer labels, ``[T]``.
        model: a :data:`ModelFactory` or the widths of a ReLU MLP.
        seeds: training seeds; seed ``s`` fixes the initialisation, the minibatch order, the random
            subsets and the tie-breaking of every run of that seed.
        conditions: the counterfactuals (default :func:`counterfactuals`: remove 5/10/20/40%, keep
            20/30/50%, global and class-stratified).
        config: training settings (default: Adam, lr 1e-3, batch 64, 60 epochs).
        margin: accuracy margin (a share) that counts as beating random.
        n_random: random subsets per seed and condition (their accuracies averaged: a less noisy baseline).

    Returns:
        An :class:`Evaluation`.
    """
    _check_data(x_train, y_train, "train")
    _check_data(x_test, y_test, "test")
    if not scores:
        raise ValueError("Expected argument `scores` to name at least one score.")
    check_positive_int(n_random, "n_random")
    if not 0 <= margin < 1:
        raise ValueError(f"Expected argument `margin` in [0, 1) (a share of accuracy) but got {margin!r}.")
    config = config or TrainConfig()
    factory = _as_factory(model)
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"Expected argument `seeds` to be distinct integers but got {seeds}.")
    conds = list(conditions) if conditions is not None else counterfactuals()
    if not conds:
        raise ValueError("Expected at least one condition.")
    n, S = x_train.shape[0], len(seeds)
    per = {name: _per_seed(v, S, name, n) for name, v in scores.items()}
    labels = y_train.cpu()
    n_classes = int(max(int(labels.max()), int(y_test.max())) + 1)

    jobs: list[tuple[int, Tensor]] = []
    where: dict[tuple[str, int, Condition, int], int] = {}  # (kind, seed, condition, draw) -> job
    for si, seed in enumerate(seeds):
        where[("full", si, conds[0], 0)] = len(jobs)
        jobs.append((seed, torch.arange(n)))
        for cond in conds:
            lab = labels if cond.stratified else None
            for r in range(n_random):
                key = int(1000 * cond.fraction), int(cond.stratified), r
                top = _random_like(n, cond.fraction, lab, _generator(seed, _RANDOM, *key))
                where[("random", si, cond, r)] = len(jobs)
                jobs.append((seed, _training_subset(top, n, cond)))
            for k, name in enumerate(per):
                sc = per[name][min(si, per[name].shape[0] - 1)]
                top = select_top(sc, cond.fraction, labels=lab, generator=_generator(seed, _TIES))
                where[(f"score{k}", si, cond, 0)] = len(jobs)
                jobs.append((seed, _training_subset(top, n, cond)))
    acc, cls = _train_and_test(factory, x_train, y_train.to(x_train.device), x_test, y_test, jobs, config, n_classes)

    def get(kind: str, cond: Condition, draws: int = 1) -> tuple[Tensor, Tensor]:
        a = torch.stack(
            [torch.stack([acc[where[(kind, si, cond, r)]] for r in range(draws)]).mean(0) for si in range(S)]
        )
        c = torch.stack(
            [torch.stack([cls[where[(kind, si, cond, r)]] for r in range(draws)]).mean(0) for si in range(S)]
        )
        return a, c

    full_acc, full_cls = get("full", conds[0])
    accuracy: dict[str, dict[Condition, Tensor]] = {name: {} for name in per}
    class_accuracy: dict[str, dict[Condition, Tensor]] = {name: {} for name in per}
    random_accuracy: dict[Condition, Tensor] = {}
    random_class: dict[Condition, Tensor] = {}
    for cond in conds:
        random_accuracy[cond], random_class[cond] = get("random", cond, n_random)
        for k, name in enumerate(per):
            accuracy[name][cond], class_accuracy[name][cond] = get(f"score{k}", cond)
    stability = {name: seed_stability(v) for name, v in per.items() if v.shape[0] >= 2}
    correlations = score_correlations(per) if len(per) >= 2 else None
    return Evaluation(
        seeds=seeds,
        conditions=conds,
        margin=float(margin),
        n_random=n_random,
        n_classes=n_classes,
        full_accuracy=full_acc,
        accuracy=accuracy,
        random_accuracy=random_accuracy,
        class_accuracy=class_accuracy,
        random_class_accuracy=random_class,
        full_class_accuracy=full_cls,
        stability=stability,
        correlations=correlations,
    )

"""The counterfactual evaluation: batched ensemble against the plain loop, subsets, planted answers, the table."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_swim.evaluate import (
    Condition,
    Evaluation,
    TrainConfig,
    counterfactuals,
    evaluate_scores,
    index_stream,
    mlp_factory,
    score_correlations,
    seed_stability,
    select_top,
    spearman,
    train_model,
    train_models,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n_per_class: int, seed: int, *, spread: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian classes in 2-D around the corners of a triangle (overlapping a little)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 1.5], [-1.3, -0.75], [1.3, -0.75]])
    y = torch.arange(3).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), 2, generator=g)
    return x, y


@pytest.fixture(scope="module")
def problem():
    xtr, ytr = blobs(60, 0)
    xte, yte = blobs(300, 1)
    return xtr, ytr, xte, yte


class TestEnsemble:
    def test_batched_ensemble_equals_the_plain_loop(self):
        x, y = blobs(40, 2)
        x = x.double()
        make = mlp_factory([2, 8, 3], dtype=torch.float64)
        config = TrainConfig(epochs=4, batch_size=16, lr=1e-2, weight_decay=1e-3, max_models=2)  # two chunks
        subsets = [torch.arange(120), torch.arange(30, 100), torch.tensor([0, 50, 90])]  # one smaller than a batch
        run = train_models(make, x, y, seeds=[0, 1, 5], subsets=subsets, config=config)
        assert run.steps == 4 * math.ceil(120 / 16)
        for e, (seed, sub) in enumerate(zip([0, 1, 5], subsets, strict=True)):
            ref = train_model(make, x, y, seed=seed, subset=sub, config=config)
            for (name, a), b in zip(ref.named_parameters(), run.models[e].parameters(), strict=True):
                torch.testing.assert_close(b, a, rtol=0, atol=1e-12, msg=f"run {e}, {name}")

    def test_float32_default_mlp_and_checkpoints(self):
        x, y = blobs(20, 3)
        config = TrainConfig(epochs=2, batch_size=8, lr=1e-2)
        run = train_models([2, 6, 3], x, y, seeds=[0, 1], config=config, checkpoint_steps=[3, run_steps(60, config)])
        ref = train_model([2, 6, 3], x, y, seed=1, config=config)
        for a, b in zip(ref.parameters(), run.models[1].parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        last = run.checkpoints[run.steps][1]
        for a, b in zip(last.parameters(), run.models[1].parameters(), strict=True):
            assert torch.equal(a, b)
        assert not all(
            torch.equal(a, b)
            for a, b in zip(run.checkpoints[3][0].parameters(), run.models[0].parameters(), strict=True)
        )

    def test_same_initialisation_for_every_subset_of_a_seed(self):
        x, y = blobs(20, 4)
        config = TrainConfig(epochs=1, batch_size=8, lr=1e-12)  # Adam moves each weight by about lr: still the init
        subsets = [torch.arange(60), torch.arange(10), torch.arange(60)]
        run = train_models([2, 5, 3], x, y, seeds=[7, 7, 8], subsets=subsets, config=config)
        a, b, c = (dict(m.named_parameters()) for m in run.models)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-9)
            assert not torch.allclose(a[k], c[k])

    def test_the_global_rng_is_left_alone(self, problem):
        xtr, ytr, xte, yte = problem
        state = torch.random.get_rng_state()

        def global_factory(generator: torch.Generator) -> nn.Module:  # a factory drawing from the global RNG
            return nn.Linear(2, 3)

        with pytest.raises(ValueError, match="must draw"):
            train_models(global_factory, xtr, ytr, seeds=[0])
        train_models([2, 4, 3], xtr, ytr, seeds=[0, 1], config=TrainConfig(epochs=1))
        scores = {"s": torch.arange(len(xtr), dtype=torch.float64)}
        evaluate_scores(
            scores,
            xtr,
            ytr,
            xte,
            yte,
            model=[2, 4, 3],
            seeds=[0],
            conditions=[Condition("remove", 0.5)],
            config=TrainConfig(epochs=1),
        )
        assert torch.equal(state, torch.random.get_rng_state())

    def test_index_stream_runs_through_permutations(self):
        subset = torch.tensor([4, 8, 15, 16, 23, 42, 99])
        s = index_stream(subset, 5, 4, torch.Generator().manual_seed(0)).ravel()
        assert s.shape == (20,)
        for start in range(0, 14, 7):  # each epoch is a permutation of the subset
            assert sorted(s[start : start + 7].tolist()) == subset.tolist()
        again = index_stream(subset, 5, 4, torch.Generator().manual_seed(0)).ravel()
        assert torch.equal(s, again)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"model": lambda g: constant_linear()}, "same weights"),
            ({"model": [2]}, "at least two"),
            ({"y": torch.zeros(60)}, "integer class labels"),
            ({"subsets": [torch.tensor([], dtype=torch.long)]}, "at least one training index"),
            ({"subsets": [torch.tensor([0, 60])]}, r"in \[0, 60\)"),
            ({"checkpoint_steps": [0]}, "checkpoint_steps"),
        ],
    )
    def test_bad_arguments(self, kwargs, match):
        x, y = blobs(20, 0)
        args = {"model": [2, 4, 3], "y": y, "seeds": [0], "config": TrainConfig(epochs=1)} | kwargs
        with pytest.raises((ValueError, TypeError), match=match):
            train_models(args.pop("model"), x, args.pop("y"), **args)

    def test_dropout_is_refused(self):
        def factory(g: torch.Generator) -> nn.Module:
            net = mlp_factory([2, 4, 3])(g)
            return nn.Sequential(net, nn.Dropout(0.5))

        x, y = blobs(10, 0)
        with pytest.raises(ValueError, match="dropout"):
            train_models(factory, x, y, seeds=[0])


def run_steps(n: int, config: TrainConfig) -> int:
    return config.steps(n)


def constant_linear() -> nn.Module:
    """A model whose weights do not depend on the generator (a factory that ignores it)."""
    net = nn.Linear(2, 3, device="meta").to_empty(device="cpu")
    with torch.no_grad():
        net.weight.fill_(0.1)
        net.bias.zero_()
    return net


class TestSubsets:
    def test_top_points_and_random_ties(self):
        scores = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2])
        assert select_top(scores, 0.5).tolist() == [0, 2, 4]
        flat = torch.zeros(200)
        picks = {tuple(select_top(flat, 0.1, generator=torch.Generator().manual_seed(s)).tolist()) for s in range(5)}
        assert len(picks) == 5  # ties broken at random, by the generator
        assert max(max(p) for p in picks) > 100  # not the first indices

    def test_stratified_takes_the_share_of_every_class(self):
        labels = torch.tensor([0] * 10 + [1] * 30)
        scores = torch.cat([torch.arange(10.0) + 100, torch.arange(30.0)])  # class 0 scores all higher
        assert set(select_top(scores, 0.25).tolist()) == set(range(10))  # global: only class 0
        strat = select_top(scores, 0.2, labels=labels)
        assert (labels[strat] == 0).sum() == 2 and (labels[strat] == 1).sum() == 6
        assert set(strat.tolist()) == {8, 9, 34, 35, 36, 37, 38, 39}

    def test_conditions(self):
        conds = counterfactuals((0.1,), (0.3,))
        assert [str(c) for c in conds] == [
            "remove top 10%",
            "keep top 30%",
            "remove top 10% per class",
            "keep top 30% per class",
        ]
        with pytest.raises(ValueError, match="fraction"):
            Condition("remove", 1.0)
        with pytest.raises(ValueError, match="mode"):
            Condition("drop", 0.1)


class TestPlanted:
    def test_a_score_marking_one_class_hurts_that_class_when_removed(self, problem):
        xtr, ytr, xte, yte = problem
        planted = (ytr == 0).double()  # class 0 is a third of the points: removing the top third removes it
        ev = evaluate_scores(
            {"class 0": planted},
            xtr,
            ytr,
            xte,
            yte,
            model=[2, 16, 3],
            seeds=[0, 1, 2],
            conditions=[Condition("remove", 1 / 3), Condition("remove", 1 / 3, stratified=True)],
            config=TrainConfig(epochs=30, batch_size=32, lr=1e-2),
        )
        glob, strat = ev.conditions
        assert bool((ev.full_class_accuracy[:, 0] > 0.8).all())
        assert bool((ev.class_accuracy["class 0"][glob][:, 0] < 0.05).all())  # the class is gone
        assert bool((ev.class_delta("class 0", glob)[:, 0] < -0.7).all())
        assert ev.wins("class 0", glob) == 3
        # per class, the planted score has only ties: it removes a random third of every class, like random
        assert float(ev.class_delta("class 0", strat).abs().max()) < 0.1
        assert ev.wins("class 0", strat) == 0

    def test_a_random_score_does_not_differ_from_random_subsets(self, problem):
        xtr, ytr, xte, yte = problem
        seeds = list(range(8))
        noise = torch.rand(len(seeds), len(xtr), generator=torch.Generator().manual_seed(123), dtype=torch.float64)
        ev = evaluate_scores(
            {"noise": noise},
            xtr,
            ytr,
            xte,
            yte,
            model=[2, 16, 3],
            seeds=seeds,
            conditions=[Condition("remove", 0.3), Condition("keep", 0.3)],
            config=TrainConfig(epochs=20, batch_size=32, lr=1e-2),
        )
        for cond in ev.conditions:
            d = ev.delta("noise", cond)
            assert abs(float(d.mean())) <= 3 * float(d.std()) / math.sqrt(len(seeds)) + 0.005, (str(cond), d)
            assert 0 < int((d > 0).sum()) < len(seeds)  # not one-sided
        rho, overlap = ev.stability["noise"]
        assert abs(rho) < 0.05 and abs(overlap - 0.1) < 0.06


class TestResult:
    def make(self) -> Evaluation:
        rem, keep = Condition("remove", 0.1), Condition("keep", 0.3)
        acc = {"a": {rem: torch.tensor([0.90, 0.95, 0.97]), keep: torch.tensor([0.90, 0.93, 0.80])}}
        rnd = {rem: torch.tensor([0.95, 0.96, 0.97]), keep: torch.tensor([0.85, 0.90, 0.81])}
        cls = {"a": {c: torch.zeros(3, 2) for c in (rem, keep)}}
        return Evaluation(
            seeds=[0, 1, 2],
            conditions=[rem, keep],
            margin=0.02,
            n_random=1,
            n_classes=2,
            full_accuracy=torch.tensor([0.97, 0.98, 0.99]),
            accuracy=acc,
            random_accuracy=rnd,
            class_accuracy=cls,
            random_class_accuracy={c: torch.zeros(3, 2) for c in (rem, keep)},
            full_class_accuracy=torch.zeros(3, 2),
        )

    def test_deltas_and_wins_by_direction(self):
        ev = self.make()
        rem, keep = ev.conditions
        torch.testing.assert_close(ev.delta("a", rem), torch.tensor([-0.05, -0.01, 0.0]))
        assert ev.wins("a", rem) == 1  # only -5 points beats by 2
        assert ev.wins("a", keep) == 2  # +5 and +3 points, not -1
        rows = ev.rows()
        assert rows[0]["delta_per_seed"] == [-5.0, -1.0, 0.0] and rows[1]["wins"] == 2

    def test_table(self):
        text = str(self.make())
        assert "remove top 10%" in text and "keep top 30%" in text and "(random subset)" in text
        assert "-5.00 -1.00 +0.00" in text and "1/3" in text and "chance 50.0" in text

    def test_score_shapes_are_checked(self, problem):
        xtr, ytr, xte, yte = problem
        with pytest.raises(ValueError, match="'short'.*one value per training point"):
            evaluate_scores({"short": torch.zeros(5)}, xtr, ytr, xte, yte, model=[2, 3, 3], seeds=[0])
        with pytest.raises(ValueError, match="1 or 2 rows"):
            evaluate_scores({"s": torch.zeros(3, len(xtr))}, xtr, ytr, xte, yte, model=[2, 3, 3], seeds=[0, 1])


class TestCorrelations:
    def test_spearman_matches_scipy_with_ties(self):
        from scipy.stats import spearmanr

        g = torch.Generator().manual_seed(0)
        a = torch.randint(0, 5, (50,), generator=g).double()
        b = a + torch.randn(50, generator=g, dtype=torch.float64)
        assert spearman(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
        assert math.isnan(spearman(torch.ones(5), torch.arange(5.0)))

    def test_seed_stability(self):
        g = torch.Generator().manual_seed(0)
        same = torch.rand(1, 1000, generator=g, dtype=torch.float64).expand(3, -1)
        assert seed_stability(same) == (pytest.approx(1.0), pytest.approx(1.0))
        rho, overlap = seed_stability(torch.rand(4, 1000, generator=g, dtype=torch.float64))
        assert abs(rho) < 0.1 and abs(overlap - 0.1) < 0.05

    def test_score_correlations(self):
        a = torch.arange(10.0)
        names, rho = score_correlations({"a": a, "b": -a, "c": torch.stack([a, a])})
        assert names == ["a", "b", "c"]
        torch.testing.assert_close(rho, torch.tensor([[1.0, -1, 1], [-1, 1, -1], [1, -1, 1]], dtype=torch.float64))


def test_the_evaluate_command_prints_the_table(capsys, tmp_path):
    import json

    from lightning_swim.cli import main

    threads = torch.get_num_threads()
    try:
        argv = ["evaluate", "--seeds", "2", "--epochs", "2", "--remove", "0.1", "--keep", "0.3", "--global-only"]
        argv += ["--refine", "function"]
        main([*argv, "--scores", "pair_loo", "el2n", "random", "--json", str(tmp_path / "rows.json")])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "Running: digits" in out and "seeds [0, 1]" in out
    for text in ("remove top 10%", "keep top 30%", "(random subset)", "pair_loo", "el2n", "Seed stability"):
        assert text in out
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert len(rows) == 2 * 3 and {r["score"] for r in rows} == {"pair_loo", "el2n", "random"}

"""map_layer: exact against brute force, the two backends agree, planted pairs come back, bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_swim import ACTIVATIONS, PairMap, map_layer, swim_neurons
from lightning_swim._cpu_kernel import CpuKernelUnavailableError
from lightning_swim._keops import KeOpsUnavailableError
from lightning_swim.activations import get_activation

F64 = torch.float64


def to_frame(weight, bias, x):
    """The layer in the normalised frame of map_layer, computed independently: centred, unit RMS norm."""
    mu = x.mean(0)
    sigma = ((x - mu) ** 2).sum(1).mean().sqrt()
    return weight * sigma, bias + weight @ mu, (x - mu) / sigma


def brute_force_costs(weight, bias, x, name):
    """Every ordered pair's parameter-space cost in the normalised frame, from explicitly built SWIM
    neurons: ``[M, N, N]`` (inf on excluded pairs)."""
    act = get_activation(name)
    weight, bias, x = to_frame(weight, bias, x)
    N = x.shape[0]
    ii, jj = torch.meshgrid(torch.arange(N), torch.arange(N), indexing="ij")
    ii, jj = ii.reshape(-1), jj.reshape(-1)
    ok = (x[ii] != x[jj]).any(1)
    w, b = swim_neurons(x[ii[ok]], x[jj[ok]], act)  # [P, d], [P]
    if act.homogeneous:
        nw, nb = w / w.norm(dim=1, keepdim=True), b / w.norm(dim=1)
        tw, tb = weight / weight.norm(dim=1, keepdim=True), bias / weight.norm(dim=1)
    else:
        nw, nb, tw, tb = w, b, weight, bias
    cost = ((nw[None] - tw[:, None]) ** 2).sum(-1) + (nb[None] - tb[:, None]) ** 2  # [M, P]
    full = torch.full((weight.shape[0], N * N), float("inf"), dtype=x.dtype)
    full[:, ok] = cost
    return full.reshape(-1, N, N)


def check_flags(pm, w, b, x, name):
    """Assert that exactly the neurons that are zero on every probe point are flagged dead; the mapped ones."""
    dead = (get_activation(name)(x @ w.T + b) == 0).all(0)
    assert pm.reasons() == ["dead" if d else "mapped" for d in dead.tolist()]
    return ~dead


def random_layer(n, d, m, seed, dtype=F64, duplicates=0, offset=0.1):
    """``n`` Gaussian points (plus ``duplicates`` repeated ones) in ``d`` dimensions and ``m`` neurons whose
    hyperplanes pass near a random point (``offset`` times a standard normal away)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    if duplicates:
        x = torch.cat([x, x[:duplicates]])
    w = torch.randn(m, d, generator=g, dtype=dtype)
    b = -(w * x[torch.randint(0, n, (m,), generator=g)]).sum(1) + offset * torch.randn(m, generator=g, dtype=dtype)
    return w, b, x


class TestExactSearch:
    @pytest.mark.parametrize("name", sorted(ACTIVATIONS))
    @pytest.mark.parametrize("backend", ["torch", pytest.param("keops", marks=pytest.mark.keops)])
    def test_matches_brute_force(self, name, backend):
        w, b, x = random_layer(25, 4, 6, seed=1, duplicates=3)
        pm = map_layer(w, b, x, activation=name, refine="none", backend=backend)
        costs = brute_force_costs(w, b, x, name)
        flat = costs.reshape(len(w), -1).argmin(1)  # first minimum: lexicographic tie-break
        ok = check_flags(pm, w, b, x, name)
        assert pm.idx_from[ok].tolist() == (flat // len(x))[ok].tolist()
        assert pm.idx_to[ok].tolist() == (flat % len(x))[ok].tolist()
        torch.testing.assert_close(pm.param_cost[ok], costs.reshape(len(w), -1).amin(1)[ok], rtol=1e-9, atol=1e-9)

    def test_top_k_pairs_are_the_k_cheapest(self):
        from lightning_swim import _search

        w, b, x = to_frame(*random_layer(20, 3, 4, seed=2, duplicates=2))  # stage 1 runs in the frame
        act = get_activation("relu")
        fam = _search.Family.of(act)
        v, gamma, c0 = _search.neuron_terms(w, b, x, act)
        fmin, _ = _search.rowmin(x, v, gamma, fam, backend="torch", max_memory=2**20)
        i, j, c = _search.topk_pairs(x, v, gamma, c0, fam, fmin, 15)
        costs = brute_force_costs(w, b, x, "relu").reshape(len(w), -1)
        order = torch.sort(costs, dim=1, stable=True)
        torch.testing.assert_close(c, order.values[:, :15])
        assert torch.equal(i * len(x) + j, order.indices[:, :15])

    @pytest.mark.parametrize("refine", ["none", "function", "exact"])
    def test_a_rescaled_relu_neuron_keeps_its_pair_and_scales_its_scale(self, refine):
        w, b, x = random_layer(30, 5, 8, seed=3)
        c = torch.linspace(0.1, 7.0, 8, dtype=F64)
        base = map_layer(w, b, x, refine=refine, top_k=8, backend="torch")
        scaled = map_layer(c[:, None] * w, c * b, x, refine=refine, top_k=8, backend="torch")
        assert torch.equal(base.idx_from, scaled.idx_from) and torch.equal(base.idx_to, scaled.idx_to)
        torch.testing.assert_close(scaled.scale, c * base.scale, equal_nan=True)
        torch.testing.assert_close(scaled.param_cost, base.param_cost, equal_nan=True)
        torch.testing.assert_close(scaled.func_error, base.func_error, equal_nan=True)

    def test_float32_near_duplicates_far_from_the_origin(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(200, 5, generator=g) + 100
        x = torch.cat([x, x[:20] + 1e-4 * torch.randn(20, 5, generator=g)])  # distinct, but nearly equal
        w = torch.randn(8, 5, generator=g)
        b = -(w * x[:8]).sum(1)
        single = map_layer(w, b, x, refine="none", backend="torch")
        double = map_layer(w.double(), b.double(), x.double(), refine="none", backend="torch")
        assert bool(torch.isfinite(single.param_cost).all())
        # rounding may pick another pair of nearly the same cost, never a much worse one
        assert bool((single.param_cost.double() <= double.param_cost + 0.05).all())

    @settings(max_examples=15, deadline=None)
    @given(
        st.integers(2, 30),
        st.integers(1, 6),
        st.integers(1, 5),
        st.integers(0, 10_000),
        st.sampled_from(["relu", "tanh"]),
    )
    def test_brute_force_property(self, n, d, m, seed, name):
        w, b, x = random_layer(n, d, m, seed)
        pm = map_layer(w, b, x, activation=name, refine="none", backend="torch")
        costs = brute_force_costs(w, b, x, name).reshape(m, -1)
        ok = check_flags(pm, w, b, x, name)
        torch.testing.assert_close(pm.param_cost[ok], costs.amin(1)[ok], rtol=1e-8, atol=1e-8)


@pytest.mark.keops
class TestBackendsAgree:
    @pytest.mark.parametrize("dtype", [torch.float32, F64])
    @pytest.mark.parametrize("name", ["relu", "tanh", "sigmoid"])
    def test_same_pairs(self, dtype, name):
        w, b, x = random_layer(300, 20, 70, seed=4, dtype=dtype, duplicates=5)
        kw = dict(activation=name, refine="none")
        a, c = map_layer(w, b, x, backend="keops", **kw), map_layer(w, b, x, backend="torch", **kw)
        assert torch.equal(a.idx_from, c.idx_from) and torch.equal(a.idx_to, c.idx_to)
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(a.param_cost, c.param_cost, rtol=tol, atol=tol)

    def test_same_top_k_and_refinement(self):
        w, b, x = random_layer(200, 16, 130, seed=5)
        a, c = map_layer(w, b, x, backend="keops", top_k=20), map_layer(w, b, x, backend="torch", top_k=20)
        for field in ("idx_from", "idx_to"):
            assert torch.equal(getattr(a, field), getattr(c, field))
        torch.testing.assert_close(a.func_error, c.func_error)


class TestRefinement:
    def test_function_refinement_never_worse(self):
        w, b, x = random_layer(120, 6, 20, seed=6)
        coarse = map_layer(w, b, x, refine="none", backend="torch")
        fine = map_layer(w, b, x, refine="function", top_k=32, backend="torch")
        deeper = map_layer(w, b, x, refine="function", top_k=32, local_search=2, backend="torch")
        assert bool((fine.func_error <= coarse.func_error + 1e-12).all())
        assert bool((deeper.func_error <= fine.func_error + 1e-12).all())
        assert float(deeper.func_error.mean()) < float(coarse.func_error.mean())

    @pytest.mark.parametrize("name", ["relu", "tanh"])
    def test_func_error_is_the_optimally_scaled_error(self, name):
        act = get_activation(name)
        w, b, x = random_layer(80, 5, 10, seed=7)
        pm = map_layer(w, b, x, activation=name, top_k=8, backend="torch")
        a = act(x @ w.T + b)
        sw, sb = swim_neurons(x[pm.idx_from], x[pm.idx_to], act)
        h = act(x @ sw.T + sb)
        for m in range(len(w)):
            bound = 2 * float((h[:, m] @ a[:, m]).abs() / (h[:, m] @ h[:, m])) + 1  # brackets the optimum
            cs = torch.linspace(0, bound, 40001, dtype=F64)
            grid = ((cs[:, None] * h[None, :, m] - a[None, :, m]) ** 2).sum(1) / (a[:, m] ** 2).sum()
            assert float(pm.func_error[m]) <= float(grid.min()) + 1e-9
            assert float(pm.func_error[m]) >= float(grid.min()) - 1e-4
        rebuilt = act(pm.scale * h) if act.homogeneous else pm.scale * h
        direct = ((rebuilt - a) ** 2).sum(0) / (a**2).sum(0)
        torch.testing.assert_close(direct, pm.func_error)
        assert bool((pm.scale >= 0).all())  # tanh: the pair's orientation carries the sign

    def test_gram_and_gemm_paths_agree(self):
        w, b, x = random_layer(60, 4, 6, seed=8)
        kw = dict(refine="function", top_k=4, local_search=2, backend="torch")
        with_gram = map_layer(w, b, x, **kw)
        without = map_layer(w, b, x, **kw, max_memory=60 * 60 * 8 - 1)
        assert torch.equal(with_gram.idx_from, without.idx_from) and torch.equal(with_gram.idx_to, without.idx_to)
        torch.testing.assert_close(with_gram.func_error, without.func_error)

    @pytest.mark.parametrize("refine", ["exact", "function", "none"])
    def test_neuron_silent_on_the_probe_is_flagged_dead(self, refine):
        x = torch.rand(40, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
        w = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.5]], dtype=F64)
        pm = map_layer(w, torch.tensor([-10.0, 0.0], dtype=F64), x, refine=refine, backend="torch")
        assert pm.idx_from.tolist()[0] == -1 and pm.reasons() == ["dead", "mapped"]
        assert math.isnan(pm.func_error[0].item()) and pm.n_near.tolist()[0] == -1
        assert pm.soft_neuron.tolist() and set(pm.soft_neuron.tolist()) == {1}


class TestBadInput:
    def test_dead_and_non_finite_neurons_are_flagged_with_one_warning(self):
        w, b, x = random_layer(30, 3, 5, seed=9)
        b[0] = 100.0
        w[1] = 0.0
        w[3, 0] = float("nan")
        b[4] = float("inf")
        b[2] = 100.0  # positive on every probe point: alive
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pm = map_layer(w, b, x, backend="torch")
        msgs = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
        assert len(msgs) == 1 and "3 of 5 neurons" in msgs[0] and "1 zero weights, 2 non finite" in msgs[0]
        assert pm.reasons() == ["mapped", "zero_weights", "mapped", "non_finite", "non_finite"]
        assert pm.idx_from.tolist()[1] == -1 and pm.idx_to.tolist()[3] == -1 and pm.idx_from.tolist()[4] == -1
        assert pm.valid.tolist() == [True, False, True, False, False]
        assert math.isnan(float(pm.param_cost[1])) and bool(torch.isfinite(pm.param_cost[[0, 2]]).all())

    def test_all_neurons_dead(self):
        x = torch.randn(10, 2, dtype=F64)
        with pytest.warns(RuntimeWarning, match="2 of 2"):
            pm = map_layer(torch.zeros(2, 2, dtype=F64), torch.zeros(2, dtype=F64), x)
        assert not bool(pm.valid.any())

    @pytest.mark.parametrize(
        ("w", "b", "x", "match"),
        [
            (torch.randn(3, 2), torch.randn(3), torch.ones(5, 2), "distinct points"),
            (torch.randn(3, 2), torch.randn(3), torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), "non-finite"),
            (torch.randn(3, 4), torch.randn(3), torch.randn(5, 2), r"`\[M, 2\]`"),
            (torch.randn(3, 2), torch.randn(2), torch.randn(5, 2), r"shape `\[3\]`"),
            (torch.randn(3), torch.randn(3), torch.randn(5, 2), "2D tensor"),
            (torch.randn(3, 2), torch.randn(3), torch.randint(0, 4, (5, 2)), "floating dtype"),
            (torch.randint(0, 4, (3, 2)), torch.randn(3), torch.randn(5, 2), "floating dtype"),
        ],
    )
    def test_errors_name_the_problem(self, w, b, x, match):
        with pytest.raises((ValueError, TypeError), match=match):
            map_layer(w, b, x)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"refine": "greedy"}, "Invalid `refine`"),
            ({"backend": "cuda"}, "Invalid `backend`"),
            ({"top_k": 0}, "`top_k`"),
            ({"local_search": -1}, "`local_search`"),
            ({"activation": "not_an_activation"}, "Invalid activation"),
            ({"temperature": 0.0}, "`temperature`"),
            ({"atol": -1.0}, "`atol`"),
            ({"rtol": float("nan")}, "`rtol`"),
            ({"max_soft": 0}, "`max_soft`"),
        ],
    )
    def test_bad_options(self, kwargs, match):
        w, b, x = random_layer(10, 2, 2, seed=0)
        with pytest.raises(ValueError, match=match):
            map_layer(w, b, x, **kwargs)

    def test_no_pair_joins_coincident_points(self):
        w, b, x = random_layer(10, 2, 30, seed=10, duplicates=10)  # every point twice
        pm = map_layer(w, b, x, backend="torch")
        ok = pm.valid
        assert bool(ok.sum() > 20) and bool(((x[pm.idx_from[ok]] - x[pm.idx_to[ok]]).norm(dim=1) > 0).all())
        soft_ok = (x[pm.soft_from] - x[pm.soft_to]).norm(dim=1) > 0
        assert bool(soft_ok.all())


class TestKeOpsFallback:
    def test_auto_falls_back_with_one_warning_and_keops_raises(self, monkeypatch):
        from lightning_swim import _search

        def broken(*args, **kwargs):
            raise KeOpsUnavailableError("no compiler here")

        def no_kernel():
            raise CpuKernelUnavailableError("no compiler here")

        monkeypatch.setattr(_search, "rowmin_keops", broken)
        monkeypatch.setattr(_search, "cpu_kernel", no_kernel)  # on a CPU, "auto" tries the compiled kernel first
        monkeypatch.setitem(_search._warned, "keops", False)
        w, b, x = random_layer(30, 3, 4, seed=11)
        reference = map_layer(w, b, x, backend="torch", refine="function")
        with pytest.warns(RuntimeWarning, match="plain-PyTorch backend"):
            auto = map_layer(w, b, x, backend="auto", refine="function")
        assert torch.equal(auto.idx_from, reference.idx_from)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once only
            map_layer(w, b, x, backend="auto", refine="function")
        with pytest.raises(KeOpsUnavailableError, match="no compiler"):
            map_layer(w, b, x, backend="keops", refine="function")

    def test_the_monitor_shows_the_fallback_and_tries_once(self, tmp_path, monkeypatch):
        """Issue 11.10: the warning reaches the user from inside a fit, and KeOps is not retried at every map."""
        from helpers import MLPModule, trainer

        from lightning_swim import PairImportanceMonitor, _search

        calls = []

        def broken(*args, **kwargs):
            calls.append(1)
            raise RuntimeError("g++ not found")

        def no_kernel():
            raise CpuKernelUnavailableError("no compiler here")

        monkeypatch.setattr(_search, "rowmin_keops", broken)
        monkeypatch.setattr(_search, "cpu_kernel", no_kernel)
        monkeypatch.setitem(_search._warned, "keops", False)
        monkeypatch.setattr(_search, "_keops_failure", {})
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(96, 5, generator=g), torch.randint(0, 3, (96,), generator=g)
        monitor = PairImportanceMonitor(every_n_epochs=1, probe_size=48, top_k=4, fidelity=False, log_images=False)
        with pytest.warns(RuntimeWarning, match="g\\+\\+ not found") as record:
            trainer(tmp_path, max_epochs=3, callbacks=[monitor]).fit(MLPModule([5, 8, 8, 3], x, y))
        assert len(monitor._steps) >= 3
        assert sum("plain-PyTorch" in str(w.message) for w in record) == 1
        assert len(calls) == 1  # the first map found KeOps failing; later maps go straight to PyTorch

    def test_compile_failure_is_wrapped(self, monkeypatch):
        from lightning_swim import _search

        def failing(*args, **kwargs):
            raise ModuleNotFoundError("No module named 'pykeops_cpp_0123'")

        monkeypatch.setattr(_search, "rowmin_keops", failing)
        w, b, x = random_layer(30, 3, 4, seed=11)
        with pytest.raises(KeOpsUnavailableError, match="backend='torch'"):
            map_layer(w, b, x, backend="keops", refine="none")


def test_pairmap_tensors_and_to():
    pm = PairMap(torch.tensor([0, -1]), torch.tensor([1, -1]), torch.ones(2), torch.zeros(2), torch.zeros(2), "tanh")
    assert len(pm) == 2 and pm.valid.tolist() == [True, False]
    moved = pm.to("cpu")
    assert moved.activation == "tanh"
    assert {"idx_from", "idx_to", "scale", "param_cost", "func_error", "status", "soft_weight"} <= set(moved.tensors())
    assert pm.reasons() == ["mapped", "zero_weights"]
    assert pm.soft_neuron.tolist() == [0] and pm.soft_weight.tolist() == [1.0]  # a hand-made map: its own pairs

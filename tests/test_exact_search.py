"""The exact function-space search: brute force over all pairs, ambiguity, soft attribution, invariances."""

from __future__ import annotations

import itertools
import math
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_pairmap import random_layer

from lightning_swim import ACTIVATIONS, map_layer, pair_importance, swim_neurons, turnover
from lightning_swim.activations import get_activation
from lightning_swim.pairmap import pair_errors, random_map

F64 = torch.float64
# the output factor may be negative (no pair swap negates the neuron); relu, leaky_relu, tanh: c >= 0
SIGN_FREE = {"sigmoid", "gelu", "gelu_tanh", "silu", "softplus"}


def brute_force(weight, bias, x, name):
    """Every ordered pair's function-space error from explicitly built SWIM neurons in the raw
    coordinates: ``[M, N, N]`` float64, inf on pairs of coincident points."""
    act = get_activation(name)
    N = x.shape[0]
    ii, jj = torch.meshgrid(torch.arange(N), torch.arange(N), indexing="ij")
    ii, jj = ii.reshape(-1), jj.reshape(-1)
    ok = (x[ii] != x[jj]).any(1)
    w, b = swim_neurons(x[ii[ok]], x[jj[ok]], act)
    h = act(x @ w.T + b)  # [N, P] every pair's SWIM neuron on every point
    a = act(x @ weight.T + bias)  # [N, M]
    ha, hh, aa = h.T @ a, (h * h).sum(0), (a * a).sum(0)  # [P, M], [P], [M]
    c = ha / hh[:, None]
    if name not in SIGN_FREE:
        c = c.clamp_min(0)
    err = (((c[None] * h[:, :, None] - a[:, None, :]) ** 2).sum(0) / aa).T  # [M, P]
    full = torch.full((weight.shape[0], N * N), float("inf"), dtype=x.dtype)
    full[:, ok] = err
    return full.reshape(-1, N, N)


def layer(n, d, m, seed, duplicates=0, dtype=F64):
    return random_layer(n, d, m, seed, dtype=dtype, duplicates=duplicates, offset=0.3)


def quiet_map(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # dead neurons are expected in random layers
        return map_layer(*args, **kwargs)


class TestAgainstBruteForce:
    # the one fixture sets the same switch for every example
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        n=st.integers(3, 22),
        d=st.integers(1, 5),
        m=st.integers(1, 4),
        duplicates=st.integers(0, 2),
        seed=st.integers(0, 10_000),
        name=st.sampled_from(sorted(ACTIVATIONS)),
    )
    @pytest.mark.parametrize("screen", [False, True], ids=["dense", "bf16-screen"])
    def test_best_pair_counts_and_soft_weights(self, n, d, m, duplicates, seed, name, screen, monkeypatch):
        from lightning_swim import _fsearch

        monkeypatch.setattr(_fsearch, "SCREEN", screen)
        w, b, x = layer(n, d, m, seed, duplicates)
        atol, temperature = 0.02, 0.3
        pm = quiet_map(w, b, x, activation=name, refine="exact", atol=atol, temperature=temperature, max_soft=10**6)
        err = brute_force(w, b, x, name).reshape(m, -1)
        dead = (get_activation(name)(x @ w.T + b) == 0).all(0)
        assert pm.reasons() == ["dead" if dd else "mapped" for dd in dead.tolist()]
        for k in torch.nonzero(~dead).ravel().tolist():
            best = float(err[k].min())
            i, j = int(pm.idx_from[k]), int(pm.idx_to[k])
            assert float(err[k, i * len(x) + j]) <= best + 1e-10  # the optimum over all pairs
            ties = torch.nonzero(err[k] <= best + 1e-10).ravel()
            if len(ties) == 1 or float(err[k].sort().values[1]) > best + 1e-9:  # a clear winner: that one
                assert i * len(x) + j == int(ties[0])
            assert math.isclose(float(pm.func_error[k]), best, abs_tol=1e-10)
            near = torch.nonzero(err[k] <= best + atol).ravel()
            if not bool(((err[k] - best - atol).abs() < 1e-9).any()):  # no pair on the edge of the tolerance
                assert int(pm.n_near[k]) == len(near)
                assert int(pm.n_near_points[k]) == len(set((near // len(x)).tolist()) | set((near % len(x)).tolist()))
            tau = temperature * best + 16 * torch.finfo(F64).eps
            gibbs = torch.exp(-(err[k] - best) / tau)
            inside = gibbs >= math.exp(-5) * (1 + 1e-9)
            mine = pm.soft_neuron == k
            expected = {int(p): float(gibbs[p] / gibbs[inside].sum()) for p in torch.nonzero(inside).ravel()}
            got = {
                int(i) * len(x) + int(j): float(v)
                for i, j, v in zip(pm.soft_from[mine], pm.soft_to[mine], pm.soft_weight[mine], strict=True)
            }
            assert set(expected) <= set(got)  # pairs exactly at the cut may come in by rounding
            for p, v in expected.items():
                assert math.isclose(got[p], v, rel_tol=1e-6, abs_tol=1e-9)

    def test_ties_go_to_the_smallest_pair(self):
        x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [3.0, 1.0], [1.0, 0.0]], dtype=F64)  # 2 == 0, 4 == 1
        w, b = swim_neurons(x[[2]], x[[4]])  # planted on the duplicates
        pm = map_layer(w, b, x, refine="exact")
        assert (int(pm.idx_from[0]), int(pm.idx_to[0])) == (0, 1)
        assert int(pm.n_near[0]) >= 4  # (0, 1), (0, 4), (2, 1), (2, 4) are exact ties
        torch.testing.assert_close(pm.soft_weight[pm.soft_neuron == 0][:4], torch.full((4,), 0.25, dtype=F64))

    @pytest.mark.parametrize("name", sorted(ACTIVATIONS))
    def test_planted_swim_neurons_come_back_exactly(self, name):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(60, 4, generator=g, dtype=F64)
        i, j = torch.randint(0, 60, (12,), generator=g), torch.randint(0, 60, (12,), generator=g)
        keep = i != j
        i, j = i[keep], j[keep]
        w, b = swim_neurons(x[i], x[j], name)
        scale = torch.linspace(0.5, 4.0, len(i), dtype=F64)
        if get_activation(name).homogeneous:
            w, b = scale[:, None] * w, scale * b
        pm = map_layer(w, b, x, activation=name, refine="exact")
        assert pm.idx_from.tolist() == i.tolist() and pm.idx_to.tolist() == j.tolist()
        assert float(pm.func_error.max()) < 1e-12
        expected = scale if get_activation(name).homogeneous else torch.ones_like(scale)
        torch.testing.assert_close(pm.scale, expected)

    @pytest.mark.parametrize("name", ["relu", "tanh", "sigmoid"])
    def test_exact_is_never_worse_than_the_candidates(self, name):
        w, b, x = layer(150, 30, 24, seed=5)
        exact = quiet_map(w, b, x, activation=name, refine="exact")
        local = quiet_map(w, b, x, activation=name, refine="function", top_k=32, local_search=2)
        top = quiet_map(w, b, x, activation=name, refine="function", top_k=8)
        none = quiet_map(w, b, x, activation=name, refine="none")
        ok = exact.valid
        for other in (local, top, none):
            assert bool((exact.func_error[ok] <= other.func_error[ok] + 1e-12).all())
        assert float(exact.func_error[ok].mean()) < float(top.func_error[ok].mean())
        assert exact.refine == "exact" and local.refine == "function" and none.refine == "none"

    def test_the_bound_only_changes_the_speed(self):
        from lightning_swim import _fsearch
        from lightning_swim.pairmap import _frame

        w, b, x = layer(70, 4, 6, seed=9)
        act = get_activation("relu")
        xf, wf, bf, _ = _frame(x, w, b, True)
        a = act(xf @ wf.T + bf)
        a = a[:, (a != 0).any(0)]
        thr = lambda best: best + 0.05  # noqa: E731
        inf = torch.full((a.shape[1],), math.inf, dtype=F64)
        loose, _ = _fsearch.exact_candidates(xf, act, a, thr, inf, max_memory=2**17)  # small blocks, no bound
        best = torch.full_like(inf, math.inf).scatter_reduce_(0, loose.m, loose.err, reduce="amin")
        key = lambda c: sorted(zip(c.m.tolist(), c.i.tolist(), c.j.tolist(), strict=True))  # noqa: E731
        for bound in (best, best + 0.3):  # any upper bound on the best errors
            tight, _ = _fsearch.exact_candidates(xf, act, a, thr, bound, max_memory=2**26)
            assert key(tight) == key(loose)
        assert len(loose.m) > a.shape[1]

    def test_capped_neurons_keep_their_cheapest_pairs_exactly(self):
        """A layer no pair explains well: most pairs fall in the window, the search keeps only the
        cheapest ``max_kept // 2`` per neuron, and those (the best pair, the soft set) stay exact."""
        from lightning_swim import _fsearch
        from lightning_swim.pairmap import _frame

        w, b, x = layer(60, 12, 5, seed=22)  # 12 dimensions, 60 points: poorly explained neurons
        act = get_activation("relu")
        xf, wf, bf, _ = _frame(x, w, b, True)
        a = act(xf @ wf.T + bf)
        keep = (a != 0).any(0)
        a = a[:, keep]
        thr = lambda best: best + 0.5  # noqa: E731  (a wide window: hundreds of pairs per neuron)
        inf = torch.full((a.shape[1],), math.inf, dtype=F64)
        full, ceiling_full = _fsearch.exact_candidates(xf, act, a, thr, inf, max_memory=2**20, max_kept=10**9)
        capped, ceiling = _fsearch.exact_candidates(xf, act, a, thr, inf, max_memory=2**20, max_kept=40)
        assert bool(torch.isinf(ceiling_full).all()) and bool(torch.isfinite(ceiling).any())
        err = brute_force(w[keep], b[keep], x, "relu").reshape(a.shape[1], -1)
        for m in range(a.shape[1]):
            mine = torch.sort(capped.err[capped.m == m]).values
            cheapest = torch.sort(err[m]).values[: min(20, len(mine))]
            torch.testing.assert_close(mine[: len(cheapest)], cheapest)  # the 20 cheapest, exactly
            assert int((full.m == m).sum()) >= int((capped.m == m).sum())


def _frame_layer(n, d, m, seed, dtype=F64):
    """A random layer in the search's frame: ``(x', relu, live activations)``."""
    from lightning_swim.pairmap import _frame

    w, b, x = layer(n, d, m, seed, dtype=dtype)
    act = get_activation("relu")
    xf, wf, bf, _ = _frame(x, w, b, True)
    a = act(xf @ wf.T + bf)
    return xf, act, a[:, (a != 0).any(0)]


def _errors(c):
    """``{(m, i, j): error}`` of a candidate set."""
    return dict(zip(zip(c.m.tolist(), c.i.tolist(), c.j.tolist(), strict=True), c.err.tolist(), strict=True))


class TestScreen:
    """The bfloat16 screen of the torch search: its error bound, and that it changes nothing."""

    @pytest.mark.parametrize("n", [2, 7, 64, 257, 1000, 4096])
    def test_the_screened_cosines_are_within_the_slack(self, n):
        from lightning_swim._fsearch import screen_slack

        g = torch.Generator().manual_seed(n)
        h = torch.cat(
            [
                torch.rand(300, n, generator=g),  # non-negative, like ReLU neurons: cosines near 1
                torch.randn(300, n, generator=g),
                torch.ones(1, n) + 1e-3 * torch.randn(1, n, generator=g),  # nearly parallel to a constant
                torch.rand(300, n, generator=g) ** 8,  # heavy tails
            ]
        ).double()
        a = torch.cat([h[:40].T, torch.rand(n, 40, generator=g).double(), torch.ones(n, 1, dtype=F64)], 1)
        hn, an = h / h.norm(dim=1, keepdim=True), a / a.norm(dim=0)
        exact = hn @ an
        screened = (hn.float().bfloat16() @ an.float().bfloat16()).double()
        err = float((screened - exact).abs().max())
        assert err <= screen_slack(n)
        assert err > 0.05 * screen_slack(n)  # the bound is not vacuous: bf16 really is that coarse

    @pytest.mark.parametrize("dtype", [F64, torch.float32])
    @pytest.mark.parametrize("wide", [False, True], ids=["window 0.05", "window 0.5"])
    def test_the_screen_changes_nothing(self, dtype, wide, monkeypatch):
        from lightning_swim import _fsearch

        xf, act, a = _frame_layer(120, 6, 12, seed=31, dtype=dtype)
        width = 0.5 if wide else 0.05
        thr = lambda best: best + width  # noqa: E731
        inf = torch.full((a.shape[1],), math.inf, dtype=dtype)
        got = {}
        for screen in (False, True):
            monkeypatch.setattr(_fsearch, "SCREEN", screen)
            got[screen] = _fsearch.exact_candidates(xf, act, a, thr, inf, max_memory=2**20, max_kept=10**9)[0]
        dense, screened = (_errors(got[k]) for k in (False, True))
        if dtype == F64:
            assert dense.keys() == screened.keys()
        else:  # float32: a pair on the edge of the window may fall either side by rounding
            best = torch.full((a.shape[1],), math.inf).scatter_reduce_(0, got[False].m, got[False].err, "amin")
            edge = dense.keys() ^ screened.keys()
            assert len(edge) < 1e-3 * len(dense)
            for key in edge:
                assert abs({**dense, **screened}[key] - float(thr(best)[key[0]])) < 1e-5
        for key in dense.keys() & screened.keys():
            assert abs(dense[key] - screened[key]) < (1e-12 if dtype == F64 else 1e-5)
        assert len(got[True].m) > 3 * a.shape[1]

    def test_the_default_screens_only_where_bf16_is_native(self, monkeypatch):
        from lightning_swim import _fsearch

        x = torch.zeros(3, 2)
        monkeypatch.setattr(_fsearch, "SCREEN", None)
        monkeypatch.setattr(_fsearch, "_native_bf16", lambda: False)
        assert not _fsearch.screens(x)
        monkeypatch.setattr(_fsearch, "_native_bf16", lambda: True)
        assert _fsearch.screens(x) and _fsearch.screens(x.double()) and not _fsearch.screens(x.half())


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_the_map_is_the_same_with_and_without_the_screen_and_the_trim(name, seed, monkeypatch):
    """The whole map (pairs, counts, soft attribution) in float64, with duplicate points (exact ties)
    and a wide soft window: the bf16 screen and the trim to ``max_soft`` change nothing."""
    from lightning_swim import _fsearch
    from lightning_swim import pairmap as pmod

    n = 40 + 23 * seed
    w, b, x = random_layer(n, 3 + seed, 7, seed, dtype=F64, duplicates=seed % 3, offset=0.3)
    maps, near = {}, pmod.threshold_fn
    for screen, trim in ((False, False), (False, True), (True, True)):
        monkeypatch.setattr(_fsearch, "SCREEN", screen)
        monkeypatch.setattr(pmod, "threshold_fn", near if trim else (lambda atol, rtol: None))
        for max_soft in (4, 64):
            maps[screen, trim, max_soft] = quiet_map(
                w, b, x, activation=name, refine="exact", max_soft=max_soft, temperature=0.5, atol=0.03
            )
    for max_soft in (4, 64):
        ref = maps[False, False, max_soft]
        for key in ((False, True, max_soft), (True, True, max_soft)):
            pm = maps[key]
            for f in ("idx_from", "idx_to", "n_near", "n_near_points", "soft_neuron", "soft_from", "soft_to"):
                assert torch.equal(getattr(pm, f), getattr(ref, f)), (key, f)
            torch.testing.assert_close(pm.soft_weight, ref.soft_weight, rtol=0, atol=1e-9)
            torch.testing.assert_close(pm.func_error, ref.func_error, rtol=0, atol=1e-12, equal_nan=True)


class TestUnitNeuronKernel:
    """The compiled unit neurons of a block (ReLU, leaky ReLU) against their torch twin."""

    @pytest.mark.parametrize("name", ["relu", "leaky_relu"])
    @pytest.mark.parametrize("dtype", [F64, torch.float32])
    def test_the_kernel_equals_the_torch_twin(self, name, dtype):
        from lightning_swim import _fsearch

        act = get_activation(name)
        if _fsearch._unit_kernel(act, torch.zeros(2, 2)) is None:
            if os.environ.get("LIGHTNING_SWIM_REQUIRE_CPU_KERNEL") == "1":
                raise AssertionError("the compiled CPU kernel is required here")
            pytest.skip("the compiled CPU kernel is not available here")
        w, b, x = layer(130, 7, 9, seed=41, duplicates=3, dtype=dtype)
        lay = _fsearch._Layer(x, act, act(x @ w.T + b), "torch")
        N = x.shape[0]
        rows = torch.tensor([0, 3, 64, N - 1])
        r, c, bad = lay.pair_terms(rows)
        shape = (4 * N, N)
        want, got = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
        want_b, got_b = torch.empty(shape, dtype=torch.bfloat16), torch.empty(shape, dtype=torch.bfloat16)
        _fsearch._unit_neurons_torch(lay, rows, r, c, want, want_b)
        _fsearch._unit_kernel(act, x).unit_neurons(
            lay.gram, rows, r.contiguous(), c.contiguous(), act.negative_slope, got, got_b
        )
        ok = ~bad.view(-1)
        tol = 1e-12 if dtype == F64 else 2e-6
        torch.testing.assert_close(got[ok], want[ok], rtol=tol, atol=tol)
        torch.testing.assert_close(got[ok].norm(dim=1), torch.ones(int(ok.sum()), dtype=dtype))
        # rounded to the nearest bfloat16 of the kernel's own values
        assert torch.equal(got_b[ok], got[ok].float().bfloat16())

    def test_a_kernel_failing_its_self_check_is_not_used(self, monkeypatch):
        from lightning_swim import _fsearch

        act = get_activation("relu")
        if _fsearch._unit_kernel(act, torch.zeros(2, 2)) is None:
            pytest.skip("the compiled CPU kernel is not available here")
        monkeypatch.setattr(_fsearch, "_unit_checked", {})

        def broken(self, gram, rows, r, c, slope, out, out_bf16, inv=None):
            for t in (out, out_bf16, inv):
                if t is not None:
                    t.fill_(0.5)

        monkeypatch.setattr(type(_fsearch._search.cpu_kernel()), "unit_neurons", broken)
        assert _fsearch._unit_kernel(act, torch.zeros(2, 2)) is None
        w, b, x = layer(40, 3, 5, seed=3)
        monkeypatch.setattr(_fsearch, "SCREEN", True)
        pm = quiet_map(w, b, x, refine="exact")  # the torch twin: still the exact answer
        err = brute_force(w, b, x, "relu").reshape(5, -1)
        ok = pm.valid
        torch.testing.assert_close(pm.func_error[ok], err[ok].min(1).values, rtol=0, atol=1e-10)


class TestTrim:
    """Keeping only what the summary reads (pairs within ``near`` and the ``n_cheapest`` cheapest)."""

    @pytest.mark.parametrize("screen", [False, True], ids=["dense", "bf16-screen"])
    def test_the_summary_is_the_same_and_far_fewer_pairs_are_kept(self, screen, monkeypatch):
        from lightning_swim import _fsearch
        from lightning_swim.pairmap import threshold_fn

        monkeypatch.setattr(_fsearch, "SCREEN", screen)
        xf, act, a = _frame_layer(90, 12, 6, seed=22)  # 12 dimensions, 90 points: poorly explained neurons
        M = a.shape[1]
        thr = lambda best: best + 0.4  # noqa: E731  (a wide soft window: thousands of pairs per neuron)
        near, k = threshold_fn(0.01, 0.0), 16
        inf = torch.full((M,), math.inf, dtype=F64)
        full, _ = _fsearch.exact_candidates(xf, act, a, thr, inf, max_memory=2**18, max_kept=10**9)
        kept, ceiling = _fsearch.exact_candidates(
            xf, act, a, thr, inf, max_memory=2**18, max_kept=10**9, near=near, n_cheapest=k
        )
        assert bool(torch.isfinite(ceiling).all())  # every neuron was trimmed
        assert len(kept.m) < len(full.m) / 4
        opts = {"atol": 0.01, "rtol": 0.0, "temperature": 0.5, "max_soft": k}
        s_full, s_kept = _fsearch.summarise(full, M, **opts), _fsearch.summarise(kept, M, **opts)
        for f in ("best_i", "best_j", "best_err", "n_near", "n_near_points"):
            assert torch.equal(getattr(s_full, f), getattr(s_kept, f)), f
        for s_ in (s_full, s_kept):
            assert int((s_.soft_neuron == 0).sum()) == k  # the window holds far more than k pairs
        soft = lambda r: sorted(zip(r.soft_neuron.tolist(), r.soft_from.tolist(), r.soft_to.tolist(), strict=True))  # noqa: E731
        assert soft(s_full) == soft(s_kept)
        torch.testing.assert_close(s_kept.soft_weight.sum(), s_full.soft_weight.sum())
        # every pair within `near` of the best, and the k cheapest, are there: against brute force
        for m in range(M):
            mine = torch.sort(kept.err[kept.m == m]).values
            everyone = torch.sort(full.err[full.m == m]).values
            n_near = int((everyone <= everyone[0] + 0.01).sum())
            torch.testing.assert_close(mine[: max(k, n_near)], everyone[: max(k, n_near)])


class TestInvariances:
    @pytest.mark.parametrize("s", [1e-20, 1e-10, 1e10, 1e20])
    @pytest.mark.parametrize("name", ["relu", "tanh"])
    def test_float32_maps_at_extreme_input_scales_equal_the_map_at_scale_one(self, s, name):
        w, b, x = layer(80, 5, 10, seed=11, dtype=torch.float32)
        x = x + 3.0  # off the origin, too
        ref = quiet_map(w, b, x, activation=name)
        scaled = quiet_map(w / s, b, x * s, activation=name)  # the same function of the same points
        assert torch.equal(ref.idx_from, scaled.idx_from) and torch.equal(ref.idx_to, scaled.idx_to)
        torch.testing.assert_close(scaled.func_error, ref.func_error, rtol=1e-3, atol=1e-5, equal_nan=True)
        torch.testing.assert_close(scaled.scale, ref.scale, rtol=1e-3, atol=1e-5, equal_nan=True)

    @pytest.mark.parametrize("s", [1e-20, 1e20])
    def test_float32_relu_weights_at_extreme_scales(self, s):
        w, b, x = layer(80, 5, 10, seed=12, dtype=torch.float32)
        ref = quiet_map(w, b, x)
        scaled = quiet_map(w * s, b * s, x)
        assert torch.equal(ref.idx_from, scaled.idx_from) and torch.equal(ref.idx_to, scaled.idx_to)
        assert bool(torch.isfinite(scaled.func_error[scaled.valid]).all())
        torch.testing.assert_close(scaled.scale / s, ref.scale, rtol=1e-4, atol=0, equal_nan=True)

    def test_translation_of_the_inputs(self):
        w, b, x = layer(60, 3, 8, seed=13)
        shift = torch.tensor([5.0, -2.0, 100.0], dtype=F64)
        for refine in ("exact", "none"):
            ref = quiet_map(w, b, x, refine=refine)
            moved = quiet_map(w, b - w @ shift, x + shift, refine=refine)
            assert torch.equal(ref.idx_from, moved.idx_from) and torch.equal(ref.idx_to, moved.idx_to)


class TestDeadNeuronsAndImportance:
    def test_a_dead_neuron_is_flagged_and_carries_no_importance(self):
        w, b, x = layer(40, 3, 4, seed=14)
        b[2] = -1e3  # below zero on every probe point
        with pytest.warns(RuntimeWarning, match=r"1 of 4 neurons .*1 dead"):
            pm = map_layer(w, b, x)
        assert pm.reasons()[2] == "dead" and int(pm.idx_from[2]) == -1
        assert 2 not in pm.soft_neuron.tolist()
        heavy = torch.tensor([1.0, 1.0, 1e6, 1.0], dtype=F64)  # however much it would weigh
        for soft in (True, False):
            imp = pair_importance(pm, len(x), heavy, soft=soft)
            alive = pm.valid.clone()
            reference = pair_importance(pm, len(x), heavy * alive, soft=soft)
            torch.testing.assert_close(imp, reference)

    def test_soft_weights_sum_to_one_per_neuron(self):
        w, b, x = layer(50, 4, 9, seed=15)
        pm = quiet_map(w, b, x)
        sums = torch.zeros(len(pm), dtype=F64).index_add_(0, pm.soft_neuron, pm.soft_weight)
        torch.testing.assert_close(sums[pm.valid], torch.ones(int(pm.valid.sum()), dtype=F64))
        assert bool((sums[~pm.valid] == 0).all())

    @pytest.mark.parametrize("dtype", [F64, torch.float32])
    def test_soft_importance_spreads_exact_ties_evenly(self, dtype):
        # points 0 and 2 coincide, and the four pairs (0, 1), (0, 3), (2, 1), (2, 3) give the neuron exactly:
        # the collinear pairs (0, 1) and (0, 3) only up to rounding, which alone split the weight unevenly
        # in 14 of these 36 layouts before errors within the rounding bound were made ties
        for far, near, scale in itertools.product([1.0, 0.7, 1.3, 3.1], [2.0, 2.5, 4.2], [1.0, 0.1, 7.0]):
            x = (torch.tensor([[0.0], [far], [0.0], [near]], dtype=F64) * scale).to(dtype)
            w, b = swim_neurons(x[[0]], x[[1]])
            pm = map_layer(w, b, x, refine="exact")
            assert int(pm.n_near[0]) == 4 and int(pm.n_near_points[0]) == 4
            soft, hard = pair_importance(pm, 4, soft=True), pair_importance(pm, 4, soft=False)
            torch.testing.assert_close(soft, torch.full((4,), 0.25, dtype=F64))
            torch.testing.assert_close(hard, torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=F64))  # the smallest (i, j)


class TestTurnover:
    def test_two_maps_of_an_unchanged_network_have_turnover_zero(self):
        w, b, x = layer(80, 4, 16, seed=16)
        first, second = quiet_map(w, b, x), quiet_map(w, b, x)
        errors, _ = pair_errors(w, b, x, first.idx_from, first.idx_to)
        assert turnover(first, second, previous_errors=errors) == 0.0

    def test_near_ties_are_not_change_but_real_moves_are(self):
        w, b, x = layer(80, 4, 16, seed=17)
        before = quiet_map(w, b, x)
        g = torch.Generator().manual_seed(0)
        nudged_w = w + 1e-4 * torch.randn(w.shape, generator=g, dtype=F64)
        after = quiet_map(nudged_w, b, x)
        errors, _ = pair_errors(nudged_w, b, x, before.idx_from, before.idx_to)
        assert turnover(before, after, previous_errors=errors) == 0.0
        moved_w = torch.randn(w.shape, generator=g, dtype=F64)
        moved = quiet_map(moved_w, b, x)
        errors, _ = pair_errors(moved_w, b, x, before.idx_from, before.idx_to)
        assert turnover(before, moved, previous_errors=errors) > 0.5

    def test_pair_errors_match_the_map(self):
        w, b, x = layer(60, 4, 10, seed=18)
        for name in ("relu", "tanh", "sigmoid"):
            pm = quiet_map(w, b, x, activation=name)
            err, scale = pair_errors(w, b, x, pm.idx_from, pm.idx_to, activation=name)
            torch.testing.assert_close(err, pm.func_error, equal_nan=True)
            torch.testing.assert_close(scale, pm.scale, equal_nan=True)


def test_random_map_draws_distinct_points_and_fits_their_scale():
    w, b, x = layer(30, 3, 50, seed=19, duplicates=10)
    rm = random_map(w, b, x, generator=torch.Generator().manual_seed(0))
    ok = rm.valid
    assert rm.refine == "random" and bool(ok.sum() > 30)
    assert bool(((x[rm.idx_from[ok]] - x[rm.idx_to[ok]]).norm(dim=1) > 0).all())
    err, _ = pair_errors(w, b, x, rm.idx_from, rm.idx_to)
    torch.testing.assert_close(rm.func_error, err, equal_nan=True)
    again = random_map(w, b, x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.idx_from, rm.idx_from)  # reproducible from the generator alone


def test_auto_is_exact_for_small_probe_sets_and_says_so():
    w, b, x = layer(100, 4, 8, seed=20)
    assert quiet_map(w, b, x).refine == "exact"
    from lightning_swim import pairmap

    assert quiet_map(w, b, x, refine="auto", top_k=4).refine == "exact"
    old = pairmap.AUTO_EXACT_WORK
    try:
        pairmap.AUTO_EXACT_WORK = 1.0
        assert quiet_map(w, b, x).refine == "function"
    finally:
        pairmap.AUTO_EXACT_WORK = old


@pytest.mark.keops
@pytest.mark.parametrize("name", ["relu", "leaky_relu", "tanh", "sigmoid"])
def test_keops_twin_gives_the_same_map(name):
    w, b, x = layer(45, 5, 7, seed=21, duplicates=2)
    kw = dict(activation=name, refine="exact", atol=0.05)
    k, t = quiet_map(w, b, x, backend="keops", **kw), quiet_map(w, b, x, backend="torch", **kw)
    for f in ("idx_from", "idx_to", "status", "n_near", "n_near_points"):
        assert torch.equal(getattr(k, f), getattr(t, f)), f
    torch.testing.assert_close(k.func_error, t.func_error, equal_nan=True)
    # the soft sets agree up to the order of exact ties and pairs at the cut (weights ~exp(-5) of the best)
    torch.testing.assert_close(pair_importance(k, len(x)), pair_importance(t, len(x)), atol=1e-3, rtol=0)


def test_keops_twin_refuses_activations_it_cannot_write(monkeypatch):
    from lightning_swim import _fsearch
    from lightning_swim._keops import KeOpsUnavailableError
    from lightning_swim.activations import Activation

    odd = Activation("softsign", 1.0, 0.5, False, torch.nn.functional.softsign)
    with pytest.raises(KeOpsUnavailableError, match="no formula"):
        _fsearch._keops_activation(odd, None, None)


@pytest.mark.slow
def test_soft_importance_is_the_same_at_other_probe_orders_dtypes_and_top_k():
    """On a trained digits network (64-64-10, Adam): the default map's importance does not depend on
    the order of the probe rows, the dtype or ``top_k``; the top-k path's argmin importance does."""
    from helpers import train_mlp
    from scipy.stats import spearmanr
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    x, y = torch.tensor(X[:400] / 16.0, dtype=torch.float32), torch.tensor(y[:400])
    model = train_mlp([64, 64, 10], x, y, epochs=30, lr=1e-3, batch_size=32)
    w, b = model[0].weight.detach(), model[0].bias.detach()
    omega = model[2].weight.detach().norm(dim=0) * w.norm(dim=1)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))

    def importance(pm, soft=True, order=None):
        imp = pair_importance(pm, len(x), omega.to(pm.scale.dtype), soft=soft)
        if order is None:
            return imp
        out = torch.zeros_like(imp)
        out[order] = imp
        return out

    ref = importance(quiet_map(w, b, x))
    settings_ = {
        "probe order": importance(quiet_map(w, b, x[perm]), order=perm),
        "float64": importance(quiet_map(w.double(), b.double(), x.double())),
        "top_k=16": importance(quiet_map(w, b, x, top_k=16)),
    }
    for label, imp in settings_.items():
        assert spearmanr(ref, imp)[0] >= 0.9, label
    # what the exact, soft default fixes: re-ranked candidates depend on how many there are
    a, c = quiet_map(w, b, x, refine="function", top_k=16), quiet_map(w, b, x, refine="function", top_k=128)
    assert spearmanr(importance(a, soft=False), importance(c, soft=False))[0] < 0.9


class TestScreenKernel:
    """The compiled screen (the entries of a block that pass, and their exact cosines) against its torch twin."""

    @staticmethod
    def kernel():
        from lightning_swim import _fsearch

        kern = _fsearch._screen_kernel(torch.zeros(2, 2))
        if kern is None:
            if os.environ.get("LIGHTNING_SWIM_REQUIRE_CPU_KERNEL") == "1":
                raise AssertionError("the compiled CPU kernel is required here")
            pytest.skip("the compiled CPU kernel is not available here")
        return kern

    @pytest.mark.parametrize("dtype", [F64, torch.float32])
    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_the_kernel_equals_the_torch_twin(self, dtype, seed):
        from lightning_swim import _fsearch

        kern = self.kernel()
        g = torch.Generator().manual_seed(seed)
        P, M, N = 500 + 37 * seed, 33, 71
        h = torch.randn(P, N, generator=g, dtype=F64).to(dtype)
        h /= h.norm(dim=1, keepdim=True)
        a_t = torch.randn(M, N, generator=g, dtype=F64).to(dtype)
        a_t /= a_t.norm(dim=1, keepdim=True)
        chat = (h @ a_t.T).to(torch.bfloat16)
        chat[torch.rand(P, generator=g) < 0.1] = float("-inf")  # excluded pairs
        thr = (0.3 * torch.rand(M, generator=g)).float()
        thr[:3] = torch.tensor([-1e30, 1.5, float(chat[5, 2])])  # every entry, none, one on the threshold
        for trim in (None, lambda counts: torch.where(counts > 40, thr + 0.1, thr)):
            p, m, cos = kern.screen(chat, thr, h, a_t, trim)
            wp, wm, wcos = _fsearch._screen_torch(chat, thr, h, a_t, trim)
            assert torch.equal(p, wp) and torch.equal(m, wm) and len(p) > 100
            torch.testing.assert_close(cos, wcos, rtol=0, atol=1e-12 if dtype == F64 else 1e-6)
            torch.testing.assert_close(cos, (h[p] * a_t[m]).sum(1), rtol=0, atol=1e-12 if dtype == F64 else 1e-6)
        assert len(kern.screen(chat, torch.full((M,), 2.0), h, a_t)[0]) == 0

    @pytest.mark.parametrize("name", ["relu", "leaky_relu"])
    @pytest.mark.parametrize("dtype", [F64, torch.float32])
    def test_rows_built_again_equal_the_stored_rows(self, name, dtype):
        """The piecewise-linear rows the screen builds again (not stored) give the stored rows' entries."""
        from lightning_swim import _fsearch

        kern = self.kernel()
        act = get_activation(name)
        w, b, x = layer(150, 6, 11, seed=5, duplicates=3, dtype=dtype)
        lay = _fsearch._Layer(x, act, act(x @ w.T + b), "torch")
        N, rows = x.shape[0], torch.tensor([0, 2, 77, 149])
        work, work_bf16 = torch.empty(4 * N * N, dtype=dtype), torch.empty(4 * N * N, dtype=torch.bfloat16)
        stored, chat_rows, bad = lay.unit_neurons(rows, work.clone(), work_bf16.clone(), stored=True)
        built, chat_rows_2, _ = lay.unit_neurons(rows, work, work_bf16, stored=False)
        assert isinstance(stored, torch.Tensor) and isinstance(built, _fsearch.PwlRows)
        assert torch.equal(chat_rows[~bad], chat_rows_2[~bad])  # (the pairs (i, i) have no neuron: NaN)
        chat = chat_rows @ lay.unit_a_bf16
        chat[bad] = float("-inf")
        thr = (chat.float().amax(0) - 0.2).contiguous()
        p, m, cos = kern.screen(chat, thr, built, lay.unit_a_t)
        wp, wm, wcos = kern.screen(chat, thr, stored, lay.unit_a_t)
        assert torch.equal(p, wp) and torch.equal(m, wm) and len(p) > 50
        torch.testing.assert_close(cos, wcos, rtol=0, atol=1e-12 if dtype == F64 else 1e-6)

    def test_a_kernel_failing_its_self_check_is_not_used(self, monkeypatch):
        from lightning_swim import _fsearch

        kern = self.kernel()
        monkeypatch.setattr(_fsearch, "_unit_checked", {})
        real = type(kern).screen
        monkeypatch.setattr(type(kern), "screen", lambda *a, **k: tuple(t[:-1] for t in real(*a, **k)))  # drops one
        assert _fsearch._screen_kernel(torch.zeros(2, 2)) is None
        w, b, x = layer(40, 3, 5, seed=3)
        monkeypatch.setattr(_fsearch, "SCREEN", True)
        pm = quiet_map(w, b, x, refine="exact")  # the torch twin: still the exact answer
        err = brute_force(w, b, x, "relu").reshape(5, -1)
        torch.testing.assert_close(pm.func_error[pm.valid], err[pm.valid].min(1).values, rtol=0, atol=1e-10)

    @pytest.mark.parametrize("name", ["relu", "tanh"])
    def test_the_map_is_the_same_without_the_kernel(self, name, monkeypatch):
        from lightning_swim import _fsearch

        self.kernel()
        monkeypatch.setattr(_fsearch, "SCREEN", True)
        w, b, x = random_layer(90, 5, 7, 11, dtype=F64, duplicates=2, offset=0.3)
        with_kernel = quiet_map(w, b, x, activation=name, refine="exact", temperature=0.5, atol=0.03)
        monkeypatch.setattr(_fsearch, "_unit_checked", {"screen": None})
        without = quiet_map(w, b, x, activation=name, refine="exact", temperature=0.5, atol=0.03)
        for f in ("idx_from", "idx_to", "n_near", "n_near_points", "soft_neuron", "soft_from", "soft_to"):
            assert torch.equal(getattr(with_kernel, f), getattr(without, f)), f
        torch.testing.assert_close(with_kernel.func_error, without.func_error, rtol=0, atol=1e-12, equal_nan=True)


def test_the_one_key_sort_of_candidates_equals_the_four_stable_sorts():
    """``summarise``'s order (neuron, error, i, j) from one integer key, against four stable sorts; with ties
    in the error (zeros, -0.0), negative and infinite errors, and a NaN or sizes that overflow the key
    (which fall back)."""
    from lightning_swim._fsearch import _by_neuron_error_pair, _lexsort

    g = torch.Generator().manual_seed(1)
    for n_points in (1, 7, 300, 2**11, 2**16 + 3):  # the last two: a key of 63 bits, one too wide
        for _ in range(20):
            k, n_neurons = int(torch.randint(1, 2000, (1,), generator=g)), int(torch.randint(1, 300, (1,), generator=g))
            key = torch.unique(torch.randint(0, n_neurons * n_points**2, (k,), generator=g))  # distinct (m, i, j)
            m, i, j = key // (n_points * n_points), key // n_points % n_points, key % n_points
            err = (torch.randn(len(m), generator=g) * torch.randint(0, 3, (len(m),), generator=g)).float()
            err[torch.rand(len(m), generator=g) < 0.1] = -0.0  # ties: 0, -0.0, and (rounding) negative errors
            err[torch.rand(len(m), generator=g) < 0.02] = float("inf")
            assert torch.equal(_by_neuron_error_pair(m, err, i, j), _lexsort(m, err, i, j))
            err[0] = float("nan")  # (falls back)
            assert torch.equal(_by_neuron_error_pair(m, err, i, j), _lexsort(m, err, i, j))

"""transport_map: the plan against POT, assignments against the Hungarian algorithm, SWIM vs Kaiming."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lightning_swim import ACTIVATIONS, SWIMInit, sample_pairs, swim_neurons, transport_map
from lightning_swim._datasets import digits
from lightning_swim.transport import _params

F64 = torch.float64


def problem(m=30, k=50, n=40, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    w = torch.randn(m, d, generator=g, dtype=F64)
    b = torch.randn(m, generator=g, dtype=F64)
    flat = torch.randperm(n * (n - 1), generator=g)[:k]  # k distinct ordered pairs i != j
    ci = flat // (n - 1)
    cj = (ci + 1 + flat % (n - 1)) % n
    return w, b, x, (ci, cj)


def cost_matrix(w, b, x, cands, name="relu"):
    act = ACTIVATIONS[name]
    cw, cb = swim_neurons(x[cands[0]], x[cands[1]], act)
    return 0.5 * torch.cdist(_params(w, b, act), _params(cw, cb, act)) ** 2


def plan(tm, c, alpha, beta):
    return alpha[:, None] * beta[None, :] * torch.exp((tm.f[:, None] + tm.g[None, :] - c) / tm.eps)


class TestAgainstReferences:
    @pytest.mark.parametrize("blur", [0.5, 0.2])
    @pytest.mark.parametrize("name", ["relu", "tanh"])
    def test_plan_matches_pot_sinkhorn(self, blur, name):
        ot = pytest.importorskip("ot")
        w, b, x, cands = problem()
        tm = transport_map(w, b, x, activation=name, candidates=cands, blur=blur, backend="tensorized", tol=1e-9)
        c = cost_matrix(w, b, x, cands, name)
        a, bb = torch.full((30,), 1 / 30, dtype=F64), torch.full((50,), 1 / 50, dtype=F64)
        ref = ot.sinkhorn(
            a.numpy(), bb.numpy(), c.numpy(), reg=blur**2, method="sinkhorn_log", numItermax=100_000, stopThr=1e-13
        )
        ours = plan(tm, c, a, bb).numpy()
        # same problem: min <pi, C> + eps KL(pi | a x b); POT's reg is eps and C the same |x - y|^2 / 2
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6 * ref.max())
        assert tm.assignment.tolist() == ref.argmax(1).tolist()
        np.testing.assert_allclose(tm.mass_share.numpy(), ref.max(1) / ref.sum(1), atol=1e-6)

    def test_small_blur_approaches_exact_ot(self):
        ot = pytest.importorskip("ot")
        w, b, x, cands = problem(m=20, k=20, seed=3)
        c = cost_matrix(w, b, x, cands)
        a = np.full(20, 1 / 20)
        exact = ot.emd2(a, a, c.numpy())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            values = [
                float((plan(tm, c, torch.tensor(a), torch.tensor(a)) * c).sum())
                for tm in (
                    transport_map(w, b, x, candidates=cands, blur=blur, backend="tensorized", divergence=False)
                    for blur in (0.3, 0.1, 0.03)
                )
            ]
        gaps = [abs(v - exact) for v in values]
        assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3 * max(exact, 1e-9) + 1e-4

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_hard_assignment_is_the_hungarian_matching(self, seed):
        from scipy.optimize import linear_sum_assignment

        w, b, x, cands = problem(m=25, k=25, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            tm = transport_map(
                w, b, x, candidates=cands, blur=0.03, backend="tensorized", divergence=False, max_iter=20_000
            )
        rows, cols = linear_sum_assignment(cost_matrix(w, b, x, cands).numpy())
        assert tm.assignment[rows].tolist() == cols.tolist()
        assert float(tm.mass_share.min()) > 0.5  # every neuron sends most of its mass to its match

    def test_divergence_matches_geomloss_online(self):
        from lightning_swim._keops import pykeops_torch

        try:
            pykeops_torch()
        except Exception as err:  # pragma: no cover - KeOps missing
            pytest.skip(f"KeOps: {err}")
        w, b, x, cands = problem(m=40, k=60, seed=4)
        dense = transport_map(w, b, x, candidates=cands, blur=0.3, backend="tensorized")
        online = transport_map(w, b, x, candidates=cands, blur=0.3, backend="online")
        torch.testing.assert_close(dense.divergence, online.divergence, rtol=1e-5, atol=1e-8)
        assert torch.equal(dense.assignment, online.assignment)


class TestSwimVersusKaiming:
    # Half the pool's candidates coincide with the layer's neurons: a near-degenerate plan on which
    # Sinkhorn's potentials settle slowly (the divergence is the same to 1e-14 after 5,000 or 100,000
    # iterations), so the warning that they have not met `tol` is expected here.
    @pytest.mark.filterwarnings("ignore:Sinkhorn did not converge:RuntimeWarning")
    def test_swim_layer_is_near_its_pool_and_kaiming_is_not(self):
        xtr, ytr, _, _ = digits(dtype=F64)
        x, y = xtr[:600], ytr[:600]
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).double()
        i, j = SWIMInit(seed=0).apply(model, x, y)["0"]
        with torch.random.fork_rng():
            torch.manual_seed(0)
            kaiming = nn.Linear(64, 64).double()
        extra = sample_pairs(x, y, 64, generator=torch.Generator().manual_seed(5))
        pool = (torch.cat([i, extra[0]]), torch.cat([j, extra[1]]))
        kw = dict(candidates=pool, blur=0.1, backend="tensorized")
        swim = transport_map(model[0].weight.detach(), model[0].bias.detach(), x, **kw)
        other = transport_map(kaiming.weight.detach(), kaiming.bias.detach(), x, **kw)
        own = transport_map(model[0].weight.detach(), model[0].bias.detach(), x, candidates=(i, j), blur=0.1)
        assert abs(float(own.divergence)) < 1e-6  # the pool is exactly the layer's pairs
        assert float(other.divergence) > 4 * float(swim.divergence) > 0
        # the SWIM neurons are assigned to their own pairs
        assert float(((swim.pairs.idx_from == i) & (swim.pairs.idx_to == j)).double().mean()) > 0.9


class TestOutputs:
    def test_importance_is_a_distribution_and_unbalanced_drops_unused_candidates(self):
        w, b, x, cands = problem(m=10, k=60, seed=5)
        balanced = transport_map(w, b, x, candidates=cands, blur=0.3, divergence=False)
        assert balanced.importance.shape == (40,)
        assert abs(float(balanced.importance.sum()) - 1) < 1e-12
        pool = torch.zeros(40, dtype=F64)
        pool.index_add_(0, cands[0], torch.full((60,), 0.5, dtype=F64))
        pool.index_add_(0, cands[1], torch.full((60,), 0.5, dtype=F64))
        torch.testing.assert_close(balanced.importance, pool / pool.sum(), atol=1e-5, rtol=0)
        unbalanced = transport_map(w, b, x, candidates=cands, blur=0.3, reach=0.5, divergence=False)
        assert float((unbalanced.importance - pool / pool.sum()).abs().sum()) > 0.1

    def test_flagged_neurons_and_weights(self):
        w, b, x, cands = problem(m=6, k=20, seed=6)
        w[2] = 0.0
        b[4] = float("nan")
        with pytest.warns(RuntimeWarning, match="2 of 6 neurons"):
            tm = transport_map(w, b, x, candidates=cands, blur=0.3, neuron_weights=torch.arange(6.0), divergence=False)
        assert tm.assignment.tolist()[2] == -1 and tm.assignment.tolist()[4] == -1
        assert tm.pairs.valid.tolist() == [True, True, False, True, False, True]
        assert torch.isnan(tm.f[2]) and bool(torch.isfinite(tm.f[[0, 1, 3, 5]]).all())

    def test_candidates_drawn_with_a_generator_leave_the_global_rng_alone(self):
        w, b, x, _ = problem(m=5, k=10, seed=7)
        state = torch.random.get_rng_state().clone()
        a = transport_map(w, b, x, n_candidates=64, generator=torch.Generator().manual_seed(1), divergence=False)
        c = transport_map(w, b, x, n_candidates=64, generator=torch.Generator().manual_seed(1), divergence=False)
        assert torch.equal(state, torch.random.get_rng_state())
        assert torch.equal(a.cand_from, c.cand_from) and torch.equal(a.assignment, c.assignment)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"blur": 0.0}, "`blur`"),
            ({"scaling": 1.0}, "`scaling`"),
            ({"reach": -1.0}, "`reach`"),
            ({"backend": "gpu"}, "Invalid `backend`"),
            ({"neuron_weights": -torch.ones(5, dtype=F64)}, "`neuron_weights`"),
            ({"candidates": (torch.tensor([0, 1]), torch.tensor([1, 99]))}, r"candidate indices in \[0, 39\]"),
            ({"tol": 0.0}, "`tol`"),
        ],
    )
    def test_bad_arguments(self, kwargs, match):
        w, b, x, _ = problem(m=5, k=10, seed=8)
        with pytest.raises(ValueError, match=match):
            transport_map(w, b, x, **kwargs)

    def test_no_neuron_to_transport(self):
        w, b, x, cands = problem(m=2, k=5, seed=9)
        with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="nothing to transport"):
            transport_map(torch.zeros_like(w), b, x, candidates=cands)


class TestBlockedTwin:
    """The online path in plain PyTorch (issue 11, item 11): the same annealed solve as GeomLoss'."""

    @staticmethod
    def _measures(m=25, k=40, d=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        a = torch.rand(m, generator=g, dtype=F64) + 0.1
        b = torch.rand(k, generator=g, dtype=F64) + 0.1
        x = torch.randn(m, d, generator=g, dtype=F64)
        y = torch.randn(k, d, generator=g, dtype=F64) + 0.5
        return a / a.sum(), x, b / b.sum(), y

    @pytest.mark.parametrize("reach", [None, 0.7])
    @pytest.mark.parametrize("max_memory", [2**30, 4096])  # one block; blocks of rows and columns
    def test_potentials_and_divergence_equal_geomloss_tensorized(self, reach, max_memory):
        from geomloss import SamplesLoss

        from lightning_swim.transport import _sinkhorn_blocked

        a, x, b, y = self._measures()
        kw = dict(p=2, blur=0.3, reach=reach, scaling=0.8, backend="tensorized")
        f_ref, g_ref = SamplesLoss("sinkhorn", debias=False, potentials=True, **kw)(a, x, b, y)
        div_ref = SamplesLoss("sinkhorn", debias=True, **kw)(a, x, b, y)
        opts = dict(blur=0.3, reach=reach, scaling=0.8, max_memory=max_memory)
        f, g = _sinkhorn_blocked(a, x, b, y, potentials=True, **opts)
        div = _sinkhorn_blocked(a, x, b, y, potentials=False, **opts)
        torch.testing.assert_close(f, f_ref.reshape(-1), rtol=0, atol=1e-10)
        torch.testing.assert_close(g, g_ref.reshape(-1), rtol=0, atol=1e-10)
        torch.testing.assert_close(div, div_ref.reshape(()), rtol=0, atol=1e-10)

    @pytest.mark.keops
    def test_equal_to_the_keops_online_path(self):
        from geomloss import SamplesLoss

        from lightning_swim.transport import _sinkhorn_blocked

        a, x, b, y = self._measures(seed=1)
        kw = dict(p=2, blur=0.3, reach=None, scaling=0.8, backend="online")
        f_ref, g_ref = SamplesLoss("sinkhorn", debias=False, potentials=True, **kw)(a, x, b, y)
        f, g = _sinkhorn_blocked(a, x, b, y, potentials=True, blur=0.3, reach=None, scaling=0.8, max_memory=4096)
        # GeomLoss' online path passes 1/eps as `torch.Tensor([1 / eps])`, a float32 number: 1e-7 relative
        torch.testing.assert_close(f, f_ref.reshape(-1), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g, g_ref.reshape(-1), rtol=1e-6, atol=1e-7)

    def test_transport_map_falls_back_when_keops_cannot_compile(self, monkeypatch):
        """The dense cost does not fit in `max_memory` and KeOps cannot build its formula: this raised
        ModuleNotFoundError ('No module named pykeops_cpp_...')."""
        import geomloss._legacy.sinkhorn_samples as gs

        from lightning_swim import transport

        def no_compiler(*args, **kwargs):
            raise ModuleNotFoundError("No module named 'pykeops_cpp_0123456789'")

        monkeypatch.setattr(gs, "lse_genred", no_compiler)
        monkeypatch.setattr(transport, "_keops_works", lambda: True)  # pykeops imports, but cannot compile
        monkeypatch.setitem(transport._warned, "online", False)
        w, b, x, cands = problem(m=20, k=60, seed=5)
        dense = transport_map(w, b, x, candidates=cands, blur=0.3, backend="tensorized")
        with pytest.warns(RuntimeWarning, match="KeOps.*plain PyTorch"):
            small = transport_map(w, b, x, candidates=cands, blur=0.3, max_memory=4096)
        assert small.backend == "blocked"
        torch.testing.assert_close(small.divergence, dense.divergence, rtol=0, atol=1e-10)
        torch.testing.assert_close(small.f, dense.f, rtol=0, atol=1e-9, equal_nan=True)
        assert torch.equal(small.assignment, dense.assignment)
        with pytest.raises(Exception, match="backend='blocked'"):  # asked for KeOps by name: no silent swap
            transport_map(w, b, x, candidates=cands, blur=0.3, backend="online")
        blocked = transport_map(w, b, x, candidates=cands, blur=0.3, backend="blocked")
        torch.testing.assert_close(blocked.divergence, dense.divergence, rtol=0, atol=1e-10)

"""Stage 1 of the pair map on every engine: row minima against brute force, the compiled CPU kernel's
build and fallbacks, and the CUDA twins of the parity tests (marker ``cuda``, skipped without a GPU)."""

from __future__ import annotations

import os

import pytest
import torch
from test_pairmap import brute_force_costs, check_flags, random_layer, to_frame

from lightning_swim import _cpu_kernel, _search, map_layer
from lightning_swim._cpu_kernel import CpuKernelUnavailableError
from lightning_swim.activations import get_activation

F64 = torch.float64
CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
)


def engine(name: str):
    """``rowmin(x, v, gamma, fam, max_memory)`` of one engine."""
    if name == "eager":
        return lambda x, v, g, fam, mem: _search._rowmin_eager(x, v, g, fam, max_memory=mem)
    if name == "kernel":
        try:
            kern = _search.cpu_kernel()
        except CpuKernelUnavailableError as err:
            if os.environ.get("LIGHTNING_SWIM_REQUIRE_CPU_KERNEL") == "1":
                raise
            pytest.skip(f"the compiled CPU kernel is not available here: {err}")
        return lambda x, v, g, fam, mem: _search._rowmin_kernel(kern, x, v, g, fam, max_memory=mem)
    return lambda x, v, g, fam, mem: _search.rowmin_keops(x, v, g, fam)


ENGINES = ["eager", "kernel", pytest.param("keops", marks=pytest.mark.keops)]
_BRUTE: dict[str, torch.Tensor] = {}  # brute-force row minima, shared by the engines


def terms(w, b, x, name):
    act = get_activation(name)
    fam = _search.Family.of(act)
    v, gamma, c0 = _search.neuron_terms(w, b, x, act)
    return fam, v, gamma, c0


class TestRowMinima:
    """Each engine's row minima ``min_j cost_ij`` equal the brute force's, entry by entry."""

    @pytest.mark.parametrize("name", ["relu", "tanh", "sigmoid"])
    @pytest.mark.parametrize("which", ENGINES)
    def test_brute_force_with_duplicates_and_many_tiles(self, which, name):
        # 523 + 12 points: several 512-partner tiles and 4-anchor blocks with remainders; 37 neurons:
        # a partial register block; duplicates and a near-duplicate (1e-5 apart: its distance must be
        # recomputed, and the cancellation in |x_i|^2 - |x_j|^2, common to all engines, stays below 1e-9)
        w, b, x = random_layer(523, 3, 37, seed=12, duplicates=12)
        w, b, x = to_frame(w, b, torch.cat([x, x[:1] + 1e-5]))  # the brute force works in map_layer's frame
        fam, v, gamma, c0 = terms(w, b, x, name)
        got = engine(which)(x, v, gamma, fam, 2**16)  # a small budget: many row blocks
        if name not in _BRUTE:
            _BRUTE[name] = brute_force_costs(w, b, x, name).amin(2).T - c0  # [N, M], without the neuron's constant
        want = _BRUTE[name]
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)

    @pytest.mark.parametrize("which", ENGINES)
    def test_float32_agrees_with_float64(self, which):
        w, b, x = random_layer(300, 20, 70, seed=4, duplicates=5)
        fam, v, gamma, _ = terms(w, b, x, "relu")
        got = engine(which)(x.float(), v.float(), gamma.float(), fam, 2**20)
        want = _search._rowmin_eager(x, v, gamma, fam, max_memory=2**20)
        torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-4)

    def test_kernel_equals_eager_on_a_larger_problem(self):
        kernel = engine("kernel")
        g = torch.Generator().manual_seed(3)
        x = torch.rand(1100, 50, generator=g)
        x = torch.cat([x, x[:30], x[30:40] + 1e-5 * torch.rand(10, 50, generator=g)])  # far from the origin
        w = torch.randn(100, 50, generator=g)
        b = -(w * x[:100]).sum(1)
        for name in ("relu", "tanh"):
            fam, v, gamma, _ = terms(w, b, x, name)
            got = kernel(x, v, gamma, fam, 2**20)
            want = _search._rowmin_eager(x, v, gamma, fam, max_memory=2**22)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            # the winning anchors, hence the pairs, are the same
            assert torch.equal(got.argmin(0), want.argmin(0))

    def test_near_duplicates_keep_a_true_distance(self):
        """A Gram-based distance would cancel to 0 (excluded) or garbage; both engines recompute it."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(40, 5, generator=g) + 100
        x = torch.cat([x, x[:5] + 1e-3 * torch.randn(5, 5, generator=g)])
        w, b = torch.randn(6, 5, generator=g), torch.randn(6, generator=g)
        fam, v, gamma, _ = terms(w.double(), b.double(), x.double(), "relu")
        want = _search._rowmin_eager(x.double(), v, gamma, fam, max_memory=2**20)
        for which in ("eager", "kernel"):
            got = engine(which)(x.float(), v.float(), gamma.float(), fam, 2**20)
            assert bool(torch.isfinite(got).all())
            # float32 rounding of the coordinates moves costs by ~eps |x|^2 / |dx|, never more
            torch.testing.assert_close(got.double(), want, rtol=0.05, atol=0.05)


class TestCpuKernelBuild:
    def test_builds_once_and_reuses_the_library(self, tmp_path):
        lib = _cpu_kernel._build(tmp_path)
        mtime = lib.stat().st_mtime_ns
        assert _cpu_kernel._build(tmp_path) == lib and lib.stat().st_mtime_ns == mtime
        assert [p.name for p in tmp_path.iterdir()] == [lib.name]  # no temporary files left behind

    def test_a_damaged_library_is_rebuilt(self, tmp_path):
        lib = _cpu_kernel._build(tmp_path)
        lib.write_bytes(b"not a shared library")
        kern = _cpu_kernel._load(tmp_path)
        w, b, x = random_layer(30, 3, 5, seed=1)
        fam, v, gamma, _ = terms(w, b, x, "relu")
        got = _search._rowmin_kernel(kern, x, v, gamma, fam, max_memory=2**20)
        torch.testing.assert_close(got, _search._rowmin_eager(x, v, gamma, fam, max_memory=2**20))

    def test_no_compiler_names_the_reason(self, tmp_path, monkeypatch):
        monkeypatch.setattr(_cpu_kernel, "_compiler", lambda: "/bin/false")
        with pytest.raises(CpuKernelUnavailableError, match="did not compile with /bin/false"):
            _cpu_kernel._build(tmp_path)
        assert not any(tmp_path.iterdir())

    def test_turned_off_by_the_environment(self, monkeypatch):
        monkeypatch.setenv("LIGHTNING_SWIM_CPU_KERNEL", "0")
        with pytest.raises(CpuKernelUnavailableError, match="LIGHTNING_SWIM_CPU_KERNEL=0"):
            _cpu_kernel.load_cpu_kernel()
        w, b, x = random_layer(20, 3, 4, seed=2)
        fam, v, gamma, _ = terms(w, b, x, "relu")
        assert _search.rowmin(x, v, gamma, fam, backend="torch", max_memory=2**20)[1] == "torch"


class TestEngineChoice:
    def test_auto_on_a_cpu_prefers_the_kernel(self):
        engine("kernel")  # skips where it cannot be built
        w, b, x = random_layer(20, 3, 4, seed=2)
        fam, v, gamma, _ = terms(w, b, x, "relu")
        assert _search.rowmin(x, v, gamma, fam, backend="auto", max_memory=2**20)[1] == "cpu-kernel"
        assert _search.rowmin(x, v, gamma, fam, backend="torch", max_memory=2**20)[1] == "cpu-kernel"

    @pytest.mark.keops
    def test_a_kernel_failing_its_self_check_is_not_used(self, monkeypatch):
        monkeypatch.setitem(_search._kernel_checked, "ok", False)
        w, b, x = random_layer(20, 3, 4, seed=2)
        fam, v, gamma, _ = terms(w, b, x, "relu")
        with pytest.raises(CpuKernelUnavailableError, match="disagrees"):
            _search.cpu_kernel()
        assert _search.rowmin(x, v, gamma, fam, backend="auto", max_memory=2**20)[1] == "keops"


@pytest.mark.parametrize("device", ["cpu", CUDA])
class TestDevices:
    """The key parity tests on every device: brute force, and KeOps against PyTorch."""

    @pytest.mark.parametrize("backend", ["torch", pytest.param("keops", marks=pytest.mark.keops)])
    def test_matches_brute_force(self, device, backend):
        w, b, x = random_layer(40, 4, 9, seed=13)  # no duplicates: coincident partners tie in cost
        pm = map_layer(w.to(device), b.to(device), x.to(device), refine="none", backend=backend)
        costs = brute_force_costs(w, b, x, "relu").reshape(len(w), -1)
        flat = costs.argmin(1)
        assert pm.idx_from.device.type == device
        ok = check_flags(pm.to("cpu"), w, b, x, "relu")
        assert pm.idx_from.cpu()[ok].tolist() == (flat // len(x))[ok].tolist()
        assert pm.idx_to.cpu()[ok].tolist() == (flat % len(x))[ok].tolist()
        torch.testing.assert_close(pm.param_cost.cpu()[ok], costs.amin(1)[ok], rtol=1e-9, atol=1e-9)

    @pytest.mark.keops
    @pytest.mark.parametrize("dtype", [torch.float32, F64])
    def test_keops_and_torch_agree(self, device, dtype):
        w, b, x = (t.to(device) for t in random_layer(300, 20, 70, seed=4, dtype=dtype, duplicates=5))
        a, c = map_layer(w, b, x, refine="none", backend="keops"), map_layer(w, b, x, refine="none", backend="torch")
        assert torch.equal(a.idx_from, c.idx_from) and torch.equal(a.idx_to, c.idx_to)
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(a.param_cost, c.param_cost, rtol=tol, atol=tol)

    def test_device_results_equal_cpu_results(self, device):
        w, b, x = random_layer(150, 10, 20, seed=14)
        here = map_layer(w.to(device), b.to(device), x.to(device), top_k=8, backend="auto")
        cpu = map_layer(w, b, x, top_k=8, backend="torch")
        assert torch.equal(here.idx_from.cpu(), cpu.idx_from) and torch.equal(here.idx_to.cpu(), cpu.idx_to)
        torch.testing.assert_close(here.func_error.cpu(), cpu.func_error, equal_nan=True)  # NaN: dead neurons


class TestDuplicateGroups:
    """``duplicate_groups`` (rows hashed from their bits, then compared) against ``torch.unique``'s row
    comparison: the same partition, with ids ``0 .. G-1``."""

    @staticmethod
    def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.equal(a[:, None] == a[None, :], b[:, None] == b[None, :])

    @pytest.mark.parametrize("dtype", [torch.float32, F64, torch.float16, torch.bfloat16])
    def test_partition_against_unique(self, dtype):
        g = torch.Generator().manual_seed(3)
        for _ in range(40):
            n, d = int(torch.randint(1, 50, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
            x = (torch.randint(-2, 3, (n, d), generator=g) * 0.5).to(dtype)  # few values: many duplicates
            x[torch.rand(n, d, generator=g) < 0.2] = -0.0  # equal to 0.0, with other bits
            ids = _search.duplicate_groups(x)
            ref = torch.unique(x, dim=0, return_inverse=True)[1]
            assert self.same_partition(ids, ref)
            assert sorted(set(ids.tolist())) == list(range(int(ref.max()) + 1))

    def test_collision_and_nan_fall_back(self, monkeypatch):
        x = torch.tensor([[1.0, 2.0], [2.0, 1.0], [1.0, 2.0], [0.5, 0.5]])
        ref = torch.unique(x, dim=0, return_inverse=True)[1]
        # every row one key: the comparison with the first row of the group finds the collision
        monkeypatch.setattr(_search, "_row_keys", lambda flat: torch.zeros(len(flat), dtype=torch.long))
        assert self.same_partition(_search.duplicate_groups(x), ref)
        monkeypatch.undo()
        x[3, 0] = float("nan")
        assert self.same_partition(_search.duplicate_groups(x), torch.unique(x, dim=0, return_inverse=True)[1])

    def test_shapes(self):
        assert _search.duplicate_groups(torch.zeros(0, 3)).shape == (0,)
        assert _search.duplicate_groups(torch.zeros(3, 0)).tolist() == [0, 0, 0]
        x = torch.randn(4, 2, 3)  # rows of any shape
        x[2] = x[0]
        assert _search.duplicate_groups(x).tolist() == _search.duplicate_groups(x.reshape(4, 6)).tolist()
        assert _search.duplicate_groups(x)[0] == _search.duplicate_groups(x)[2]

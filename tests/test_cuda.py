"""Transport and the monitor on every device: the CUDA runs equal the CPU runs (marker ``cuda``, skipped
without a GPU; ``benchmarks/gpu_check.sh`` runs them with ``-m cuda``). The pair search's device tests
are in ``test_search.py``."""

from __future__ import annotations

import pytest
import torch
from helpers import MLPModule, trainer
from lightning.pytorch.loggers import TensorBoardLogger
from test_transport import problem

from lightning_swim import PairImportanceMonitor, load_history, load_probe, map_network, transport_map
from lightning_swim._datasets import digits

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
class TestTransportOnDevices:
    @pytest.mark.parametrize("backend", ["tensorized", pytest.param("online", marks=pytest.mark.keops)])
    def test_same_plan_as_the_cpu_dense_solver(self, device, backend):
        w, b, x, cands = problem(m=40, k=60, seed=4)
        ref = transport_map(w, b, x, candidates=cands, blur=0.3, backend="tensorized")
        here = transport_map(w.to(device), b.to(device), x.to(device), candidates=cands, blur=0.3, backend=backend)
        assert here.f.device.type == device and here.backend == backend
        torch.testing.assert_close(here.divergence.cpu(), ref.divergence, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(here.f.cpu(), ref.f, rtol=1e-5, atol=1e-7)
        assert torch.equal(here.assignment.cpu(), ref.assignment)
        torch.testing.assert_close(here.importance.cpu(), ref.importance, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_monitored_fit_maps_the_final_weights(tmp_path, device):
    """A fit on the device logs maps; the last is the map of the final weights, computed on the CPU."""
    xtr, ytr, _, _ = digits()
    module = MLPModule([64, 20, 10], xtr[:200], ytr[:200], lr=1e-2)
    monitor = PairImportanceMonitor(every_n_epochs=1, probe_size=60, top_k=8, log_images=False, fidelity=False)
    t = trainer(
        tmp_path,
        callbacks=[monitor],
        max_epochs=2,
        accelerator="gpu" if device == "cuda" else "cpu",
        logger=TensorBoardLogger(tmp_path, name="tb", version=0),
    )
    t.fit(module)
    px, _ = load_probe(t.log_dir)
    final = load_history(t.log_dir)[-1].maps["net.0"]
    direct = map_network(module.cpu(), px, top_k=8)["net.0"]
    same = (final.idx_from == direct.idx_from) & (final.idx_to == direct.idx_to)
    if device == "cpu":
        assert bool(same.all())
    else:  # another device rounds differently: a near-tie may go the other way, at the same error
        assert float(same.float().mean()) >= 0.9
        torch.testing.assert_close(final.func_error, direct.func_error, rtol=0, atol=1e-4)

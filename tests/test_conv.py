"""Convolutions as SWIM layers: patches, planted patch pairs, trained CNNs, provenance, passes, the example."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from helpers import train
from torch import Tensor, nn

from lightning_swim import convert_network, fidelity, load_history, map_network
from lightning_swim._datasets import digits
from lightning_swim._modelio import ConvKind, read_model
from lightning_swim.analysis import AnalysisConfig, analyse_network, forward_passes
from lightning_swim.history import save_map, save_probe

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


# -- an independent construction: patches by slicing, SWIM neurons by the formula -------------------------


def _patches(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], pad: tuple[int, ...], dil: tuple[int, ...]):
    """All patches of ``x [N, C, *spatial]`` by explicit slicing (zero padding): ``[N, L, C prod(kernel)]``."""
    nd = len(kernel)
    pads = [p for q in reversed(pad) for p in (q, q)]
    xp = nn.functional.pad(x, pads)
    grid = [
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, p, d, k, st in zip(x.shape[2:], pad, dil, kernel, stride, strict=True)
    ]
    out = []
    for loc in range(math.prod(grid)):
        coords, rest = [], loc
        for g in reversed(grid):
            coords.insert(0, rest % g)
            rest //= g
        window = tuple(
            slice(c * st, c * st + d * (k - 1) + 1, d) for c, st, d, k in zip(coords, stride, dil, kernel, strict=True)
        )
        out.append(xp[(slice(None), slice(None), *window)].reshape(x.shape[0], -1))
    assert len(out[0].shape) == 2 and nd == len(grid)
    return torch.stack(out, 1), tuple(grid)


def _swim(x_from: Tensor, x_to: Tensor, s1: float, s2: float) -> tuple[Tensor, Tensor]:
    """SWIM's neuron of ordered pairs (Bolager et al. 2023): z(x_from) = -s2, z(x_to) = s1 - s2."""
    u = x_to - x_from
    w = s1 * u / (u * u).sum(1, keepdim=True)
    return w, -(w * x_from).sum(1) - s2


_CONSTANTS = {nn.ReLU: (1.0, 0.0), nn.Tanh: (math.log(3), math.log(3) / 2)}


def _plant(conv: nn.Module, act: type[nn.Module], x_in: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Set ``conv``'s kernels to SWIM neurons of random pairs of its input patches (ReLU: rescaled by a random
    positive factor). Returns the patches ``[N L, d]`` and the planted pairs ``[M, 2]``."""
    P, _ = _patches(x_in, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    P = P.reshape(-1, P.shape[-1])
    m = conv.out_channels
    pairs = []
    while len(pairs) < m:
        i, j = torch.randint(0, len(P), (2,), generator=g).tolist()
        if bool((P[i] != P[j]).any()) and (P[i].norm() > 0 or P[j].norm() > 0):
            pairs.append((i, j))
    pairs_t = torch.tensor(pairs)
    w, b = _swim(P[pairs_t[:, 0]], P[pairs_t[:, 1]], *_CONSTANTS[act])
    if act is nn.ReLU:
        s = torch.rand(m, generator=g, dtype=F64) * 3 + 0.5
        w, b = w * s[:, None], b * s
    with torch.no_grad():
        conv.weight.copy_(w.reshape(conv.weight.shape))
        conv.bias.copy_(b)
    return P, pairs_t


def _planted_cnn(dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    if dim == 2:
        x = digits(dtype=F64)[0][:20].view(-1, 1, 8, 8)
        convs = [nn.Conv2d(1, 8, 3), nn.Conv2d(8, 12, 3, stride=1, padding=1, dilation=2)]
        acts = [nn.ReLU, nn.Tanh]
    else:
        x = torch.randn(30, 2, 24, generator=g, dtype=F64).cumsum(-1)  # random walks: smooth-ish signals
        convs = [nn.Conv1d(2, 6, 5, stride=2, padding=2), nn.Conv1d(6, 8, 3, stride=1, padding=1, dilation=2)]
        acts = [nn.Tanh, nn.ReLU]
    layers: list[nn.Module] = []
    for conv, act in zip(convs, acts, strict=True):
        layers += [conv.double(), act()]
    model = nn.Sequential(*layers, nn.Flatten())
    planted = {}
    h = x
    with torch.no_grad():
        for k, (conv, act) in enumerate(zip(convs, acts, strict=True)):
            planted[str(2 * k)] = _plant(conv, act, h, g)
            h = act()(conv(h))
    head = nn.Linear(h[0].numel(), 10).double()
    torch.nn.init.normal_(head.weight, generator=g)
    model.append(head)
    return model, x, planted


class TestPatches:
    """ConvKind's patches are the layer's points: a conv is a dense layer over them."""

    @pytest.mark.parametrize(
        "conv",
        [
            nn.Conv2d(3, 5, 3),
            nn.Conv2d(3, 5, (2, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
            nn.Conv2d(3, 5, 4, padding="same", padding_mode="reflect"),
            nn.Conv1d(3, 5, 5, stride=2, padding=1, dilation=2),
            nn.Conv1d(3, 5, 4, padding="same", padding_mode="circular"),
            nn.Conv1d(3, 5, 3, padding="valid", bias=False),
        ],
    )
    def test_dense_over_patches(self, conv):
        conv = conv.double()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, 3, *((9, 10) if isinstance(conv, nn.Conv2d) else (17,)), generator=g, dtype=F64)
        kind = ConvKind()
        out = conv(x)
        assert kind.grid(conv, x) == tuple(out.shape[2:])
        P = kind.points(conv, x)
        w, b = kind.parameters(conv)
        b = torch.zeros(w.shape[0], dtype=F64) if b is None else b
        torch.testing.assert_close(kind.by_neuron(out), P @ w.T + b, rtol=1e-12, atol=1e-12)
        if conv.padding_mode == "zeros" and not isinstance(conv.padding, str):  # the test's own slicing
            ref, _ = _patches(x, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
            assert torch.equal(P, ref.reshape(-1, ref.shape[-1]))
        idx = torch.randperm(P.shape[0], generator=g)[:25]
        assert torch.equal(kind.gather(conv, x, idx), P[idx])
        rows = torch.tensor([True, False, True, False, True])
        w2, b2 = torch.randn(3, w.shape[1], generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)
        replaced = kind.by_neuron(kind.replace(conv, x, out, rows, w2, b2))
        expected = kind.by_neuron(out).clone()
        expected[:, rows] = P @ w2.T + b2
        torch.testing.assert_close(replaced, expected, rtol=1e-12, atol=1e-12)

    def test_unmappable_convolutions_are_named(self):
        model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
        reading = read_model(model, torch.randn(5, 2, 8, 8))
        assert "groups=2" in reading.skipped()["0"]
        unbatched = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU())
        layer = read_model(unbatched, torch.randn(2, 10)).layers[0]  # [C, L]: one unbatched signal
        assert "batches `[N, C, L]`" in (layer.reason or "")


class TestPlantedPatchPairs:
    """A CNN whose conv layers are SWIM neurons of patch pairs maps back to them and rebuilds exactly."""

    @pytest.mark.parametrize("dim", [1, 2])
    def test_maps_back_and_rebuilds(self, dim):
        model, x, planted = _planted_cnn(dim, seed=dim)
        maps = map_network(model, x, patches=10**6)  # every patch: the exact search over all pairs
        assert list(maps) == list(planted)
        for name, pm in maps.items():
            P, pairs = planted[name]
            assert pm.refine == "exact"
            assert int(pm.valid.sum()) == len(pm)
            # the same patches (a pair index, or another patch equal to it)
            assert torch.equal(P[pm.idx_from], P[pairs[:, 0]]), name
            assert torch.equal(P[pm.idx_to], P[pairs[:, 1]]), name
            assert float(pm.func_error.max()) < 1e-12
        x_new = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
        rebuilt = convert_network(model, maps, x, output="keep")
        with torch.no_grad():
            out, again = model(x_new), rebuilt(x_new)
        assert float((out - again).abs().max() / out.abs().max()) < 1e-6
        for name in planted:  # written back as kernels of the conv's own shape
            assert rebuilt.get_submodule(name).weight.shape == model.get_submodule(name).weight.shape


class TestSubsample:
    """The patches a map uses: fixed per layer and seed, traced back to examples and locations."""

    def test_sample_provenance_and_importance(self, tmp_path):
        model, x, _ = _planted_cnn(2, seed=3)
        reading = read_model(model, x)
        a, b = reading.sample("0", 500, seed=1), reading.sample("0", 500, seed=1)
        assert a is not None and torch.equal(a, b) and len(a.unique()) == 500
        assert not torch.equal(a, reading.sample("0", 500, seed=2))
        assert reading.sample("0", 10**6) is None  # fewer patches than asked: all of them
        maps = map_network(model, x, patches=500, seed=1, refine="function", top_k=8)
        pm = maps["0"]
        L = 36
        assert bool(torch.isin(pm.idx_from[pm.valid], a).all()) and bool(torch.isin(pm.idx_to[pm.valid], a).all())
        P, _ = _patches(x, (3, 3), (1, 1), (0, 0), (1, 1))
        i = int(pm.idx_from[0])
        torch.testing.assert_close(reading.points("0", index=torch.tensor([i]))[0], P[i // L, i % L])

        config = AnalysisConfig(patches=500, seed=1, refine="function", top_k=8, fidelity=False)
        record = analyse_network(model, x, config=config)
        assert torch.equal(record.maps["0"].idx_from, pm.idx_from)
        extra = record.extra["0"]
        assert torch.equal(extra["patch_example"], a // L) and torch.equal(extra["patch_location"], a % L)
        assert extra["patch_grid"].tolist() == [6, 6]
        imp = record.importance["0"]
        assert imp.shape == (len(x),)  # one importance per example ...
        per_example = torch.zeros(len(x), dtype=F64).index_add_(0, extra["patch_example"], extra["patch_importance"])
        torch.testing.assert_close(imp, per_example)  # ... the sum of its patches'
        assert abs(float(imp.sum()) - 1) < 1e-12
        save_probe(tmp_path, x, None)
        save_map(tmp_path, record)
        (loaded,) = load_history(tmp_path)
        assert torch.equal(loaded.importance["0"], imp) and torch.equal(loaded.maps["0"].idx_to, pm.idx_to)
        for key, value in extra.items():
            assert torch.equal(loaded.extra["0"][key], value), key


def _digits_cnn(seed: int = 0, width: tuple[int, int, int] = (8, 16, 32)) -> nn.Sequential:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    c1, c2, h = width
    model = nn.Sequential(
        nn.Conv2d(1, c1, 3),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * 16, h),
        nn.ReLU(),
        nn.Linear(h, 10),
    )
    torch.random.set_rng_state(state)
    return model


class TestDigitsCNN:
    """A small digits CNN: keep-mode fidelity per layer and whole, each above its random-pairs baseline."""

    def test_fidelity_and_passes(self):
        xtr, ytr, xte, yte = digits()
        xtr, xte = xtr.view(-1, 1, 8, 8), xte.view(-1, 1, 8, 8)
        model = train(_digits_cnn(), xtr, ytr, epochs=12, lr=3e-3, batch_size=64)
        with torch.no_grad():
            assert float((model(xte).argmax(1) == yte).float().mean()) > 0.93
        probe = xtr[:256]
        calls = [0]
        model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        config = AnalysisConfig(patches=1024, refine="function", top_k=32, backend="torch")
        record = analyse_network(model, probe, ytr[:256], config=config)
        assert list(record.maps) == ["0", "2", "5"]
        assert calls[0] == forward_passes(3) == 11
        s = record.scalars
        for name in ("0", "2"):
            assert s[f"swim/{name}/fidelity"] >= 0.97, s
            assert s[f"swim/{name}/fidelity_random_pairs"] <= s[f"swim/{name}/fidelity"] - 0.3, s
        assert s["swim/network/fidelity_keep"] >= s["swim/network/fidelity_keep_random_pairs"] + 0.5, s
        held_out = fidelity(model, convert_network(model, record.maps, probe), xte)
        assert held_out >= 0.85, held_out


@pytest.mark.slow
def test_example_mnist1d_cnn_vs_mlp(tmp_path, capsys):
    pytest.importorskip("mnist1d")
    spec = importlib.util.spec_from_file_location(
        "example_mnist1d_cnn_vs_mlp", ROOT / "examples" / "mnist1d_cnn_vs_mlp.py"
    )
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = ["--epochs", "2", "--probe-size", "48", "--patches", "256", "--top-k", "8", "--train-size", "600"]
    results = example.main([*args, "--out", str(tmp_path)])
    cnn, mlp = results["CNN"], results["MLP"]
    assert list(cnn["layers"]) == ["net.1", "net.3", "net.5"] and list(mlp["layers"]) == ["net.0", "net.2"]
    assert cnn["maps"] == mlp["maps"] == 3  # at fit start, after the first epoch, at fit end
    first = cnn["layers"]["net.1"]
    assert first["fidelity"] > first["fidelity_random_pairs"] + 0.2, first
    widths = [cnn["pairs"][n]["patch_width"] for n in ("net.1", "net.3", "net.5")]
    assert widths == [5, 9, 17]  # receptive fields: 5, then 5 + 2 * 2, then 9 + 2 * 4 (stride 2 twice)
    assert len(list(tmp_path.glob("*_top_pairs.png"))) == 5
    out = capsys.readouterr().out
    assert "reference 0.94" in out and "reference 0.68" in out and "random pairs" in out

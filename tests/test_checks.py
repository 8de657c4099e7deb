"""Clear errors for bad input (issue 11, item 16): malformed PairMaps, meta tensors, probes, infinite options."""

from __future__ import annotations

import pytest
import torch
from helpers import pairmap_fields
from torch import nn

from lightning_swim import PairImportanceMonitor, PairMap, map_layer, sample_pairs, swim_neurons, transport_map
from lightning_swim._checks import check_layer_width, check_model, check_pairmap, check_positive_finite, split_probe


class TestPairMap:
    @pytest.mark.parametrize(
        ("fields", "match"),
        [
            (pairmap_fields([0, 1], [1]), "one length"),
            (pairmap_fields([0, 1], [1, 2], m=3), "one length"),
            (pairmap_fields([0, -2], [1, 2]), ">= -1"),
            (pairmap_fields([0, -1], [1, 2]), "-1 for the same"),
            ({**pairmap_fields([0], [1]), "idx_from": torch.tensor([0.0])}, "integer indices"),
            ({**pairmap_fields([0], [1]), "scale": torch.ones(1, 1)}, "1D tensor"),
        ],
    )
    def test_malformed_pairmap_is_refused_when_built(self, fields, match):
        with pytest.raises(ValueError, match=match):
            PairMap(**fields)

    def test_indices_beyond_the_probe_set_are_named(self):
        pm = PairMap(**pairmap_fields([0, 7], [1, 2]))
        check_pairmap(pm, 8)
        with pytest.raises(ValueError, match="point 7 but the probe set has 5 points"):
            check_pairmap(pm, 5)

    def test_unmapped_maps_are_valid(self):
        pm = PairMap.unmapped(4, "relu", torch.float32, torch.device("cpu"))
        check_pairmap(pm, 1)
        assert len(pm.to("cpu")) == 4


class TestMetaTensors:
    def test_meta_points_are_named(self):
        x = torch.empty(10, 3, device="meta")
        with pytest.raises(ValueError, match="`x` to hold values but it is a meta tensor"):
            map_layer(torch.ones(2, 3), torch.ones(2), x)
        with pytest.raises(ValueError, match="meta tensor"):
            sample_pairs(x, n=2)
        with pytest.raises(ValueError, match="`x_from`.*meta tensor"):
            swim_neurons(x, x)

    def test_meta_model_is_named_with_the_fix(self):
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).to("meta")
        with pytest.raises(ValueError, match=r"parameter `0.weight` is a meta tensor.*to_empty"):
            check_model(model)
        check_model(nn.Linear(2, 2))


class TestArguments:
    def test_zero_width_layer(self):
        with pytest.raises(ValueError, match=r"Layer 'h' has zero width \(nn.Linear\(3, 0\)\)"):
            check_layer_width("h", nn.Linear(3, 0))
        check_layer_width("h", nn.Linear(3, 1))

    @pytest.mark.parametrize("probe", [[torch.randn(5, 2)], (torch.randn(5, 2),), [torch.randn(5, 2)] * 3])
    def test_a_probe_in_a_list_of_one_is_a_clear_error(self, probe):
        with pytest.raises(ValueError, match=r"`probe` to be a tensor `x` or a pair `\(x, y\)`"):
            PairImportanceMonitor(probe=probe)

    def test_probe_forms_accepted(self):
        x, y = torch.randn(5, 2), torch.arange(5)
        assert split_probe(x)[1] is None
        assert split_probe([x, y])[1] is y and split_probe((x, None))[1] is None
        with pytest.raises(ValueError, match="one row per example"):
            split_probe((x, y[:3]))

    @pytest.mark.parametrize("value", [float("inf"), float("nan"), 0.0, -1.0, True, "1"])
    def test_positive_finite(self, value):
        with pytest.raises(ValueError, match="`blur` to be a finite number > 0"):
            check_positive_finite(value, "blur")
        check_positive_finite(None, "reach", allow_none=True)

    @pytest.mark.parametrize(
        ("kwargs", "match"), [({"reach": float("inf")}, "`reach`"), ({"blur": float("inf")}, "`blur`")]
    )
    def test_infinite_transport_scales_are_refused(self, kwargs, match):
        x = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
        w, b = swim_neurons(x[:4], x[4:8])
        with pytest.raises(ValueError, match=match):
            transport_map(w, b, x, n_candidates=20, **kwargs)

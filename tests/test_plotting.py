"""The figures: drawn in the order, places and colours of the data they show, at TensorBoard's card width."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch
from helpers import MLPModule, pairmap_fields, trainer
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure

from lightning_swim import AnalysisConfig, PairImportanceMonitor, analyse_network, plotting
from lightning_swim._datasets import digits
from lightning_swim.pairmap import PairMap

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
ORANGE, SKY = plotting._FROM, plotting._TO  # the outlines of x_from and x_to


def _where(image, rgb):
    """Rows and columns of the pixels of exactly this colour."""
    a = np.asarray(image)
    return np.nonzero((a == np.array(rgb, dtype=np.uint8)).all(-1))


def _pairmap(idx_from, idx_to):
    return PairMap(**pairmap_fields(idx_from, idx_to), activation="relu")


def _rgb_points(colours):
    """One 3x8x8 image per colour, flat: ``[N, 192]``."""
    x = torch.zeros(len(colours), 3, 8, 8)
    for n, c in enumerate(colours):
        x[n] = torch.tensor(c, dtype=torch.float32)[:, None, None] / 255
    return x.reshape(len(colours), -1)


# -- what is an image ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gray_r", "RdBu_r", "viridis"])
def test_the_cached_colour_table_gives_matplotlibs_colours(name):
    import matplotlib

    values = np.concatenate([np.random.default_rng(0).normal(size=500), [-1.0, 0.0, 0.5, 1.0, 1 - 1e-17, 7.0]])
    z = ((values + 1) / 2).clip(0, 1)
    assert np.array_equal(plotting._cmap(values, -1.0, 1.0, name), matplotlib.colormaps[name](z, bytes=True)[..., :3])


def test_flat_vectors_are_images_only_when_neighbouring_pixels_correlate():
    x = digits()[0][:400]
    assert plotting.guess_image_shape((64,), x) == (8, 8)
    shuffled = x[:, torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    assert plotting.guess_image_shape((64,), shuffled) is None  # the same values, not an image
    tabular = torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    assert plotting.guess_image_shape((16,), tabular) is None  # 16 features are not a 4x4 image
    assert plotting.guess_image_shape((64,)) is None  # without data a flat vector is not called an image
    assert plotting.guess_image_shape((1, 28, 28)) == (1, 28, 28)
    assert plotting.guess_image_shape((3, 4)) is None


# -- the most important points -------------------------------------------------------------------------------


def test_top_points_shows_the_most_important_point_first():
    # four RGB points: the most important is pure red, the others pure blue; one row of four tiles
    x = _rgb_points([BLUE, BLUE, RED, BLUE])
    image = plotting.top_points(x, torch.tensor([0.2, 0.1, 0.6, 0.1]), (3, 8, 8), k=4)
    assert image.width == plotting.WIDTH
    (_, red), (_, blue) = _where(image, RED), _where(image, BLUE)
    assert len(red) and len(blue) and red.max() < blue.min()  # the red tile is the leftmost one
    assert len(blue) == 3 * len(red)  # three blue tiles, as large as the red one


def test_tabular_points_are_rows_of_feature_cells_in_order_of_importance():
    # 20 points of 12 features; point 5 has feature 3 far above the mean, point 9 feature 8 far below;
    # point 5 is the most important, point 9 the second: its row is the first, with the red cell at feature 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 12, generator=g) * 0.1
    x[5, 3], x[9, 8] = 10.0, -10.0
    imp = torch.full((20,), 0.01)
    imp[5], imp[9] = 0.5, 0.3
    image = plotting.top_points(x, imp / imp.sum(), None, k=4)
    deep_red = tuple(plotting._cmap(np.array([plotting._Z]), -plotting._Z, plotting._Z, "RdBu_r")[0])
    deep_blue = tuple(plotting._cmap(np.array([-plotting._Z]), -plotting._Z, plotting._Z, "RdBu_r")[0])
    (ry, rx), (by, bx) = _where(image, deep_red), _where(image, deep_blue)
    rows = ry < image.height - 60  # leave out the colour scale at the bottom
    ry, rx = ry[rows], rx[rows]
    rows = by < image.height - 60
    by, bx = by[rows], bx[rows]
    assert len(ry) and len(by) and ry.max() < by.min()  # point 5's row above point 9's
    left, right = min(rx.min(), bx.min()), max(rx.max(), bx.max())  # both cells in the same row of 12 cells
    cell = (bx.min() - rx.min()) / 5  # features 3 and 8 are five cells apart
    assert cell > 0 and abs((rx.max() - rx.min() + 1) - cell) <= 1 and right - left < 12 * cell


# -- the pairs of the weightiest neurons ---------------------------------------------------------------------


def test_top_pairs_puts_the_weightiest_neuron_first_and_each_x_from_before_its_x_to():
    # neuron 0: red -> blue (weight 1); neuron 1: green -> blue (weight 2): green's row above red's
    x = _rgb_points([RED, BLUE, GREEN, BLUE])
    pm = _pairmap([0, 2], [1, 3])
    image = plotting.top_pairs(x, pm, (3, 8, 8), neuron_weights=torch.tensor([1.0, 2.0]))
    (ry, rx), (gy, gx), (by, bx) = _where(image, RED), _where(image, GREEN), _where(image, BLUE)
    assert gy.max() < ry.min()  # the weightier neuron is the first row
    for y_rows, x_cols in ((gy, gx), (ry, rx)):
        blue_here = bx[(by >= y_rows.min()) & (by <= y_rows.max())]
        assert len(blue_here) and x_cols.max() < blue_here.min()  # x_from left of x_to
    # the third tile, x_to - x_from, is drawn in the diverging colours: blue - green is negative in green
    assert image.width == plotting.WIDTH


def test_top_pairs_leaves_out_unmapped_neurons():
    x = _rgb_points([RED, BLUE, GREEN])
    pm = _pairmap([0, -1], [1, -1])
    image = plotting.top_pairs(x, pm, (3, 8, 8), neuron_weights=torch.tensor([1.0, 5.0]))
    assert len(_where(image, RED)[0]) and not len(_where(image, GREEN)[0])


def test_tabular_and_signal_pairs_are_drawn():
    g = torch.Generator().manual_seed(0)
    pm = _pairmap([0, 2], [1, 3])
    for x in (torch.randn(6, 10, generator=g), torch.randn(6, 2, 30, generator=g)):
        image = plotting.top_pairs(x, pm, None, neuron_weights=torch.tensor([1.0, 2.0]))
        assert image.width == plotting.WIDTH and image.height > 150


# -- importance over training --------------------------------------------------------------------------------


def test_heatmap_puts_the_most_important_point_on_top_and_colours_its_rise():
    # point 2 gains all the importance between two maps: it is the top row, light (0 %) then darkest (100 %)
    first = torch.tensor([0.5, 0.5, 0.0])
    second = torch.tensor([0.0, 0.0, 1.0])
    third = torch.tensor([0.0, 0.0, 1.0])
    image = plotting.importance_heatmap([first, second, third], [0, 10, 20], top=3)
    assert image.mode == "RGB" and image.width == plotting.WIDTH
    darkest = tuple(plotting._cmap(np.array([1.0]), 0.0, 1.0, "magma_r")[0])
    half = tuple(plotting._cmap(np.array([50.0]), 0.0, 100.0, "magma_r")[0])
    (dy, dx), (hy, hx) = _where(image, darkest), _where(image, half)
    dark, mid = dy < image.height - 50, hy < image.height - 50  # leave out the colour scale at the bottom
    assert dark.any() and mid.any() and dy[dark].max() < hy[mid].min()  # point 2's row is above points 0 and 1
    assert dx[dark].min() > hx[mid].max()  # its dark cells are in the later maps, theirs in the first
    with pytest.raises(ValueError, match="one step per importance"):
        plotting.importance_heatmap([first], [0, 1])


def test_pair_arrows_is_a_figure_of_tensorboard_width_with_one_arrow_per_mapped_neuron():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    fig = plotting.pair_arrows(x, _pairmap([0, 1, -1], [1, 2, -1]))
    assert isinstance(fig, Figure) and fig.get_size_inches()[0] * fig.dpi == plotting.WIDTH
    (quiver,) = [c for c in fig.axes[0].collections if type(c).__name__ == "Quiver"]
    assert quiver.N == 2  # the unmapped neuron has no arrow


# -- pairs of patches (convolutions) -------------------------------------------------------------------------


def _box(rows, cols):
    return rows.min(), rows.max(), cols.min(), cols.max()


def test_patch_pairs_outline_the_patches_where_they_are():
    # example 0 has a black 3x3 block at (2, 4), example 1 at (5, 1): the pair of those two patches
    x = torch.zeros(3, 1, 8, 8)
    x[0, 0, 2:5, 4:7] = 1.0
    x[1, 0, 5:8, 1:4] = 1.0
    image = plotting.patch_pairs(
        x, torch.tensor([0]), torch.tensor([[2, 4]]), torch.tensor([1]), torch.tensor([[5, 1]]), 3
    )
    ink = _where(image, tuple(plotting._cmap(np.array([1.0]), 0.0, 1.0, "gray_r")[0]))
    orange, sky = _where(image, ORANGE), _where(image, SKY)
    o_top, o_bottom, o_left, o_right = _box(*orange)
    s_top, s_bottom, s_left, s_right = _box(*sky)
    assert o_right < s_left  # x_from's example left of x_to's
    for top, bottom, left, right in ((o_top, o_bottom, o_left, o_right), (s_top, s_bottom, s_left, s_right)):
        inside = (ink[0] >= top) & (ink[0] <= bottom) & (ink[1] >= left) & (ink[1] <= right)
        block = _box(ink[0][inside], ink[1][inside])
        assert inside.any()
        # the outline hugs the block: within its 2-pixel line of the block's edges
        assert abs(block[0] - top) <= 2 and abs(block[1] - bottom) <= 2
        assert abs(block[2] - left) <= 2 and abs(block[3] - right) <= 2


def test_patch_pairs_order_by_importance_and_clip_padding():
    x = torch.zeros(4, 1, 8, 8)
    first = plotting.patch_pairs(
        x,
        torch.tensor([0, 2]),
        torch.tensor([[-1, -1], [0, 0]]),  # the first patch hangs over the padding
        torch.tensor([1, 3]),
        torch.tensor([[0, 0], [5, 5]]),
        (3, 3),
        importance=torch.tensor([0.1, 0.9]),
        neurons=torch.tensor([7, 3]),
    )
    orange = _where(first, ORANGE)
    assert len(orange[0])  # the clipped outline is drawn
    # the more important pair (its x_to patch at (5, 5), low right) is the upper row
    sky_rows, sky_cols = _where(first, SKY)
    upper = sky_rows < (sky_rows.min() + sky_rows.max()) / 2
    assert sky_cols[upper].mean() > sky_cols[~upper].mean()


def test_patch_pairs_shade_the_window_of_a_signal():
    # a bump at samples 10..14 of example 0: the shaded window of the patch [10:15] is where the line peaks
    x = torch.zeros(2, 1, 40)
    x[0, 0, 10:15] = 1.0
    image = plotting.patch_pairs(x, torch.tensor([0]), torch.tensor([10]), torch.tensor([1]), torch.tensor([0]), 5)
    _, shade_cols = _where(image, (255, 236, 179))
    line_rows, line_cols = _where(image, plotting._CHANNEL_COLOURS[0])
    first_tile = line_cols < shade_cols.max() + 60
    peak = line_cols[first_tile][line_rows[first_tile] == line_rows[first_tile].min()]
    assert shade_cols.min() <= peak.min() and peak.max() <= shade_cols.max()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"x": torch.zeros(4, 8)}, "`x` to be images"),
        ({"location_from": torch.zeros(1, 3)}, "`location_from` to hold 2 coordinate"),
        ({"patch_size": (3,)}, "`patch_size` to be 2 positive"),
        ({"example_to": torch.tensor([4])}, "`example_to` to hold rows of x"),
        ({"importance": torch.ones(2)}, "`importance` to have one entry per pair"),
    ],
)
def test_patch_pairs_errors_name_the_argument(kwargs, match):
    args = {
        "x": torch.zeros(4, 1, 8, 8),
        "example_from": torch.tensor([0]),
        "location_from": torch.tensor([[0, 0]]),
        "example_to": torch.tensor([1]),
        "location_to": torch.tensor([[1, 1]]),
        "patch_size": 3,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        plotting.patch_pairs(**args)


def test_figures_of_a_real_layer_take_milliseconds():
    x, y = digits()[0][:512], digits()[1][:512]
    g = torch.Generator().manual_seed(0)
    pm = _pairmap(
        torch.randint(0, 512, (128,), generator=g).tolist(), torch.randint(0, 512, (128,), generator=g).tolist()
    )
    imp = torch.rand(512, generator=g)
    imp /= imp.sum()
    t0 = time.perf_counter()
    plotting.top_points(x, imp, (8, 8), y=y, index=torch.arange(512) + 1000)
    plotting.top_pairs(x, pm, (8, 8), y=y, neuron_weights=torch.rand(128, generator=g))
    plotting.importance_heatmap([imp] * 20, list(range(0, 2000, 100)), y=y)
    plotting.top_points(x, imp, None, y=y)
    assert time.perf_counter() - t0 < 2.0  # about 0.1 s on two quiet cores


# -- the monitor's figures and charts ------------------------------------------------------------------------


def test_every_chart_of_the_layout_shows_tags_the_analysis_writes(monkeypatch):
    x, y = digits()[0][:120], digits()[1][:120]
    model = MLPModule([64, 12, 8, 10], x, y).net
    config = AnalysisConfig(top_k=8, transport=True, n_candidates=64)
    first = analyse_network(model, x, y, config=config)
    written = set(analyse_network(model, x, y, config=config, previous=first).scalars)
    monitor = PairImportanceMonitor(transport=True)
    monitor._y = y
    layout = monitor._layout(["0", "2"])
    charted = {t for charts in layout.values() for _, (kind, tags) in charts.items() for t in tags}
    assert all(kind == "Margin" for charts in layout.values() for kind, _ in charts.values())
    assert charted <= written, charted - written
    assert {"swim/0/fidelity_random_pairs", "swim/network/fidelity_chance", "swim/2/sinkhorn_divergence"} <= charted
    # only charts of what is logged: no transport, no labels -> no Sinkhorn, no cross-class chart
    plain = PairImportanceMonitor()
    plain._y = None
    tags = {t for charts in plain._layout(["0"]).values() for _, (_, tags) in charts.items() for t in tags}
    assert not any("sinkhorn" in t or "cross_class" in t for t in tags)
    no_fidelity = PairImportanceMonitor(fidelity=False)
    tags = {t for charts in no_fidelity._layout(["0"]).values() for _, (_, tags) in charts.items() for t in tags}
    assert not any("fidelity" in t for t in tags)


def test_monitor_names_points_by_their_dataset_index_and_draws_tabular_data_as_features(tmp_path, monkeypatch):
    # 16 tabular features: no 4x4 pseudo-images; the figures get the probe's dataset indices
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    y = (x[:, 0] > 0).long()
    calls = []
    for name in ("top_points", "top_pairs", "importance_heatmap"):
        original = getattr(plotting, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append((_name, args, kwargs))
            return _original(*args, **kwargs)

        monkeypatch.setattr(plotting, name, spy)
    monitor = PairImportanceMonitor(every_n_epochs=1, probe_size=64, top_k=4, fidelity=False)
    t = trainer(tmp_path, callbacks=[monitor], max_epochs=1, logger=TensorBoardLogger(tmp_path, name="tb", version=0))
    t.fit(MLPModule([16, 8, 2], x, y))
    assert {c[0] for c in calls} == {"top_points", "top_pairs", "importance_heatmap"}
    for name, args, kwargs in calls:
        assert torch.equal(kwargs["index"], monitor._index)  # dataset indices, not probe rows
        if name != "importance_heatmap":
            assert args[2] is None  # drawn as features, not as a 4x4 image
    assert not torch.equal(monitor._index, torch.arange(64))  # drawn from the dataset: real indices


def test_only_a_layer_on_the_data_itself_has_its_pair_difference_called_its_weight_direction(tmp_path, monkeypatch):
    # a deeper layer's weight points along the difference of the pair's *features*: its caption must not
    # call the difference of the two inputs the direction of its weight
    x, y = digits()[0][:160], digits()[1][:160]
    seen = {}
    original = plotting.top_pairs

    def spy(*args, **kwargs):
        seen[kwargs["title"].split(":")[0]] = kwargs["input_layer"]
        return original(*args, **kwargs)

    monkeypatch.setattr(plotting, "top_pairs", spy)
    monitor = PairImportanceMonitor(every_n_epochs=1, probe_size=64, top_k=4, fidelity=False, log_images="end")
    t = trainer(tmp_path, callbacks=[monitor], max_epochs=1, logger=TensorBoardLogger(tmp_path, name="tb", version=0))
    t.fit(MLPModule([64, 12, 8, 10], x, y))
    assert seen == {"net.0": True, "net.2": False}


def test_patch_pairs_of_a_cnn_that_unflattens_flat_examples(tmp_path):
    # flat [N, 64] digits reshaped by the model (nn.Unflatten) before its convolutions: the patch figures
    # view the probe as the convolutions' input (they used to fail at fit end on the flat probe)
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    x, y = digits()[0][:128], digits()[1][:128]
    module = MLPModule([64, 10], x, y)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module.net = torch.nn.Sequential(
            torch.nn.Unflatten(1, (1, 8, 8)),
            torch.nn.Conv2d(1, 4, 3),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(144, 8),
            torch.nn.ReLU(),
            torch.nn.Linear(8, 10),
        )
    monitor = PairImportanceMonitor(
        every_n_epochs=1, probe_size=48, patches=128, top_k=4, fidelity=False, log_images="end", backend="torch"
    )
    t = trainer(tmp_path, callbacks=[monitor], max_epochs=1, logger=TensorBoardLogger(tmp_path, name="tb", version=0))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*figures.*failed.*")
        t.fit(module)
    acc = EventAccumulator(t.log_dir, size_guidance={IMAGES: 0})
    acc.Reload()
    assert {"swim/net.1/top_pairs", "swim/net.1/top_points", "swim/net.4/top_pairs"} <= set(acc.Tags()[IMAGES])

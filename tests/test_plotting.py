"""The figures: images the monitor logs, drawn in the order and colours of the data they show."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure

from lightning_swim import plotting
from lightning_swim.pairmap import PairMap


def _colour_columns(image, rgb):
    """Columns of the image that hold a pixel of exactly this colour."""
    a = np.asarray(image)
    return np.nonzero((a == np.array(rgb, dtype=np.uint8)).all(-1).any(0))[0]


def test_top_points_shows_the_most_important_point_first():
    # four 3x8x8 RGB points: the most important is pure red, the others pure blue
    x = torch.zeros(4, 3, 8, 8)
    x[:, 2] = 1.0
    x[2] = 0.0
    x[2, 0] = 1.0
    importance = torch.tensor([0.2, 0.1, 0.6, 0.1])
    image = plotting.top_points(x.reshape(4, -1), importance, (3, 8, 8), k=4)
    red, blue = _colour_columns(image, (255, 0, 0)), _colour_columns(image, (0, 0, 255))
    assert len(red) and len(blue) and red.max() < blue.min()  # the red tile is the leftmost one
    assert len(blue) == 3 * len(red)  # three blue tiles, as wide as the red one


def test_top_pairs_puts_each_neuron_from_before_to():
    # two neurons, pairs (0 -> 1) and (2 -> 3); points 0 and 2 red, 1 and 3 blue
    x = torch.zeros(4, 3, 8, 8)
    x[[0, 2], 0] = 1.0
    x[[1, 3], 2] = 1.0
    pm = PairMap(
        idx_from=torch.tensor([0, 2]),
        idx_to=torch.tensor([1, 3]),
        scale=torch.ones(2),
        param_cost=torch.zeros(2),
        func_error=torch.zeros(2),
        activation="relu",
    )
    image = plotting.top_pairs(x.reshape(4, -1), pm, (3, 8, 8), neuron_weights=torch.tensor([1.0, 2.0]))
    a = np.asarray(image)
    red_rows = np.nonzero((a == [255, 0, 0]).all(-1).any(1))[0]
    blue_rows = np.nonzero((a == [0, 0, 255]).all(-1).any(1))[0]
    assert np.array_equal(red_rows, blue_rows)  # both pairs on one row of tiles
    row = a[red_rows[len(red_rows) // 2]]
    colour = np.where((row == [255, 0, 0]).all(-1), "from", np.where((row == [0, 0, 255]).all(-1), "to", ""))
    runs = [c for k, c in enumerate(colour) if c and (k == 0 or colour[k - 1] != c)]
    assert runs == ["from", "to", "from", "to"]  # each pair's x_from left of its x_to


def test_heatmap_colours_follow_importance_over_time():
    # one point gains all the importance between two maps: its row goes from dark to bright
    first = torch.tensor([0.5, 0.5, 0.0])
    second = torch.tensor([0.0, 0.0, 1.0])
    image = plotting.importance_heatmap([first, second], [0, 10], top=3)
    assert image.mode == "RGB" and image.width > 300 and image.height > 100
    a = np.asarray(image).astype(int)
    brightest = np.array(plotting.matplotlib.colormaps["magma"](1.0, bytes=True)[:3])
    darkest = np.array(plotting.matplotlib.colormaps["magma"](0.0, bytes=True)[:3])
    ys, xs = np.nonzero((a == brightest).all(-1))
    yd, xd = np.nonzero((a == darkest).all(-1))
    assert len(ys) and len(yd)
    # the bright cell (point 2 at step 10) is right of the dark cell in its row (point 2 at step 0)
    row = ys[0]
    assert xd[yd == row].size and xd[yd == row].max() < xs[ys == row].min()


def test_pair_arrows_is_a_matplotlib_figure_with_one_arrow_per_mapped_neuron():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    pm = PairMap(
        idx_from=torch.tensor([0, 1, -1]),
        idx_to=torch.tensor([1, 2, -1]),
        scale=torch.ones(3),
        param_cost=torch.zeros(3),
        func_error=torch.zeros(3),
        activation="relu",
    )
    fig = plotting.pair_arrows(x, pm)
    assert isinstance(fig, Figure)
    (quiver,) = [c for c in fig.axes[0].collections if type(c).__name__ == "Quiver"]
    assert quiver.N == 2  # the unmapped neuron has no arrow

"""Colour figures: RGB filters, true-colour patches (the training normalisation undone), few channels drawn."""
import numpy as np
import pytest
pytest.importorskip("matplotlib")  # absent on a bare GPU machine: skip, not a collection error
pytest.importorskip("PIL")
from matplotlib.colors import to_rgb
from PIL import Image

from gpucnn import viz
from gpucnn.features import TopPatches


def png(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64) / 255


def rgb_patches(channels, k, crops):
    zeros = np.zeros((channels, k), np.int64)
    return TopPatches(layer="conv1", rf=crops.shape[-2:], input_hw=(32, 32), values=np.ones((channels, k)),
                      image=zeros, oy=zeros, ox=zeros, region=np.zeros((channels, k, 4), np.int64),
                      box=np.zeros((channels, k, 4), np.int64), crops=crops.astype(np.float32))


def count(pixels, colour):
    return int((np.abs(pixels - np.array(to_rgb(colour))) < 0.02).all(axis=-1).sum())


def test_colour_filters_show_the_colour_each_filter_looks_for(tmp_path):
    weight = np.zeros((10, 3, 5, 5), np.float32)
    weight[0, 0] = 1.0          # filter 0 wants red
    weight[1, 2] = 1.0          # filter 1 wants blue
    weight[2] = -1.0            # filter 2 wants dark
    path = viz.colour_filter_grid(weight, tmp_path / "f.png", cell_px=32)
    pixels = png(path)
    assert pixels.shape[:2][::-1] == viz.colour_filter_grid_size(10, cell_px=32) == (60 + 8 * 32 + 10,
                                                                                  60 + 2 * (32 + 16) + 10)
    assert count(pixels, (1.0, 0.5, 0.5)) > 200      # red weights: 0.5 + 0.5 on red, grey elsewhere
    assert count(pixels, (0.5, 0.5, 1.0)) > 200
    assert count(pixels, (0.0, 0.0, 0.0)) > 200      # all -1: black
    assert count(pixels, (0.5, 0.5, 0.5)) > 200      # zero weights: grey
    with pytest.raises(ValueError, match=r"\(OC, 3, KH, KW\)"):
        viz.colour_filter_grid(np.zeros((4, 1, 3, 3)), tmp_path / "g.png")


def test_patches_are_drawn_in_their_own_colours_with_a_checkered_border(tmp_path):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    pixels = np.zeros((2, 3, 3, 6, 6))
    pixels[:, :, 0] = 0.9                             # every crop: an orange-ish colour ...
    pixels[:, :, 1] = 0.4
    pixels[:, :, 2] = 0.1
    crops = (pixels - np.reshape(mean, (1, 1, 3, 1, 1))) / np.reshape(std, (1, 1, 3, 1, 1))   # ... normalised
    crops[:, :, :, :2] = np.nan                      # two rows beyond the image border
    path = viz.patch_figure(rgb_patches(2, 3, crops), tmp_path / "p.png", cell_px=60, pixel_stats=(mean, std))
    drawn = png(path)
    assert count(drawn, (0.9, 0.4, 0.1)) > 2 * 3 * 0.5 * 55 * 55     # the true colour, 4 of 6 rows per tile
    white, grey = (count(drawn, colour) for colour in viz.OUTSIDE_CHECKER)
    assert white > 500 and grey > 500 and count(drawn, viz.OUTSIDE_COLOR) == 0
    # without the statistics the crop's own range is stretched: not the true colour
    stretched = png(viz.patch_figure(rgb_patches(2, 3, crops), tmp_path / "s.png", cell_px=60))
    assert count(stretched, (0.9, 0.4, 0.1)) == 0


def test_max_channels_draws_only_the_first_channels(tmp_path):
    crops = np.random.default_rng(0).standard_normal((20, 2, 3, 4, 4))
    path = viz.patch_figure(rgb_patches(20, 2, crops), tmp_path / "m.png", cell_px=40, max_channels=5)
    assert Image.open(path).size == viz.patch_figure_size(5, 2, cell_px=40)
    with pytest.raises(ValueError, match="max_channels"):
        viz.patch_figure(rgb_patches(20, 2, crops), tmp_path / "n.png", max_channels=0)
    with pytest.raises(ValueError, match="pixel_stats"):
        viz.patch_figure(rgb_patches(20, 2, crops), tmp_path / "n.png", pixel_stats=((0.1, 0.2), (1, 1)))

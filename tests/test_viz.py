"""Figures (pixel sizes by hand, not blank) and the visualize / features commands end to end.

The command tests train a real (tiny) run with the Trainer on synthetic IDX files, then check that
every patch saved by ``visualize`` is exactly the input region that produces its recorded activation.
"""
import json
import sys
from collections import OrderedDict

import numpy as np
import pytest
pytest.importorskip("click")  # absent on a bare GPU machine: skip, not a collection error
pytest.importorskip("matplotlib")
import click
from click.testing import CliRunner
from numpy.testing import assert_allclose

from gpucnn import optim
from gpucnn.checkpoint import load_checkpoint, model_from_checkpoint
from gpucnn.cli.viz import features, visualize
from gpucnn.data import DATASETS, load_dataset, normalize, write_idx
from gpucnn.features import TopPatches, top_patches
from gpucnn.models import LeNet5
from gpucnn.train import Trainer

pytest.importorskip("matplotlib")
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.image import imread  # noqa: E402

from gpucnn import viz  # noqa: E402


def png(path):
    """(height, width) of a PNG and its pixels as floats (H, W, 3) in [0, 1]."""
    pixels = imread(path)
    return pixels.shape[:2], pixels[..., :3]


def assert_not_blank(pixels):
    assert pixels.std() > 0.05


def records(epochs):
    return [{"epoch": e, "train_loss": 1.0 / e, "test_loss": 1.1 / e, "train_acc": 1 - 0.2 / e,
             "test_acc": 1 - 0.25 / e, "lr": 1e-3} for e in range(1, epochs + 1)]


# --- figures ---------------------------------------------------------------------------
def test_filter_grid_size_and_colours(tmp_path):
    weight = np.random.default_rng(0).standard_normal((6, 1, 5, 5)).astype(np.float32)
    path = viz.filter_grid(weight, tmp_path / "filters.png", cell_px=96)
    size, pixels = png(path)
    # width 60 left + 6*96 filters + 80 colour bar; height 60 top + 1*96 + 10 bottom
    assert size == (166, 716) == viz.filter_grid_size(6, 1, 96)[::-1]
    assert_not_blank(pixels)
    reddish = (pixels[..., 0] > 0.6) & (pixels[..., 2] < 0.4)
    bluish = (pixels[..., 2] > 0.6) & (pixels[..., 0] < 0.4)
    assert reddish.sum() > 500 and bluish.sum() > 500            # a diverging map: both signs drawn
    size, _ = png(viz.filter_grid(np.ones((4, 3, 3, 3)), tmp_path / "rgb.png", cell_px=40))
    assert size == (60 + 3 * 40 + 10, 60 + 4 * 40 + 80)


def make_patches(channels, k, rf=(6, 6), c=1, nan_rows=0, seed=0):
    rng = np.random.default_rng(seed)
    crops = rng.uniform(-1, 2, (channels, k, c) + rf).astype(np.float32)
    crops[..., :nan_rows, :] = np.nan
    zeros = np.zeros((channels, k), np.int64)
    return TopPatches(layer="conv1", rf=rf, input_hw=(28, 28), values=rng.standard_normal((channels, k)),
                      image=zeros, oy=zeros, ox=zeros, region=np.zeros((channels, k, 4), np.int64),
                      box=np.zeros((channels, k, 4), np.int64), crops=crops)


def outside_pixels(pixels):
    return (np.abs(pixels - np.array(to_rgb(viz.OUTSIDE_COLOR))) < 0.02).all(axis=-1).sum()


def test_patch_figure_size_content_and_border_colour(tmp_path):
    size, pixels = png(viz.patch_figure(make_patches(6, 4), tmp_path / "p.png", cell_px=80))
    # width 70 labels + 4*80 + 10; height 70 heading + 6*(80 + 16 caption) + 10
    assert size == (656, 400) == viz.patch_figure_size(6, 4, 80)[::-1]
    assert_not_blank(pixels)
    assert outside_pixels(pixels) == 0
    _, with_border = png(viz.patch_figure(make_patches(6, 4, nan_rows=2), tmp_path / "b.png", cell_px=80))
    # two of six rows of each 6x6 patch lie beyond the image: about a third of each ~75x75 tile
    assert outside_pixels(with_border) > 24 * 0.25 * 75 * 75
    size, rgb = png(viz.patch_figure(make_patches(2, 3, c=3, nan_rows=1), tmp_path / "rgb.png", cell_px=40))
    assert size == (70 + 2 * 56 + 10, 70 + 3 * 40 + 10)
    assert_not_blank(rgb)
    with pytest.raises(ValueError, match="not 2 channels"):
        viz.patch_figure(make_patches(2, 3, c=2), tmp_path / "x.png")
    with pytest.raises(TypeError, match="needs a TopPatches"):
        viz.patch_figure({}, tmp_path / "x.png")


def test_training_curves(tmp_path):
    size, pixels = png(viz.training_curves(records(5), tmp_path / "c.png"))
    assert size == viz.CURVES_SIZE[::-1] == (420, 1000)
    assert_not_blank(pixels)
    with pytest.raises(ValueError, match="record 1 lacks test_acc"):
        viz.training_curves([records(1)[0], {"epoch": 2, "train_loss": 1, "test_loss": 1, "train_acc": 1}],
                            tmp_path / "c.png")


def test_read_metrics_sorts_and_keeps_the_last_record_of_an_epoch(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first, second = records(2)
    again = dict(second, test_acc=0.5)
    path.write_text("\n".join(json.dumps(r) for r in (second, first, again)) + "\n\n")
    assert viz.read_metrics(path) == [first, again]
    path.write_text(json.dumps(first) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        viz.read_metrics(path)
    path.write_text(json.dumps({"epoch": 1}) + "\n")
    with pytest.raises(ValueError, match="line 1 lacks train_loss"):
        viz.read_metrics(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        viz.read_metrics(tmp_path / "missing.jsonl")


def test_missing_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(viz.MissingDependencyError, match=r"pip install 'gpucnn\[viz\]'"):
        viz.training_curves(records(2), tmp_path / "c.png")
    result = CliRunner().invoke(click.Group(commands=[visualize]), ["visualize", str(tmp_path / "x.npz")])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: matplotlib is needed for visualize: pip install 'gpucnn[viz]'"


# --- the commands on a real (tiny) run ------------------------------------------------------
def stroke_images(n, seed):
    """uint8 (n, 28, 28) images with a bright bar whose orientation is the label (0-3), some at the border."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n).astype(np.uint8)
    images = rng.integers(0, 30, (n, 28, 28)).astype(np.uint8)
    for image, label in zip(images, labels):
        y, x = rng.integers(0, 20, 2)
        if label == 0:
            image[y, x:x + 9] = 255
        elif label == 1:
            image[y:y + 9, x] = 255
        else:
            for i in range(9):
                image[y + i, x + (i if label == 2 else 8 - i)] = 255
    return images, labels


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(data folder, run folder with checkpoint.npz and metrics.jsonl of a 2-epoch LeNet-5 run)."""
    data = tmp_path_factory.mktemp("data")
    for prefix, n, seed in (("train", 256, 0), ("t10k", 64, 1)):
        images, labels = stroke_images(n, seed)
        write_idx(data / f"{prefix}-images-idx3-ubyte", images)
        write_idx(data / f"{prefix}-labels-idx1-ubyte", labels)
    spec = DATASETS["mnist"]
    splits = [load_dataset("mnist", split, data_dir=data, download=False) for split in ("train", "test")]
    model = LeNet5(seed=0)
    out = tmp_path_factory.mktemp("run")
    trainer = Trainer(model, optim.Adam(list(model.parameters()), lr=3e-3), device="cpu", out_dir=out,
                      config={"dataset": "mnist"})
    trainer.fit(*[(normalize(images, spec.mean, spec.std), labels) for images, labels in splits], epochs=2,
                batch_size=32, progress=False)
    return data, out


def invoke(*args):
    app = click.Group(commands=[visualize, features])
    return CliRunner().invoke(app, [str(a) for a in args])


def test_visualize_writes_legible_figures_and_patches_that_reproduce_their_activations(run, tmp_path):
    data, out = run
    result = invoke("visualize", out / "checkpoint.npz", "--data-dir", data, "--no-download", "-q",
                    "--device", "cpu", "--limit", 40, "--patches", 4, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("device: cpu")
    assert "data: mnist test, 40 images" in result.output
    sizes = {"filters_conv1.png": viz.filter_grid_size(6, 1), "patches_conv1.png": viz.patch_figure_size(6, 4),
             "patches_conv2.png": viz.patch_figure_size(16, 4), "curves.png": viz.CURVES_SIZE,
             "confusion.png": viz.confusion_figure_size(10)}
    assert sizes["patches_conv2.png"] == (70 + 4 * 80 + 10, 70 + 16 * 96 + 10)
    for name, (width, height) in sizes.items():
        assert f"wrote {tmp_path / name}" in result.output
        size, pixels = png(tmp_path / name)
        assert size == (height, width), name
        assert_not_blank(pixels)

    # each saved patch, alone in an otherwise empty image, gives back the recorded activation
    model = model_from_checkpoint(load_checkpoint(out / "checkpoint.npz"))
    spec = DATASETS["mnist"]
    x = normalize(load_dataset("mnist", "test", data_dir=data, download=False)[0][:40], spec.mean, spec.std)
    for layer, channels in (("conv1", 6), ("conv2", 16)):
        patches = TopPatches.load(tmp_path / f"patches_{layer}.npz")
        assert patches.values.shape == (channels, 4) and patches.info["images"] == 40
        upto = model[: list(model._modules).index(layer) + 1]
        for c in range(channels):
            for r in range(4):
                y0, y1, x0, x1 = patches.region[c, r]
                canvas = np.zeros((1, 1, 28, 28), np.float32)
                canvas[0, :, y0:y1, x0:x1] = patches.clipped_crop(c, r)
                np.testing.assert_array_equal(canvas[0, :, y0:y1, x0:x1], x[patches.image[c, r], :, y0:y1, x0:x1])
                value = upto(canvas)[0, c, patches.oy[c, r], patches.ox[c, r]]
                assert_allclose(value, patches.values[c, r], rtol=1e-5, atol=1e-5)
        # and they are the channel's strongest activations in the data set
        expected = top_patches(model, x, k=4, layers=layer)[layer]
        assert_allclose(patches.values, expected.values, rtol=1e-6)


def test_visualize_options_and_errors(run, tmp_path):
    data, out = run
    common = ("--data-dir", data, "--no-download", "-q", "--device", "cpu", "--limit", 12, "--patches", 2)
    result = invoke("visualize", out / "checkpoint.npz", *common, "--layers", "pool1", "--all-positions",
                    "--metrics", tmp_path / "none.jsonl", "--out", tmp_path)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == f"Error: metrics file {tmp_path / 'none.jsonl'} does not exist."
    result = invoke("visualize", out / "checkpoint.npz", *common, "--layers", "pool1,conv2", "--all-positions",
                    "--out", tmp_path / "v")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == [
        "confusion.png", "curves.png", "filters_conv1.png", "patches_conv2.npz", "patches_conv2.png",
        "patches_pool1.npz", "patches_pool1.png"]
    assert not TopPatches.load(tmp_path / "v" / "patches_pool1.npz").info["distinct_images"]
    for bad, message in ((["--layers", "fc1"], "layer fc1 (Linear) has no spatial layout"),
                         (["--patches", 13], "k=13 exceeds the 12 images"),
                         (["--layers", "conv7"], "no layer named 'conv7'")):
        result = invoke("visualize", out / "checkpoint.npz", *common, *bad, "--out", tmp_path / "e")
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and lines[-1].startswith("Error: ") and message in lines[-1], result.output
        assert not any(line.startswith("Traceback") for line in lines)
    result = invoke("visualize", tmp_path / "missing.npz", "--out", tmp_path / "e")
    assert result.exit_code == 1 and "does not exist" in result.output


def test_visualize_without_metrics_still_draws_the_rest(run, tmp_path):
    data, out = run
    lone = tmp_path / "lone.npz"
    lone.write_bytes((out / "checkpoint.npz").read_bytes())
    result = invoke("visualize", lone, "--data-dir", data, "--no-download", "-q", "--device", "cpu",
                    "--limit", 10, "--patches", 1)
    assert result.exit_code == 0, result.output
    assert "no metrics.jsonl beside the checkpoint" in result.output
    assert sorted(p.name for p in (tmp_path / "viz").glob("*.png")) == [
        "confusion.png", "filters_conv1.png", "patches_conv1.png", "patches_conv2.png"]


def test_features_command_saves_activations_and_labels(run, tmp_path):
    data, out = run
    result = invoke("features", out / "checkpoint.npz", "--layer", "flatten", "--data-dir", data, "--no-download",
                    "-q", "--device", "cpu", "--limit", 30, "--batch-size", 8, "--out", tmp_path / "f.npy",
                    "--labels", tmp_path / "y.npy")
    assert result.exit_code == 0, result.output
    saved = np.load(tmp_path / "f.npy")
    assert saved.shape == (30, 400) and saved.dtype == np.float32
    assert np.load(tmp_path / "y.npy").shape == (30,)
    model = model_from_checkpoint(load_checkpoint(out / "checkpoint.npz"))
    spec = DATASETS["mnist"]
    x = normalize(load_dataset("mnist", "test", data_dir=data, download=False)[0][:30], spec.mean, spec.std)
    assert_allclose(saved, model.features(x, "flatten"), rtol=1e-4, atol=1e-5)
    for args, message in ((["--layer", "fc9", "--out", tmp_path / "g.npy"], "no layer named 'fc9'"),
                          (["--layer", "fc1", "--out", tmp_path / "g.txt"], "--out must name a .npy file")):
        result = invoke("features", out / "checkpoint.npz", "--data-dir", data, "--no-download", "-q",
                        "--device", "cpu", "--limit", 3, *args)
        assert result.exit_code == 1 and message in result.output, result.output


def test_commands_plug_into_a_group_by_name():
    group = click.Group(commands=OrderedDict(visualize=visualize, features=features))
    assert isinstance(visualize, click.Command) and isinstance(features, click.Command)
    help_text = CliRunner().invoke(group, ["visualize", "--help"]).output
    for option in ("--dataset", "--split", "--data-dir", "--limit", "--patches", "--layers", "--device", "--metrics",
                   "--out"):
        assert option in help_text

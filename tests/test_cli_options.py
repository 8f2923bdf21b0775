"""The command line's one vocabulary, and colour data end to end: image folders, CIFAR-10, vgg-small."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
pytest.importorskip("click")  # absent on a bare GPU machine: skip, not a collection error
pytest.importorskip("PIL")
import click
from PIL import Image

from gpucnn import viz
from gpucnn.checkpoint import load_checkpoint
from gpucnn.cli import cli
from gpucnn.cli.options import RenamedOption, meaning
from gpucnn.data import cifar
from tests.helpers import clean_env, run_cli_together
from tests.colour_data import CLASSES, colour_shape_images, write_cifar_dir, write_image_folder

ROOT = Path(__file__).resolve().parents[1]
READS_DATA = ("train", "evaluate", "visualize", "features")


# ---- one name, one meaning ------------------------------------------------------------------------

def vocabulary_conflicts(group: click.Group) -> list[str]:
    """Every option name used with two meanings, and every meaning (or dest) reached by two names."""
    uses, names_of_meaning, names_of_dest = {}, {}, {}
    for command_name, command in group.commands.items():
        for param in command.params:
            if not isinstance(param, click.Option) or isinstance(param, RenamedOption):
                continue
            name = max(param.opts, key=len)
            sense = (param.name, meaning(param), type(param.type).__name__, param.is_flag)
            uses.setdefault(name, {}).setdefault(sense, []).append(command_name)
            names_of_meaning.setdefault(meaning(param), set()).add(name)
            names_of_dest.setdefault(param.name, set()).add(name)
    problems = [f"{name} means {len(senses)} things: {senses}" for name, senses in uses.items() if len(senses) > 1]
    problems += [f"{sorted(names)} all mean {text!r}" for text, names in names_of_meaning.items() if len(names) > 1]
    problems += [f"{sorted(names)} all fill {dest!r}" for dest, names in names_of_dest.items() if len(names) > 1]
    return problems


def test_every_option_name_has_one_meaning_across_commands():
    assert vocabulary_conflicts(cli) == []


def test_the_vocabulary_check_catches_a_name_with_two_meanings():
    @click.command()
    @click.option("--top-k", type=int, help="Classes printed per image.")
    def first(top_k):
        pass

    @click.command()
    @click.option("--top-k", type=int, help="Patches per channel.")
    @click.option("--data", "dataset", help="The data set to read.")
    @click.option("--dataset", help="The data set to read.")
    def second(top_k, dataset):
        pass
    problems = vocabulary_conflicts(click.Group(commands={"first": first, "second": second}))
    assert any(p.startswith("--top-k means 2 things") for p in problems)
    assert any("'--data', '--dataset'" in p and "all mean 'The data set to read'" in p for p in problems)


def test_every_command_that_reads_data_takes_dataset_and_data_dir():
    for name in READS_DATA:
        options = {opt for param in cli.commands[name].params for opt in param.opts}
        assert {"--dataset", "--data-dir", "--skip-bad-images"} <= options, name
    dataset_choices = {tuple(p.type.choices) for name in READS_DATA for p in cli.commands[name].params
                       if p.name == "dataset"}
    assert dataset_choices == {("mnist", "fashion-mnist", "cifar10", "folder")}


# ---- the commands, through real subprocesses ------------------------------------------------------

def gpucnn(cache, *args, check=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUCNN_")}
    env["GPUCNN_CACHE_DIR"] = str(cache)
    result = subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def assert_one_line_error(result, code, fragment):
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], result.stderr


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("colour")
    write_image_folder(root / "photos", per_class_train=20, per_class_test=8, size=36)
    write_cifar_dir(root / "cifar" / cifar.BATCHES_DIR, train_per_batch=8, test=16)
    return root


@pytest.fixture(scope="module")
def folder_run(places):
    out = places / "run-folder"
    result = gpucnn(places / "cache", "train", "--dataset", "folder", "--data-dir", places / "photos", "--device",
                    "cpu", "--epochs", 4, "--batch-size", 16, "--lr", 3e-3, "--out", out)
    return out, result


@pytest.fixture(scope="module")
def cifar_run(places):
    out = places / "run-cifar"
    result = gpucnn(places / "cache", "train", "--dataset", "cifar10", "--model", "vgg-small", "--data-dir",
                    places / "cifar", "--no-download", "--device", "cpu", "--epochs", 1, "--batch-size", 20,
                    "--out", out)
    return out, result


def test_train_on_an_image_folder_stores_classes_and_normalisation(folder_run, places):
    out, result = folder_run
    assert "data: folder, 80 training and 32 test images of 3x28x28, 4 classes" in result.stdout
    config = load_checkpoint(out / "checkpoint.npz")["config"]
    assert config["classes"] == sorted(CLASSES) and config["dataset"] == "folder"
    assert config["image"] == {"size": 28, "grey": False, "shape": [3, 28, 28],
                               "folder": str((places / "photos").resolve())}
    assert config["model"]["in_channels"] == 3 and config["model"]["input_size"] == 28
    mean, std = config["normalization"]["mean"], config["normalization"]["std"]
    assert len(mean) == len(std) == 3 and mean[0] > mean[1]          # more red than green in the pictures
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["test_acc"] >= 0.75, metrics                  # colour + shape, 80 images, 4 epochs

    folder = ("train", "--dataset", "folder", "--data-dir", places / "photos", "--device", "cpu", "--epochs", 1)
    again, grey = run_cli_together((*folder, "--out", places / "run-folder-again", "--image-size", 28, "-q"),
                                   (*folder, "--out", places / "run-grey", "--grey", "--image-size", 20),
                                   env=clean_env(places / "cache"))
    assert again.returncode == 0, again.stderr
    assert grey.returncode == 0, grey.stderr
    assert "images of 1x20x20" in grey.stdout
    cached = gpucnn(places / "cache", "train", "--dataset", "folder", "--data-dir", places / "photos", "--device",
                    "cpu", "--epochs", 1, "--out", places / "run-grey-2", "--grey", "--image-size", 20)
    assert "(decoded earlier, read from the cache)" in cached.stdout


def test_evaluate_uses_the_stored_normalisation(folder_run, places):
    out, _ = folder_run
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    result = gpucnn(places / "cache", "evaluate", out / "checkpoint.npz", "--data-dir", places / "photos",
                    "--device", "cpu")
    assert f"accuracy {last['test_acc']:.2%}" in result.stdout and "32 images" in result.stdout


def test_a_folder_checkpoint_remembers_its_folder_until_it_is_gone(places, tmp_path):
    photos = tmp_path / "photos"
    write_image_folder(photos, per_class_train=6, per_class_test=3, size=28)
    run = tmp_path / "run"
    gpucnn(tmp_path / "cache", "train", "--dataset", "folder", "--data-dir", photos, "--device", "cpu", "--epochs", 1,
           "--batch-size", 8, "--out", run, "-q")
    checkpoint = run / "checkpoint.npz"
    evaluated, features, resumed = run_cli_together(
        ("evaluate", checkpoint, "--device", "cpu"),
        ("features", checkpoint, "--layer", "flatten", "--out", tmp_path / "f.npy", "-q"),
        ("train", "--resume", checkpoint, "--epochs", 2, "-q"), env=clean_env(tmp_path / "cache"))
    for result in (evaluated, features, resumed):
        assert result.returncode == 0, result.stderr
    assert "folder test: loss" in evaluated.stdout and "12 images" in evaluated.stdout
    assert evaluated.stderr.strip() == f"images from {photos}, the checkpoint's folder"
    assert f"data: folder test, 12 images (images from {photos}, the checkpoint's folder)" in features.stdout
    assert np.load(tmp_path / "f.npy").shape == (12, 400)
    assert load_checkpoint(checkpoint)["epoch"] == 2
    photos.rename(tmp_path / "moved")
    gone, told = run_cli_together(("evaluate", checkpoint, "--device", "cpu"),
                                  ("evaluate", checkpoint, "--device", "cpu", "--data-dir", tmp_path / "moved"),
                                  env=clean_env(tmp_path / "cache"))
    assert_one_line_error(gone, 1, f"the image folder {photos} that the checkpoint was trained on is gone; "
                                   "pass --data-dir DIR.")
    assert told.returncode == 0 and "12 images" in told.stdout, told.stderr


def test_predict_names_the_folder_classes_for_png_jpeg_npy(folder_run, places, tmp_path):
    out, _ = folder_run
    images, labels = colour_shape_images(2, seed=9, size=28)
    Image.fromarray(images[0].transpose(1, 2, 0)).save(tmp_path / "a.png")
    Image.fromarray(images[0].transpose(1, 2, 0)).resize((56, 70)).save(tmp_path / "big.jpg")
    np.save(tmp_path / "a.npy", images[0])                     # (3, 28, 28) uint8
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result, text_file, broken = run_cli_together(
        ("predict", out / "checkpoint.npz", tmp_path / "a.png", tmp_path / "big.jpg", tmp_path / "a.npy",
         "--top-k", 2, "--device", "cpu"),
        ("predict", out / "checkpoint.npz", tmp_path / "x.txt"),
        ("predict", out / "checkpoint.npz", tmp_path / "broken.png"), env=clean_env(places / "cache"))
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines()[1:])
    assert lines[str(tmp_path / "a.png")] == lines[str(tmp_path / "a.npy")]   # PNG is lossless
    for text in lines.values():
        first, second = text.split(", ")
        assert first.split()[1].strip("'") in CLASSES and second.split()[1].strip("'") in CLASSES
    assert_one_line_error(text_file, 1, "predict reads PNG/JPEG")
    assert_one_line_error(broken, 1, f"cannot read image {tmp_path / 'broken.png'}")


def test_train_cifar10_vgg_small_and_predict_cifar_class_names(cifar_run, places, tmp_path):
    out, result = cifar_run
    assert "data: cifar10, 40 training and 16 test images of 3x32x32, 10 classes" in result.stdout
    assert "run: vgg-small" in result.stdout and "done: epoch 1" in result.stdout
    config = load_checkpoint(out / "checkpoint.npz")["config"]
    assert config["model"]["name"] == "vgg-small" and config["classes"] == list(cifar.CLASSES)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    line = gpucnn(places / "cache", "predict", out / "checkpoint.npz", tmp_path / "p.png").stdout.splitlines()[1]
    assert line.split(": ")[1].split()[1].strip("'") in cifar.CLASSES


def test_visualize_and_features_on_a_colour_checkpoint(folder_run, places, tmp_path):
    out, _ = folder_run
    result, features = run_cli_together(
        ("visualize", out / "checkpoint.npz", "--dataset", "folder", "--data-dir", places / "photos", "--patches", 3,
         "--out", tmp_path / "viz", "-q", "--device", "cpu"),
        ("features", out / "checkpoint.npz", "--dataset", "folder", "--data-dir", places / "photos", "--layer",
         "flatten", "--out", tmp_path / "f.npy", "-q"), env=clean_env(places / "cache"))
    assert result.returncode == 0, result.stderr
    assert features.returncode == 0, features.stderr
    assert "data: folder test, 32 images" in result.stdout
    names = sorted(p.name for p in (tmp_path / "viz").iterdir())
    assert names == ["confusion.png", "curves.png", "filters_conv1.png", "patches_conv1.npz", "patches_conv1.png",
                     "patches_conv2.npz", "patches_conv2.png"]
    filters = np.asarray(Image.open(tmp_path / "viz" / "filters_conv1.png").convert("RGB"))
    assert filters.shape[:2][::-1] == viz.colour_filter_grid_size(6)
    patches = np.asarray(Image.open(tmp_path / "viz" / "patches_conv1.png").convert("RGB")).astype(int)
    assert patches.shape[:2][::-1] == viz.patch_figure_size(6, 3)
    # true colours: the strongly red or blue pixels of the shapes are there (a grey drawing has R = G = B)
    assert (np.abs(patches[..., 0] - patches[..., 2]) > 100).sum() > 100

    assert np.load(tmp_path / "f.npy").shape == (32, 400), features.stdout


def test_visualize_vgg_small_draws_every_stage_with_few_channels(cifar_run, places, tmp_path):
    out, _ = cifar_run
    gpucnn(places / "cache", "visualize", out / "checkpoint.npz", "--data-dir", places / "cifar", "--no-download",
           "--patches", 2, "--max-channels", 4, "--out", tmp_path, "-q", "--device", "cpu")
    for layer in ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2"):
        image = Image.open(tmp_path / f"patches_{layer}.png")
        assert image.size == viz.patch_figure_size(4, 2), layer
    assert np.load(tmp_path / "patches_conv3_2.npz")["values"].shape == (256, 2)   # every channel kept
    assert Image.open(tmp_path / "filters_conv1_1.png").size == viz.colour_filter_grid_size(64)


def test_summary_for_any_model_and_input_shape(places):
    vgg, lenet, short_shape, not_a_multiple = run_cli_together(
        ("summary", "--model", "vgg-small", "--input-shape", "3,32,32"),
        ("summary", "--model", "lenet5", "--input-shape", "3,32,32"),
        ("summary", "--input-shape", "3,32"),
        ("summary", "--model", "vgg-small", "--input-shape", "3,28,28"), env=clean_env(places / "cache"))
    assert vgg.returncode == 0 and lenet.returncode == 0, (vgg.stderr, lenet.stderr)
    out, lenet = vgg.stdout, lenet.stdout
    assert "vgg-small for input (3, 32, 32)" in out and "total parameters: 2,196,810" in out
    assert "after 150 stacked 3x3 stride-1 layers" in out and "after 26 3x3 layers with this model's strides" in out
    row = next(line.split() for line in out.splitlines() if line.startswith("conv3_2"))
    assert row[-3:] == ["590,080", "32", "4"]
    conv1 = next(line.split() for line in lenet.splitlines() if line.startswith("conv1"))
    assert conv1[-3:] == ["456", "5", "1"] and "(6, 28, 28)" in lenet     # (5*5*3+1)*6; no padding at 32x32
    assert "after 40 3x3 layers" in lenet
    assert_one_line_error(short_shape, 2, "C,H,W")
    assert_one_line_error(not_a_multiple, 1, "multiple of 8")


def test_clear_errors_for_renamed_and_misplaced_options(folder_run, places):
    out, _ = folder_run
    checkpoint = out / "checkpoint.npz"
    cache = places / "cache"
    results = iter(run_cli_together(
        ("visualize", checkpoint, "--data", "mnist"),
        ("features", checkpoint, "--layer", "fc1", "--out", "x.npy", "--data", "mnist"),
        ("visualize", checkpoint, "--top-k", "3"),
        ("train", "--dataset", "folder", "--device", "cpu", "--out", places / "nowhere"),
        ("train", "--dataset", "mnist", "--image-size", 32, "--device", "cpu", "--out", places / "nowhere2"),
        ("evaluate", checkpoint, "--dataset", "mnist", "--device", "cpu"), env=clean_env(cache)))
    assert_one_line_error(next(results), 2, "--data was renamed --dataset")
    assert_one_line_error(next(results), 2, "--data was renamed --dataset")
    assert_one_line_error(next(results), 2, "--top-k was renamed --patches")
    assert_one_line_error(next(results), 1, "--dataset folder needs --data-dir")
    assert_one_line_error(next(results), 1, "apply to --dataset folder only")
    assert_one_line_error(next(results), 1, "takes 3x28x28 images, but mnist images are 1x28x28")


def test_data_settings_round_trip_and_old_checkpoints():
    from gpucnn.cli.data import DataSettings
    from gpucnn.data import DATASETS
    settings = DataSettings("folder", ("a", "b"), (0.4, 0.5, 0.6), (0.2, 0.2, 0.3), (3, 24, 24), 24, False)
    config = {**settings.record(), "model": {"name": "lenet5", "in_channels": 3, "input_size": 24}}
    assert DataSettings.from_config(json.loads(json.dumps(config))) == settings
    old = DataSettings.from_config({"dataset": "fashion-mnist", "model": {"name": "lenet5"}})
    spec = DATASETS["fashion-mnist"]
    assert (old.mean, old.std, old.input_shape, old.classes) == ((spec.mean,), (spec.std,), (1, 28, 28), spec.classes)
    with pytest.raises(ValueError, match="class names"):
        DataSettings.from_config({"dataset": "folder", "normalization": {"mean": [0.5], "std": [0.2]}})
    with pytest.raises(ValueError, match="pass --dataset"):
        DataSettings.from_config({})

"""Bad input and faults: every row of docs/faults.md produced for real, and what the user sees.

Real means: real files truncated on disk, a real local HTTP server that stalls, real training
processes killed with SIGKILL or interrupted with SIGINT, real CLI invocations.
"""
from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gpucnn import backend, nn, ops, optim
from gpucnn import checkpoint as checkpoint_module
from gpucnn.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from gpucnn.cli import cli
from gpucnn.cuda import conv as cuda_conv
from gpucnn.cuda import linear as cuda_linear
from gpucnn.cuda import loss as cuda_loss
from gpucnn.cuda import pool as cuda_pool
from gpucnn.data import DATASETS, DataError, DatasetSpec, FileSpec, datasets, load_dataset, read_idx, write_idx
from gpucnn.data.datasets import download_dataset
from gpucnn.models import LeNet5, build_model
from gpucnn.train import BEST_FILE, CHECKPOINT_FILE, METRICS_FILE, Trainer, TrainingError
from tests.kernel_cases import NoLaunchRuntime

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 30       # per CLI run below; an epoch takes about 80 ms on the tiny data set
BATCH = 8
PREFIXES = {"train": ("train", 96), "test": ("t10k", 32)}
FILENAMES = {
    "train-images": "train-images-idx3-ubyte.gz",
    "train-labels": "train-labels-idx1-ubyte.gz",
    "test-images": "t10k-images-idx3-ubyte.gz",
    "test-labels": "t10k-labels-idx1-ubyte.gz",
}


# ---------------------------------------------------------------------------------------
# helpers


def clean_env(tmp_cache: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUCNN_")}
    env["GPUCNN_CACHE_DIR"] = str(tmp_cache or "/nonexistent-gpucnn-cache")  # never touch a real cache
    return env


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_cli(*args):
    return subprocess.Popen([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_one_line_error(code, stderr, fragment, expected_code=1):
    """The CLI's promise: a non-zero exit, no traceback, one 'Error: ...' line naming the problem."""
    assert code == expected_code, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: ") and fragment in lines[0], lines[0]


def wait_until(predicate, timeout=60.0, interval=0.002) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def assert_same_tree(a, b, where="checkpoint"):
    """Nested dicts/lists of arrays and values are equal, arrays bit for bit."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}/{i}")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert np.asarray(a).dtype == np.asarray(b).dtype, where
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), where
    else:
        assert a == b, where


DETERMINISTIC_METRICS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr")


def metrics_of(out: Path) -> list[dict]:
    return [{k: json.loads(line)[k] for k in DETERMINISTIC_METRICS}
            for line in (out / METRICS_FILE).read_text().splitlines()]


def assert_same_run(out: Path, reference: Path):
    """A resumed run ends exactly where the uninterrupted one did: weights, optimizer, best, metrics."""
    got, want = load_checkpoint(out / CHECKPOINT_FILE), load_checkpoint(reference / CHECKPOINT_FILE)
    assert got["epoch"] == want["epoch"] == EPOCHS
    for part in ("model", "optimizer", "scheduler", "rng"):
        assert_same_tree(got[part], want[part], part)
    assert_same_tree(load_checkpoint(out / BEST_FILE)["model"], load_checkpoint(reference / BEST_FILE)["model"])
    assert metrics_of(out) == metrics_of(reference)


def write_split_files(folder: Path, split: str, seed: int, n: int | None = None, gz=False):
    prefix, count = PREFIXES[split]
    n = count if n is None else n
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    images = write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}",
                       rng.integers(0, 256, (n, 28, 28)).astype(np.uint8))
    labels = write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n).astype(np.uint8))
    return images, labels


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny MNIST-layout data set (random pixels and labels) in <root>/mnist/."""
    root = tmp_path_factory.mktemp("faults-data")
    (root / "mnist").mkdir()
    write_split_files(root / "mnist", "train", seed=0)
    write_split_files(root / "mnist", "test", seed=1)
    return root


def train_args(data_dir, out, *extra):
    return ("train", "--device", "cpu", "--data-dir", data_dir, "--no-download", "--epochs", EPOCHS,
            "--batch-size", BATCH, "--out", out, "--quiet", *extra)


def resume_args(data_dir, out):
    return ("train", "--resume", out / CHECKPOINT_FILE, "--epochs", EPOCHS, "--data-dir", data_dir,
            "--no-download", "--device", "cpu", "--quiet")


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """The uninterrupted CLI run every interrupted one must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("faults-reference") / "run"
    result = run_cli(*train_args(data_dir, out))
    assert result.returncode == 0, result.stderr
    return out


# ---------------------------------------------------------------------------------------
# Public API: layers and ops


def test_wrong_ndim_names_the_layer_and_the_shape():
    with pytest.raises(ValueError, match=r"Conv2d\(1, 6, kernel_size=\(5, 5\).*expected a 4-D input, got shape "
                                         r"\(1, 28, 28\)"):
        nn.Conv2d(1, 6, 5)(np.zeros((1, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"Linear\(in_features=4.*expected a 2-D input, got shape \(2, 1, 2, 2\)"):
        nn.Linear(4, 3)(np.zeros((2, 1, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"MaxPool2d\(kernel_size=\(2, 2\).*expected a 4-D input, got shape \(8, 8\)"):
        nn.MaxPool2d(2)(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match=r"LeNet5 expects input of shape \(N, 1, 28, 28\), got \(2, 1, 32, 32\)"):
        LeNet5()(np.zeros((2, 1, 32, 32), np.float32))


def test_float64_and_integer_inputs_are_refused_not_converted():
    conv = nn.Conv2d(1, 2, 3)
    with pytest.raises(TypeError, match=r"Conv2d\(1, 2.*expected float32 input \(like its parameters\), got "
                                        r"float64; convert the input with x.astype\(float32\)"):
        conv(np.zeros((1, 1, 5, 5), np.float64))
    with pytest.raises(TypeError, match=r"Conv2d\(1, 2.*expected float32 input.*got int64"):
        conv(np.zeros((1, 1, 5, 5), np.int64))
    with pytest.raises(TypeError, match=r"ReLU\(\) expected float32 or float64 input, got uint8"):
        nn.ReLU()(np.zeros((2, 3), np.uint8))
    with pytest.raises(TypeError, match="x must be a float32 or float64 array, not int32"):
        ops.conv2d_forward(np.zeros((1, 1, 5, 5), np.int32), np.zeros((1, 1, 3, 3), np.float32), None)
    with pytest.raises(TypeError, match="weight has dtype float64 but x has float32; they must match"):
        ops.conv2d_forward(np.zeros((1, 1, 5, 5), np.float32), np.zeros((1, 1, 3, 3), np.float64), None)
    # double() is the documented way to run float64 (gradient checks): then float64 input is right.
    assert nn.Conv2d(1, 2, 3).double()(np.zeros((1, 1, 5, 5), np.float64)).dtype == np.float64


def test_wrong_channel_count_names_the_layer_and_both_shapes():
    with pytest.raises(ValueError, match=r"Conv2d\(3, 8.*expected input with 3 channels, got shape \(2, 1, 8, 8\)"):
        nn.Conv2d(3, 8, 3)(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"Linear\(in_features=400.*expected input with 400 features, got shape "
                                         r"\(2, 256\)"):
        nn.Linear(400, 120)(np.zeros((2, 256), np.float32))
    with pytest.raises(ValueError, match=r"weight expects 3 input channels \(shape \(8, 3, 3, 3\)\) but x has 1 "
                                         r"\(shape \(2, 1, 8, 8\)\)"):
        ops.conv2d_forward(np.zeros((2, 1, 8, 8), np.float32), np.zeros((8, 3, 3, 3), np.float32), None)


def test_kernel_larger_than_the_padded_input():
    with pytest.raises(ValueError, match=r"Conv2d\(1, 1, kernel_size=\(5, 5\).*got input of shape \(1, 1, 3, 3\), "
                                         r"too small for its kernel \(output would be -1x-1\)"):
        nn.Conv2d(1, 1, 5)(np.zeros((1, 1, 3, 3), np.float32))
    assert nn.Conv2d(1, 1, 5, padding=1)(np.zeros((1, 1, 3, 3), np.float32)).shape == (1, 1, 1, 1)  # fits exactly
    with pytest.raises(ValueError, match=r"MaxPool2d.*got input of shape \(1, 1, 3, 3\), too small for its window"):
        nn.MaxPool2d(4)(np.zeros((1, 1, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"the \(dilated\) kernel 5x5 is larger than the padded input 3x3"):
        ops.conv2d_forward(np.zeros((1, 1, 3, 3), np.float32), np.zeros((1, 1, 3, 3), np.float32), None,
                           dilation=2)
    with pytest.raises(ValueError, match=r"the pooling kernel 4x4 is larger than the padded input 3x3"):
        ops.avg_pool2d_forward(np.zeros((1, 1, 3, 3), np.float32), 4)


@pytest.mark.parametrize("make, message", [
    (lambda: nn.Conv2d(0, 6, 5), "in_channels must be at least 1, (got|not) 0"),
    (lambda: nn.Conv2d(1, -6, 5), "out_channels must be at least 1, (got|not) -6"),
    (lambda: nn.Conv2d(1, 6, (5, 0)), r"kernel_size must be at least 1 in both dimensions, got \(5, 0\)"),
    (lambda: nn.Conv2d(1, 6, 5, stride=0), r"stride must be at least 1 in both dimensions, got \(0, 0\)"),
    (lambda: nn.Conv2d(1, 6, 5, padding=-1), r"padding must be at least 0 in both dimensions, got \(-1, -1\)"),
    (lambda: nn.Linear(5, 0), "out_features must be at least 1, (got|not) 0"),
    (lambda: nn.MaxPool2d(0), r"kernel_size must be at least 1 in both dimensions, got \(0, 0\)"),
    (lambda: nn.AvgPool2d(2, padding=2), r"AvgPool2d padding \(2, 2\) must be at most half of kernel_size"),
    (lambda: LeNet5(num_classes=1), "num_classes must be an int of at least 2, got 1"),
], ids=["in-0", "out-neg", "kernel-0", "stride-0", "padding-neg", "linear-0", "pool-0", "pool-padding", "classes-1"])
def test_zero_and_negative_sizes_are_refused_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_empty_batch_names_the_layer():
    with pytest.raises(ValueError, match=r"Conv2d\(1, 6.*got an empty input of shape \(0, 1, 28, 28\)"):
        LeNet5()(np.zeros((0, 1, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"Flatten\(\) got an empty input of shape \(4, 0, 2\)"):
        nn.Flatten()(np.zeros((4, 0, 2), np.float32))
    with pytest.raises(ValueError, match=r"x has a zero-length dimension \(shape \(2, 1, 0, 5\)\)"):
        ops.max_pool2d_forward(np.zeros((2, 1, 0, 5), np.float32), 2)


def test_nan_and_inf_policy_layers_propagate_the_trainer_refuses_bad_data():
    # Layers do not scan their input (a full pass, and a GPU sync, per layer): NaN propagates ...
    x = np.zeros((1, 1, 28, 28), np.float32)
    x[0, 0, 14, 14] = np.nan
    assert np.isnan(LeNet5(seed=0)(x)).all()
    # ... and the trainer checks its data once, before the first step, naming where the bad image is.
    rng = np.random.default_rng(0)
    images = rng.standard_normal((20, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, 20)
    bad = images.copy()
    bad[7, 0, 3, 3] = np.inf
    bad[12, 0, 0, 0] = np.nan
    model = LeNet5(seed=0)
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.01), device="cpu")
    before = model.state_dict()
    with pytest.raises(ValueError, match=r"train_data images hold NaN or infinite values \(2 of 20 images, "
                                         r"the first at index 7\)"):
        trainer.fit((bad, labels), (images, labels), epochs=1, batch_size=5, progress=False)
    with pytest.raises(ValueError, match=r"test_data images hold NaN or infinite values \(2 of 20 images"):
        trainer.fit((images, labels), (bad, labels), epochs=1, batch_size=5, progress=False)
    with pytest.raises(ValueError, match="data images hold NaN or infinite values"):
        trainer.evaluate((bad, labels))
    assert_same_tree(model.state_dict(), before, "untouched weights")


@pytest.fixture
def fake_gpu(monkeypatch):
    """Arrays that gpucnn.backend takes for CuPy arrays (a NumPy subclass), so device checks run without a GPU."""
    class FakeGpuArray(np.ndarray):
        pass

    monkeypatch.setattr(backend, "_cupy", types.SimpleNamespace(ndarray=FakeGpuArray))
    return lambda array: np.ascontiguousarray(array).view(FakeGpuArray)


def test_input_on_the_wrong_device_names_the_layer_and_shape(fake_gpu):
    x = fake_gpu(np.zeros((2, 1, 28, 28), np.float32))
    assert backend.device_of(x) == "gpu"
    with pytest.raises(ValueError, match=r"input is on gpu but Conv2d's parameters are on cpu \(Conv2d\(1, 6.*input "
                                         r"shape \(2, 1, 28, 28\)\); call model.to\('gpu'\)"):
        LeNet5()(x)
    with pytest.raises(ValueError, match=r"input is on gpu but Linear's parameters are on cpu"):
        nn.Linear(3, 2)(fake_gpu(np.zeros((4, 3), np.float32)))
    with pytest.raises(ValueError, match=r"weight and x must be on the same device \(cpu vs gpu\)"):
        ops.conv2d_forward(x, np.zeros((6, 1, 5, 5), np.float32), None)


@pytest.mark.gpu
def test_input_on_the_wrong_device_with_a_real_gpu():
    cp = backend.cupy_module()
    with pytest.raises(ValueError, match=r"input is on gpu but Conv2d's parameters are on cpu"):
        LeNet5()(cp.zeros((2, 1, 28, 28), dtype=cp.float32))
    model = LeNet5().to("gpu")
    with pytest.raises(ValueError, match=r"input is on cpu but Conv2d's parameters are on gpu"):
        model(np.zeros((2, 1, 28, 28), np.float32))


def f32(*shape):
    return np.zeros(shape, np.float32)


@pytest.mark.parametrize("call, error, message", [
    (lambda rt: cuda_conv.conv2d_forward(np.zeros((1, 1, 5, 5)), f32(1, 1, 3, 3), None, runtime=rt),
     TypeError, "x must have dtype float32, not float64"),
    (lambda rt: cuda_conv.conv2d_forward(f32(1, 5, 5), f32(1, 1, 3, 3), None, runtime=rt),
     ValueError, r"x must have 4 dimensions, not 3 \(shape \(1, 5, 5\)\)"),
    (lambda rt: cuda_conv.conv2d_forward(f32(1, 2, 5, 5), f32(4, 3, 3, 3), None, runtime=rt),
     ValueError, "weight expects 3 input channels"),
    (lambda rt: cuda_conv.conv2d_forward(f32(1, 1, 2, 2), f32(1, 1, 3, 3), None, runtime=rt),
     ValueError, "larger than the padded input"),
    (lambda rt: cuda_conv.conv2d_backward(f32(1, 1, 2, 2), f32(1, 1, 5, 5), f32(1, 1, 3, 3), runtime=rt),
     ValueError, r"grad_y must have shape \(1, 1, 3, 3\) for these inputs, not \(1, 1, 2, 2\)"),
    # y would hold 2**32 elements: flat indices overflow int32 (x and weight are tiny)
    (lambda rt: cuda_conv.conv2d_forward(f32(1, 1, 1, 2**16), f32(2**16, 1, 1, 1), None, runtime=rt),
     ValueError, "y would hold 4294967296 elements, more than the 2147482623"),
    # oy*SH reaches 2**31 (padding and stride 2**30): coordinates overflow int32 although every count is small
    (lambda rt: cuda_conv.conv2d_forward(f32(1, 1, 4, 4), f32(1, 1, 1, 1), None, stride=2**30, padding=2**30,
                                         runtime=rt),
     ValueError, r"H \+ 2\*PH \+ SH, is 3221225476, more than the 2147482623"),
    (lambda rt: cuda_conv.conv2d_backward(f32(1, 1, 4, 4), f32(1, 1, 4, 4), f32(1, 1, 1, 1), dilation=2**40,
                                          runtime=rt),
     ValueError, "the dilation is 1099511627776"),
    # the backward's first window (ty + SH - 1) overflows: the kernel read grad_y[-1] (wrong gradient)
    (lambda rt: cuda_pool.max_pool2d_backward(f32(1, 1, 1, 1), np.zeros((1, 1, 1, 1), np.int32), (1, 1, 4, 4), 2,
                                              stride=2**31 - 1, runtime=rt),
     ValueError, r"H \+ 2\*PH \+ SH, is 2147483651"),
    (lambda rt: cuda_pool.avg_pool2d_forward(f32(1, 1, 4, 4), 2, stride=2**31 - 1, runtime=rt),
     ValueError, "more than the 2147482623"),
    (lambda rt: cuda_pool.max_pool2d_backward(f32(1, 1, 2, 2), np.zeros((1, 1, 2, 2), np.int64), (1, 1, 4, 4), 2,
                                              runtime=rt),
     TypeError, "argmax must have dtype int32, not int64"),
    (lambda rt: cuda_linear.linear_forward(f32(2, 3), f32(4, 5), None, runtime=rt),
     ValueError, r"weight expects 5 input features \(shape \(4, 5\)\) but x has 3"),
    (lambda rt: cuda_loss.softmax_cross_entropy(f32(2, 3), np.array([0.0, 1.0]), runtime=rt),
     TypeError, "labels must be an integer array, not float64"),
    (lambda rt: cuda_loss.softmax_cross_entropy(f32(2, 3), np.array([0, 3]), runtime=rt),
     ValueError, r"labels must lie in \[0, 3\), but range over \[0, 3\]"),
], ids=["dtype", "ndim", "channels", "kernel-too-big", "grad-shape", "count-over-int32", "coordinates-over-int32",
        "dilation-over-int32", "pool-backward-over-int32", "pool-stride-over-int32", "argmax-dtype", "linear-features",
        "label-dtype", "label-range"])
def test_cuda_path_refuses_before_any_kernel_is_launched(call, error, message):
    runtime = NoLaunchRuntime()
    with pytest.raises(error, match=message):
        call(runtime)
    assert runtime.launched == []


# ---------------------------------------------------------------------------------------
# Data


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A registered data set 'tiny' (MNIST layout) with its source files, and isolated search places."""
    monkeypatch.setenv(datasets.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(datasets.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(datasets, "SYSTEM_DATA_ROOT", tmp_path / "system")
    source = tmp_path / "source"
    source.mkdir()
    # 200 test images: more than one 64 KiB read, so a stalled download has written bytes to its .part
    for split, seed in (("train", 0), ("test", 1)):
        write_split_files(source, split, seed, n=12 if split == "train" else 200, gz=True)
    files = {key: (source / name).read_bytes() for key, name in FILENAMES.items()}
    spec = DatasetSpec(name="tiny", files={k: FileSpec(FILENAMES[k], hashlib.md5(v).hexdigest())
                                           for k, v in files.items()},
                       mirrors=("http://127.0.0.1:9/",), mean=0.5, std=0.25, classes=tuple("0123456789"))
    monkeypatch.setitem(DATASETS, "tiny", spec)
    return types.SimpleNamespace(files=files, spec=spec, cache=tmp_path / "cache" / "tiny", source=source)


def fill_cache(tiny, split="test"):
    tiny.cache.mkdir(parents=True, exist_ok=True)
    for kind in ("images", "labels"):
        (tiny.cache / FILENAMES[f"{split}-{kind}"]).write_bytes(tiny.files[f"{split}-{kind}"])


def test_missing_files_say_where_gpucnn_looked(tiny, tmp_path):
    with pytest.raises(DataError, match=r"no tiny test files \(t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, "
                                        r"or without .gz\) found in .*cache/tiny.*allow downloading"):
        load_dataset("tiny", "test", download=False)
    with pytest.raises(DataError, match=r"IDX file .*absent.idx does not exist"):
        read_idx(tmp_path / "absent.idx")
    with pytest.raises(DataError, match=r"data directory .*nowhere does not exist or is not a folder"):
        load_dataset("tiny", "test", data_dir=tmp_path / "nowhere", download=False)


def test_truncated_gzip_in_the_cache_says_delete_and_download_again(tiny):
    fill_cache(tiny)
    images = tiny.cache / FILENAMES["test-images"]
    os.truncate(images, images.stat().st_size // 2)  # a real file cut short, as by a full disk or a bad copy
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz is a corrupt or truncated gzip stream .*gpucnn's "
                                        r"cached download: delete .*t10k-images-idx3-ubyte.gz and .*t10k-labels"
                                        r"-idx1-ubyte.gz and run again to download them afresh"):
        load_dataset("tiny", "test", download=False)


def test_corrupt_gzip_in_the_cache_is_detected(tiny):
    fill_cache(tiny)
    labels = tiny.cache / FILENAMES["test-labels"]
    raw = bytearray(labels.read_bytes())
    raw[-6] ^= 0xFF  # inside the CRC-32 trailer: the stream decompresses but does not check out
    labels.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"corrupt or truncated gzip stream.*run again to download them afresh"):
        load_dataset("tiny", "test", download=False)


def test_wrong_idx_magic_in_the_cache_is_detected(tiny):
    fill_cache(tiny)
    images = tiny.cache / FILENAMES["test-images"]
    images.write_bytes(gzip.compress(b"<html>404 Not Found</html>"))  # what a captive portal serves
    with pytest.raises(DataError, match=r"has a wrong magic number \(first bytes 3c68746d.*it is not an IDX file.*"
                                        r"delete .* and run again"):
        load_dataset("tiny", "test", download=False)


def test_image_and_label_counts_that_differ(tiny, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    write_split_files(folder, "test", seed=3, n=5)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(DataError, match=r"holds 5 images but .*t10k-labels-idx1-ubyte holds 4 labels; the two files "
                                        r"come from different data sets or splits"):
        load_dataset("tiny", "test", data_dir=folder, download=False)


def test_forged_idx_headers_are_refused_not_crashing(tmp_path):
    path = tmp_path / "forged.idx"
    # 65536**4 bytes wrapped to 0 in int64, and the empty payload then crashed reshape.
    path.write_bytes(bytes([0, 0, 0x08, 4]) + np.full(4, 65536, ">u4").tobytes())
    with pytest.raises(DataError, match=r"declares shape \(65536, 65536, 65536, 65536\), too large for any array"):
        read_idx(path)
    # Found by tests/test_properties.py: a zero size does not make (0, 141977, 4294846392, 7563) allocatable.
    path.write_bytes(bytes([0, 0, 0x0B, 4]) + np.array([0, 141977, 4294846392, 7563], ">u4").tobytes())
    with pytest.raises(DataError, match="too large for any array"):
        read_idx(path)
    # A plausible shape with too few bytes is called truncated, with both counts.
    path.write_bytes(bytes([0, 0, 0x08, 3]) + np.array([60000, 28, 28], ">u4").tobytes() + bytes(1000))
    with pytest.raises(DataError, match="is truncated: expected 47040000 bytes of data, found 1000"):
        read_idx(path)


class StallingServer:
    """A local HTTP server: ``routes`` path -> bytes; a path in ``stall`` sends its headers and the first
    half of its body, then stops sending (until the server closes) without closing the connection."""

    def __init__(self):
        self.routes, self.stall = {}, set()
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = server.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    if self.path in server.stall:
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        server.release.wait(60)
                        return
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client died (killed)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = StallingServer()
    yield s
    s.close()


DOWNLOAD_SCRIPT = """
import json, sys
from gpucnn.data import DATASETS, DatasetSpec, FileSpec, download_dataset
files = {key: FileSpec(name, md5) for key, (name, md5) in json.loads(sys.argv[3]).items()}
DATASETS["tiny"] = DatasetSpec(name="tiny", files=files, mirrors=(sys.argv[1],), mean=0.5, std=0.25,
                               classes=tuple("0123456789"))
download_dataset("tiny", "test", cache_dir=sys.argv[2], progress=False, timeout=60)
"""


def test_download_killed_midway_leaves_no_broken_file_and_the_part_is_cleaned_later(tiny, server, tmp_path):
    for key, name in FILENAMES.items():
        server.routes[f"/stall/{name}"] = tiny.files[key]
        server.routes[f"/good/{name}"] = tiny.files[key]
    server.stall.add(f"/stall/{FILENAMES['test-images']}")
    spec_json = json.dumps({k: [f.filename, f.md5] for k, f in tiny.spec.files.items()})
    process = subprocess.Popen([sys.executable, "-c", DOWNLOAD_SCRIPT, server.url + "/stall/",
                                str(tmp_path / "cache"), spec_json], cwd=ROOT, env=clean_env(tmp_path / "cache"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: any(p.stat().st_size > 0 for p in tiny.cache.glob("*.part")), timeout=60), \
            "the download never started writing"
    finally:
        process.kill()  # SIGKILL: no cleanup code can run
        process.wait(30)
    assert process.returncode == -signal.SIGKILL
    parts = list(tiny.cache.glob("*.part"))
    assert len(parts) == 1 and parts[0].name.startswith(FILENAMES["test-images"] + ".")
    assert not (tiny.cache / FILENAMES["test-images"]).exists()  # nothing under the real name
    # The .part is never read: without a download the split is simply missing.
    with pytest.raises(DataError, match="no tiny test files"):
        load_dataset("tiny", "test", download=False)
    # A fresh .part may belong to a live download, so it is left alone; the download completes beside it.
    images, labels = load_dataset("tiny", "test", mirrors=[server.url + "/good/"], progress=False)
    assert images.shape == (200, 28, 28) and labels.shape == (200,)
    assert parts[0].exists()
    # Once stale, the next download into that folder deletes it.
    stale = time.time() - 2 * datasets.STALE_PART_S
    os.utime(parts[0], (stale, stale))
    download_dataset("tiny", "train", mirrors=[server.url + "/good/"], progress=False)
    assert not parts[0].exists()
    assert sorted(p.name for p in tiny.cache.iterdir()) == sorted(FILENAMES.values())


def test_checksum_mismatch_names_the_file_and_what_to_do(tiny, server):
    for key, name in FILENAMES.items():
        server.routes[f"/mirror/{name}"] = tiny.files[key]
    server.routes[f"/mirror/{FILENAMES['test-labels']}"] = gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")
    with pytest.raises(DataError) as info:
        load_dataset("tiny", "test", mirrors=[server.url + "/mirror/"], progress=False)
    message = str(info.value)
    assert f"checksum mismatch for {FILENAMES['test-labels']}: expected MD5 {tiny.spec.files['test-labels'].md5}" \
        in message
    assert "put the files in a folder and pass it as data_dir (--data-dir)" in message
    assert not (tiny.cache / FILENAMES["test-labels"]).exists()
    assert not list(tiny.cache.glob("*.part"))


# ---------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_key(path: Path):
    """Identifies one version of a file written by rename: (inode, mtime), or None while it is absent."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_mtime_ns)


def save_temporaries(out: Path) -> list[Path]:
    return list(out.glob(".checkpoint.npz.*.tmp")) + list(out.glob(".best.npz.*.tmp"))


@pytest.mark.slow
def test_sigkill_at_any_moment_keeps_a_loadable_checkpoint_and_resume_is_bitwise(data_dir, reference_run,
                                                                                    tmp_path):
    out = tmp_path / "run"
    path = out / CHECKPOINT_FILE
    rng = random.Random(20251125)
    process = start_cli(*train_args(data_dir, out))
    last, epoch, kills, mid_write_kills = None, 0, 0, 0
    for cycle in range(8):
        # Wait for a new checkpoint (so every cycle makes progress), then SIGKILL: on even cycles the
        # moment a save's temporary file appears (mid-write), on odd ones after a random delay.
        assert wait_until(lambda: checkpoint_key(path) not in (None, last) or process.poll() is not None,
                          timeout=120), "no new checkpoint within 120 s"
        if process.poll() is not None:  # it finished all epochs before this cycle could kill it
            assert process.returncode == 0, process.communicate()[1]
            break
        if cycle % 2 == 0:
            wait_until(lambda: save_temporaries(out) or process.poll() is not None, timeout=60)
            writing = bool(save_temporaries(out))
        else:
            time.sleep(rng.uniform(0.0, 0.25))
            writing = False
        process.kill()
        process.communicate(timeout=60)
        kills += process.returncode == -signal.SIGKILL
        mid_write_kills += writing and process.returncode == -signal.SIGKILL
        last = checkpoint_key(path)
        saved = load_checkpoint(path)  # never half-written, whenever the kill came
        model_from_checkpoint(saved)
        assert saved["epoch"] >= epoch and saved["step"] == 0
        epoch = saved["epoch"]
        if epoch >= EPOCHS:
            break
        process = start_cli(*resume_args(data_dir, out))
    else:
        process.communicate(timeout=300)
        assert process.returncode == 0
    assert kills >= 4 and mid_write_kills >= 1, (kills, mid_write_kills)
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {CHECKPOINT_FILE, BEST_FILE, METRICS_FILE}
    assert all(p.name.endswith(".tmp") for p in out.iterdir() if p.name.startswith("."))
    assert_same_run(out, reference_run)


def test_temporary_files_of_killed_saves_are_never_read_and_cleaned_later(reference_run, tmp_path):
    good = (reference_run / CHECKPOINT_FILE).read_bytes()
    target = tmp_path / CHECKPOINT_FILE
    target.write_bytes(good)
    dead = tmp_path / ".checkpoint.npz.k1ll3d.tmp"   # what a save killed halfway leaves behind
    dead.write_bytes(good[: len(good) // 2])
    live = tmp_path / ".checkpoint.npz.busy.tmp"     # a save in progress elsewhere: recent
    live.write_bytes(good[:100])
    assert load_checkpoint(target)["epoch"] == EPOCHS
    stale = time.time() - 2 * checkpoint_module.STALE_TEMP_S
    os.utime(dead, (stale, stale))
    save_checkpoint(target, model={"w": np.zeros(2, np.float32)})
    assert not dead.exists() and live.exists()


def test_metrics_line_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    data = small_data()
    model = LeNet5(num_classes=4, seed=0)
    Trainer(model, optim.Adam(model.parameters(), lr=1e-3), device="cpu", out_dir=tmp_path).fit(
        data, data, epochs=1, batch_size=8, progress=False)
    metrics = tmp_path / METRICS_FILE
    with open(metrics, "a", encoding="utf-8") as f:
        f.write('{"epoch": 2, "train_loss": 1.2')  # epoch 2's line, cut off where the process died
    resumed = LeNet5(num_classes=4, seed=0)
    Trainer(resumed, optim.Adam(resumed.parameters(), lr=1e-3), device="cpu", out_dir=tmp_path).fit(
        data, data, epochs=2, batch_size=8, resume=tmp_path / CHECKPOINT_FILE, progress=False)
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_ctrl_c_saves_exits_130_and_resume_is_bitwise(data_dir, reference_run, tmp_path):
    out = tmp_path / "run"
    process = start_cli(*train_args(data_dir, out))
    assert wait_until(lambda: (out / CHECKPOINT_FILE).exists(), timeout=120)
    time.sleep(random.Random(7).uniform(0.0, 0.2))
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (f"interrupted; continue with: gpucnn train --resume "
                                               f"{out / CHECKPOINT_FILE} --epochs {EPOCHS}")
    saved = load_checkpoint(out / CHECKPOINT_FILE)
    assert saved["epoch"] < EPOCHS
    resumed = run_cli(*resume_args(data_dir, out))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, reference_run)


def test_corrupt_checkpoints_are_refused_with_the_reason(reference_run, tmp_path):
    good = (reference_run / CHECKPOINT_FILE).read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good[: len(good) // 2])
    result = run_cli("evaluate", truncated, "--device", "cpu")
    assert_one_line_error(result.returncode, result.stderr, f"checkpoint {truncated} is not an .npz archive "
                                                            "(truncated, corrupt, or another kind of file)")
    flipped = tmp_path / "flipped.npz"
    data = bytearray(good)
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF  # flipped bits inside a stored member
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"checkpoint {flipped} is corrupt"):
        load_checkpoint(flipped)
    text = tmp_path / "notes.npz"
    text.write_text("not a checkpoint")
    result = run_cli("train", "--resume", text, "--device", "cpu")
    assert_one_line_error(result.returncode, result.stderr, "is not an .npz archive")


def test_incompatible_checkpoints_are_refused_with_the_reason(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((16, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 4, 16)

    def trainer(model, out=None):
        return Trainer(model, optim.Adam(model.parameters(), lr=1e-3), device="cpu", out_dir=out)

    trainer(LeNet5(num_classes=4, variant="classic", seed=0), tmp_path).fit(
        (images, labels), (images, labels), epochs=1, batch_size=8, progress=False)
    path = tmp_path / CHECKPOINT_FILE
    # Same names and shapes, other model: refused by name.
    with pytest.raises(CheckpointError, match=f"checkpoint {path} holds a lenet5-classic model, but this run "
                                              "trains lenet5"):
        trainer(LeNet5(num_classes=4)).fit((images, labels), (images, labels), epochs=2, batch_size=8,
                                           resume=path, progress=False)
    # Other shapes: the mismatched parameters are named.
    with pytest.raises(CheckpointError, match=r"does not fit the model: fc3.weight is \(4, 84\) in the checkpoint "
                                              r"but \(10, 84\) in the model"):
        trainer(build_model("lenet5-classic", num_classes=10)).fit(
            (images, labels), (images, labels), epochs=2, batch_size=8, resume=path, progress=False)
    # A checkpoint of something else entirely.
    foreign = save_checkpoint(tmp_path / "foreign.npz", weights={"w": np.zeros(3)})
    result = run_cli("evaluate", foreign, "--device", "cpu")
    assert_one_line_error(result.returncode, result.stderr, "the checkpoint holds no model weights")


# ---------------------------------------------------------------------------------------
# Training


def small_data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 28, 28)).astype(np.float32), rng.integers(0, 4, n)


def test_loss_going_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    model = LeNet5(num_classes=4, seed=0)
    opt = optim.Adam(model.parameters(), lr=2e-3)
    # A real divergence: after epoch 1 the schedule multiplies the learning rate by 1e30.
    trainer = Trainer(model, opt, optim.StepLR(opt, step_size=1, gamma=1e30), device="cpu", out_dir=tmp_path)
    data = small_data()
    with np.errstate(all="ignore"), pytest.raises(
            TrainingError, match=f"the training loss became nan in epoch 2 .*the last good checkpoint, "
                                 f"{tmp_path / CHECKPOINT_FILE}, is unchanged; try a smaller learning rate"):
        trainer.fit(data, data, epochs=3, batch_size=8, progress=False)
    saved = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert saved["epoch"] == 1
    assert all(np.isfinite(w).all() for w in saved["model"].values())
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 1


def test_loss_going_nan_in_the_cli_is_one_line(data_dir, tmp_path):
    result = run_cli("train", "--device", "cpu", "--data-dir", data_dir, "--no-download", "--epochs", 2,
                     "--batch-size", BATCH, "--optimizer", "sgd", "--lr", 1e30, "--out", tmp_path / "run", "--quiet")
    assert_one_line_error(result.returncode, result.stderr, "the training loss became nan in epoch 1")
    assert not (tmp_path / "run" / CHECKPOINT_FILE).exists()


def fake_cupy_out_of_memory():
    """An exception of CuPy's class name and module (cupy.cuda.memory.OutOfMemoryError), without CuPy."""
    cls = type("OutOfMemoryError", (MemoryError,), {"__module__": "cupy.cuda.memory"})
    return cls("Out of memory allocating 1,073,741,824 bytes (allocated so far: 79,456,894,976 bytes).")


def test_is_out_of_memory_recognises_gpu_and_host_allocation_failures():
    assert backend.is_out_of_memory(fake_cupy_out_of_memory())
    runtime_error = type("CUDARuntimeError", (RuntimeError,), {"__module__": "cupy_backends.cuda.api.runtime"})
    assert backend.is_out_of_memory(runtime_error("cudaErrorMemoryAllocation: out of memory"))
    assert backend.is_out_of_memory(MemoryError("Unable to allocate 12.0 GiB"))
    assert not backend.is_out_of_memory(runtime_error("cudaErrorIllegalAddress: an illegal memory access"))
    assert not backend.is_out_of_memory(type("OutOfMemoryError", (Exception,), {"__module__": "mylib"})())
    assert not backend.is_out_of_memory(ValueError("x"))


def test_out_of_memory_in_training_suggests_a_smaller_batch_and_keeps_the_checkpoint(tmp_path):
    data = small_data()
    model = LeNet5(num_classes=4, seed=0)
    Trainer(model, optim.Adam(model.parameters(), lr=1e-3), device="cpu", out_dir=tmp_path).fit(
        data, data, epochs=1, batch_size=8, progress=False)
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()

    resumed = LeNet5(num_classes=4, seed=0)
    calls = []

    def forward_running_out(x):
        calls.append(1)
        if len(calls) == 3:
            raise fake_cupy_out_of_memory()
        return nn.Conv2d.forward(resumed.conv1, x)

    resumed.conv1.forward = forward_running_out
    trainer = Trainer(resumed, optim.Adam(resumed.parameters(), lr=1e-3), device="cpu", out_dir=tmp_path)
    with pytest.raises(TrainingError, match=r"training on the cpu ran out of memory at batch size 8 "
                                            r"\(OutOfMemoryError: Out of memory allocating .*\); training stopped and "
                                            r"the last good checkpoint, .*checkpoint.npz, is unchanged; try a smaller "
                                            r"batch size \(--batch-size 4\)"):
        trainer.fit(data, data, epochs=2, batch_size=8, resume=tmp_path / CHECKPOINT_FILE, progress=False)
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before


def invoke(args):
    """The CLI in this process (so a test can monkeypatch it); an escaping exception fails the test."""
    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="gpucnn")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_out_of_memory_in_the_cli_is_one_line(data_dir, reference_run, tmp_path, monkeypatch):
    def step_running_out(self, x, y):
        raise fake_cupy_out_of_memory()

    monkeypatch.setattr(Trainer, "train_step", step_running_out)
    result = invoke(("train", "--device", "cpu", "--data-dir", data_dir, "--no-download", "--epochs", 1,
                     "--batch-size", 64, "--out", tmp_path / "run", "--quiet"))
    assert_one_line_error(result.exit_code, result.stderr, "ran out of memory at batch size 64")
    assert "--batch-size 32" in result.stderr

    def evaluate_running_out(*args, **kwargs):
        raise fake_cupy_out_of_memory()

    monkeypatch.setattr("gpucnn.cli.evaluate", evaluate_running_out)
    result = invoke(("evaluate", reference_run / CHECKPOINT_FILE, "--device", "cpu", "--data-dir", data_dir,
                     "--no-download"))
    assert_one_line_error(result.exit_code, result.stderr, "out of memory (Out of memory allocating")
    assert "try a smaller --batch-size" in result.stderr


# ---------------------------------------------------------------------------------------
# CLI: bad option values and combinations


@pytest.mark.parametrize("args, code, fragment", [
    (["train", "--epochs", "0"], 2, "Invalid value for '--epochs': 0 is not in the range x>=1"),
    (["train", "--batch-size", "-5"], 2, "Invalid value for '--batch-size'"),
    (["train", "--dataset", "cifar-10"], 2, "Invalid value for '--dataset': 'cifar-10' is not one of"),
    (["train", "--device", "tpu"], 2, "Invalid value for '--device'"),
    (["train", "--lr", "0"], 2, "Invalid value for '--lr': 0.0 is not in the range x>0"),
    (["train", "--lr", "nan"], 2, "Invalid value for '--lr': nan is not a finite number"),
    (["train", "--lr", "inf"], 2, "Invalid value for '--lr': inf is not a finite number"),
    (["train", "--lr", "fast"], 2, "'fast' is not a valid float"),
    (["train", "--momentum", "1"], 2, "Invalid value for '--momentum'"),
    (["train", "--weight-decay", "nan"], 2, "Invalid value for '--weight-decay': nan is not a finite number"),
    (["train", "--model", "resnet"], 2, "Invalid value for '--model'"),
    (["train", "--optimizer", "adam", "--momentum", "0.9", "--device", "cpu"], 1,
     "--momentum applies to --optimizer sgd only"),
    (["train", "--resume", "/nonexistent/checkpoint.npz", "--device", "cpu"], 1,
     "checkpoint /nonexistent/checkpoint.npz does not exist"),
    (["train", "--no-such-option"], 2, "--no-such-option"),
    (["evaluate", "/nonexistent/run/checkpoint.npz", "--device", "cpu"], 1, "does not exist"),
    (["predict", "/nonexistent/run/checkpoint.npz", "x.npy", "--device", "cpu"], 1, "does not exist"),
    (["predict", "--top-k", "0", "c.npz", "x.npy"], 2, "Invalid value for '--top-k'"),
    (["summary", "--model", "vgg"], 2, "Invalid value for '--model'"),
], ids=["epochs-0", "batch-negative", "unknown-dataset", "unknown-device", "lr-0", "lr-nan", "lr-inf", "lr-text",
        "momentum-1", "weight-decay-nan", "unknown-model", "momentum-with-adam", "resume-missing", "unknown-option",
        "evaluate-missing", "predict-missing", "top-k-0", "summary-model"])
def test_bad_option_values_are_one_line_and_non_zero(args, code, fragment):
    result = invoke(args)
    assert_one_line_error(result.exit_code, result.stderr, fragment, expected_code=code)


def test_gpu_asked_for_without_a_gpu(tmp_path):
    if backend.gpu_available():
        pytest.skip("this machine has a GPU")
    result = run_cli("train", "--device", "gpu", "--out", tmp_path / "run")
    assert_one_line_error(result.returncode, result.stderr, "the GPU was asked for, but ")
    env_result = subprocess.run([sys.executable, "cli.py", "evaluate", "c.npz"], cwd=ROOT, capture_output=True,
                                text=True, env={**clean_env(), "GPUCNN_DEVICE": "tpu"}, timeout=120)
    assert_one_line_error(env_result.returncode, env_result.stderr, "GPUCNN_DEVICE='tpu' is not a device")


def test_unwritable_out_is_refused_before_any_data_is_loaded(data_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("train", "--device", "cpu", "--data-dir", tmp_path / "no-data-here", "--out", blocker / "run")
    assert_one_line_error(result.returncode, result.stderr, str(blocker))
    result = run_cli("train", "--device", "cpu", "--out", blocker)
    assert_one_line_error(result.returncode, result.stderr, "is a file", expected_code=2)


def test_predict_refuses_non_finite_and_missing_images(reference_run, tmp_path):
    image = np.full((28, 28), 0.5, np.float32)
    image[3, 4] = np.nan
    np.save(tmp_path / "nan.npy", image)
    result = run_cli("predict", reference_run / CHECKPOINT_FILE, tmp_path / "nan.npy", "--device", "cpu")
    assert_one_line_error(result.returncode, result.stderr, "holds floats outside [0, 1]")
    result = run_cli("predict", reference_run / CHECKPOINT_FILE, tmp_path / "absent.npy", "--device", "cpu")
    assert_one_line_error(result.returncode, result.stderr, "absent.npy")

"""The CLI with --device gpu, every command: train (captured steps), evaluate, predict, features,
visualize. Skipped without a GPU; CI runs it on the CuPy stand-in (``--cupy-standin``)."""
import json

import numpy as np
import pytest

from tests.helpers import run_cli, run_cli_together

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_run(random_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-cli") / "run"
    result = run_cli("train", "--device", "gpu", "--data-dir", random_mnist, "--no-download", "--epochs", 1,
                     "--batch-size", 32, "--out", out, "--quiet")
    assert "device: gpu" in result.stdout
    return out


def test_train_on_the_gpu_writes_a_checkpoint_and_metrics(gpu_run):
    record = json.loads((gpu_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["epoch"] == 1 and np.isfinite(record["train_loss"])
    assert (gpu_run / "checkpoint.npz").is_file()


def test_evaluate_predict_features_visualize_on_the_gpu(gpu_run, random_mnist, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (2, 1, 28, 28)).astype(np.uint8)
    np.save(tmp_path / "two.npy", images)
    checkpoint, data = gpu_run / "checkpoint.npz", ("--data-dir", random_mnist, "--no-download")
    gpu, cpu, predicted, predicted_cpu, features, drawn = run_cli_together(
        ("evaluate", checkpoint, "--device", "gpu", *data),
        ("evaluate", checkpoint, "--device", "cpu", *data),
        ("predict", checkpoint, tmp_path / "two.npy", "--device", "gpu", "--top-k", 2),
        ("predict", checkpoint, tmp_path / "two.npy", "--device", "cpu", "--top-k", 2),
        ("features", checkpoint, "--layer", "flatten", "--limit", 16, "--device", "gpu", "--out",
         tmp_path / "features.npy", *data),
        ("visualize", checkpoint, "--limit", 16, "--device", "gpu", "--out", tmp_path / "figures", *data))
    for result in (gpu, cpu, predicted, predicted_cpu, features, drawn):
        assert result.returncode == 0, result.stderr
    accuracy = [line for line in gpu.stdout.splitlines() if "accuracy" in line]
    assert accuracy and accuracy == [line for line in cpu.stdout.splitlines() if "accuracy" in line]
    lines, cpu_lines = predicted.stdout.splitlines(), predicted_cpu.stdout.splitlines()
    assert lines[0].startswith("device: gpu") and lines[1:] == cpu_lines[1:] and len(lines) == 3
    assert np.load(tmp_path / "features.npy").shape == (16, 400)
    assert sorted(p.suffix for p in (tmp_path / "figures").iterdir()) and any(
        p.suffix == ".png" for p in (tmp_path / "figures").iterdir())

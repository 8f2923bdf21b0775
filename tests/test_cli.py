"""The command line through real subprocesses: summary, train, evaluate, predict, resume, and clean errors."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gpucnn import backend
from gpucnn.checkpoint import load_checkpoint, model_from_checkpoint
from gpucnn.data import DATASETS, load_dataset, normalize
from gpucnn.train import CHECKPOINT_FILE
from tests.helpers import ROOT, assert_one_line_error, clean_env, invoke, run_cli, run_cli_together
from tests.synthetic_data import quadrant_images, write_quadrant_mnist

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_quadrant_mnist(tmp_path_factory.mktemp("data"), 320, 80)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    result = run_cli("train", "--device", "cpu", "--dataset", "mnist", "--data-dir", data_dir, "--no-download",
                     "--epochs", 1, "--batch-size", 32, "--lr", 3e-3, "--out", out)
    return out, result


def test_output_into_a_closed_pipe_ends_quietly():
    """`gpucnn summary | head -1`: the reader leaves early; no 'Broken pipe' error, status 141 as for SIGPIPE."""
    process = subprocess.Popen([sys.executable, "cli.py", "summary", "--model", "vgg-small"], cwd=ROOT,
                               env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # long before the command has imported gpucnn and written a line
    stderr = process.communicate(timeout=120)[1].decode()
    assert process.returncode == 141 and stderr == "", (process.returncode, stderr)


def test_summary_prints_layers_parameters_and_receptive_fields():
    lenet, classic = run_cli_together(("summary",), ("summary", "--model", "lenet5-classic"))
    assert lenet.returncode == 0 and classic.returncode == 0, (lenet.stderr, classic.stderr)
    out, classic = lenet.stdout, classic.stdout
    assert "total parameters: 61,706" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split() and line.split()[0] in
            ("conv1", "pool1", "conv2", "pool2", "fc1", "fc3")}
    # name type shape... params rf jump: rf/jump are the last two columns
    assert rows["conv1"][-3:] == ["156", "5", "1"]
    assert rows["pool1"][-3:] == ["0", "6", "2"]
    assert rows["conv2"][-3:] == ["2,416", "14", "2"]
    assert rows["pool2"][-3:] == ["0", "16", "4"]
    assert rows["fc1"][-3:] == ["48,120", "-", "-"]
    assert rows["fc3"][-3:] == ["850", "-", "-"]
    assert "(16, 5, 5)" in out
    assert "AvgPool2d" in classic and "total parameters: 61,706" in classic


def test_train_writes_checkpoints_and_metrics(trained):
    out, result = trained
    assert result.stdout.startswith("device: cpu (NumPy")
    assert "epoch 1/1  train loss" in result.stdout
    assert "Traceback" not in result.stderr
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1
    assert (out / "checkpoint.npz").is_file() and (out / "best.npz").is_file()


def test_evaluate_reports_the_trained_accuracy_per_class_and_the_confusion_matrix(trained, data_dir):
    out, _ = trained
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    result, as_json = run_cli_together(
        *[("evaluate", out / "checkpoint.npz", "--data-dir", data_dir, "--no-download", "--device", "cpu",
           "--batch-size", 17, *extra) for extra in ((), ("--json",))])
    assert result.returncode == 0 and as_json.returncode == 0, (result.stderr, as_json.stderr)
    assert result.stdout.startswith("device: cpu")
    assert f"accuracy {metrics['test_acc']:.2%}" in result.stdout
    assert f"loss {metrics['test_loss']:.4f}" in result.stdout
    assert "80 images" in result.stdout
    report = json.loads(as_json.stdout)  # nothing but the JSON object on stdout
    assert report["accuracy"] == metrics["test_acc"] and report["images"] == 80
    assert report["classes"] == [str(k) for k in range(10)]

    # the same numbers, computed here from the checkpoint's own predictions
    model = model_from_checkpoint(load_checkpoint(out / "checkpoint.npz"))
    images, labels = load_dataset("mnist", "test", data_dir=data_dir, download=False)
    spec = DATASETS["mnist"]
    predicted = model.eval()(normalize(images, spec.mean, spec.std)).argmax(axis=1)
    expected = np.zeros((10, 10), int)
    for true, guess in zip(labels, predicted):
        expected[true, guess] += 1
    assert report["confusion_matrix"] == expected.tolist() and report["class_images"] == expected.sum(1).tolist()
    for k in range(10):
        right, total = expected[k, k], expected[k].sum()
        assert report["per_class_accuracy"][k] == (right / total if total else None)
        if total:  # one text row per class: label, accuracy, right of images
            assert f"{k:>3}  {right / total:7.2%}  ({right} of {total})" in result.stdout
    matrix_rows = result.stdout.split("columns the predicted ones\n")[1].splitlines()[1:]
    assert [[int(v) for v in row.split()] for row in matrix_rows] == [[k, *expected[k]] for k in range(10)]


def write_pgm(path, image, binary):
    height, width = image.shape
    if binary:
        path.write_bytes(f"P5\n# a comment\n{width} {height}\n255\n".encode() + image.astype(np.uint8).tobytes())
    else:
        rows = "\n".join(" ".join(str(v) for v in row) for row in image)
        path.write_text(f"P2\n{width} {height}\n# comment between fields\n255\n{rows}\n")


def test_predict_npy_and_pgm_agree(trained, tmp_path):
    out, _ = trained
    images, labels = quadrant_images(3, seed=7)
    np.save(tmp_path / "batch.npy", images)                                  # (N, 28, 28) uint8
    np.save(tmp_path / "one.npy", images[0].astype(np.float32) / 255)        # (28, 28) floats in [0, 1]
    np.save(tmp_path / "nchw.npy", images[:2, None])                         # (N, 1, 28, 28)
    write_pgm(tmp_path / "p5.pgm", images[0], binary=True)
    write_pgm(tmp_path / "p2.pgm", images[0], binary=False)
    result = run_cli("predict", out / "checkpoint.npz", tmp_path / "batch.npy", tmp_path / "one.npy",
                     tmp_path / "nchw.npy", tmp_path / "p5.pgm", tmp_path / "p2.pgm", "--device", "cpu")
    lines = result.stdout.splitlines()[1:]
    assert len(lines) == 3 + 1 + 2 + 1 + 1
    predictions = {line.split(": ")[0]: line.split(": ")[1] for line in lines}
    first = predictions[f"{tmp_path / 'batch.npy'}[0]"]
    # the same image as uint8, as floats, as NCHW, as P5 and as P2 gives the same class and probability
    assert first == predictions[str(tmp_path / "one.npy")] == predictions[f"{tmp_path / 'nchw.npy'}[0]"]
    assert first == predictions[str(tmp_path / "p5.pgm")] == predictions[str(tmp_path / "p2.pgm")]
    label, probability = first.split()
    assert 0 <= int(label) <= 9 and probability.endswith("%")

    top3 = run_cli("predict", out / "checkpoint.npz", tmp_path / "p5.pgm", "--top-k", 3).stdout.splitlines()[1]
    ranked = top3.split(": ")[1].split(", ")
    assert len(ranked) == 3 and ranked[0] == first
    probabilities = [float(r.split()[1].rstrip("%")) for r in ranked]
    assert probabilities == sorted(probabilities, reverse=True)


def test_resume_continues_the_run(trained, data_dir, tmp_path):
    out, _ = trained
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("checkpoint.npz", "metrics.jsonl"):
        (copy / name).write_bytes((out / name).read_bytes())
    result = run_cli("train", "--resume", copy / "checkpoint.npz", "--epochs", 2, "--data-dir", data_dir,
                     "--no-download", "--device", "cpu", "--quiet")
    assert "done: epoch 2" in result.stdout
    records = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    # The run was planned for one epoch: extended to two, its cosine schedule spans both (lr 0.003, then
    # 0.0015), where the old schedule would have trained epoch 2 at lr 0.
    assert [r["lr"] for r in records] == pytest.approx([3e-3, 1.5e-3])
    assert load_checkpoint(copy / "checkpoint.npz")["config"]["epochs"] == 2
    conflicting = run_cli("train", "--resume", copy / "checkpoint.npz", "--epochs", 3, "--lr", 0.5,
                          "--data-dir", data_dir, "--no-download", check=False)
    assert conflicting.returncode == 1
    assert "--lr 0.5 differs from the checkpoint's 0.003" in conflicting.stderr


def assert_clean_failure(result, code, fragment):
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and fragment in lines[0], lines[0]


BAD_INPUTS = [  # (args, exit status, fragment of the one line)
    (["train", "--epochs", "0"], 2, "--epochs"),
    (["train", "--dataset", "cifar-10"], 2, "--dataset"),
    (["train", "--optimizer", "adam", "--momentum", "0.9", "--device", "cpu"], 1, "--momentum applies to"),
    (["train", "--bogus-option"], 2, "--bogus-option"),
    (["evaluate", "/nonexistent/checkpoint.npz", "--device", "cpu"], 1, "does not exist"),
    (["predict", "/nonexistent/checkpoint.npz", "x.npy", "--device", "cpu"], 1, "does not exist"),
]


def test_bad_inputs_fail_on_one_line():
    """Each in its own process, the processes started together (their start-ups overlap)."""
    results = run_cli_together(*(args for args, _, _ in BAD_INPUTS))
    for (args, code, fragment), result in zip(BAD_INPUTS, results):
        try:
            assert_clean_failure(result, code, fragment)
        except AssertionError as error:
            raise AssertionError(f"cli.py {' '.join(args)}: {error}") from None


def test_missing_data_dir_without_download_fails_cleanly(tmp_path):
    result = run_cli("train", "--device", "cpu", "--data-dir", tmp_path / "absent", "--no-download",
                     "--out", tmp_path / "out", check=False)
    assert_clean_failure(result, 1, "does not exist")


def test_data_dir_without_the_files_fails_cleanly(tmp_path):
    result = run_cli("train", "--device", "cpu", "--dataset", "mnist", "--data-dir", tmp_path,
                     "--no-download", "--out", tmp_path / "out", check=False)
    assert_clean_failure(result, 1, "no mnist train files")


def test_out_holding_a_run_is_not_overwritten(trained, data_dir):
    out, _ = trained
    result = run_cli("train", "--device", "cpu", "--data-dir", data_dir, "--no-download", "--out", out, check=False)
    assert_clean_failure(result, 1, "already holds a run")


def test_predict_refuses_bad_images(trained, tmp_path):
    out, _ = trained
    np.save(tmp_path / "big.npy", np.full((28, 28), 3.0, dtype=np.float32))
    np.save(tmp_path / "shape.npy", np.zeros((2, 32, 32), dtype=np.uint8))
    (tmp_path / "bad.pgm").write_bytes(b"P5\n28 28\n255\n" + bytes(100))
    big, shape, bad, top_k = run_cli_together(
        ("predict", out / "checkpoint.npz", tmp_path / "big.npy"),
        ("predict", out / "checkpoint.npz", tmp_path / "shape.npy"),
        ("predict", out / "checkpoint.npz", tmp_path / "bad.pgm"),
        ("predict", out / "checkpoint.npz", tmp_path / "big.npy", "--top-k", 11))
    assert_clean_failure(big, 1, "outside [0, 1]")
    assert_clean_failure(shape, 1, "shape (2, 32, 32)")
    assert_clean_failure(bad, 1, "truncated")
    assert_clean_failure(top_k, 1, "--top-k 11 exceeds")


def test_help_texts():
    top, train_help = run_cli_together(("--help",), ("train", "--help"))
    assert top.returncode == 0 and train_help.returncode == 0, (top.stderr, train_help.stderr)
    top, train_help = top.stdout, train_help.stdout
    for command in ("train", "evaluate", "predict", "summary"):
        assert command in top
    for option in ("--device", "--dataset", "--data-dir", "--model", "--epochs", "--batch-size", "--lr",
                   "--optimizer", "--momentum", "--weight-decay", "--schedule", "--seed", "--out", "--resume",
                   "--no-download", "--quiet"):
        assert option in train_help


def test_ctrl_c_saves_a_checkpoint_and_exits_130(data_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUCNN_")}
    out = tmp_path / "run"
    # batch 1 and many epochs, so the interrupt lands while training, wherever the machine's speed puts it
    process = subprocess.Popen([sys.executable, "cli.py", "train", "--device", "cpu", "--data-dir", str(data_dir),
                                "--no-download", "--epochs", "50", "--batch-size", "1", "--out", str(out)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("run:"):  # printed just before training starts
            break
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert f"continue with: gpucnn train --resume {out / 'checkpoint.npz'} --epochs 50" in stderr
    saved = load_checkpoint(out / "checkpoint.npz")
    assert 0 <= saved["epoch"] < 50 and 0 <= saved["step"] < 320
    target = saved["epoch"] + 1
    resumed = run_cli("train", "--resume", out / "checkpoint.npz", "--epochs", target, "--data-dir", data_dir,
                      "--no-download", "--device", "cpu", "--quiet")
    assert f"done: epoch {target}" in resumed.stdout


def test_ctrl_c_at_the_terminal_stops_a_split_step_run_cleanly(data_dir, tmp_path):
    """Ctrl-C at a terminal signals the whole process group: at batch 64 on two cores the run has a
    split-step worker, which must not die first and turn the clean stop into a worker error."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUCNN_")}
    env["GPUCNN_CPU_THREADS"] = env["GPUCNN_CPU_PROCESSES"] = "2"
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "cli.py", "train", "--device", "cpu", "--data-dir", str(data_dir),
                                "--no-download", "--epochs", "500", "--batch-size", "64", "--out", str(out)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    for line in process.stdout:
        if line.startswith("run:"):
            break
    time.sleep(1.5)  # past the first steps: the worker is running
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "worker" not in stderr, stderr
    assert load_checkpoint(out / "checkpoint.npz")["epoch"] < 500


# ------------------------------------------------------------------------------------------------
# Bad option values and combinations: one line, non-zero exit


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
    # one run for both checks (it was two tests running the same command): no traceback, exit 1
    result = run_cli("train", "--device", "gpu", "--out", tmp_path / "run", check=False)
    assert_clean_failure(result, 1, "GPU")
    assert_one_line_error(result.returncode, result.stderr, "the GPU was asked for, but ")
    env_result = subprocess.run([sys.executable, "cli.py", "evaluate", "c.npz"], cwd=ROOT, capture_output=True,
                                text=True, env={**clean_env(), "GPUCNN_DEVICE": "tpu"}, timeout=120)
    assert_one_line_error(env_result.returncode, env_result.stderr, "GPUCNN_DEVICE='tpu' is not a device")


def test_unwritable_out_is_refused_before_any_data_is_loaded(random_mnist, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # before training and before any data is loaded (the data folder does not exist): one run, both checks
    result, into_a_file = run_cli_together(
        ("train", "--device", "cpu", "--data-dir", tmp_path / "no-data-here", "--out", blocker / "run"),
        ("train", "--device", "cpu", "--out", blocker))
    assert_clean_failure(result, 1, str(blocker))
    assert_one_line_error(result.returncode, result.stderr, str(blocker))
    result = into_a_file
    assert_one_line_error(result.returncode, result.stderr, "is a file", expected_code=2)


def test_predict_refuses_non_finite_and_missing_images(reference_run, tmp_path):
    image = np.full((28, 28), 0.5, np.float32)
    image[3, 4] = np.nan
    np.save(tmp_path / "nan.npy", image)
    result, absent = run_cli_together(
        ("predict", reference_run / CHECKPOINT_FILE, tmp_path / "nan.npy", "--device", "cpu"),
        ("predict", reference_run / CHECKPOINT_FILE, tmp_path / "absent.npy", "--device", "cpu"))
    assert_one_line_error(result.returncode, result.stderr, "holds floats outside [0, 1]")
    result = absent
    assert_one_line_error(result.returncode, result.stderr, "absent.npy")

"""gpucnn.metrics on label arrays: the confusion matrix and per-class accuracy against a plain loop."""
import numpy as np
import pytest

from gpucnn.metrics import confusion_matrix, per_class_accuracy
from gpucnn.models import LeNet5
from gpucnn.train import evaluate


def loop_confusion(labels, predictions, K):
    matrix = np.zeros((K, K), np.int64)
    for true, guess in zip(labels, predictions):
        matrix[true, guess] += 1
    return matrix


@pytest.mark.backends("reference", "emulator-forward", "gpu")  # labels on any device; the results on the host
def test_confusion_matrix_and_per_class_accuracy_match_a_loop(backend):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, size=500)
    predictions = np.where(rng.random(500) < 0.6, labels, rng.integers(0, 7, size=500))
    labels[labels == 5] = 4                       # class 5 has no images; 6 is the largest label
    expected = loop_confusion(labels, predictions, 8)
    matrix = confusion_matrix(backend.to(labels), backend.to(predictions), 8)
    assert isinstance(matrix, np.ndarray) and matrix.dtype == np.int64
    np.testing.assert_array_equal(matrix, expected)
    per_class = per_class_accuracy(labels, predictions, 8)
    for k in range(8):
        total = (labels == k).sum()
        if total:
            assert per_class[k] == np.sum((labels == k) & (predictions == k)) / total
        else:
            assert np.isnan(per_class[k])
    # the default K is the largest label + 1; lists work too
    np.testing.assert_array_equal(confusion_matrix(list(labels), list(predictions)), expected[:7, :7])
    assert np.trace(matrix) / matrix.sum() == np.mean(labels == predictions)


@pytest.mark.parametrize("labels, predictions, num_classes, message", [
    ([0, 1], [0], None, "2 labels but 1 predictions"),
    ([0, 3], [0, 1], 3, "label 3 is out of range for 3 classes"),
    ([0, -1], [0, 1], None, "negative label"),
    ([[0, 1]], [[0, 1]], None, "1-D array"),
    ([0.0, 1.0], [0, 1], None, "integer class labels"),
    ([0, 1], [0, 1], 0, "num_classes must be a positive int"),
])
def test_bad_label_arrays_are_refused_in_one_sentence(labels, predictions, num_classes, message):
    with pytest.raises((ValueError, TypeError), match=message):
        confusion_matrix(labels, predictions, num_classes)


@pytest.mark.backends("fast", "emulator-forward", "gpu")
def test_evaluate_returns_the_predicted_classes_in_order(backend):
    model = LeNet5(seed=3).to(backend.device)
    images = np.random.default_rng(1).standard_normal((23, 1, 28, 28)).astype(np.float32)
    labels = np.arange(23) % 10
    result = evaluate(model, backend.to(images), backend.to(labels), batch_size=7, return_predictions=True)
    expected = backend.host(model.eval()(backend.to(images))).argmax(axis=1)
    np.testing.assert_array_equal(result["predictions"], expected)
    assert result["accuracy"] == np.mean(expected == labels)
    assert "predictions" not in evaluate(model, backend.to(images), backend.to(labels))


def test_metrics_csv_mirrors_the_log_through_appends_and_trims(tmp_path):
    import csv
    import json

    from gpucnn.metrics import append_metrics, trim_metrics, write_metrics_csv
    log = tmp_path / "metrics.jsonl"
    records = [{"epoch": e, "train_loss": 1.0 / e, "test_acc": 0.5 + e / 10, "lr": 1e-3} for e in (1, 2, 3)]
    for record in records:
        append_metrics(log, record)

    def csv_rows():
        with open(tmp_path / "metrics.csv", newline="") as f:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "epoch,train_loss,test_acc,lr"
    assert csv_rows() == records                         # floats written by repr: read back exactly
    trim_metrics(log, 2)                                  # a run resumed from epoch 2
    assert csv_rows() == records[:2]
    with open(log, "a") as f:
        f.write(json.dumps(records[2])[:20])              # a line torn by a killed run is not a row
    write_metrics_csv(log)
    assert csv_rows() == records[:2]

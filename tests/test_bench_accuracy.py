"""bench/accuracy_side_by_side.py without training: the PyTorch twins hold gpucnn's initial weights and
compute the same logits (skipped without torch), the matrix's cells, and the table of partial results."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("bench_accuracy_side_by_side",
                                                  ROOT / "bench" / "accuracy_side_by_side.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", ["resnet20", "lenet5"])
def test_torch_twin_starts_from_gpucnns_weights_and_agrees(model):
    torch = pytest.importorskip("torch")
    script = _script()
    ours, theirs = script.initial_model(model, 3), script.torch_model(model, 3)
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    for mode in ("train", "eval"):  # train: batch statistics (and one running update each); eval: running ones
        getattr(ours, mode)()
        getattr(theirs, mode)()
        np.testing.assert_allclose(ours(x), theirs(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_matrix_cells_and_a_table_of_partial_results(tmp_path, capsys):
    script = _script()
    cells = list(script.cells())
    assert len(cells) == 18 and cells[0] == ("gpucnn", "resnet20", "none", 0)
    assert ("torch", "lenet5", "crop+flip", 0) not in cells
    record = {"test_acc": 0.9, "train_seconds": 100.0}
    for library, complete in (("gpucnn", False), ("torch", True)):
        result = {"library": library, "model": "resnet20", "augment": "none", "seed": 0, "complete": complete,
                  "epochs": [record] * (2 if not complete else 5), "final_test_acc": 0.9,
                  "recipe": {"epochs": 5}, "load_before": [3.0], "load_after": [4.0]}
        script.result_path(tmp_path, library, "resnet20", "none", 0).write_text(json.dumps(result))
    for library, accuracy in (("gpucnn", 0.92), ("torch", 0.9)):  # seed 1: both finished
        result = {"library": library, "model": "resnet20", "augment": "none", "seed": 1, "complete": True,
                  "epochs": [record] * 5, "final_test_acc": accuracy, "recipe": {"epochs": 5},
                  "load_before": [3.0], "load_after": [4.0], "commit": "0123456789abcdef"}
        script.result_path(tmp_path, library, "resnet20", "none", 1).write_text(json.dumps(result))
    script.command_table(type("Args", (), {"out": tmp_path, "write": tmp_path / "table.md"})())
    text = (tmp_path / "table.md").read_text()
    assert "| 0123456 |" in text
    # paired over seed 1 only: seed 0's gpucnn run stopped early
    assert "- resnet20 none: gpucnn - PyTorch: 92.00 - 90.00 = +2.00 over seeds 1" in text
    assert "(stopped after 2 of 5 epochs)" in text
    assert "resnet20 none torch: 90.00% over 2 seed(s)" in text and "resnet20 none gpucnn: 92.00% over 1" in text
    assert "Not run: " in text and "lenet5 none gpucnn seed 0" in text

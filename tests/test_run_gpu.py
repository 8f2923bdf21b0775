"""bench/run_gpu.sh end to end at GPUCNN_RUN_GPU_SCALE=small: every step runs and leaves its results
where $GPUCNN_RESULTS_DIR says. Skipped without a GPU; CI runs it on the CuPy stand-in."""
import json
import subprocess

import pytest

from tests.helpers import ROOT, clean_env
from tests.synthetic_data import write_random_split

pytestmark = pytest.mark.gpu


def test_run_gpu_script_runs_every_step_and_writes_into_the_results_dir(tmp_path):
    data = tmp_path / "fashion-mnist"
    data.mkdir()
    write_random_split(data, "train", seed=0, n=48, gz=True)
    write_random_split(data, "test", seed=1, n=16, gz=True)
    results = tmp_path / "results"
    env = {**clean_env(), "GPUCNN_RESULTS_DIR": str(results), "GPUCNN_DATA_DIR": str(data),
           "GPUCNN_RUN_GPU_SCALE": "small"}
    run = subprocess.run(["bash", "bench/run_gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    (out,) = results.iterdir()
    status = (out / "status.txt").read_text().splitlines()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert [line.split()[:2] for line in status] == [["tests", "exit=0"], ["train", "exit=0"], ["ops", "exit=0"],
                                                    ["e2e", "exit=0"]]
    assert "1 passed" in (out / "tests.log").read_text()
    assert "scale: small" in (out / "environment.txt").read_text()
    metrics = (out / "train-fashion-mnist" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-1])["epoch"] == 1
    ops = json.loads((out / "gpu_ops.json").read_text())
    assert [row["op"] for row in ops["rows"]] == ["b2 act1 relu fwd", "b2 act1 relu bwd", "adam step"]
    assert all(row["ours_us"] > 0 for row in ops["rows"])
    e2e = json.loads((out / "gpu_train.json").read_text())
    assert sorted(row["variant"] for row in e2e["rows"]) == ["gpucnn-eager", "gpucnn-graph"]
    assert e2e["reproducible_weights"] == {"gpucnn-graph": True, "gpucnn-eager": True}

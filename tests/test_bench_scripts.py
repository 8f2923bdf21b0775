"""The GPU benchmarks on a machine without a GPU: each stops at once with one clear line, and the parts
that need no GPU (recording and replaying launches, every benchmark row built and run once on the
emulator against PyTorch on the CPU, the floors, the table) work.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from gpucnn import backend
from gpucnn.cuda import conv as cuda_conv
from gpucnn.ops import conv as ops_conv
from gpucnn.emulator import EmulatorRuntime

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

no_gpu_only = pytest.mark.skipif(backend.gpu_available(), reason="checks what happens without a GPU")


def _load(name):
    """bench/<name>.py as a module (the scripts import their neighbour gpu_env by name)."""
    module_name = f"bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def _run(command, **kwargs):
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, **kwargs)


@no_gpu_only
@pytest.mark.parametrize("args", [["bench/gpu_ops.py"], ["bench/gpu_train.py"],
                                  ["bench/gpu_train.py", "--compile-probe"],
                                  ["bench/gpu_ops.py", "--no-torch", "--only", "conv"]])
def test_benchmark_stops_with_one_line_without_a_gpu(args):
    result = _run([sys.executable, *args])
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no GPU: "), result.stderr


@no_gpu_only
def test_run_gpu_script_stops_before_writing_anything(tmp_path):
    result = _run(["bash", "bench/run_gpu.sh"], env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                                                      "GPUCNN_RESULTS_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert result.stderr.strip().startswith("no GPU: ") and len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_run_gpu_script_parses_and_refuses_unknown_steps(tmp_path):
    assert _run(["bash", "-n", "bench/run_gpu.sh"]).returncode == 0
    result = _run(["bash", "bench/run_gpu.sh", "tests", "benchmarks"], env={"PATH": "/usr/bin:/bin",
                                                                            "GPUCNN_RESULTS_DIR": str(tmp_path)})
    assert result.returncode == 2 and "unknown step 'benchmarks'" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_argument_checks():
    gpu_ops, gpu_train = _load("gpu_ops"), _load("gpu_train")
    assert gpu_ops.parse_args(["--batches", "64,256", "--only", "conv,adam"]).batches == [64, 256]
    with pytest.raises(SystemExit):
        gpu_ops.parse_args(["--only", "conv,gemm"])
    with pytest.raises(SystemExit):
        gpu_ops.parse_args(["--reps", "0"])
    assert gpu_train.parse_args(["--batch-sizes", "32"]).batch_sizes == [32]
    assert gpu_train.parse_args(["--no-torch"]).only == ["gpucnn-graph", "gpucnn-eager", "jax-jit"]
    for bad in (["--rounds", "0"], ["--pool", "0"], ["--only", "gpucnn-graph,mxnet"]):
        with pytest.raises(SystemExit):
            gpu_train.parse_args(bad)


def test_floor_is_the_larger_of_memory_and_arithmetic_time():
    gpu_ops = _load("gpu_ops")
    ceilings = {"bandwidth_bytes_per_s": 1e12, "fp32_flops_per_s": 5e13}
    assert gpu_ops.floor_us(0.0, 2e6, ceilings) == pytest.approx(2.0)      # 2 MB at 1 TB/s
    assert gpu_ops.floor_us(5e8, 2e6, ceilings) == pytest.approx(10.0)     # 0.5 GFLOP at 50 TFLOP/s
    assert gpu_ops.relative_error(np.array([1.0, 2.5]), np.array([1.0, 2.0])) == pytest.approx(0.25)


@pytest.mark.emulator
def test_recorded_launches_replay_on_refilled_inputs():
    gpu_ops = _load("gpu_ops")
    rt = gpu_ops.RecordingRuntime(EmulatorRuntime(order="reverse"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    grad_y = rng.standard_normal((2, 4, 9, 9)).astype(np.float32)
    grad_x, grad_weight, _ = cuda_conv.conv2d_backward(grad_y, x, weight, padding=1, runtime=rt)
    launches = rt.take()
    assert rt.take() == []
    names = [launch.name for launch in launches]
    assert names[0] == "conv2d_small_backward_data" and "conv2d_small_backward_weight" in names

    x[...] = rng.standard_normal(x.shape)
    grad_y[...] = rng.standard_normal(grad_y.shape)
    gpu_ops.replay(launches)
    ref_x, ref_weight, _ = ops_conv.conv2d_backward(grad_y, x, weight, padding=1)
    np.testing.assert_allclose(grad_x, ref_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_weight, ref_weight, rtol=1e-4, atol=1e-4)


class _NumpyRandomState:
    """cupy.random.RandomState's calls that the benchmark makes, on NumPy."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def standard_normal(self, shape, dtype):
        return self.rng.standard_normal(shape, dtype=dtype)

    def randint(self, low, high, size):
        return self.rng.integers(low, high, size)


@pytest.mark.emulator
@pytest.mark.slow
def test_every_benchmark_row_runs_and_agrees_with_pytorch_on_the_cpu():
    """Each row's recorded kernels, public call, PyTorch op and check, once, at batch 2: the GPU
    session then only meets problems of the GPU itself."""
    torch = pytest.importorskip("torch")
    gpu_ops = _load("gpu_ops")
    numpy_as_cupy = types.SimpleNamespace(float32=np.float32, int32=np.int32, concatenate=np.concatenate,
                                          random=types.SimpleNamespace(RandomState=_NumpyRandomState))
    bench = gpu_ops.Bench(numpy_as_cupy, torch, runtime=EmulatorRuntime(order="random", seed=4), device="cpu")
    gpu_ops.build_rows(bench, gpu_ops.parse_args(["--batches", "2", "--only", "conv,pool,linear,loss,relu,adam"]))
    assert len(bench.rows) == 6 + 4 + 2 + 9 + 2 + 1
    for row in bench.rows:
        row.refresh()
        row.ours()
        row.torch()
        if row.call is not None:
            row.call()
        error = bench.check(row)
        assert error is not None and error < 1e-4, (row.op, error)
        assert row.bytes > 0 and row.flops >= 0
    ceilings = {"bandwidth_bytes_per_s": 3e12, "fp32_flops_per_s": 5e13, "copy_bytes": 2**30, "gemm_n": 8192}
    for row in bench.rows:
        row.results.update(ours_us=10.0, torch_us=5.0, ours_over_torch=2.0, check=0.0,
                           floor_us=gpu_ops.floor_us(row.flops, row.bytes, ceilings))
    table = gpu_ops.format_table(bench.rows, ceilings)
    assert len(table.splitlines()) == len(bench.rows) + 2 and "3000 GB/s" in table


@pytest.mark.emulator
def test_training_variants_run_and_agree_on_the_cpu():
    """The end-to-end benchmark's gpucnn steps without gpucnn.step, on NumPy and the emulator: the
    user path and the fused one agree over a few steps, the reproducibility check holds, and
    PyTorch's model trains."""
    gpu_train = _load("gpu_train")
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((16, 1, 28, 28)).astype(np.float32) for _ in range(3)]
    labels = [rng.integers(0, 10, 16).astype(np.int32) for _ in range(3)]
    emulator = EmulatorRuntime(order="random", seed=6)
    models, losses = [], []
    for variant in ("gpucnn", "gpucnn-fused"):
        model, step = gpu_train.gpucnn_trainer(variant, seed=0, device="cpu", runtime=emulator)
        losses.append([float(step(x, y)) for x, y in zip(images, labels)])
        models.append(model)
    assert np.isfinite(losses).all() and losses[0] == pytest.approx(losses[1], rel=1e-3)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        np.testing.assert_allclose(q.data, p.data, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="unknown gpucnn variant"):
        gpu_train.gpucnn_trainer("gpucnn-graph", seed=0, device="cpu")

    numpy_as_cupy = types.SimpleNamespace(asnumpy=np.asarray)
    make = lambda: gpu_train.gpucnn_trainer("gpucnn-fused", seed=0, device="cpu", runtime=emulator)  # noqa: E731
    assert gpu_train.gpucnn_weights_are_reproducible(numpy_as_cupy, make, images, labels, steps=2)

    torch = pytest.importorskip("torch")
    _, step = gpu_train.torch_trainer(torch, seed=0, device="cpu")
    first = float(step(torch.from_numpy(images[0]), torch.from_numpy(labels[0]).long()))
    for _ in range(5):
        last = float(step(torch.from_numpy(images[0]), torch.from_numpy(labels[0]).long()))
    assert np.isfinite(first) and last < first


@pytest.mark.emulator
def test_the_end_to_end_benchmark_trains_vgg_small_too(monkeypatch):
    gpu_train = _load("gpu_train")
    assert gpu_train.parse_args(["--model", "vgg-small"]).model == "vgg-small"
    monkeypatch.setattr(gpu_train, "MODEL", "vgg-small")
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((2, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, 2).astype(np.int32)
    model, step = gpu_train.gpucnn_trainer("gpucnn-fused", seed=0, device="cpu",
                                           runtime=EmulatorRuntime(order="forward", seed=1))
    assert type(model).__name__ == "VGGSmall" and np.isfinite(float(step(x, y)))
    torch = pytest.importorskip("torch")
    torch_model, torch_step = gpu_train.torch_trainer(torch, seed=0, device="cpu")
    assert sum(p.numel() for p in torch_model.parameters()) == sum(p.size for p in model.parameters())
    assert np.isfinite(float(torch_step(torch.from_numpy(x), torch.from_numpy(y).long())))


def test_the_captured_variant_says_in_one_line_when_gpucnn_step_is_missing(monkeypatch):
    gpu_train = _load("gpu_train")
    monkeypatch.setitem(sys.modules, "gpucnn.step", None)   # import gpucnn.step raises ImportError
    with pytest.raises(gpu_train.Unavailable, match="gpucnn.step.TrainStep cannot be imported") as info:
        gpu_train.gpucnn_train_step(64, seed=0, graph=True, device="cpu")
    assert "\n" not in str(info.value)


def test_rounds_alternate_and_rows_report_medians_ratios_and_goals():
    gpu_train = _load("gpu_train")
    calls = []

    def fake_timer(seconds_per_step):
        per_round = iter(seconds_per_step)

        def timer(run, first, steps):
            run(first, steps)
            return next(per_round) * steps
        return timer

    plans = {"gpucnn-graph": [1e-3, 9e-3, 1e-3, 2e-3, 1e-3], "pytorch-eager": [4e-3] * 5,
             "torch-compile": [2e-3, 2e-3, 3e-3, 2e-3, 2e-3]}
    variants = [gpu_train.Variant(name, lambda first, steps, name=name: calls.append((name, first, steps)),
                                  fake_timer(plan), dict) for name, plan in plans.items()]
    gpu_train.measure(variants, rounds=5, round_steps=10, pool=16)
    # one round of each variant in turn, batches cycling through the pool
    assert calls[:4] == [("gpucnn-graph", 0, 10), ("pytorch-eager", 0, 10), ("torch-compile", 0, 10),
                         ("gpucnn-graph", 10, 10)]
    assert len(calls) == 15 and calls[6][1] == 20 % 16
    rows = [gpu_train.summarize(v.name, 64, v.rounds_s, 10) for v in variants]
    graph = rows[0]
    assert graph["median_step_ms"] == pytest.approx(1.0) and graph["max_step_ms"] == pytest.approx(9.0)
    assert graph["images_per_s"] == pytest.approx(64000)
    gpu_train.add_ratios(rows)
    assert [r["vs_pytorch-eager"] for r in rows] == pytest.approx([4.0, 1.0, 2.0])
    assert gpu_train.goals(rows, 64) == [("gpucnn-graph >= 3x pytorch-eager at batch 64: x4.00", True),
                                         ("gpucnn-graph >= 1x torch-compile at batch 64: x2.00", True)]
    assert gpu_train.goals(rows[1:], 64) == []
    table = gpu_train.format_table(rows + [gpu_train.summarize("jax-jit", 256, [0.5], 100)])
    lines = table.splitlines()
    assert len(lines) == 5 and lines[1].split()[:2] == ["gpucnn-graph", "64"] and lines[4].split()[6] == "-"
    with pytest.raises(ValueError, match="at least one timed round"):
        gpu_train.summarize("x", 64, [], 10)


def test_host_timer_waits_for_the_last_result_before_stopping_the_clock():
    gpu_train = _load("gpu_train")
    waited = []
    timer = gpu_train.host_timer(lambda out: waited.append(out))
    seconds = timer(lambda first, steps: (first, steps), 3, 20)
    assert waited == [(3, 1), (4, 20)] and seconds >= 0


def test_jax_step_matches_the_pytorch_step_on_the_cpu():
    """The jax.jit LeNet-5 step is the same network and Adam: from PyTorch's weights, three steps agree."""
    jax = pytest.importorskip("jax")
    torch = pytest.importorskip("torch")
    gpu_train = _load("gpu_train")
    jax.config.update("jax_default_matmul_precision", "highest")
    params, state, step = gpu_train.jax_lenet_step(jax, seed=0)
    model, torch_step = gpu_train.torch_trainer(torch, seed=0, device="cpu")
    layers = [m for m in model if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    for i, layer in enumerate(layers, start=1):
        w = layer.weight.detach().numpy()
        params[f"w{i}"] = jax.numpy.asarray(w if w.ndim == 4 else w.T)
        params[f"b{i}"] = jax.numpy.asarray(layer.bias.detach().numpy())
        assert params[f"w{i}"].shape == (w.shape if w.ndim == 4 else w.T.shape)
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = rng.standard_normal((8, 1, 28, 28)).astype(np.float32)
        y = rng.integers(0, 10, 8)
        params, state, loss = step(params, state, jax.numpy.asarray(x), jax.numpy.asarray(y, dtype=np.int32))
        torch_loss = torch_step(torch.from_numpy(x), torch.from_numpy(y))
        assert float(loss) == pytest.approx(float(torch_loss), rel=1e-4)
    np.testing.assert_allclose(np.asarray(params["w5"]), layers[-1].weight.detach().numpy().T, rtol=1e-3,
                               atol=1e-5)


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python on a GPU machine: the GPU check and the version probe pass, every step is logged.
if [ "$1" = "-c" ]; then exit 0; fi
if [ "$1" = "-" ]; then cat > /dev/null; echo "device: fake GPU"; exit 0; fi
echo "$*" >> "$CALLS"
echo "ran $*"; echo "a warning" >&2
case "$*" in *bench/gpu_ops.py*) exit 3 ;; esac
"""


def _fake_gpu_run(tmp_path, *args, **env):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.log"
    results = tmp_path / "results"
    result = _run(["bash", "bench/run_gpu.sh", *args],
                  env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "CALLS": str(calls),
                       "GPUCNN_RESULTS_DIR": str(results), **env})
    (out,) = results.iterdir()
    calls_made = calls.read_text().splitlines() if calls.exists() else []
    return result, out, calls_made


def test_run_gpu_script_runs_every_step_bounded_and_records_it(tmp_path):
    data = tmp_path / "fashion"
    data.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (data / name).write_bytes(b"")
    result, out, calls = _fake_gpu_run(tmp_path, GPUCNN_DATA_DIR=str(data))
    assert result.returncode == 1, result.stdout + result.stderr      # the ops step failed (exit 3)
    tests, train, ops, e2e = calls
    # The GPU rows live beside the CPU ones (the backend fixture): -m gpu selects them from tests/.
    assert tests.startswith("-m pytest -m gpu ") and tests.split()[-1] == "tests"
    assert train.startswith("cli.py train --device gpu --dataset fashion-mnist --data-dir " + str(data))
    assert "bench/gpu_ops.py --batches 64,256" in ops and "bench/gpu_train.py --json" in e2e
    status = (out / "status.txt").read_text().splitlines()
    assert [line.split()[:2] for line in status] == [["tests", "exit=0"], ["train", "exit=0"], ["ops", "exit=3"],
                                                    ["e2e", "exit=0"]]
    assert "a warning" in (out / "ops.log").read_text()                # stderr is kept
    environment = (out / "environment.txt").read_text()
    assert "date_utc: " in environment and "device: fake GPU" in environment


def test_run_gpu_script_skips_what_the_data_or_the_time_does_not_allow(tmp_path):
    result, out, calls = _fake_gpu_run(tmp_path, "train", "e2e", GPUCNN_DATA_DIR=str(tmp_path / "none"),
                                       GPUCNN_TOTAL_SECONDS="10")
    assert result.returncode == 1 and calls == []
    status = (out / "status.txt").read_text()
    assert "train skipped: " in status and "lacks train-images-idx3-ubyte.gz" in status
    assert "e2e skipped: " in status and "of the 10s left" in status


class _HostEvent:
    """cupy.cuda.Event on the host clock."""

    def record(self, stream=None):
        self.at = time.perf_counter()

    def synchronize(self):
        pass


@pytest.mark.emulator
def test_the_eager_gpucnn_variant_trains_and_is_timed_by_its_events(monkeypatch):
    """gpucnn-eager as main builds it (here without gpucnn.step: the fused eager fallback), on the
    emulator with a CuPy stand-in: warm-up, alternating timed rounds, a row, a finite loss."""
    gpu_train = _load("gpu_train")
    monkeypatch.setitem(sys.modules, "gpucnn.step", None)
    cuda = types.SimpleNamespace(Event=_HostEvent, get_current_stream=lambda: None,
                                 get_elapsed_time=lambda a, b: (b.at - a.at) * 1e3,
                                 Device=lambda: types.SimpleNamespace(synchronize=lambda: None))
    fake_cupy = types.SimpleNamespace(cuda=cuda)
    rng = np.random.default_rng(3)
    images = [rng.standard_normal((4, 1, 28, 28)).astype(np.float32) for _ in range(2)]
    labels = [rng.integers(0, 10, 4).astype(np.int32) for _ in range(2)]
    variant = gpu_train.gpucnn_variant(fake_cupy, "gpucnn-eager", images, labels, 4, warmup_steps=1,
                                       device="cpu", runtime=EmulatorRuntime())
    gpu_train.measure([variant], rounds=2, round_steps=1, pool=2)
    row = gpu_train.summarize(variant.name, 4, variant.rounds_s, 1)
    assert len(variant.rounds_s) == 2 and all(s > 0 for s in variant.rounds_s) and row["images_per_s"] > 0
    assert np.isfinite(variant.result()["last_loss"]) and variant.setup_s > 0
    with pytest.raises(gpu_train.Unavailable, match="captured step is not measured"):
        gpu_train.gpucnn_variant(fake_cupy, "gpucnn-graph", images, labels, 4, 1, device="cpu")


def test_cpu_benchmark_arguments_and_median():
    cpu = _load("cpu_throughput")
    args = cpu.parse_args(["--batch-sizes", "64,256", "--modes", "infer", "--libraries", "gpucnn"])
    assert args.batch_sizes == [64, 256] and args.modes == ["infer"] and args.libraries == ["gpucnn"]
    assert cpu.parse_args([]).modes == ["train", "loop", "infer"] and cpu.parse_args([]).model == "lenet5"
    for bad in (["--batch-sizes", "0"], ["--modes", "eval"], ["--libraries", "jax"], ["--rounds", "0"],
                ["--model", "resnet-1000"]):
        with pytest.raises(SystemExit):
            cpu.parse_args(bad)
    assert cpu.median([3.0, 1.0, 2.0]) == 2.0 and cpu.median([4.0, 1.0, 2.0, 3.0]) == 2.5


def test_cpu_benchmark_runs_a_worker_process_per_library_and_writes_json(tmp_path):
    """A tiny run of gpucnn alone (PyTorch's import would cost seconds): rounds come back from the worker."""
    out = tmp_path / "cpu.json"
    result = _run([sys.executable, "bench/cpu_throughput.py", "--libraries", "gpucnn", "--batch-sizes", "3",
                   "--rounds", "2", "--steps", "1", "--warmup", "1", "--pool", "8", "--json", str(out)])
    assert result.returncode == 0, result.stderr
    import json  # noqa: PLC0415
    report = json.loads(out.read_text())
    assert [(row["mode"], row["batch_size"]) for row in report["throughput"]] == [("train", 3), ("loop", 3),
                                                                                  ("infer", 3)]
    for row in report["throughput"]:
        assert len(row["gpucnn_rounds"]) == 2 and row["gpucnn_images_per_s"] > 0 and "load_before" in row
    assert report["env"]["gpucnn_cpu_path"] == "fast" and report["env"]["threads"] == 2


def test_cpu_benchmark_onnxruntime_rows_are_inference_only_with_gpucnns_weights(tmp_path):
    """ONNX Runtime runs gpucnn's exported model (its worker checks the logits agree) and only in infer rows."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    out = tmp_path / "ort.json"
    result = _run([sys.executable, "bench/cpu_throughput.py", "--libraries", "gpucnn,onnxruntime", "--batch-sizes", "3",
                   "--rounds", "2", "--steps", "1", "--warmup", "0", "--round-warmup", "0", "--pool", "8",
                   "--modes", "loop,infer", "--json", str(out)])
    assert result.returncode == 0, result.stderr
    import json  # noqa: PLC0415
    loop, infer = json.loads(out.read_text())["throughput"]
    assert "onnxruntime_images_per_s" not in loop and "ratio_onnxruntime" not in loop
    assert infer["onnxruntime_images_per_s"] > 0 and len(infer["onnxruntime_rounds"]) == 2
    assert infer["ratio_onnxruntime"] == infer["gpucnn_images_per_s"] / infer["onnxruntime_images_per_s"]


def test_cpu_benchmark_models_are_gpucnns_networks_in_pytorch():
    """bench/bench_models.py: PyTorch's form of every registered model has gpucnn's parameter count."""
    torch = pytest.importorskip("torch")
    from gpucnn import models  # noqa: PLC0415
    bench_models = _load("bench_models")
    built = [name for name in bench_models.MODELS if name in models.available_models()]
    assert {"lenet5", "vgg-small"} <= set(built)
    for name in built:
        ours = sum(p.data.size for p in bench_models.gpucnn_model(name).parameters())
        assert sum(p.numel() for p in bench_models.torch_model(torch, name).parameters()) == ours, name


def test_cpu_layer_profile_prints_every_layer_in_run_order():
    result = _run([sys.executable, "bench/cpu_layer_profile.py", "--batch-size", "2", "--steps", "6"])
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()[1:-1]]
    # each ReLU runs inside the max-pool or linear layer before it (and its backward in the layer after)
    assert names == ["conv1", "pool1", "conv2", "pool2", "flatten", "fc1", "fc2", "fc3"]
    assert result.stdout.splitlines()[-1].startswith("loss ")


def test_cpu_layer_profile_walks_into_residual_blocks():
    result = _run([sys.executable, "bench/cpu_layer_profile.py", "--model", "resnet20", "--batch-size", "2",
                   "--steps", "6", "--clock", "cpu"])
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()[1:-1]]
    assert names[:2] == ["conv1", "bn1"] and names[-1] == "fc"
    assert {"layer1.0.conv1", "layer1.0.bn2", "layer1.0", "layer2.0.downsample.0", "layer3.2.conv2"} <= set(names)
    assert "layer1.0.act1" not in names and "relu" not in names  # each ReLU after a BatchNorm runs inside it
    for line in result.stdout.splitlines()[1:-1]:
        forward, backward = float(line.split()[2]), float(line.split()[4])
        assert forward >= 0 and backward >= 0


@pytest.mark.emulator
def test_the_adam_row_replays_only_the_update():
    """The "adam step" row times advance_step and adam_update, not the constructor's fill of the gradients."""
    gpu_ops = _load("gpu_ops")
    numpy_as_cupy = types.SimpleNamespace(float32=np.float32, random=types.SimpleNamespace(RandomState=_NumpyRandomState))
    bench = gpu_ops.Bench(numpy_as_cupy, None, runtime=EmulatorRuntime(), device="cpu")
    bench.adam()
    (row,) = bench.rows
    assert [launch.name for launch in row.launches] == ["optim_advance_step", "adam_update"]


def test_gpu_tests_are_collected_without_the_optional_test_packages(tmp_path):
    """bench/run_gpu.sh's `pytest -m gpu tests` on a machine without hypothesis, matplotlib, Pillow or
    click: the modules that need them skip, and every GPU test is still collected."""
    for name in ("hypothesis", "matplotlib", "PIL", "click"):
        (tmp_path / f"{name}.py").write_text(f"raise ModuleNotFoundError('{name} is hidden', name='{name}')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    result = _run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider",
                   "-p", "no:hypothesispytest", "tests"], env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    collected = int(re.search(r"(\d+)/\d+ tests collected", result.stdout).group(1))
    assert collected >= 100 and "error" not in result.stdout.strip().splitlines()[-1]


@pytest.mark.gpu
def test_gpu_ops_writes_its_json_after_every_row(tmp_path, monkeypatch):
    """A run stopped after two rows (as by its time limit) leaves them in --json."""
    gpu_ops = _load("gpu_ops")
    real_time_op, calls = gpu_ops.time_op, []

    def time_op(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2 + 4:  # the two ceilings, then two rows: ours and the public call each
            raise KeyboardInterrupt
        return real_time_op(*args, **kwargs)
    monkeypatch.setattr(gpu_ops, "time_op", time_op)
    out = tmp_path / "ops.json"
    with pytest.raises(KeyboardInterrupt):
        gpu_ops.main(["--batches", "2", "--reps", "1", "--warmup", "0", "--inner", "1", "--copy-mib", "1",
                      "--gemm-n", "8", "--no-torch", "--only", "relu,adam", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [row["op"] for row in rows] == ["b2 act1 relu fwd", "b2 act1 relu bwd"]
    assert all(row["ours_us"] > 0 for row in rows)


@pytest.mark.gpu
def test_preflight_names_the_missing_library(monkeypatch):
    gpu_env = _load("gpu_env")
    cp = gpu_env.require_gpu()  # every check passes here

    def missing(*args, **kwargs):
        raise ImportError("libcurand.so.10: cannot open shared object file")
    monkeypatch.setattr(cp.random, "RandomState", missing)
    with pytest.raises(SystemExit, match=r"^no GPU: cuRAND \(a cupy.random.RandomState draw\) failed "
                                         r"\(ImportError: libcurand.so.10"):
        gpu_env.require_gpu()

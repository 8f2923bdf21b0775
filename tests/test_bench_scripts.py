"""The GPU benchmarks on a machine without a GPU: each stops at once with one clear line, and the parts
that need no GPU (recording and replaying launches, every benchmark row built and run once on the
emulator against PyTorch on the CPU, the floors, the table) work.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from gpucnn import backend
from gpucnn.cuda import conv as cuda_conv
from gpucnn.ops import conv as ops_conv
from gpucnn.testing.emulator import EmulatorRuntime

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
    with pytest.raises(SystemExit):
        gpu_train.parse_args(["--images", "0"])


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
    assert names[0] == "conv2d_backward_data" and "conv2d_backward_weight_partial" in names

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
    """The end-to-end benchmark's steps, on NumPy and the emulator: eager gpucnn and the fused variant
    follow the same path for a few steps, PyTorch's model trains, and the reproducibility check holds."""
    gpu_train = _load("gpu_train")
    rng = np.random.default_rng(0)
    images = rng.standard_normal((48, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, 48).astype(np.int32)
    order = rng.permutation(48)
    emulator = EmulatorRuntime(order="random", seed=6)
    models, losses = [], []
    for variant in ("gpucnn", "gpucnn-fused"):
        model, step = gpu_train.gpucnn_trainer(variant, seed=0, device="cpu", runtime=emulator)
        losses.append(float(gpu_train.run_epoch(step, images, labels, order, 16)))
        models.append(model)
    assert np.isfinite(losses).all() and losses[0] == pytest.approx(losses[1], rel=1e-3)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        np.testing.assert_allclose(q.data, p.data, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="unknown gpucnn variant"):
        gpu_train.gpucnn_trainer("gpucnn-graph", seed=0, device="cpu")

    numpy_as_cupy = types.SimpleNamespace(random=types.SimpleNamespace(RandomState=np.random.RandomState),
                                          asnumpy=np.asarray)
    assert gpu_train.gpucnn_weights_are_reproducible(numpy_as_cupy, "gpucnn-fused", images, labels, steps=2,
                                                     device="cpu", runtime=emulator)

    torch = pytest.importorskip("torch")
    _, step = gpu_train.torch_trainer(torch, seed=0, device="cpu")
    loss = gpu_train.run_epoch(step, torch.from_numpy(images), torch.from_numpy(labels).long(),
                               torch.from_numpy(order), 16, steps=2)
    assert np.isfinite(float(loss))


def test_cpu_benchmark_arguments_and_median():
    cpu = _load("cpu_throughput")
    args = cpu.parse_args(["--batch-sizes", "64,256", "--modes", "infer", "--libraries", "gpucnn"])
    assert args.batch_sizes == [64, 256] and args.modes == ["infer"] and args.libraries == ["gpucnn"]
    for bad in (["--batch-sizes", "0"], ["--modes", "eval"], ["--libraries", "jax"], ["--rounds", "0"]):
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
    assert [(row["mode"], row["batch_size"]) for row in report["throughput"]] == [("train", 3), ("infer", 3)]
    for row in report["throughput"]:
        assert len(row["gpucnn_rounds"]) == 2 and row["gpucnn_images_per_s"] > 0 and "load_before" in row
    assert report["env"]["gpucnn_cpu_path"] == "fast" and report["env"]["threads"] == 2

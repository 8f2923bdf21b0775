"""The backend shim: device names, the environment default, and a clear error where no GPU is usable."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpucnn import backend

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_cupy(monkeypatch):
    """A machine where `import cupy` fails, whatever this one has."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setattr(backend, "_cupy_problem", None)


def test_importing_every_module_leaves_cupy_unimported():
    code = ("import sys, gpucnn, gpucnn.cli, gpucnn.train, gpucnn.ops, gpucnn.cuda, gpucnn.nn, gpucnn.models, "
            "gpucnn.data, gpucnn.features, gpucnn.emulator; print('cupy' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_gpu_without_cupy_is_one_clear_error(no_cupy):
    with pytest.raises(backend.DeviceError, match=r"^the GPU was asked for, but CuPy is not installed") as info:
        backend.resolve_device("gpu")
    assert "gpucnn[cuda12]" in str(info.value) and "\n" not in str(info.value)
    assert not backend.gpu_available()


def test_auto_falls_back_to_cpu(no_cupy):
    assert backend.resolve_device("auto") == "cpu"
    assert backend.xp_for("auto") is np


@pytest.mark.parametrize("value, expected", [("cpu", "cpu"), (" CPU ", "cpu"), ("", "auto")])
def test_environment_names_the_default_device(monkeypatch, value, expected):
    monkeypatch.setenv(backend.DEVICE_ENV, value)
    assert backend.default_device() == expected


def test_unknown_device_names_are_refused(monkeypatch):
    with pytest.raises(backend.DeviceError, match="unknown device 'tpu'"):
        backend.resolve_device("tpu")
    monkeypatch.setenv(backend.DEVICE_ENV, "cuda")
    with pytest.raises(backend.DeviceError, match="GPUCNN_DEVICE='cuda' is not a device"):
        backend.resolve_device(None)


def test_cpu_arrays_stay_numpy():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert backend.get_array_module(x) is np
    assert backend.device_of(x) == "cpu"
    moved = backend.to_device(x, "cpu")
    assert isinstance(moved, np.ndarray) and np.array_equal(moved, x)
    assert np.array_equal(backend.to_numpy([1, 2]), np.array([1, 2]))


@pytest.mark.gpu
def test_round_trip_through_the_gpu():
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    on_gpu = backend.to_device(x, "gpu")
    assert backend.is_gpu_array(on_gpu) and backend.device_of(on_gpu) == "gpu"
    assert backend.get_array_module(on_gpu) is backend.cupy_module()
    assert np.array_equal(backend.to_numpy(on_gpu), x)
    assert backend.describe("gpu").startswith("gpu (")

"""The CuPy stand-in (tests/cupy_standin): CuPy's names and signatures, and the refusals that make it strict.

tests/cupy_api.json records the API gpucnn uses as cupy-cuda13x 14.2.0 has it (tests/cupy_signatures.py);
the stand-in is compared with the record everywhere, and the record with CuPy where CuPy imports.
The behaviour tests are marked gpu: they run in the stand-in pass (``--cupy-standin``) and skip on a
real GPU, where they would test CuPy itself.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gpucnn import backend
from tests.helpers import ROOT

RECORD = json.loads((ROOT / "tests" / "cupy_api.json").read_text())
STANDIN = ROOT / "tests" / "cupy_standin"


def _api(pythonpath: str | None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    result = subprocess.run([sys.executable, "-W", "ignore", "tests/cupy_signatures.py"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    return result


def _matches(recorded: list, ours: list) -> bool:
    """Same names; a recorded ``**kwargs`` (a Cython signature) may be spelled out by the stand-in."""
    if recorded and recorded[-1] == "kwargs":
        return ours[:len(recorded) - 1] == recorded[:-1]
    return ours == recorded


def test_the_standin_has_cupys_names_and_signatures():
    result = _api(str(STANDIN))
    assert result.returncode == 0, result.stderr
    ours = json.loads(result.stdout)
    differ = {name: (params, ours["parameters"][name]) for name, params in RECORD["parameters"].items()
              if not _matches(params, ours["parameters"][name])}
    assert differ == {}
    assert ours["bases"] == RECORD["bases"] and ours["constants"] == RECORD["constants"]
    assert ours["nccl_available_is_bool"]


def test_the_record_matches_the_installed_cupy():
    result = _api(None)
    if result.returncode != 0 or "gpucnn.standin" in subprocess.run(
            [sys.executable, "-W", "ignore", "-c", "import cupy; print(cupy.__version__)"], cwd="/",
            capture_output=True, text=True, timeout=120).stdout:
        pytest.skip("CuPy cannot be imported here")
    real = json.loads(result.stdout)
    assert {k: v for k, v in RECORD.items() if not k.startswith("_")} == real


# ---- the stand-in's refusals (only under --cupy-standin) --------------------------------------

@pytest.fixture
def cp():
    module = backend.cupy_module() if backend.gpu_available() else None
    if not getattr(module, "STANDIN", False):
        pytest.skip("tests the CuPy stand-in (python -m pytest -m gpu --cupy-standin)")
    return module


standin_only = pytest.mark.gpu  # the stand-in pass selects -m gpu


@standin_only
def test_what_cupy_refuses_is_refused(cp):
    x = cp.arange(6, dtype=cp.float32)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(x)
    with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
        x + np.ones(6, np.float32)
    with pytest.raises(TypeError, match="Unsupported type"):
        np.multiply(np.ones(6, np.float32), x)
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray cannot be used for fill"):
        x[...] = np.ones(6, np.float32)
    x[...] = 2.5  # a scalar is a fill
    x[1:3] = cp.zeros(2, cp.float32)
    assert x.get().tolist() == [2.5, 0, 0, 2.5, 2.5, 2.5] and float(x.sum()) == 10.0
    with pytest.raises(TypeError, match="expected tuple"):
        cp.RawModule(code="", options=["-std=c++17"])


@standin_only
def test_a_capture_keeps_launches_and_refuses_what_a_graph_cannot_hold(cp):
    from cupy.cuda.runtime import CUDARuntimeError  # noqa: PLC0415 - the stand-in's, as CuPy names it

    kernel = cp.RawModule(code='extern "C" __global__ void add_one(float* x, int n) {'
                               ' int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] += 1.0f; }',
                          options=("-std=c++17",)).get_function("add_one")
    x = cp.zeros(4, cp.float32)
    stream = cp.cuda.Stream(non_blocking=False)
    with stream:
        stream.begin_capture()
        kernel((1,), (32,), (x, np.int32(4)))
        graph = stream.end_capture()
        assert x.get().tolist() == [0, 0, 0, 0]  # kept, not run
        graph.launch(stream)
        graph.launch(stream)
    stream.synchronize()
    assert x.get().tolist() == [2, 2, 2, 2]
    for refused in (lambda: cp.zeros(1), lambda: x.get(), lambda: stream.synchronize(),
                    lambda: cp.cuda.Device().synchronize()):
        with stream:
            stream.begin_capture()
            with pytest.raises(CUDARuntimeError, match="cudaErrorStreamCaptureUnsupported"):
                refused()
            with pytest.raises(CUDARuntimeError, match="cudaErrorStreamCaptureInvalidated"):
                stream.end_capture()
    stream.begin_capture()  # the legacy stream is the current one here
    with pytest.raises(CUDARuntimeError, match="cudaErrorStreamCaptureImplicit"):
        x.fill(0.0)
    with pytest.raises(CUDARuntimeError, match="cudaErrorStreamCaptureInvalidated"):
        stream.end_capture()


@standin_only
def test_stream_order_is_checked(cp):
    from cupy.cuda.stream import StreamOrderError  # noqa: PLC0415 - the stand-in's own

    x = cp.ones(4, cp.float32)  # written on the legacy stream
    side = cp.cuda.Stream(non_blocking=True)
    with side, pytest.raises(StreamOrderError, match="without ordering"):
        x += 1.0
    side.wait_event(cp.cuda.Stream.null.record())
    with side:
        x += 1.0
    with pytest.raises(StreamOrderError, match="read on the host"):
        x.get()  # on the legacy stream, which does not wait for a non-blocking one
    side.synchronize()
    assert x.get().tolist() == [2, 2, 2, 2]
    blocking = cp.cuda.Stream(non_blocking=False)  # orders with the legacy stream by itself
    with blocking:
        x *= 2.0
    assert x.get().tolist() == [4, 4, 4, 4]


@standin_only
def test_nccl_is_absent_as_in_cupy_cuda13x(cp):
    assert backend.nccl_module().available is False

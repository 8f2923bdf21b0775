"""Shared pytest set-up: the backend fixture, GPU tests skipped cleanly where CuPy or a GPU is missing,
and the fixtures several modules share (a local HTTP server, small data sets, a reference training run).

The ``backend`` fixture runs one test body on every place gpucnn's public ops run:

==================  ==========================================================================
id                  what ``gpucnn.ops`` runs for the body's arrays
==================  ==========================================================================
reference           NumPy arrays, the NumPy reference (``dispatch.cpu_path("reference")``)
fast                NumPy arrays, the fast CPU path (``gpucnn/cpu/``; the reference where none)
emulator-forward    EmulatorArrays: the CUDA kernels under the emulator, threads in forward order
emulator-reverse    ... in reverse order
emulator-random     ... in a random order (a missing barrier that one order hides shows up in another)
gpu                 CuPy arrays: the CUDA kernels on the GPU (marked ``gpu``: skipped without one)
==================  ==========================================================================

A body puts its inputs on the backend with ``backend.to(array)``, brings results back with
``backend.host(result)`` and compares them with the plain loops of tests/loops.py (or float64
finite differences). The kernels are float32 only: ``backend.kernels`` says whether they run, and a
test that needs float64 asks for ``@pytest.mark.backends("reference", "fast")``. The fixture holds
the backend's context (CPU path or thread order) for the whole test.

``--cupy-standin`` runs only the GPU tests (``-m gpu``), on tests/cupy_standin: a strict CuPy
stand-in put first on the path as ``cupy`` (for subprocesses too, through PYTHONPATH), whose
kernels run under the emulator. It checks gpucnn's CuPy code without a GPU; it measures nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest

from gpucnn import backend as gpucnn_backend
from gpucnn import dispatch
from gpucnn.data import DATASETS, DatasetSpec, FileSpec, datasets
from tests.helpers import MNIST_FILES, ROOT, Server, run_cli, train_args
from tests.synthetic_data import write_random_split


@dataclass(frozen=True)
class Backend:
    """One place the public ops run (see the table above)."""

    name: str
    device: str                    # "cpu", "emulator" or "gpu"
    cpu_path: str | None = None    # "reference" or "fast" on the CPU
    order: str | None = None       # the emulator's thread order

    @property
    def kernels(self) -> bool:
        """True where the ops run gpucnn's CUDA kernels (float32 only)."""
        return self.device in gpucnn_backend.KERNEL_DEVICES

    def to(self, array):
        """``array`` (None passes) on this backend's device."""
        return None if array is None else gpucnn_backend.to_device(array, self.device)

    def host(self, result):
        """A result (an array, None, or a tuple of them) as NumPy arrays."""
        if isinstance(result, tuple):
            return tuple(self.host(r) for r in result)
        return None if result is None else np.array(gpucnn_backend.to_numpy(result))

    def context(self):
        """The block in which ops run on this backend (CPU path or thread order)."""
        if self.cpu_path is not None:
            return dispatch.cpu_path(self.cpu_path)
        if self.order is not None:
            from gpucnn.emulator import emulator_order  # noqa: PLC0415

            return emulator_order(self.order)
        return contextlib.nullcontext()

    def launcher(self, family: str, name: str):
        """The kernel launcher of an op, bound to this backend's runtime (kernel backends only)."""
        from gpucnn.cuda.runtime import runtime_for  # noqa: PLC0415

        launch = dispatch.launcher(family, name)
        return lambda *args, **kwargs: launch(*args, **kwargs, runtime=runtime_for(self.device))


BACKENDS = [
    Backend("reference", "cpu", cpu_path="reference"),
    Backend("fast", "cpu", cpu_path="fast"),
    *(Backend(f"emulator-{order}", "emulator", order=order) for order in ("forward", "reverse", "random")),
    Backend("gpu", "gpu"),
]
_MARKS = {"emulator": [pytest.mark.emulator], "gpu": [pytest.mark.gpu], "cpu": []}


STANDIN_DIR = ROOT / "tests" / "cupy_standin"


def pytest_addoption(parser):
    parser.addoption("--cupy-standin", action="store_true",
                     help="run only the GPU tests, with tests/cupy_standin (a strict CuPy stand-in on the CPU) as cupy")


def pytest_configure(config):
    config.addinivalue_line("markers", "backends(*names): run the backend fixture only on these backends")
    if config.getoption("--cupy-standin"):
        use_cupy_standin()


def use_cupy_standin():
    """Make ``import cupy`` (here and in subprocesses) find the stand-in, and gpucnn probe it afresh."""
    sys.path.insert(0, str(STANDIN_DIR))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(STANDIN_DIR), os.environ.get("PYTHONPATH")]))
    for name in [n for n in sys.modules if n == "cupy" or n.startswith("cupy.")]:
        del sys.modules[name]  # a real CuPy imported before the option was read
    gpucnn_backend._cupy = gpucnn_backend._cupy_problem = None
    import cupy  # noqa: PLC0415

    assert getattr(cupy, "STANDIN", False), f"{cupy.__file__} is not the stand-in"


def pytest_report_header(config):
    if config.getoption("--cupy-standin"):
        return f"cupy: gpucnn's strict stand-in ({STANDIN_DIR}), kernels under the emulator; not a GPU"
    return None


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("backends")
    names = marker.args if marker else [b.name for b in BACKENDS]
    chosen = [b for b in BACKENDS if b.name in names or b.device in names]
    metafunc.parametrize("backend", [pytest.param(b, id=b.name, marks=_MARKS[b.device]) for b in chosen],
                         indirect=True)


@pytest.fixture
def backend(request):
    """The backend of this run of the test body (parametrized by pytest_generate_tests)."""
    with request.param.context():
        yield request.param


def pytest_collection_modifyitems(config, items):
    if config.getoption("--cupy-standin"):
        deselected = [item for item in items if "gpu" not in item.keywords]
        items[:] = [item for item in items if "gpu" in item.keywords]
        config.hook.pytest_deselected(items=deselected)
    if gpucnn_backend.gpu_available():
        return
    skip_gpu = pytest.mark.skip(reason=f"no GPU: {gpucnn_backend.gpu_unavailable_reason()}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# ---------------------------------------------------------------- shared fixtures

@pytest.fixture
def server():
    """A local HTTP server on 127.0.0.1 (tests.helpers.Server), closed after the test."""
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="session")
def random_mnist(tmp_path_factory):
    """A tiny MNIST-layout data set (random pixels and labels) in <root>/mnist/."""
    root = tmp_path_factory.mktemp("random-mnist")
    (root / "mnist").mkdir()
    write_random_split(root / "mnist", "train", seed=0)
    write_random_split(root / "mnist", "test", seed=1)
    return root


@pytest.fixture(scope="session")
def reference_run(random_mnist, tmp_path_factory):
    """The uninterrupted CLI run (tests.helpers.train_args) every interrupted one must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("faults-reference") / "run"
    result = run_cli(*train_args(random_mnist, out), check=False)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def tiny_cache(tmp_path, monkeypatch):
    """A registered data set 'tiny' (MNIST layout) with its source files, and isolated search places."""
    monkeypatch.setenv(datasets.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(datasets.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(datasets, "SYSTEM_DATA_ROOT", tmp_path / "system")
    source = tmp_path / "source"
    source.mkdir()
    # 200 test images: more than one 64 KiB read, so a stalled download has written bytes to its .part
    for split, seed in (("train", 0), ("test", 1)):
        write_random_split(source, split, seed, n=12 if split == "train" else 200, gz=True)
    files = {key: (source / name).read_bytes() for key, name in MNIST_FILES.items()}
    spec = DatasetSpec(name="tiny", files={k: FileSpec(MNIST_FILES[k], hashlib.md5(v).hexdigest())
                                           for k, v in files.items()},
                       mirrors=("http://127.0.0.1:9/",), mean=0.5, std=0.25, classes=tuple("0123456789"))
    monkeypatch.setitem(DATASETS, "tiny", spec)
    return types.SimpleNamespace(files=files, spec=spec, cache=tmp_path / "cache" / "tiny", source=source)


@pytest.fixture
def threaded(monkeypatch):
    """Hand even tiny chunks of the fast CPU path (gpucnn/cpu/) to 3 threads, so its threaded code runs
    on test-sized shapes."""
    from gpucnn.cpu import pool, threads  # noqa: PLC0415

    monkeypatch.setattr(threads, "MIN_PARALLEL_WORK", 0)
    monkeypatch.setattr(threads, "THREADS", 3)
    monkeypatch.setattr(pool, "THREADED_MIN_ELEMENTS", 0)


EMULATOR_ORDERS = ("forward", "reverse", "random")


@pytest.fixture(scope="module", params=EMULATOR_ORDERS)
def emulator(request):
    """An EmulatorRuntime in each thread order, for the launcher tests (a given runtime, kernels_dir, ...)."""
    from gpucnn.emulator import EmulatorRuntime  # noqa: PLC0415

    return EmulatorRuntime(order=request.param, seed=3)

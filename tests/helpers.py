"""Helpers shared by the test modules, defined once: the CLI runner, the local HTTP server,
tie-free inputs, tolerance checks and checkpoint comparisons. Small data sets live in
tests/synthetic_data.py, the backend fixture in tests/conftest.py."""
from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gpucnn.checkpoint import load_checkpoint
from gpucnn.train import BEST_FILE, CHECKPOINT_FILE, METRICS_FILE

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the command line

def clean_env(cache_dir: Path | None = None) -> dict:
    """The environment without GPUCNN_* settings, and a cache that is never a real one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUCNN_")}
    env["GPUCNN_CACHE_DIR"] = str(cache_dir or "/nonexistent-gpucnn-cache")  # never pick up (or write) a real cache
    return env


def run_cli(*args, check=True, timeout=300):
    """``python cli.py ARGS`` in a subprocess; with ``check``, exit status 0 is asserted."""
    result = subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, env=clean_env(),
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def run_cli_together(*commands, env=None, timeout=300):
    """Independent ``python cli.py ARGS`` runs (one tuple of ARGS each) started at once, so their
    start-ups (most of a short command's time) overlap; their CompletedProcesses in order, exit
    status unchecked. Runs that read or write the same files must not be given together."""
    processes = [subprocess.Popen([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, env=env or clean_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args in commands]
    try:
        outputs = [process.communicate(timeout=timeout) for process in processes]
        return [subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
                for process, (stdout, stderr) in zip(processes, outputs)]
    finally:
        for process in processes:  # after a timeout: none left running
            if process.poll() is None:
                process.kill()
                process.communicate()


def start_cli(*args):
    """``python cli.py ARGS`` started in the background (a Popen with piped output)."""
    return subprocess.Popen([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def mount_namespace():
    """The command prefix that runs a command with mounts of its own, where it may mount a small tmpfs (a
    real full disk): ``unshare -m`` as root, ``unshare -rm`` (a user namespace) otherwise; None where
    neither is allowed. The mounts vanish with the command."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    prefix = [unshare, "-m"] if os.geteuid() == 0 else [unshare, "-rm"]
    probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return prefix if probe.returncode == 0 else None


def assert_one_line_error(code, stderr, fragment, expected_code=1):
    """The CLI's promise: a non-zero exit, no traceback, one 'Error: ...' line naming the problem."""
    assert code == expected_code, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: ") and fragment in lines[0], lines[0]


def invoke(args):
    """The CLI in this process (so a test can monkeypatch it); an escaping exception fails the test."""
    from click.testing import CliRunner  # noqa: PLC0415 - helpers load without click (bench/run_gpu.sh's tests)

    from gpucnn.cli import cli  # noqa: PLC0415

    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="gpucnn")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def wait_until(predicate, timeout=60.0, interval=0.002) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


# ---------------------------------------------------------------- a local HTTP server

class Server:
    """An HTTP server on 127.0.0.1 serving ``routes`` (path -> bytes); other paths 404.

    ``drop`` holds paths whose body is cut off halfway (with the full Content-Length announced);
    ``stall`` paths answer only after a 2 s pause; ``hang`` paths send the first half of their body,
    then nothing more until the server closes, without closing the connection.
    """

    def __init__(self):
        self.routes, self.drop, self.stall, self.hang, self.requests = {}, set(), set(), set(), []
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                if self.path in server.stall:
                    time.sleep(2.0)
                body = server.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    if self.path in server.drop or self.path in server.hang:
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        if self.path in server.hang:
                            server.release.wait(60)
                        self.close_connection = True
                        return
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout) or was killed

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def serve(self, prefix, files):
        """Serve an MNIST-layout data set ({key: (bytes, array)}) under ``prefix``."""
        for key, (data, _) in files.items():
            self.routes[f"{prefix}/{MNIST_FILES[key]}"] = data

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------- inputs and comparisons

def tie_free(shape, rng, spacing=None, start=None, dtype=np.float32):
    """Distinct values in random order, so every pooling window has one maximum.

    ``spacing`` apart (default 1/count, all in [-0.5, 0.5)); a spacing of 0.1 keeps a finite-difference
    step from swapping two maxima. ``start`` is the smallest value (default -0.5, or -1.0 with a spacing).
    """
    count = int(np.prod(shape))
    step = 1.0 / count if spacing is None else spacing
    low = (-0.5 if spacing is None else -1.0) if start is None else start
    return (rng.permutation(count) * step + low).astype(dtype).reshape(shape)


def assert_close(name: str, actual, reference, tol: float) -> None:
    """max|actual - reference| <= tol * max(1, max|reference|), with NaN where the reference has NaN."""
    actual = np.asarray(actual)
    reference = np.asarray(reference)
    assert actual.shape == reference.shape, f"{name}: shape {actual.shape} != reference {reference.shape}"
    assert actual.dtype == reference.dtype, f"{name}: dtype {actual.dtype} != reference {reference.dtype}"
    nan = np.isnan(reference)
    assert np.array_equal(np.isnan(actual), nan), f"{name}: NaN positions differ from the reference"
    if nan.all():
        return
    error = float(np.abs(actual[~nan].astype(np.float64) - reference[~nan]).max())
    bound = tol * max(1.0, float(np.abs(reference[~nan]).max()))
    assert error <= bound, f"{name}: max abs error {error:.3g} > {bound:.3g}"


def assert_same_tree(a, b, where="checkpoint"):
    """Nested dicts/lists of arrays and values are equal, arrays bit for bit."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}/{i}")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert np.asarray(a).dtype == np.asarray(b).dtype, where
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), where
    else:
        assert a == b, where


# ---------------------------------------------------------------- launchers

class NoLaunchRuntime:
    """A runtime (see gpucnn.cuda.runtime) on NumPy whose kernels must never be reached: the launcher
    has to refuse invalid inputs before it asks for a kernel."""

    xp = np

    def __init__(self):
        self.launched = []

    def function(self, file, name):
        self.launched.append(name)
        raise AssertionError(f"kernel {name} was launched although the inputs were invalid")

    def empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype)


def assert_refused_before_launch(call, error, message):
    """``call(runtime)`` raises ``error`` matching ``message`` and launches no kernel."""
    runtime = NoLaunchRuntime()
    with pytest.raises(error, match=message):
        call(runtime)
    assert runtime.launched == []


def f32(*shape):
    return np.zeros(shape, np.float32)


def chwn(a):
    """The same values as a, in CHWN memory order (what the fast convolution returns)."""
    return np.ascontiguousarray(a.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2)


# ---------------------------------------------------------------- a reference training run (tests/conftest.py)

MNIST_FILES = {
    "train-images": "train-images-idx3-ubyte.gz",
    "train-labels": "train-labels-idx1-ubyte.gz",
    "test-images": "t10k-images-idx3-ubyte.gz",
    "test-labels": "t10k-labels-idx1-ubyte.gz",
}
EPOCHS = 30       # per CLI run of train_args; an epoch takes about 80 ms on the random data set
BATCH = 8
DETERMINISTIC_METRICS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr")


def train_args(data_dir, out, *extra):
    return ("train", "--device", "cpu", "--data-dir", data_dir, "--no-download", "--epochs", EPOCHS,
            "--batch-size", BATCH, "--out", out, "--quiet", *extra)


def resume_args(data_dir, out):
    return ("train", "--resume", out / CHECKPOINT_FILE, "--epochs", EPOCHS, "--data-dir", data_dir,
            "--no-download", "--device", "cpu", "--quiet")


def metrics_of(out: Path) -> list[dict]:
    return [{k: json.loads(line)[k] for k in DETERMINISTIC_METRICS}
            for line in (out / METRICS_FILE).read_text().splitlines()]


def assert_same_run(out: Path, reference: Path):
    """A resumed run ends exactly where the uninterrupted one did: weights, optimizer, best, metrics."""
    got, want = load_checkpoint(out / CHECKPOINT_FILE), load_checkpoint(reference / CHECKPOINT_FILE)
    assert got["epoch"] == want["epoch"] == EPOCHS
    for part in ("model", "optimizer", "scheduler", "rng"):
        assert_same_tree(got[part], want[part], part)
    assert_same_tree(load_checkpoint(out / BEST_FILE)["model"], load_checkpoint(reference / BEST_FILE)["model"])
    assert metrics_of(out) == metrics_of(reference)


def fill_cache(tiny_cache, split="test"):
    """Copy one split of the tiny_cache fixture's files into its cache folder."""
    tiny_cache.cache.mkdir(parents=True, exist_ok=True)
    for kind in ("images", "labels"):
        (tiny_cache.cache / MNIST_FILES[f"{split}-{kind}"]).write_bytes(tiny_cache.files[f"{split}-{kind}"])



def assert_outputs_close(names, outputs, expected, tols) -> None:
    """assert_close for each output; where the expected one is None (no bias), the output must be None too."""
    for name, got, want, tol in zip(names, outputs, expected, tols):
        if want is None:
            assert got is None, f"{name}: expected None without a bias"
        else:
            assert_close(name, got, want, tol)


def assert_same_bits(first, second) -> None:
    """Two runs' outputs (arrays or None) hold the same bits: no float atomics, no order-dependent sums."""
    for a, b in zip(first, second):
        assert (a is None and b is None) or a.tobytes() == b.tobytes(), "two runs gave different bits"


def assert_kernel_case(backend, run, expected, tols, names=("y", "grad_x", "grad_weight", "grad_bias")) -> None:
    """``run()``'s outputs are close to ``expected``; on the GPU a second run gives the same bits."""
    outputs = run()
    assert_outputs_close(names, outputs, expected, tols)
    if backend.device == "gpu":
        assert_same_bits(outputs, run())


def kernel_names_of_a_guarded_step(step, batch):
    """Run ``step`` once on the emulator on ``batch`` (x, y as NumPy arrays) under the emulator's guard.

    Asserts that the step made no NumPy op on device arrays (a CuPy kernel on a GPU), no allocation and no
    host read; returns the names of the kernels the step's runtime launched, in order.
    """
    from gpucnn import backend  # noqa: PLC0415
    events = []
    x, y = (backend.to_device(a, "emulator") for a in batch)
    with backend.emulator_guard(lambda kind, what: events.append((kind, what))):
        step(x, y)
    assert events == []
    return step.runtime.kernel_names

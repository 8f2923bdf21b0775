"""Process-level faults of a training run (issue 22), caused for real: a split-step worker killed with
SIGKILL (as the out-of-memory killer does) or stopped with SIGSTOP, a bad GPUCNN_CPU_THREADS, the
emulator without a C++ compiler, and seeded runs on one core against two."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpucnn.checkpoint import load_checkpoint
from gpucnn.train import CHECKPOINT_FILE
from tests.helpers import ROOT, assert_one_line_error, clean_env, run_cli_together, wait_until
from tests.synthetic_data import write_quadrant_mnist


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_quadrant_mnist(tmp_path_factory.mktemp("data"), 256, 64)


def children(pid: int) -> list[int]:
    """The ids of the processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def start_split_run(data_dir, out, epochs=500):
    """gpucnn train at batch 64 with two processes: the split step's worker starts with the first step."""
    env = clean_env()
    env["GPUCNN_CPU_THREADS"] = env["GPUCNN_CPU_PROCESSES"] = "2"
    return subprocess.Popen([sys.executable, "cli.py", "train", "--device", "cpu", "--data-dir", str(data_dir),
                             "--no-download", "--epochs", str(epochs), "--batch-size", "64", "--out", str(out),
                             "--quiet"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def worker_of(process) -> int:
    workers = []
    assert wait_until(lambda: workers.extend(children(process.pid)) or workers, timeout=60), "no worker started"
    return workers[0]


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")


def _kill(pid) -> None:
    try:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@needs_proc
@pytest.mark.parametrize("sig, delay, fragment", [
    (signal.SIGKILL, 0.3, "stopped (killed by SIGKILL, as the out-of-memory killer does)"),
    (signal.SIGSTOP, 0.3, "stopped (it was suspended, by SIGSTOP or a debugger, for over 2 s)"),
    (signal.SIGSTOP, 0.0, "stopped (it was suspended, by SIGSTOP or a debugger, for over 2 s)"),
], ids=["sigkill", "sigstop", "sigstop-while-starting"])
def test_a_split_step_worker_killed_or_stopped_ends_the_run_with_one_line(data_dir, tmp_path, sig, delay, fragment):
    """SIGSTOP while starting: before the worker has read the model (once sent through the socket, whose
    buffer it overflowed, so the main process blocked in send, deaf to Ctrl-C)."""
    process, worker = start_split_run(data_dir, tmp_path / "run"), None
    try:
        worker = worker_of(process)
        time.sleep(delay)
        os.kill(worker, sig)
        stdout, stderr = process.communicate(timeout=60)  # before the fix, SIGSTOP hung here for ever
    finally:
        _kill(worker)  # a worker left stopped would hold the run's stdout open, and communicate() with it
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert_one_line_error(process.returncode, stderr, fragment)
    assert "GPUCNN_CPU_PROCESSES=1" in stderr and "training stopped and" in stderr
    assert not children(process.pid)
    if sig == signal.SIGSTOP:  # the stopped worker was ended, not left behind
        assert wait_until(lambda: not Path(f"/proc/{worker}").exists() or
                          Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", timeout=10)


@needs_proc
def test_ctrl_c_ends_a_run_whose_worker_is_stopped(data_dir, tmp_path):
    process, worker = start_split_run(data_dir, tmp_path / "run"), None
    try:
        worker = worker_of(process)
        time.sleep(0.3)
        os.kill(worker, signal.SIGSTOP)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        _kill(worker)
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode != 0 and "Traceback" not in stderr, stderr
    assert "worker process of the split training step stopped" in stderr


@pytest.mark.parametrize("value", ["abc", "0", "-1", "2.5", " "])
def test_a_bad_gpucnn_cpu_threads_is_refused_at_first_use_and_help_still_works(value, monkeypatch):
    from gpucnn.cpu import threads  # noqa: PLC0415
    env = clean_env()
    env["GPUCNN_CPU_THREADS"] = value
    help_run, = run_cli_together(("--help",), env=env)  # before the fix: a traceback at import
    assert help_run.returncode == 0 and "Usage" in help_run.stdout, help_run.stderr
    monkeypatch.setenv("GPUCNN_CPU_THREADS", value)
    with pytest.raises(ValueError, match=r"GPUCNN_CPU_THREADS must be a whole number of threads from 1 up"):
        threads.check_setting()
    monkeypatch.setenv("GPUCNN_CPU_THREADS", "3")
    threads.check_setting()
    assert threads._thread_count() == 3


def test_a_bad_gpucnn_cpu_threads_stops_train_with_one_line(data_dir, tmp_path):
    env = clean_env()
    env["GPUCNN_CPU_THREADS"] = "abc"
    result, = run_cli_together(("train", "--device", "cpu", "--data-dir", data_dir, "--no-download", "--epochs", 1,
                                "--out", tmp_path / "run", "--quiet"), env=env)
    assert_one_line_error(result.returncode, result.stderr, "GPUCNN_CPU_THREADS must be a whole number of threads "
                                                            "from 1 up, not 'abc'")


def test_the_emulator_without_a_compiler_or_with_bad_flags_is_one_line(data_dir, tmp_path):
    common = ("train", "--device", "emulator", "--data-dir", data_dir, "--no-download", "--epochs", 1, "--quiet")
    runs = []
    for i, (name, value) in enumerate((("CXX", "/nonexistent/g++"), ("GPUCNN_EMULATOR_CXXFLAGS", "-fno-such-flag"))):
        env = clean_env()
        env[name] = value
        env["GPUCNN_EMULATOR_CACHE"] = str(tmp_path / f"cache{i}")  # nothing built yet: the compiler must run
        runs.append(run_cli_together((*common, "--out", tmp_path / f"run{i}"), env=env)[0])
    assert_one_line_error(runs[0].returncode, runs[0].stderr, "the C++ compiler '/nonexistent/g++' was not found")
    assert_one_line_error(runs[1].returncode, runs[1].stderr, "could not build its kernels: compiling")
    assert "-fno-such-flag" in runs[1].stderr and "GPUCNN_EMULATOR_CXXFLAGS" in runs[1].stderr


def _train_on_cores(data_dir, out, cores):
    env = clean_env()
    return subprocess.Popen([sys.executable, "cli.py", "train", "--device", "cpu", "--data-dir", str(data_dir),
                             "--no-download", "--epochs", "2", "--batch-size", "64", "--out", str(out), "--quiet"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, cores))


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two cores to compare one core against two")
def test_a_seeded_run_gives_the_same_bits_on_one_core_as_on_two(data_dir, tmp_path):
    """`taskset -c 0` (one process, the split step's arithmetic in it) against two cores (a worker process)."""
    two = sorted(os.sched_getaffinity(0))[:2]
    runs = [_train_on_cores(data_dir, tmp_path / "one", {two[0]}), _train_on_cores(data_dir, tmp_path / "two", set(two))]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()
    one, both = load_checkpoint(tmp_path / "one" / CHECKPOINT_FILE), load_checkpoint(tmp_path / "two" / CHECKPOINT_FILE)
    for name in one["model"]:
        assert one["model"][name].tobytes() == both["model"][name].tobytes(), name  # before: ~6e-7 apart
    lines = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("one", "two")]
    strip = [[{k: v for k, v in json.loads(line).items() if k not in ("images_per_s", "seconds")}
              for line in run] for run in lines]
    assert strip[0] == strip[1]
    assert np.isfinite(one["trainer"]["best_accuracy"])

"""Data-parallel training: shards, gradient averaging, and real MPI jobs (mpirun) against one process.

The MPI tests start ``mpirun`` (Open MPI or another MPI) with mpi4py; they skip,
saying what to install, where either is missing. The GPU test runs a one-rank
NCCL communicator and skips without a GPU.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from gpucnn import distributed, nn, optim
from gpucnn.checkpoint import load_checkpoint
from gpucnn.data import BatchIterator
from gpucnn.distributed import Communicator, DistributedError, GradientAverager, ShardedBatchIterator, shard_bounds
from gpucnn.train import Trainer
from tests.synthetic_data import write_quadrant_mnist as _data_dir

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = shutil.which("mpirun")
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
JOB_TIMEOUT = 60  # seconds; a job that hangs fails the test instead of the test run

needs_mpi = pytest.mark.skipif(
    MPIRUN is None or not HAVE_MPI4PY,
    reason="needs mpirun and mpi4py (apt-get install -y openmpi-bin libopenmpi-dev; pip install mpi4py)")


# --- shards -------------------------------------------------------------------
def test_shard_bounds_split_contiguously_and_evenly():
    for n in range(0, 13):
        for size in range(1, 5):
            bounds = [shard_bounds(n, rank, size) for rank in range(size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, disjoint, in order
            lengths = [stop - start for start, stop in bounds]
            assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)
    assert shard_bounds(1, 1, 2) == (1, 1)  # a rank without items
    with pytest.raises(ValueError, match="rank 2 does not exist among 2 ranks"):
        shard_bounds(5, 2, 2)
    with pytest.raises(TypeError, match="n must be an int"):
        shard_bounds(5.0, 0, 2)


@pytest.mark.parametrize("size", [2, 3])
def test_the_shards_of_a_step_make_up_the_single_process_batch(size):
    n, batch_size = 23, 4  # global batches of 8 or 12 with a short last one
    images = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
    labels = np.arange(n)
    single = BatchIterator(images, labels, batch_size * size, seed=3)
    ranks = [ShardedBatchIterator(images, labels, batch_size, rank, size, seed=3) for rank in range(size)]
    for epoch, start in ((0, 0), (1, 1)):
        single.set_epoch(epoch, start_batch=start)
        for it in ranks:
            it.set_epoch(epoch, start_batch=start)
            assert len(it) == len(single) and it.rank_batch_size == batch_size
        steps = list(zip(single, *ranks))
        assert len(steps) == len(single) - start
        for (x, y), *shards in steps:
            assert np.array_equal(np.concatenate([sy for _, sy in shards]), y)
            assert np.array_equal(np.concatenate([sx for sx, _ in shards]), x)
            assert all(len(sy) <= batch_size for _, sy in shards)
    with pytest.raises(ValueError, match="rank 3 does not exist among 3 ranks"):
        ShardedBatchIterator(images, labels, 4, 3, 3)


# --- communicators without MPI ------------------------------------------------
def test_the_single_process_communicator_leaves_buffers_alone_and_checks_them():
    comm = Communicator()
    assert (comm.rank, comm.size, comm.distributed) == (0, 1, False)
    buffer = np.arange(5, dtype=np.float32)
    assert comm.allreduce_sum(buffer) is buffer and np.array_equal(buffer, np.arange(5))
    assert np.array_equal(comm.allreduce_mean(buffer), np.arange(5))
    assert comm.any(True) and not comm.any(False)
    comm.check_same("anything", 1)
    with pytest.raises(TypeError, match="buffer must be a NumPy or CuPy array, not list"):
        comm.allreduce_sum([1.0, 2.0])
    with pytest.raises(TypeError, match="not int8"):
        comm.allreduce_sum(np.zeros(3, dtype=np.int8))
    with pytest.raises(ValueError, match="C-contiguous"):
        comm.allreduce_sum(np.zeros((4, 4), dtype=np.float32)[:, 1])
    with pytest.raises(TypeError, match="allreduce_mean needs a float buffer"):
        comm.allreduce_mean(np.zeros(3, dtype=np.int64))
    with pytest.raises(TypeError, match="parameter 0 is a ndarray"):
        comm.broadcast_parameters([np.zeros(3)])
    with pytest.raises(SystemExit):
        comm.abort(2)


class _SecondRank(Communicator):
    """Stands in for a two-rank job inside one process: the allreduce adds what the other rank contributed."""

    size = 2
    distributed = True

    def __init__(self, other_buffer=None):
        self.other_buffer = other_buffer
        self.sent = None

    def _allreduce_sum(self, buffer):
        self.sent = buffer.copy()
        if self.other_buffer is not None:
            buffer += self.other_buffer
        return buffer


def _mlp(seed=0):
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5, rng=seed), nn.ReLU(), nn.Linear(5, 3, rng=seed + 1))


def _gradients(model, x, y):
    from gpucnn.ops import softmax_cross_entropy, softmax_cross_entropy_backward
    model.zero_grad()
    _, probs = softmax_cross_entropy(model(x), y)
    model.backward(softmax_cross_entropy_backward(probs, y))
    return [p.grad.copy() for p in model.parameters()]


@pytest.mark.parametrize("split", [3, 7, 0], ids=["3+4", "7+0 (one empty shard)", "0+7"])
def test_averaged_gradients_are_those_of_the_combined_batch(split):
    """Shards of unequal size (or none) give the gradient of the mean loss over their union."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 1, 3, 4)).astype(np.float64)
    y = rng.integers(0, 3, 7)
    expected = _gradients(_mlp().double(), x, y)

    second = _mlp().double()
    if split < 7:
        _gradients(second, x[split:], y[split:])
    else:
        second.zero_grad()
    recorder = _SecondRank()
    with np.errstate(invalid="ignore"):  # alone, an empty shard divides 0 by 0; only what it sends matters
        GradientAverager(second.parameters(), recorder).average(7 - split)

    first = _mlp().double()
    if split > 0:
        _gradients(first, x[:split], y[:split])
    else:
        first.zero_grad()
    GradientAverager(first.parameters(), _SecondRank(recorder.sent)).average(split)
    for param, want in zip(first.parameters(), expected):
        np.testing.assert_allclose(param.grad, want, rtol=1e-12, atol=1e-15)


def test_gradient_averager_checks_its_parameters():
    model = _mlp()
    with pytest.raises(TypeError, match="comm must be a gpucnn.distributed.Communicator"):
        GradientAverager(model.parameters(), object())
    with pytest.raises(ValueError, match="parameter list is empty"):
        GradientAverager([], Communicator())
    mixed = list(model.parameters())
    mixed[0].data = mixed[0].data.astype(np.float64)
    with pytest.raises(TypeError, match="share one float dtype"):
        GradientAverager(mixed, Communicator())
    averager = GradientAverager(_mlp().parameters(), Communicator())
    averager.params[0].grad = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="does not fit the buffer"):
        averager.average(2)
    with pytest.raises(ValueError, match="count must be at least 0"):
        averager.average(-1)


def test_the_trainer_refuses_a_wrong_communicator():
    model = _mlp()
    opt = optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="comm must be a gpucnn.distributed.Communicator or None, not str"):
        Trainer(model, opt, comm="mpi")


@pytest.mark.parametrize("local_rank, local_size, device_count, device", [
    (0, 1, 1, 0), (3, 4, 1, 0),         # one CUDA_VISIBLE_DEVICES per rank: each sees its GPU as device 0
    (1, 2, 4, 1), (3, 4, 4, 3),         # ranks share the node's GPUs: the node-local rank picks one
    (1, 8, 2, 1),                       # more ranks than GPUs, but this rank has one (a fair share elsewhere)
])
def test_a_rank_picks_device_0_when_it_sees_one_gpu_else_its_local_rank(local_rank, local_size, device_count,
                                                                       device):
    assert distributed.gpu_for_rank(local_rank, local_size, device_count) == device


@pytest.mark.parametrize("local_rank, device_count, words", [(2, 2, "sees 2 GPU"), (0, 0, "sees none")])
def test_a_rank_without_its_gpu_is_one_clear_error(local_rank, device_count, words):
    with pytest.raises(DistributedError, match=words):
        distributed.gpu_for_rank(local_rank, 4, device_count)


def test_joining_nccl_uses_the_device_a_faked_count_gives(monkeypatch):
    used, joined = [], []

    class Device:
        def __init__(self, index):
            self.index = index

        def use(self):
            used.append(self.index)

    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1)
    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime, Device=Device))
    fake_nccl = types.SimpleNamespace(get_unique_id=lambda: "id",
                                      NcclCommunicator=lambda size, uid, rank: joined.append((size, uid, rank)))
    monkeypatch.setattr(distributed.backend, "cupy_module", lambda: fake_cupy)
    monkeypatch.setattr(distributed, "_nccl", lambda: fake_nccl)
    comm = distributed.MPICommunicator.__new__(distributed.MPICommunicator)
    comm.rank, comm.size, comm.local_rank, comm.local_size = 3, 4, 3, 4   # SLURM --gpus-per-task=1
    comm._comm = types.SimpleNamespace(bcast=lambda value, root: "id")
    comm._join_nccl()
    assert used == [0] and joined == [(4, "id", 3)]
    runtime.getDeviceCount = lambda: 2                                  # two GPUs shared by four ranks
    with pytest.raises(DistributedError, match="rank 3 of the 4 on this node needs GPU 3"):
        comm._join_nccl()


def test_a_missing_mpi4py_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now raises ImportError
    monkeypatch.setattr(distributed, "_world", None)
    with pytest.raises(DistributedError, match=r"needs mpi4py.*pip install 'gpucnn\[mpi\]'"):
        distributed.init("cpu")
    code = ("import sys; sys.modules['mpi4py'] = None; sys.argv = ['gpucnn'] + sys.argv[1:]; "
            "from gpucnn.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code, "train", "--distributed", "--device", "cpu"], cwd=ROOT,
                            env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: distributed training needs mpi4py") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- real MPI jobs ------------------------------------------------------------
# Run through this driver, a rank can be made to fail at a step: GPUCNN_TEST_RANK_FAULT=<action>:<rank>:<step>
# with action exit (dies at once, no clean-up), raise (a Python exception) or sigint (a stop request).
FAULT_DRIVER = """\
import os, signal, sys
sys.path.insert(0, {root!r})
from gpucnn import train
from gpucnn.cli import main

action, rank, step = os.environ["GPUCNN_TEST_RANK_FAULT"].split(":")
real_step = train.Trainer.train_step
calls = []

def faulty_step(self, x, y):
    calls.append(1)
    if self.comm.rank == int(rank) and len(calls) == int(step):
        if action == "exit":
            os._exit(3)
        if action == "raise":
            raise RuntimeError("test hook: this rank failed")
        if action == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
    return real_step(self, x, y)

train.Trainer.train_step = faulty_step
sys.argv[0] = "gpucnn"
main()
"""


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUCNN_", "OMPI_", "PMIX_"))}
    env.update(GPUCNN_CACHE_DIR="/nonexistent-gpucnn-cache", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               # Open MPI: tests may run as root (CI containers), with more ranks than cores
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1",
               # when a rank exits non-zero, mpirun sends the others SIGTERM, then sleeps this many seconds
               # (default 1) before SIGKILL; the ranks install no SIGTERM handler, so the sleep only waits
               # (measured: the stop and failing-rank tests 1 s faster each, 2026-12-01)
               OMPI_MCA_odls_base_sigkill_timeout="0")
    env.update(extra)
    return env


def run_job(args, ranks=None, timeout=JOB_TIMEOUT, **env):
    """Run ``python <args>`` (under ``mpirun -n ranks`` unless ranks is None); fails the test after ``timeout`` s."""
    command = [sys.executable, *map(str, args)]
    if ranks is not None:
        command = [MPIRUN, "-n", str(ranks), *command]
    job = subprocess.Popen(command, cwd=ROOT, env=_clean_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        stdout, stderr = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.terminate()  # mpirun passes SIGTERM on to its ranks
        try:
            job.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            job.kill()
            job.communicate()
        pytest.fail(f"{' '.join(command)} was still running after {timeout} s (a rank hangs?)")
    return subprocess.CompletedProcess(command, job.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    # 321 = 5 global batches of 64 and one of a single image: one rank's shard of the last step is empty
    return _data_dir(tmp_path_factory.mktemp("data"), 321, 81)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    path = tmp_path_factory.mktemp("driver") / "fault_driver.py"
    path.write_text(FAULT_DRIVER.format(root=str(ROOT)))
    return path


def train_args(data_dir, out, *extra):
    return ["cli.py", "train", "--device", "cpu", "--data-dir", data_dir, "--no-download", "--out", out, *extra]


def weights(out):
    return load_checkpoint(out / "checkpoint.npz")["model"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@needs_mpi
def test_two_ranks_train_the_weights_of_one_process_with_the_combined_batch(small_data, tmp_path):
    settings = ("--epochs", 2, "--optimizer", "sgd", "--lr", 0.005)
    one = run_job(train_args(small_data, tmp_path / "one", "--batch-size", 64, *settings))
    assert one.returncode == 0, one.stderr
    two = run_job(train_args(small_data, tmp_path / "two", "--distributed", "--batch-size", 32, *settings), ranks=2)
    assert two.returncode == 0, two.stderr

    initial = load_checkpoint(tmp_path / "one" / "best.npz")["model"]  # after epoch 1: the weights moved
    single, parallel = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert list(single) == list(parallel)
    for name in single:
        np.testing.assert_allclose(parallel[name], single[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert any(not np.allclose(initial[name], single[name]) for name in single)
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["train_acc"] == b["train_acc"] and a["test_acc"] == b["test_acc"]
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4, abs=1e-7)
    # rank 0 alone reports
    assert two.stdout.count("done: epoch 2") == 1 and two.stdout.count("device: cpu") == 1
    assert "distributed: 2 rank(s) over MPI" in two.stdout and "batch 32 per rank, 64 per step" in two.stdout
    assert load_checkpoint(tmp_path / "two" / "checkpoint.npz")["trainer"]["ranks"] == 2

    # its checkpoint continues on 2 ranks only
    wrong = run_job(["cli.py", "train", "--resume", tmp_path / "two" / "checkpoint.npz", "--epochs", 3,
                     "--data-dir", small_data, "--no-download", "--device", "cpu", "--quiet"])
    assert wrong.returncode == 1
    assert "trained on 2 rank(s) with batch size 32 each; resume it on 2 (got 1)" in wrong.stderr


@needs_mpi
@pytest.mark.slow
@pytest.mark.parametrize("action", ["exit", "raise"])
def test_a_rank_that_fails_ends_the_whole_job(small_data, driver, tmp_path, action):
    args = train_args(small_data, tmp_path / "run", "--distributed", "--batch-size", 16, "--epochs", 3)
    job = run_job([driver, *args[1:]], ranks=2, GPUCNN_TEST_RANK_FAULT=f"{action}:1:4")
    assert job.returncode != 0  # and within JOB_TIMEOUT: run_job fails the test on a hang
    assert "run: lenet5" in job.stdout  # it failed in training, as planned
    if action == "raise":
        assert "rank 1: Traceback" in job.stderr and "RuntimeError: test hook: this rank failed" in job.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # it died in epoch 1


@needs_mpi
@pytest.mark.slow
def test_a_stop_request_on_one_rank_stops_all_and_the_run_resumes(driver, tmp_path):
    data = _data_dir(tmp_path / "data", 640, 40)  # 20 steps of 2 x 16 per epoch: refreshes at 10 and 20
    settings = ("--distributed", "--batch-size", 16, "--epochs", 2)
    straight = run_job(train_args(data, tmp_path / "straight", *settings), ranks=2)
    assert straight.returncode == 0, straight.stderr

    stopped = run_job([driver, *train_args(data, tmp_path / "stopped", *settings)[1:]], ranks=2,
                      GPUCNN_TEST_RANK_FAULT="sigint:1:3")
    assert stopped.returncode == 130, stopped.stderr
    saved = load_checkpoint(tmp_path / "stopped" / "checkpoint.npz")
    assert (saved["epoch"], saved["step"]) == (0, 10)  # both ranks stopped at the first synchronisation
    assert saved["trainer"]["partial"]["seen"] == 10 * 32
    assert "continue with: mpirun -n 2 gpucnn train --distributed --resume" in stopped.stderr

    resumed = run_job(["cli.py", "train", "--distributed", "--resume", tmp_path / "stopped" / "checkpoint.npz",
                       "--epochs", 2, "--data-dir", data, "--no-download", "--device", "cpu"], ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    for name, value in weights(tmp_path / "straight").items():
        np.testing.assert_allclose(weights(tmp_path / "stopped")[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    for a, b in zip(metrics(tmp_path / "straight"), metrics(tmp_path / "stopped")):
        assert a["epoch"] == b["epoch"] and a["train_acc"] == b["train_acc"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)


@needs_mpi
@pytest.mark.gpu
def test_one_rank_nccl_matches_one_gpu_process(small_data, tmp_path):
    """On one GPU a single-rank NCCL communicator still runs every collective of the GPU path."""
    problem = nccl_problem()
    if problem:
        pytest.skip(problem)
    common = ("--device", "gpu", "--data-dir", small_data, "--no-download", "--epochs", 1, "--batch-size", 64,
              "--optimizer", "sgd", "--quiet")
    plain = run_job(["cli.py", "train", "--out", tmp_path / "plain", *common], timeout=300)
    assert plain.returncode == 0, plain.stderr
    nccl = run_job(["cli.py", "train", "--distributed", "--out", tmp_path / "nccl", *common], ranks=1, timeout=300)
    assert nccl.returncode == 0, nccl.stderr
    for name, value in weights(tmp_path / "plain").items():
        np.testing.assert_allclose(weights(tmp_path / "nccl")[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    code = ("import numpy as np; from gpucnn import backend, distributed; cp = backend.cupy_module(); "
            "comm = distributed.init('gpu'); x = cp.arange(6, dtype=cp.float32); comm.allreduce_sum(x); "
            "y = np.arange(3.0); comm.allreduce_mean(y); print(comm.describe(), cp.asnumpy(x).tolist(), y.tolist())")
    probe = run_job(["-c", code], ranks=1, timeout=300)
    assert probe.returncode == 0, probe.stderr
    assert "NCCL allreduce on the GPU" in probe.stdout
    assert "[0.0, 1.0, 2.0, 3.0, 4.0, 5.0] [0.0, 1.0, 2.0]" in probe.stdout


def nccl_problem() -> str | None:
    """Why CuPy's NCCL binding is unusable here (cupy-cuda13x ships none), or None."""
    try:
        nccl = distributed.backend.nccl_module()
    except ImportError as exc:
        return f"CuPy cannot import its NCCL binding ({exc})"
    return None if getattr(nccl, "available", False) else "CuPy has no NCCL library (cupy.cuda.nccl.available is False)"


@pytest.mark.gpu
def test_nccl_problem_says_why_nccl_is_missing(monkeypatch):
    """The NCCL test above skips, instead of failing, where CuPy has no NCCL."""
    nccl = distributed.backend.nccl_module()
    monkeypatch.setattr(nccl, "available", False)
    assert "no NCCL library" in nccl_problem()
    monkeypatch.setattr(nccl, "available", True)
    assert nccl_problem() is None


def test_importing_the_trainer_loads_neither_mpi4py_nor_cupy():
    code = ("import sys, gpucnn.distributed, gpucnn.train; "
            "print('mpi4py' in sys.modules, 'cupy' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_clean_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.split() == ["False", "False"], result.stderr

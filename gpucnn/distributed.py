"""Data-parallel training over MPI: ``mpirun -n N python cli.py train --distributed``.

Every rank (one process; on the GPU backend one GPU per rank) holds a full copy
of the model and trains on its shard of each global batch. Per step the
gradients of all parameters are packed into one preallocated buffer, summed over
the ranks by a single allreduce and unpacked as the mean over the global batch,
so every rank applies the same update and the weights stay identical.

- ``Communicator``: one process and no MPI; every collective is a no-op. The
  trainer uses it unless given another, and then behaves as it always did.
- ``MPICommunicator``: ``MPI.COMM_WORLD`` through mpi4py (imported here only,
  and only when a communicator is made). NumPy buffers go through MPI
  (Allreduce, Bcast); CuPy buffers through NCCL (CuPy's ``cuda.nccl``), whose
  unique id rank 0 broadcasts over MPI.
- ``init(device)``: this job's MPICommunicator; on ``"gpu"`` it first selects the
  rank's GPU (``gpu_for_rank``: device 0 if it sees one, else its node-local index).
- ``GradientAverager``: the pack / allreduce / average / unpack of one step.
- ``ShardedBatchIterator`` and ``shard_bounds``: which images of a global batch a
  rank trains on.
- ``abort_on_error``: an exception on one rank aborts the whole job.

Batch size (PyTorch DDP's convention): ``batch_size`` is per rank. A step of N
ranks trains on a global batch of N * batch_size images: batch b of the epoch's
permutation (the same on every rank, a function of seed and epoch) with batch
size N * batch_size, split into N contiguous shards whose sizes differ by at most
one. The union of the shards is exactly the batch one process with batch size
N * batch_size trains on, and the averaged gradient is that process's gradient
(up to rounding), also for a short last batch.

Limits: each rank draws Dropout masks from its own copy of the same generator,
so the ranks' shards get the same mask sequence (none of the CLI's models uses
Dropout). Ctrl-C on mpirun makes Open MPI end every rank at once (SIGTERM), so
the run continues from the last epoch's checkpoint; a SIGINT sent to the rank
processes themselves stops all ranks together with a mid-epoch checkpoint.
"""
from __future__ import annotations

import contextlib
import sys
import traceback

import numpy as np

from gpucnn import backend
from gpucnn.data import BatchIterator, epoch_permutation
from gpucnn.nn import Parameter
from gpucnn.utils import check_int

INSTALL_HINT = ("install mpi4py and an MPI library: pip install 'gpucnn[mpi]' "
                "(with e.g. apt-get install openmpi-bin libopenmpi-dev)")
_REDUCIBLE_DTYPES = (np.float32, np.float64, np.int32, np.int64)


class DistributedError(RuntimeError):
    """A distributed run cannot start: mpi4py, MPI, NCCL or enough GPUs are missing."""


def _mpi():
    """The ``mpi4py.MPI`` module (initialising MPI), or DistributedError saying what to install."""
    try:
        from mpi4py import MPI  # noqa: PLC0415 - the only mpi4py import in gpucnn, made on demand
    except ImportError as exc:
        raise DistributedError(f"distributed training needs mpi4py, which cannot be imported ({exc}); "
                               f"{INSTALL_HINT}.") from None
    return MPI


def _nccl():
    """CuPy's NCCL binding, or DistributedError when CuPy cannot load NCCL."""
    try:
        nccl = backend.nccl_module()
    except ImportError as exc:
        raise DistributedError(f"distributed GPU training needs NCCL, but CuPy cannot import it ({exc}).") from None
    if not getattr(nccl, "available", False):
        raise DistributedError("distributed GPU training needs NCCL, but CuPy cannot load it; install it with "
                               "pip install nvidia-nccl-cu12 (or -cu13), or python -m cupyx.tools.install_library "
                               "--library nccl.")
    return nccl


def _check_parameters(params) -> list:
    params = list(params)
    for i, p in enumerate(params):
        if not isinstance(p, Parameter):
            raise TypeError(f"parameter {i} is a {type(p).__name__}, not a gpucnn Parameter.")
    if not params:
        raise ValueError("the parameter list is empty.")
    return params


def _check_buffer(buffer, name: str = "buffer"):
    """A C-contiguous NumPy or CuPy array of float32/float64/int32/int64, for a collective in place."""
    if not (backend.is_array(buffer)):
        raise TypeError(f"{name} must be a NumPy or CuPy array, not {type(buffer).__name__}.")
    if buffer.dtype not in _REDUCIBLE_DTYPES:
        raise TypeError(f"{name} must hold float32, float64, int32 or int64 values, not {buffer.dtype}.")
    if not buffer.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (a collective works on the memory in place).")
    return buffer


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous shard of ``n`` items split over ``size`` ranks.

    The first ``n % size`` ranks get one item more; a rank gets nothing when
    ``n < size`` and its rank is ``>= n``.
    """
    n = check_int(n, "n", 0)
    size = check_int(size, "size", 1)
    rank = check_int(rank, "rank", 0)
    if rank >= size:
        raise ValueError(f"rank {rank} does not exist among {size} ranks.")
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ShardedBatchIterator(BatchIterator):
    """Rank ``rank``'s shard of each global batch of ``size * batch_size`` images.

    images (N, ...) and labels (N, ...) on one device, the same on every rank.
    The global batches are those of ``BatchIterator(images, labels, size *
    batch_size, shuffle, seed, drop_last)``; each is split by ``shard_bounds``, so
    the shards of one step are disjoint and their union is the global batch. A
    rank's shard of a short last batch may be smaller than ``batch_size``, or
    empty. ``len()``, ``set_epoch`` and ``batch_size`` (the global batch size)
    are BatchIterator's; ``rank_batch_size`` is the per-rank batch size.
    """

    def __init__(self, images, labels, batch_size: int, rank: int, size: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        batch_size = check_int(batch_size, "batch_size", 1)
        size = check_int(size, "size", 1)
        rank = check_int(rank, "rank", 0)
        if rank >= size:
            raise ValueError(f"rank {rank} does not exist among {size} ranks.")
        super().__init__(images, labels, batch_size * size, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.rank_batch_size = batch_size
        self.rank = rank
        self.size = size

    def __iter__(self):
        n = len(self.images)
        order = epoch_permutation(n, self.seed, self.epoch) if self.shuffle else np.arange(n, dtype=np.int64)
        order = backend.get_array_module(self.images).asarray(order)
        for b in range(self.start_batch, len(self)):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            start, stop = shard_bounds(len(batch), self.rank, self.size)
            shard = batch[start:stop]
            yield self.images[shard], self.labels[shard]


class Communicator:
    """A single process: rank 0 of 1. Every collective leaves its input as it is.

    ``distributed`` is False: the trainer then runs exactly its one-process
    code. ``device`` is None: the communicator takes arrays of either device.
    """

    rank = 0
    size = 1
    local_rank = 0
    distributed = False
    device = None

    def describe(self) -> str:
        """One line for logs."""
        return "1 process (not distributed)"

    def broadcast_parameters(self, params) -> None:
        """Give every rank rank 0's values of ``params`` (gpucnn Parameters), in place."""
        for p in _check_parameters(params):
            self._broadcast(p.data)

    def allreduce_sum(self, buffer):
        """Replace ``buffer`` (a C-contiguous array) on every rank by its sum over the ranks; returns it."""
        return self._allreduce_sum(_check_buffer(buffer))

    def allreduce_mean(self, buffer):
        """Replace float ``buffer`` on every rank by its mean over the ranks (sum / size); returns it."""
        if _check_buffer(buffer).dtype.kind != "f":
            raise TypeError(f"allreduce_mean needs a float buffer, not {buffer.dtype}.")
        self._allreduce_sum(buffer)
        if self.size > 1:
            buffer /= buffer.dtype.type(self.size)
        return buffer

    def any(self, flag) -> bool:
        """True on every rank when ``flag`` is true on at least one."""
        return bool(flag)

    def check_same(self, what: str, value) -> None:
        """Raise ValueError on every rank unless all ranks pass an equal ``value`` (``what`` names it)."""

    def barrier(self) -> None:
        """Wait until every rank has called barrier()."""

    def abort(self, code: int = 1) -> None:
        """End the job with exit status ``code`` (one process: raise SystemExit)."""
        raise SystemExit(check_int(code, "code", 0))

    def _broadcast(self, array) -> None:
        """One process holds rank 0's values already."""

    def _allreduce_sum(self, buffer):
        return buffer


def gpu_for_rank(local_rank: int, local_size: int, device_count: int) -> int:
    """The CUDA device a rank uses: its rank among the ``local_size`` ranks of its node, ``local_rank``.

    A rank that sees exactly one GPU uses device 0 whatever its local rank: a scheduler that gives
    each rank its own CUDA_VISIBLE_DEVICES (SLURM's ``--gpus-per-task=1``) shows every rank one GPU.
    Otherwise the rank needs ``local_rank < device_count`` (DistributedError if not).
    """
    if device_count < 1:
        raise DistributedError("distributed GPU training needs a GPU, but this rank sees none "
                               "(check CUDA_VISIBLE_DEVICES).")
    if device_count == 1:
        return 0
    if local_rank >= device_count:
        raise DistributedError(f"rank {local_rank} of the {local_size} on this node needs GPU {local_rank}, but it "
                               f"sees {device_count} GPU(s); start at most one rank per GPU (mpirun -n "
                               f"{device_count} per node) or give each rank its own CUDA_VISIBLE_DEVICES.")
    return local_rank


class MPICommunicator(Communicator):
    """The ranks of ``MPI.COMM_WORLD``; NumPy buffers through MPI, CuPy buffers through NCCL.

    ``device`` is ``"cpu"`` or ``"gpu"``. On ``"gpu"`` the rank first selects its
    GPU (gpu_for_rank: device 0 when it sees one GPU, as with one CUDA_VISIBLE_DEVICES
    per rank, else the GPU numbered by its rank among the ranks of its node), so
    start at most one rank per GPU; then rank 0 creates the NCCL unique id, MPI
    broadcasts it, and every rank joins one NCCL communicator. Creating one is
    collective: every rank of the job must do so, in the same order of calls.
    """

    distributed = True

    def __init__(self, device: str = "cpu"):
        device = backend.resolve_device(device)
        MPI = _mpi()
        self._MPI = MPI
        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        node = self._comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks sharing this node
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.device = device
        self._nccl = None
        self._nccl_comm = None
        if device == "gpu":
            self._join_nccl()

    def _join_nccl(self) -> None:
        cp = backend.cupy_module()
        cp.cuda.Device(gpu_for_rank(self.local_rank, self.local_size, cp.cuda.runtime.getDeviceCount())).use()
        self._nccl = _nccl()
        unique_id = self._nccl.get_unique_id() if self.rank == 0 else None
        unique_id = self._comm.bcast(unique_id, root=0)
        self._nccl_comm = self._nccl.NcclCommunicator(self.size, unique_id, self.rank)

    def describe(self) -> str:
        library = self._MPI.Get_library_version().splitlines()[0].split(",")[0].strip()
        how = "NCCL allreduce on the GPU" if self._nccl_comm is not None else "MPI allreduce"
        return f"{self.size} rank(s) over MPI ({library}), gradients averaged by {how}"

    def _nccl_args(self, array):
        """(pointer, count, NCCL datatype, stream pointer) of a CuPy array."""
        if self._nccl_comm is None:
            raise ValueError("a CuPy array needs a communicator made for the GPU (init('gpu')), "
                             "but this one was made for the CPU.")
        types = {np.dtype(np.float32): self._nccl.NCCL_FLOAT32, np.dtype(np.float64): self._nccl.NCCL_FLOAT64,
                 np.dtype(np.int32): self._nccl.NCCL_INT32, np.dtype(np.int64): self._nccl.NCCL_INT64}
        stream = backend.cupy_module().cuda.get_current_stream()
        return array.data.ptr, array.size, types[np.dtype(array.dtype)], stream.ptr

    def _broadcast(self, array) -> None:
        _check_buffer(array, "a parameter")
        if backend.is_gpu_array(array):
            pointer, count, datatype, stream = self._nccl_args(array)
            self._nccl_comm.bcast(pointer, count, datatype, 0, stream)
        else:
            self._comm.Bcast(array, root=0)

    def _allreduce_sum(self, buffer):
        if backend.is_gpu_array(buffer):
            pointer, count, datatype, stream = self._nccl_args(buffer)
            self._nccl_comm.allReduce(pointer, pointer, count, datatype, self._nccl.NCCL_SUM, stream)
        else:
            self._comm.Allreduce(self._MPI.IN_PLACE, buffer, op=self._MPI.SUM)
        return buffer

    def any(self, flag) -> bool:
        return bool(self._comm.allreduce(bool(flag), op=self._MPI.LOR))

    def check_same(self, what: str, value) -> None:
        values = self._comm.allgather(value)
        if any(v != values[0] for v in values[1:]):
            listed = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(f"the ranks disagree on {what} ({listed}); start every rank with the same "
                             "options and data.")

    def barrier(self) -> None:
        self._comm.Barrier()

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (MPI_Abort), with exit status ``code``."""
        code = check_int(code, "code", 0)
        sys.stdout.flush()
        sys.stderr.flush()
        self._comm.Abort(code)


_world: MPICommunicator | None = None  # the communicator init() made: one per process, like MPI itself


def init(device: str = "cpu") -> MPICommunicator:
    """This MPI job's communicator (made on the first call, the same one afterwards).

    ``device`` (``"cpu"``, ``"gpu"`` or ``"auto"``) is where the training arrays
    live; on ``"gpu"`` this selects the rank's GPU and joins NCCL, so call it
    before anything is allocated on the GPU. Started without mpirun, the job is
    a single rank. Raises DistributedError when mpi4py, NCCL or GPUs are missing.
    """
    global _world
    device = backend.resolve_device(device)
    if _world is None:
        _world = MPICommunicator(device)
    elif _world.device != device:
        raise ValueError(f"this process already joined the job for the {_world.device}, not the {device}.")
    return _world


def active() -> MPICommunicator | None:
    """The communicator made by ``init()``, or None when this process did not join an MPI job."""
    return _world


class GradientAverager:
    """Averages the gradients of ``params`` over the ranks with one allreduce per step.

    The buffer (allocated once, on the parameters' device and in their dtype)
    holds every gradient back to back in ``params`` order, then one element: how
    many images this rank's gradients come from. Since the loss is a mean, each
    rank puts ``count * grad`` (the sum over its images) and ``count``; after the
    summing allreduce the buffer holds the sum over the global batch and its
    size, and one division on the device gives the mean over the global batch,
    also when the shards of a short last batch differ in size or one is empty.
    A parameter without a gradient on this rank counts as zero; afterwards every
    parameter's ``grad`` is a view into the buffer, valid until the next call.
    """

    def __init__(self, params, comm: Communicator):
        if not isinstance(comm, Communicator):
            raise TypeError(f"comm must be a gpucnn.distributed.Communicator, not {type(comm).__name__}.")
        self.params = _check_parameters(params)
        dtypes = {np.dtype(p.dtype) for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) != 1 or next(iter(dtypes)) not in (np.float32, np.float64):
            raise TypeError(f"the parameters must share one float dtype, not {sorted(map(str, dtypes))}.")
        if len(devices) != 1:
            raise ValueError(f"the parameters must live on one device, not {sorted(devices)}.")
        self.comm = comm
        self.device = devices.pop()
        self.dtype = dtypes.pop()
        xp = backend.xp_for(self.device)
        total = sum(p.size for p in self.params)
        self.buffer = xp.zeros(total + 1, dtype=self.dtype)
        self.views, start = [], 0
        for p in self.params:
            self.views.append(self.buffer[start:start + p.size].reshape(p.shape))
            start += p.size

    def average(self, count: int) -> None:
        """Set every parameter's grad to the mean gradient over the global batch.

        ``count`` is the number of images this rank's gradients were computed on
        (0 for an empty shard, whose parameters have no gradient).
        """
        count = check_int(count, "count", 0)
        xp = backend.xp_for(self.device)
        scale = self.dtype.type(count)
        for p, view in zip(self.params, self.views):
            if p.grad is None or count == 0:
                view.fill(0)
                continue
            if tuple(p.grad.shape) != p.shape or p.grad.dtype != self.dtype or p.device != self.device:
                raise ValueError(f"a gradient {p.grad.dtype} {tuple(p.grad.shape)} on {p.device} does not fit "
                                 f"the buffer made for {self.dtype} {p.shape} on {self.device}.")
            xp.multiply(p.grad, scale, out=view)
        self.buffer[-1] = scale
        self.comm.allreduce_sum(self.buffer)
        grads = self.buffer[:-1]
        grads /= self.buffer[-1:]  # divided on the device: no host round trip per step
        for p, view in zip(self.params, self.views):
            p.grad = view


def abort_on_error(describe=None, passthrough=()):
    """Context manager and decorator: in a job of several ranks, an exception aborts every rank.

    Without it, a Python exception on one rank would leave the others waiting
    in their next collective forever (mpi4py finalises MPI at exit, which waits
    for them). The exception is written to stderr as ``rank R: <text>`` (text from
    ``describe(exc)``, else the traceback), then MPI_Abort ends the job with
    status 1. Exceptions of the ``passthrough`` types, SystemExit with status 0,
    and anything raised outside a multi-rank job propagate unchanged.
    """
    if describe is not None and not callable(describe):
        raise TypeError(f"describe must be callable, not {type(describe).__name__}.")
    return _AbortOnError(describe, tuple(passthrough))


class _AbortOnError(contextlib.ContextDecorator):
    def __init__(self, describe, passthrough):
        self.describe = describe
        self.passthrough = passthrough

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        comm = _world
        if exc is None or comm is None or comm.size == 1 or isinstance(exc, self.passthrough):
            return False
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            return False
        text = self.describe(exc) if self.describe else "".join(traceback.format_exception(exc)).rstrip()
        sys.stderr.write(f"rank {comm.rank}: {text}\n")
        comm.abort(1)
        return False

"""Per-op GPU timings: gpucnn's kernels against PyTorch (cuDNN for convolutions) on the same GPU, fp32.

    python bench/gpu_ops.py [--batches 64,256,4096] [--reps 30] [--warmup 5] [--inner 10] [--json FILE]
                            [--no-torch] [--only conv,pool,linear,loss,relu,adam,large,vgg]

Rows: LeNet-5's layers (conv 1->6 5x5 pad 2 on 28x28, conv 6->16 5x5 on 14x14, 2x2 max-pools,
fc 400->120->84->10, ReLU, softmax cross-entropy) at each batch size, Adam over LeNet-5's 61,706
parameters, one larger layer (conv 64->64 3x3 pad 1, 56x56, batch 32), and vgg-small's layers at
batch 128 (VGG_CASES: six 3x3 pad 1 convolutions, 3->64 ... 256->256 on 32x32 to 8x8, and its three
2x2 max-pools). Convolutions and products are split into forward, backward-data and
backward-weights (with the bias gradient).

Timing: CUDA events (cupy.cuda.Event) around ``--inner`` back-to-back runs on one stream shared
with PyTorch, after ``--warmup`` runs; inputs are refilled with fresh random numbers before every
repetition; the table shows the median over ``--reps`` repetitions, per run, in microseconds.
"ours" replays exactly the kernel launches gpucnn's launcher makes (recorded once, so no Python
validation or allocation is timed); "call" times the public launcher call itself where one call is
the whole op. PyTorch runs eagerly (TF32 off, cudnn.benchmark on). Before timing, each op's output
is compared with PyTorch's ("check").

Ceilings of the device, measured first: a large device-to-device copy (bandwidth, bytes read +
written) and a large fp32 matrix product (cuBLAS, TF32 off). Each row's floor is
max(bytes / bandwidth, flops / fp32 rate): the least time the op's compulsory memory traffic and
arithmetic could take.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_env  # noqa: E402 - also puts the repository on sys.path

from gpucnn.testing.recording import Launch, RecordingRuntime, replay  # noqa: E402, F401 - gpu_ops.RecordingRuntime

GROUPS = ("conv", "pool", "linear", "loss", "relu", "adam", "large", "vgg")
VGG_BATCH = 128
# vgg-small (gpucnn.models.VGGSmall) at 3x32x32: (label, C, H=W, OC) of each 3x3 pad 1 convolution ...
VGG_CASES = [("conv1_1", 3, 32, 64), ("conv1_2", 64, 32, 64), ("conv2_1", 64, 16, 128),
             ("conv2_2", 128, 16, 128), ("conv3_1", 128, 8, 256), ("conv3_2", 256, 8, 256)]
# ... and (label, C, H=W) of each 2x2 max-pool
VGG_POOL_CASES = [("pool1", 64, 32), ("pool2", 128, 16), ("pool3", 256, 8)]


# ---- recording the launches a launcher makes: gpucnn.testing.recording (Launch, RecordingRuntime, replay)

# ---- rows ------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One op: how to run ours and PyTorch's, how to refresh the inputs, what to compare before timing."""
    op: str
    shape: str
    flops: float
    bytes: float
    ours: Callable[[], object]                        # our recorded launches, replayed
    refresh: Callable[[], None]                       # fresh random inputs, in place
    torch: Callable[[], object]                       # PyTorch's op (never called without torch)
    ours_value: Callable[[], object] | None = None    # for the check: our result ...
    torch_value: Callable[[], object] | None = None   # ... and PyTorch's, as a tensor
    call: Callable[[], object] | None = None          # the public launcher call, where one call is the op
    results: dict = field(default_factory=dict)
    launches: list = field(default_factory=list)      # what ``ours`` replays, where the row keeps it


def floor_us(flops: float, nbytes: float, ceilings: dict) -> float:
    """The least time in microseconds: compulsory bytes at the copy bandwidth or flops at the fp32 rate."""
    return 1e6 * max(nbytes / ceilings["bandwidth_bytes_per_s"], flops / ceilings["fp32_flops_per_s"])


def relative_error(ours, reference) -> float:
    """max |ours - reference| / max(1, max |reference|), in float64 on the host."""
    import numpy as np

    from gpucnn import backend
    ours = np.asarray(backend.to_numpy(ours), dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    return float(np.abs(ours - reference).max() / max(1.0, float(np.abs(reference).max())))


class Bench:
    """Builds the rows: inputs shared with PyTorch through DLPack, our launches recorded once.

    ``cp`` is the array module (cupy), ``torch`` PyTorch or None, ``runtime`` the one the kernels
    run on (None: the process-wide CupyRuntime) and ``device`` where models go. Tests pass NumPy
    stand-ins, PyTorch on the CPU, an emulator runtime and "cpu" to run every row once without a GPU.
    PyTorch is only touched inside the rows' callables, so ``torch=None`` builds ours alone.
    """

    def __init__(self, cp, torch, runtime=None, device="gpu", seed=0):
        from gpucnn.cuda.runtime import default_runtime
        self.cp, self.torch, self.device = cp, torch, device
        self.plain = runtime if runtime is not None else default_runtime()
        self.rt = RecordingRuntime(self.plain)
        self.random = cp.random.RandomState(seed)
        self.rows: list[Row] = []

    def array(self, shape):
        return self.random.standard_normal(shape, dtype=self.cp.float32)

    def refill(self, *arrays):
        def refresh():
            for a in arrays:
                a[...] = self.random.standard_normal(a.shape, dtype=self.cp.float32)
        return refresh

    def t(self, array):
        """A torch tensor sharing the array's memory (None without torch)."""
        return None if self.torch is None else self.torch.from_dlpack(array)

    def check(self, row: Row) -> float | None:
        """Our result against PyTorch's for the current inputs (None where the row has no check)."""
        if row.ours_value is None:
            return None
        return relative_error(row.ours_value(), row.torch_value().detach().cpu().numpy())

    # conv2d: forward, backward-data, backward-weights (+ bias)
    def conv(self, label, n, c, h, w, oc, k, padding):
        from gpucnn.cuda import conv as cuda_conv
        from gpucnn.utils import conv_output_size
        oh, ow = conv_output_size(h, k, 1, padding), conv_output_size(w, k, 1, padding)
        x, weight, bias = self.array((n, c, h, w)), self.array((oc, c, k, k)), self.array((oc,))
        grad_y = self.array((n, oc, oh, ow))
        cuda_conv.conv2d_forward(x, weight, bias, padding=padding, runtime=self.rt)
        forward = self.rt.take()
        cuda_conv.conv2d_backward(grad_y, x, weight, padding=padding, runtime=self.rt)
        backward = self.rt.take()
        data_kernels = ("conv2d_gemm_backward_data", "conv2d_small_backward_data")
        data = [launch for launch in backward if launch.name in data_kernels]
        weights = [launch for launch in backward if launch.name not in data_kernels]

        tx, tw, tb, tgy = (self.t(a) for a in (x, weight, bias, grad_y))
        geometry = dict(padding=padding, runtime=self.plain)

        def ours_forward():
            return cuda_conv.conv2d_forward(x, weight, bias, **geometry)

        def torch_forward():
            return self.torch.nn.functional.conv2d(tx, tw, tb, padding=padding)

        def torch_backward(mask):
            return self.torch.ops.aten.convolution_backward(tgy, tx, tw, [oc], [1, 1], [padding, padding], [1, 1],
                                                            False, [0, 0], 1, mask)
        data_mask, weight_mask = [True, False, False], [False, True, True]
        flops = 2.0 * n * oc * oh * ow * c * k * k
        shape = f"{n}x{c}x{h}x{w} -> {oc} {k}x{k} p{padding}"
        self.rows += [
            Row(f"{label} conv fwd", shape, flops, 4.0 * (x.size + weight.size + oc + n * oc * oh * ow),
                lambda: replay(forward), self.refill(x, weight, bias), torch_forward,
                ours_forward, torch_forward, call=ours_forward),
            Row(f"{label} conv bwd-data", shape, flops, 4.0 * (grad_y.size + weight.size + x.size),
                lambda: replay(data), self.refill(grad_y, weight), lambda: torch_backward(data_mask),
                lambda: cuda_conv.conv2d_backward(grad_y, x, weight, **geometry)[0],
                lambda: torch_backward(data_mask)[0]),
            Row(f"{label} conv bwd-weights", shape, flops, 4.0 * (grad_y.size + x.size + weight.size + oc),
                lambda: replay(weights), self.refill(grad_y, x), lambda: torch_backward(weight_mask),
                lambda: cuda_conv.conv2d_backward(grad_y, x, weight, **geometry)[1],
                lambda: torch_backward(weight_mask)[1]),
        ]

    # 2x2 max pooling: forward (values and window-local argmax), backward (a gather)
    def pool(self, label, n, c, h, w):
        from gpucnn.cuda import pool as cuda_pool
        x = self.array((n, c, h, w))
        y, argmax = cuda_pool.max_pool2d_forward(x, 2, runtime=self.rt)
        forward = self.rt.take()
        grad_y = self.array(y.shape)
        cuda_pool.max_pool2d_backward(grad_y, argmax, x.shape, 2, runtime=self.rt)
        backward = self.rt.take()

        tx, tgy = self.t(x), self.t(grad_y)
        window = ([2, 2], [2, 2], [0, 0], [1, 1], False)
        torch_indices = {}

        def torch_forward():
            y_t, torch_indices["last"] = self.torch.ops.aten.max_pool2d_with_indices(tx, *window)
            return y_t

        def torch_backward():
            if "last" not in torch_indices:
                torch_forward()
            return self.torch.ops.aten.max_pool2d_with_indices_backward(tgy, tx, *window, torch_indices["last"])

        def ours_backward():
            _, fresh_argmax = cuda_pool.max_pool2d_forward(x, 2, runtime=self.plain)
            return cuda_pool.max_pool2d_backward(grad_y, fresh_argmax, x.shape, 2, runtime=self.plain)

        def torch_backward_fresh():
            torch_forward()
            return torch_backward()
        shape = f"{n}x{c}x{h}x{w} 2x2"
        self.rows += [
            Row(f"{label} maxpool fwd", shape, 0.0, 4.0 * (x.size + 2 * y.size), lambda: replay(forward),
                self.refill(x), torch_forward, lambda: cuda_pool.max_pool2d_forward(x, 2, runtime=self.plain)[0],
                torch_forward, call=lambda: cuda_pool.max_pool2d_forward(x, 2, runtime=self.plain)),
            Row(f"{label} maxpool bwd", shape, 0.0, 4.0 * (2 * y.size + x.size), lambda: replay(backward),
                self.refill(grad_y), torch_backward, ours_backward, torch_backward_fresh,
                call=lambda: cuda_pool.max_pool2d_backward(grad_y, argmax, x.shape, 2, runtime=self.plain)),
        ]

    # fully connected: forward (bias fused), backward-data, backward-weights (+ bias)
    def linear(self, label, n, d_in, d_out):
        from gpucnn.cuda import linear as cuda_linear
        x, weight, bias, grad_y = (self.array(s) for s in ((n, d_in), (d_out, d_in), (d_out,), (n, d_out)))
        cuda_linear.linear_forward(x, weight, bias, runtime=self.rt)
        forward = self.rt.take()
        cuda_linear.matmul(grad_y, weight, runtime=self.rt)
        data = self.rt.take()
        cuda_linear.matmul(grad_y, x, trans_a=True, row_sums=True, runtime=self.rt)  # weight and bias gradients
        weights = self.rt.take()

        tx, tw, tb, tgy = (self.t(a) for a in (x, weight, bias, grad_y))

        def ours_forward():
            return cuda_linear.linear_forward(x, weight, bias, runtime=self.plain)

        def torch_forward():
            return self.torch.nn.functional.linear(tx, tw, tb)

        def torch_data():
            return self.torch.mm(tgy, tw)

        def torch_weights():
            return self.torch.mm(tgy.t(), tx), tgy.sum(0)
        flops = 2.0 * n * d_in * d_out
        shape = f"{n}x{d_in} -> {d_out}"
        self.rows += [
            Row(f"{label} linear fwd", shape, flops, 4.0 * (x.size + weight.size + d_out + n * d_out),
                lambda: replay(forward), self.refill(x, weight, bias), torch_forward, ours_forward, torch_forward,
                call=ours_forward),
            Row(f"{label} linear bwd-data", shape, flops, 4.0 * (grad_y.size + weight.size + x.size),
                lambda: replay(data), self.refill(grad_y, weight), torch_data,
                lambda: cuda_linear.matmul(grad_y, weight, runtime=self.plain), torch_data),
            Row(f"{label} linear bwd-weights", shape, flops, 4.0 * (grad_y.size + x.size + weight.size + d_out),
                lambda: replay(weights), self.refill(grad_y, x), torch_weights,
                lambda: cuda_linear.matmul(grad_y, x, trans_a=True, runtime=self.plain),
                lambda: torch_weights()[0]),
        ]

    # softmax cross-entropy: forward (probs, per-row loss, fixed-order mean), backward
    def loss(self, label, n, k=10):
        from gpucnn.cuda import loss as cuda_loss
        logits = self.array((n, k))
        labels = self.random.randint(0, k, n).astype(self.cp.int32)
        _, probs = cuda_loss.softmax_cross_entropy(logits, labels, check_labels=False, runtime=self.rt)
        forward = self.rt.take()
        cuda_loss.softmax_cross_entropy_backward(probs, labels, check_labels=False, runtime=self.rt)
        backward = self.rt.take()

        state = {}

        def torch_forward():
            if "logits" not in state:
                state["logits"] = self.t(logits).detach().requires_grad_(True)
                state["labels"] = self.t(labels).long()
            state["loss"] = self.torch.nn.functional.cross_entropy(state["logits"], state["labels"])
            return state["loss"]

        def torch_backward():
            if "loss" not in state:
                torch_forward()
            return self.torch.autograd.grad(state["loss"], state["logits"], retain_graph=True)[0]

        def ours_forward():
            return cuda_loss.softmax_cross_entropy(logits, labels, check_labels=False, runtime=self.plain)

        def ours_backward():
            return cuda_loss.softmax_cross_entropy_backward(ours_forward()[1], labels, runtime=self.plain)

        def torch_backward_fresh():
            torch_forward()
            return torch_backward()
        shape = f"{n}x{k}"
        self.rows += [
            Row(f"{label} xent fwd", shape, 0.0, 4.0 * (3 * n * k + 2 * n), lambda: replay(forward),
                self.refill(logits), torch_forward, lambda: ours_forward()[0], torch_forward, call=ours_forward),
            Row(f"{label} xent bwd", shape, 0.0, 4.0 * (2 * n * k + n), lambda: replay(backward),
                self.refill(logits), torch_backward, ours_backward, torch_backward_fresh,
                call=lambda: cuda_loss.softmax_cross_entropy_backward(probs, labels, check_labels=False,
                                                                      runtime=self.plain)),
        ]

    def relu(self, label, shape_nchw):
        from gpucnn.cuda import activation as cuda_activation
        x, grad_y = self.array(shape_nchw), self.array(shape_nchw)
        y = cuda_activation.relu_forward(x, runtime=self.rt)
        forward = self.rt.take()
        cuda_activation.relu_backward(grad_y, y, runtime=self.rt)
        backward = self.rt.take()

        tx, ty, tgy = (self.t(a) for a in (x, y, grad_y))

        def torch_backward():
            return self.torch.ops.aten.threshold_backward(tgy, ty, 0)
        shape = "x".join(map(str, shape_nchw))
        self.rows += [
            Row(f"{label} relu fwd", shape, 0.0, 8.0 * x.size, lambda: replay(forward), self.refill(x),
                lambda: self.torch.relu(tx), lambda: cuda_activation.relu_forward(x, runtime=self.plain),
                lambda: self.torch.relu(tx), call=lambda: cuda_activation.relu_forward(x, runtime=self.plain)),
            Row(f"{label} relu bwd", shape, 0.0, 12.0 * x.size, lambda: replay(backward), self.refill(grad_y, y),
                torch_backward, lambda: cuda_activation.relu_backward(grad_y, y, runtime=self.plain), torch_backward,
                call=lambda: cuda_activation.relu_backward(grad_y, y, runtime=self.plain)),
        ]

    # Adam over LeNet-5's parameters: our fused update against torch.optim.Adam(fused=True)
    def adam(self):
        from gpucnn.cuda.optim import FusedAdam
        from gpucnn.models import LeNet5
        params = list(LeNet5(seed=0).to(self.device).parameters())
        opt = FusedAdam(params, lr=1e-3, runtime=self.rt)
        self.rt.take()  # the constructor's fill of the gradients is no part of a step
        opt.step()  # with the zero gradients that zero_grad() bound
        launches = self.rt.take()
        count = sum(p.size for p in params)
        state = {}

        def torch_optimizer():
            if "opt" not in state:
                state["params"] = [self.torch.nn.Parameter(self.torch.from_dlpack(p.data).clone()) for p in params]
                for tp in state["params"]:
                    tp.grad = self.torch.zeros_like(tp)
                state["opt"] = self.torch.optim.Adam(state["params"], lr=1e-3, fused=True)
            return state["opt"]

        def refresh():
            opt.flat.grad[...] = self.random.standard_normal(opt.flat.grad.shape, dtype=self.cp.float32)
            for tp in state.get("params", ()):
                tp.grad.normal_()

        def call():
            opt.step()
            self.rt.take()  # the recording runtime would otherwise keep every launch

        # The check: the same start and the same gradients for three steps, then all parameters compared.
        check_params = list(LeNet5(seed=1).to(self.device).parameters())

        def ours_steps():
            fused = FusedAdam(check_params, lr=1e-3, runtime=self.plain)
            torch_params = [self.torch.nn.Parameter(self.torch.from_dlpack(p.data).clone()) for p in check_params]
            torch_opt = self.torch.optim.Adam(torch_params, lr=1e-3, fused=True)
            for _ in range(3):
                fused.zero_grad()
                for p, tp in zip(check_params, torch_params):
                    p.grad[...] = self.random.standard_normal(p.shape, dtype=self.cp.float32)
                    tp.grad = self.torch.from_dlpack(p.grad).clone()
                fused.step()
                torch_opt.step()
            state["checked"] = torch_params
            return self.cp.concatenate([p.data.reshape(-1) for p in check_params])

        def torch_steps():  # called after ours_steps, which ran both
            return self.torch.cat([tp.detach().reshape(-1) for tp in state["checked"]])
        self.rows.append(Row("adam step", f"{count} params", 0.0, 4.0 * 7 * count, lambda: replay(launches),
                             refresh, lambda: torch_optimizer().step(), ours_steps, torch_steps, call=call,
                             launches=launches))


def time_op(cp, stream, run, refresh, reps: int, warmup: int, inner: int) -> float:
    """Median microseconds per run: CUDA events around ``inner`` runs, fresh inputs before each repetition."""
    for _ in range(warmup):
        refresh()
        run()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(reps):
        refresh()
        start.record(stream)
        for _ in range(inner):
            run()
        end.record(stream)
        end.synchronize()
        times.append(1000.0 * cp.cuda.get_elapsed_time(start, end) / inner)
    return statistics.median(times)


def _copy_us(cp, stream, nbytes: int, reps: int) -> float:
    src = cp.ones(nbytes // 4, dtype=cp.float32)
    dst = cp.empty_like(src)

    def copy():
        cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes, cp.cuda.runtime.memcpyDeviceToDevice,
                                    stream.ptr)
    return time_op(cp, stream, copy, lambda: None, reps, 3, 1)


def _gemm_us(cp, stream, n: int, reps: int) -> float:
    a = cp.random.standard_normal((n, n), dtype=cp.float32)
    b = cp.random.standard_normal((n, n), dtype=cp.float32)
    c = cp.empty_like(a)
    return time_op(cp, stream, lambda: cp.matmul(a, b, out=c), lambda: None, reps, 3, 1)


def measure_ceilings(cp, stream, copy_mib: int, gemm_n: int, reps: int) -> dict:
    """Device-to-device copy bandwidth (bytes read + written per second) and the fp32 GEMM rate (cuBLAS)."""
    nbytes = copy_mib * 2**20
    copy_us = _copy_us(cp, stream, nbytes, reps)
    gemm_us = _gemm_us(cp, stream, gemm_n, reps)
    return {"copy_bytes": nbytes, "copy_us": copy_us, "bandwidth_bytes_per_s": 2 * nbytes / (copy_us * 1e-6),
            "gemm_n": gemm_n, "gemm_us": gemm_us, "fp32_flops_per_s": 2.0 * gemm_n**3 / (gemm_us * 1e-6)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="64,256,4096", help="LeNet-5 batch sizes")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--inner", type=int, default=10, help="runs between one pair of events")
    parser.add_argument("--copy-mib", type=int, default=1024, help="size of the copy for the bandwidth ceiling")
    parser.add_argument("--gemm-n", type=int, default=8192, help="size of the square product for the fp32 ceiling")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"row groups to run, from {','.join(GROUPS)}")
    parser.add_argument("--no-torch", action="store_true", help="time gpucnn only")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    args.batches = gpu_env.comma_list(parser, args.batches, what="batch sizes", convert=int)
    args.only = gpu_env.comma_list(parser, args.only, GROUPS, what="groups")
    if min(args.reps, args.inner) < 1 or args.warmup < 0 or not args.batches or min(args.batches) < 1:
        parser.error("--reps and --inner must be at least 1, --warmup at least 0, and batch sizes positive")
    return args


def build_rows(bench: Bench, args) -> None:
    for n in args.batches:
        if "conv" in args.only:
            bench.conv(f"b{n} conv1", n, 1, 28, 28, 6, 5, 2)
            bench.conv(f"b{n} conv2", n, 6, 14, 14, 16, 5, 0)
        if "pool" in args.only:
            bench.pool(f"b{n} pool1", n, 6, 28, 28)
            bench.pool(f"b{n} pool2", n, 16, 10, 10)
        if "relu" in args.only:
            bench.relu(f"b{n} act1", (n, 6, 28, 28))
        if "linear" in args.only:
            bench.linear(f"b{n} fc1", n, 400, 120)
            bench.linear(f"b{n} fc2", n, 120, 84)
            bench.linear(f"b{n} fc3", n, 84, 10)
        if "loss" in args.only:
            bench.loss(f"b{n}", n)
    if "adam" in args.only:
        bench.adam()
    if "large" in args.only:
        bench.conv("b32 large", 32, 64, 56, 56, 64, 3, 1)
    if "vgg" in args.only:
        for label, c, size, oc in VGG_CASES:
            bench.conv(f"b{VGG_BATCH} vgg {label}", VGG_BATCH, c, size, size, oc, 3, 1)
        for label, c, size in VGG_POOL_CASES:
            bench.pool(f"b{VGG_BATCH} vgg {label}", VGG_BATCH, c, size, size)


def format_table(rows, ceilings) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)
    lines = [f"{'op':<28} {'shape':<28} {'ours us':>9} {'call us':>9} {'torch us':>9} {'ours/torch':>10} "
             f"{'floor us':>9} {'ours/floor':>10} {'check':>9}"]
    for r in rows:
        res = r.results
        lines.append(f"{r.op:<28} {r.shape:<28} {num(res.get('ours_us'), '9.1f')} {num(res.get('call_us'), '9.1f')} "
                     f"{num(res.get('torch_us'), '9.1f')} {num(res.get('ours_over_torch'), '10.2f')} "
                     f"{num(res.get('floor_us'), '9.2f')} {num(res.get('ours_over_floor'), '10.1f')} "
                     f"{num(res.get('check'), '9.1e')}")
    lines.append(f"ceilings: copy {ceilings['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s (read+write, "
                 f"{ceilings['copy_bytes'] / 2**20:.0f} MiB), fp32 GEMM {ceilings['fp32_flops_per_s'] / 1e12:.1f} "
                 f"TFLOP/s (n={ceilings['gemm_n']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    cp = gpu_env.require_gpu()
    torch = None if args.no_torch else gpu_env.require_torch()
    env = gpu_env.environment(cp, torch)
    print(gpu_env.describe(env), flush=True)

    stream = cp.cuda.Stream(non_blocking=False)
    # PyTorch runs on the same stream, so the events bracket its kernels too.
    torch_context = contextlib.nullcontext() if torch is None else \
        torch.cuda.stream(torch.cuda.ExternalStream(stream.ptr))
    with stream, torch_context:
        ceilings = measure_ceilings(cp, stream, args.copy_mib, args.gemm_n, max(5, args.reps // 3))
        bench = Bench(cp, torch)
        build_rows(bench, args)
        for done, row in enumerate(bench.rows):
            write_results(args.json, env, args, ceilings, bench.rows[:done])  # a time-out keeps the rows so far
            res = row.results
            if torch is not None:
                res["check"] = bench.check(row)
                res["torch_us"] = time_op(cp, stream, row.torch, row.refresh, args.reps, args.warmup, args.inner)
            res["ours_us"] = time_op(cp, stream, row.ours, row.refresh, args.reps, args.warmup, args.inner)
            if row.call is not None:
                res["call_us"] = time_op(cp, stream, row.call, row.refresh, args.reps, args.warmup, args.inner)
            res["floor_us"] = floor_us(row.flops, row.bytes, ceilings)
            res["ours_over_floor"] = res["ours_us"] / res["floor_us"]
            if torch is not None:
                res["ours_over_torch"] = res["ours_us"] / res["torch_us"]
            print(f"{row.op:<28} {row.shape:<28} ours {res['ours_us']:9.1f} us"
                  + (f"  torch {res['torch_us']:9.1f} us  ratio {res['ours_over_torch']:.2f}"
                     if torch is not None else ""), flush=True)
    write_results(args.json, env, args, ceilings, bench.rows)
    print()
    print(format_table(bench.rows, ceilings))
    return 0


def write_results(path, env, args, ceilings, rows) -> None:
    """The JSON of the rows measured so far (nothing without --json)."""
    gpu_env.write_json(path, {
        "environment": env, "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "ceilings": ceilings,
        "rows": [{"op": r.op, "shape": r.shape, "flops": r.flops, "bytes": r.bytes, **r.results} for r in rows]})


if __name__ == "__main__":
    sys.exit(main())

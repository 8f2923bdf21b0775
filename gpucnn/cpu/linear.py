"""Fast fully connected layer on NumPy arrays: the signatures and results of gpucnn.ops.linear.

The products are the reference's, run inside the thread pool with BLAS at one thread: a
BLAS call on its own threads between two of our ops would leave BLAS's threads spinning
on the cores our threads need (measured: fc1 at batch 256 took 10-47 ms instead of 0.2-0.3
when BLAS was given its threads back between the convolutions). Forward cuts the batch
into row chunks; backward runs grad_x, grad_weight and grad_bias side by side, each one
product, so no sum depends on the chunking.
"""
from __future__ import annotations

import numpy as np

from gpucnn.cpu.threads import even_ranges, run_chunks

MAX_ROW_CHUNKS = 4
MIN_CHUNK_ROWS = 128  # fewer rows are not worth a hand-over to another thread
# Below this many multiply-adds the backward's three products run one after the other on this
# thread: handing LeNet's fc2 (batch 64, 0.6 M) to threads took 0.10 ms against 0.03 ms.
MIN_PARALLEL_BACKWARD = 1 << 23


def linear_forward(x, weight, bias):
    """y = x @ weight.T + bias: x (N, IN), weight (OUT, IN), bias (OUT,) or None -> y (N, OUT)."""
    N, OUT = x.shape[0], weight.shape[0]
    y = np.empty((N, OUT), np.result_type(x, weight))
    ranges = even_ranges(N, max(1, min(MAX_ROW_CHUNKS, N // MIN_CHUNK_ROWS)))

    def work(i):
        start, stop = ranges[i]
        np.matmul(x[start:stop], weight.T, out=y[start:stop])
        if bias is not None:
            y[start:stop] += bias

    run_chunks(work, len(ranges), N * OUT * x.shape[1] / len(ranges))
    return y


def linear_backward(grad_y, x, weight, with_bias=True, with_grad_x=True):
    """(grad_x | None, grad_weight, grad_bias | None), as gpucnn.ops.linear.linear_backward."""
    results = {}
    tasks = [("grad_weight", lambda: grad_y.T @ x)]
    if with_grad_x:
        tasks.append(("grad_x", lambda: grad_y @ weight))
    if with_bias:
        tasks.append(("grad_bias", lambda: grad_y.sum(axis=0)))

    def work(i):
        name, compute = tasks[i]
        results[name] = compute()

    work_per_task = grad_y.size * x.shape[1]
    run_chunks(work, len(tasks), work_per_task if work_per_task >= MIN_PARALLEL_BACKWARD else 0)
    return results.get("grad_x"), results["grad_weight"], results.get("grad_bias")

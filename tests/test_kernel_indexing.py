"""Grid-stride loops in kernels/*.cu step with a 64-bit index, so ``i + stride`` cannot wrap.

The launchers accept counts up to MAX_INT32_ELEMENTS (just under 2**31). With an ``int`` index,
the last element's thread adds the grid stride and wraps negative, which still passes ``i < count``
and reads before the array. Running a loop to such a count needs gigabytes, so each loop's own
declaration and increment, copied from the source file, run once under the emulator from the last
index of the largest accepted count.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from gpucnn.cuda.runtime import MAX_INT32_ELEMENTS, kernels_dir
from gpucnn.emulator import EmulatedModule

# for (TYPE VAR = INIT; VAR < BOUND; VAR += STRIDE), where STRIDE mentions gridDim
_LOOP = re.compile(r"for\s*\(\s*(?P<type>(?:unsigned\s+|long\s+|int\s*)+)\s*(?P<var>\w+)\s*=[^;]*;"
                   r"[^;]*;\s*(?P=var)\s*\+=\s*(?P<stride>[^;{]*?gridDim[^;{]*?)\s*\)\s*\{")
_KERNEL = re.compile(r'extern "C" __global__ void (\w+)\(')
PROBE_GRID = 4096    # blocks of one thread: a stride of 4096, more than 2**31 - 1 - MAX_INT32_ELEMENTS
PROBE = """
extern "C" __global__ void probe(long long start, long long* next)
{{
    if (blockIdx.x != 0 || blockIdx.y != 0 || blockIdx.z != 0) return;
    {type} {var} = ({type})start;
    {var} += {stride};
    next[0] = (long long){var};
}}
"""


def grid_stride_loops():
    """(file, kernel, index type, variable, stride expression) of every grid-stride loop."""
    loops = []
    for path in sorted(kernels_dir().glob("*.cu")):
        source = path.read_text()
        for match in _LOOP.finditer(source):
            kernels = _KERNEL.findall(source[:match.start()])
            stride = " ".join(match.group("stride").split())
            loops.append((path.name, kernels[-1], " ".join(match.group("type").split()), match.group("var"), stride))
    return loops


LOOPS = grid_stride_loops()


def test_the_grid_stride_loops_are_found():
    found = {(file, kernel) for file, kernel, *_ in LOOPS}
    assert {("elementwise.cu", "relu_forward"), ("elementwise.cu", "relu_backward"),
            ("optim.cu", "adam_update"), ("optim.cu", "sgd_update"),
            ("conv2d.cu", "conv2d_forward_tiled")} <= found


@pytest.mark.parametrize("loop", LOOPS, ids=lambda loop: f"{loop[0]}:{loop[1]}:{loop[3]}")
def test_the_last_index_plus_the_stride_does_not_wrap(loop, tmp_path):
    file, kernel, index_type, var, stride = loop
    probe = tmp_path / f"probe_{kernel}.cu"
    probe.write_text(PROBE.format(type=index_type, var=var, stride=stride))
    axis = next(i for i, name in enumerate("xyz") if f"gridDim.{name}" in stride)
    grid = tuple(PROBE_GRID if i == axis else 1 for i in range(3))
    start = MAX_INT32_ELEMENTS - 1   # the last element of the largest count a launcher accepts
    next_index = np.zeros(1, np.int64)
    EmulatedModule(probe).get_function("probe")(grid, (1, 1, 1), (np.int64(start), next_index))
    assert next_index[0] == start + PROBE_GRID, \
        f"{file} {kernel}: {index_type} {var} += {stride} wrapped to {next_index[0]}; use a 64-bit index"

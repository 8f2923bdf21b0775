"""The convolutions as implicit GEMMs (kernels/gemm.cu) under the emulator, in all three thread orders.

Forward (with SMALL_OC lowered to 0, so that every case takes the GEMM, not the small-problem
kernel), data gradient and weight gradient (with the bias gradient as the column of ones, split
over depth when the plan says) against the NumPy reference: LeNet-5's and vgg-small's layers at
reduced batch and size, and awkward shapes. The emulator is slow, so each case is small but spans
several tiles, a ragged edge or several depth slices; the 128 x 128 tile is forced where a case is
too small to get it. Two runs, and runs in different thread orders, give identical bits.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from gpucnn.cuda import conv as cuda_conv
from gpucnn.cuda import gemm
from gpucnn.emulator import EmulatorRuntime
from gpucnn.testing.recording import RecordingRuntime
from gpucnn.utils import conv_output_size
from tests.conftest import EMULATOR_ORDERS
from tests.kernel_cases import (ConvCase, broken_kernel_copy, case_id, caught_under_some_order, check_conv,
                                conv_inputs, remove_barrier)

pytestmark = pytest.mark.emulator

GEMM_CONV_CASES = [
    # LeNet-5 at batch 3: conv1's weight gradient sums 2,352 positions in several depth slices
    ConvCase("lenet_conv1_b3", 3, 1, 28, 28, 6, (5, 5), padding=(2, 2), relu=True),
    ConvCase("lenet_conv2_b3", 3, 6, 14, 14, 16, (5, 5)),
    # vgg-small's channel counts on small images: 64 and 128 output channels, depth 27 and 576
    ConvCase("vgg_conv1_1_b2", 2, 3, 12, 12, 64, (3, 3), padding=(1, 1), relu=True),
    ConvCase("vgg_conv2_1_b1", 1, 64, 6, 6, 128, (3, 3), padding=(1, 1)),
    # awkward: C=3, OC=5, 7x7, stride 2 pad 3; dilation 2; 1x1 with 70 rows; batch 1 without bias
    ConvCase("c3_oc5_7x7_s2_p3", 2, 3, 15, 13, 5, (7, 7), stride=(2, 2), padding=(3, 3)),
    ConvCase("dilation2_relu", 1, 4, 12, 11, 7, (3, 3), padding=(2, 2), dilation=(2, 2), relu=True),
    ConvCase("kernel_1x1_70_rows", 3, 17, 9, 7, 70, (1, 1)),
    ConvCase("batch1_stride_1x2_no_bias", 1, 5, 10, 10, 9, (3, 3), stride=(1, 2), padding=(1, 0), bias=False),
    ConvCase("stride3_dilation2_pad_wide", 2, 2, 13, 14, 3, (2, 3), stride=(3, 2), padding=(2, 3), dilation=(2, 2)),
]


@pytest.fixture(params=EMULATOR_ORDERS)
def emulator(request, monkeypatch):
    monkeypatch.setattr(cuda_conv, "SMALL_OC", 0)   # every forward on the GEMM too
    monkeypatch.setattr(cuda_conv, "SMALL_TILES", 0)  # every weight gradient too (the small kernel: below)
    return EmulatorRuntime(order=request.param, seed=3)


@pytest.mark.parametrize("case", GEMM_CONV_CASES, ids=case_id)
def test_implicit_gemm_convolutions_match_the_reference(case, emulator):
    log = RecordingRuntime(emulator)
    check_conv(case, runtime=log)
    assert log.names[:3] == ["conv2d_gemm_forward", "conv2d_gemm_backward_data", "conv2d_gemm_backward_weight"]
    assert set(log.names[3:]) <= {"gemm_reduce_slices"}


@pytest.mark.parametrize("case", [c for c in GEMM_CONV_CASES
                                  if cuda_conv.small_weight_plan(c.oc, c.c * c.kernel[0] * c.kernel[1] + c.bias, 1)],
                         ids=case_id)
def test_the_small_weight_gradient_kernel_matches_the_reference(case, emulator, monkeypatch):
    monkeypatch.setattr(cuda_conv, "SMALL_TILES", 64)
    monkeypatch.setattr(cuda_conv, "SMALL_MIN_POSITIONS", 4)   # several slices even at these sizes
    log = RecordingRuntime(emulator)
    check_conv(case, runtime=log)
    assert log.names[2] == "conv2d_small_backward_weight" and set(log.names[3:]) <= {"gemm_reduce_slices"}


def test_the_small_weight_gradient_splits_lenet_conv1_in_slices(emulator, monkeypatch):
    monkeypatch.setattr(cuda_conv, "SMALL_TILES", 64)
    monkeypatch.setattr(cuda_conv, "SMALL_MIN_POSITIONS", 16)   # 6 slices at batch 8
    case = ConvCase("lenet_conv1_b8", 8, 1, 28, 28, 6, (5, 5), padding=(2, 2))
    slices, _ = cuda_conv.small_weight_plan(6, 26, 8 * 28 * 28)
    assert slices > 1
    log = RecordingRuntime(emulator)
    check_conv(case, runtime=log)
    assert log.names[2:] == ["conv2d_small_backward_weight", "gemm_reduce_slices"]
    assert log.launches[2].grid == (1, 1, slices)


def test_the_weight_gradient_is_split_in_few_slices_added_in_order(emulator):
    """LeNet conv1 at batch 3: 2,352 positions in several slices, then one reduce."""
    case = GEMM_CONV_CASES[0]
    plan = gemm.plan(6, 26, case.n * case.h * case.w)
    assert 1 < plan.slices <= gemm.MAX_SLICES
    log = RecordingRuntime(emulator)
    check_conv(case, runtime=log)
    weight_launch = log.launches[2]
    assert weight_launch.name == "conv2d_gemm_backward_weight" and weight_launch.grid[2] == plan.slices
    assert log.names[3:] == ["gemm_reduce_slices"]


def test_the_128_tile_matches_the_reference(emulator, monkeypatch):
    monkeypatch.setattr(gemm, "BIG_TILE_MIN_BLOCKS", 1)
    case = ConvCase("tile128", 2, 16, 10, 9, 130, (3, 3), padding=(1, 1), relu=True)
    log = RecordingRuntime(emulator)
    check_conv(case, runtime=log)
    blocks = {launch.name: launch.block for launch in log.launches}
    assert blocks["conv2d_gemm_forward"] == (16, 16, 1)          # 130 x 180 output: 128 x 128 tiles
    assert blocks["conv2d_gemm_backward_weight"] == (16, 16, 1)  # 130 x 145
    assert blocks["conv2d_gemm_backward_data"] == (8, 8, 1)      # 16 rows: the 64 tile


def test_two_runs_and_all_thread_orders_give_the_same_bits(monkeypatch):
    monkeypatch.setattr(cuda_conv, "SMALL_OC", 0)
    case = ConvCase("bits", 2, 5, 11, 10, 70, (3, 3), stride=(2, 1), padding=(1, 2))
    runs = [check_conv(case, runtime=EmulatorRuntime(order=order, seed=seed))
            for order, seed in (("random", 1), ("random", 2), ("forward", 0), ("reverse", 0))]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("mutation", ["barrier_0", "barrier_1", "counter"])
def test_a_broken_gemm_core_is_caught(tmp_path, mutation, monkeypatch):
    monkeypatch.setattr(cuda_conv, "SMALL_OC", 0)
    if mutation == "counter":  # the im2col counter forgets to carry kx into ky
        def mutate(source):
            return source.replace("if (++kx == g.kw) { kx = 0; if (++ky == g.kh) { ky = 0; ++ch; } }",
                                  "if (++kx == g.kw) { if (++ky == g.kh) { ky = 0; ++ch; } }", 1)
    else:
        mutate = remove_barrier("gemm_tile", int(mutation[-1]))
    case = ConvCase("mutation", 2, 3, 9, 9, 5, (3, 3), padding=(1, 1))
    assert caught_under_some_order(broken_kernel_copy(tmp_path, "gemm.cu", mutate),
                                   lambda rt: check_conv(case, runtime=rt))


def test_which_kernel_runs_for_which_shape():
    """The table of docs/design.md: small output-channel counts keep the tiled forward."""
    def forward_kernel(n, c, size, oc):
        log = RecordingRuntime(_DryRuntime())
        x = np.zeros((n, c, size, size), np.float32)
        cuda_conv.conv2d_forward(x, np.zeros((oc, c, 3, 3), np.float32), None, padding=1, runtime=log)
        return log.names[-1]
    assert forward_kernel(64, 6, 14, 16) == "conv2d_forward_tiled"
    assert forward_kernel(64, 16, 8, 32) == "conv2d_gemm_forward"
    assert forward_kernel(64, 64, 32, 64) == "conv2d_gemm_forward"
    # vgg-small's conv2_2 at batch 256: 128 x 128 tiles; conv3_2 at batch 64 would have only 64 of
    # them, so it keeps 64 x 64 tiles (256 blocks)
    assert gemm.plan(128, 256 * 16 * 16, 128 * 9, split=False).tile == 128
    assert gemm.plan(256, 64 * 8 * 8, 256 * 9, split=False).tile == 64
    # LeNet conv1's weight gradient at batch 4096: a 6 x 26 output (4 thread tiles) in the small
    # kernel, 32 slices of the positions; vgg-small's conv1_2 (64 x 577) in the GEMM
    assert cuda_conv.small_weight_plan(6, 26, 4096 * conv_output_size(28, 5, 1, 2) ** 2)[0] == 32
    assert cuda_conv.small_weight_plan(16, 151, 64 * 100) is not None
    assert cuda_conv.small_weight_plan(64, 577, 64 * 32 * 32) is None


class _DryRuntime:
    """Allocates but runs no kernel: for launch-choice tests at full size."""
    xp = np

    def function(self, file, name):
        return lambda grid, block, args, shared_mem=0: None

    def empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype)


def test_the_gemm_kernels_use_no_atomics_templates_headers_or_asm():
    from gpucnn.kernel_sources import kernels_dir
    text = re.sub(r"//[^\n]*", "", (kernels_dir() / gemm.KERNEL_FILE).read_text())  # code, not comments
    assert not re.search(r"\batomic[A-Z]\w*|\btemplate\b|#\s*include|\basm\b", text)


@pytest.mark.parametrize("index", [0, 1], ids=["before_the_sums", "before_the_next_half"])
def test_a_missing_barrier_in_the_small_weight_gradient_is_caught(tmp_path, index, monkeypatch):
    # 6 x 26 outputs: 4 thread tiles, 64 position groups, so both halves of the block hold groups
    case = ConvCase("small_mutation", 2, 1, 9, 9, 6, (5, 5), padding=(2, 2))
    assert caught_under_some_order(broken_kernel_copy(tmp_path, "conv2d.cu", remove_barrier("add_group_tiles", index)),
                                   lambda rt: check_conv(case, runtime=rt))


SMALL_DATA_CASES = [
    ConvCase("c3_7x7_s2_p3", 2, 3, 15, 13, 20, (7, 7), stride=(2, 2), padding=(3, 3)),
    ConvCase("c17_dilation2_three_groups", 2, 17, 9, 10, 5, (3, 3), padding=(2, 2), dilation=(2, 2)),
    ConvCase("c31_stride_3x2", 1, 31, 11, 8, 6, (3, 2), stride=(3, 2), padding=(1, 1)),
]


@pytest.mark.parametrize("order", EMULATOR_ORDERS)
@pytest.mark.parametrize("case", SMALL_DATA_CASES, ids=case_id)
def test_the_small_data_gradient_kernel_matches_the_reference(case, order):
    log = RecordingRuntime(EmulatorRuntime(order=order, seed=4))
    check_conv(case, runtime=log)
    assert "conv2d_small_backward_data" in log.names and "conv2d_gemm_backward_data" not in log.names


def test_a_missing_barrier_in_the_small_data_gradient_is_caught(tmp_path):
    def mutate(source):
        start = source.index("void conv2d_small_backward_data(")
        cut = source.index("__syncthreads();", start)
        return source[:cut] + source[cut + len("__syncthreads();"):]
    case = SMALL_DATA_CASES[1]
    assert caught_under_some_order(broken_kernel_copy(tmp_path, "conv2d.cu", mutate),
                                   lambda rt: check_conv(case, runtime=rt))

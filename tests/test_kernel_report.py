"""bench/kernel_report.py: the SASS inner-loop reading, the occupancy arithmetic and the dry launch list."""
from __future__ import annotations

import pytest

from tests.test_bench_scripts import _load

report = _load("kernel_report")

SASS = [(0x00, "MOV R1, c[0x0][0x28]"),
        (0x10, "LDS.128 R4, [R2]"),           # the loop: 0x10 .. 0x50
        (0x20, "LDS R8, [R3]"),
        (0x30, "FFMA R10, R4, R8, R10"),
        (0x40, "FFMA R11, R5, R8, R11"),
        (0x50, "@P0 BRA 0x10"),
        (0x60, "FFMA R12, R5, R8, R12"),      # after the loop: not counted
        (0x70, "EXIT")]


def test_the_inner_loop_is_the_backward_branch_span_holding_ffma():
    loop = report.inner_loop(SASS)
    assert (loop.instructions, loop.ffma, loop.lds, loop.ldg) == (5, 2, {32: 1, 64: 0, 128: 1}, 0)
    assert loop.per_fma == 2.5
    assert loop.shared_clocks == 5 and loop.cost == 10.0  # 4 * 5 shared clocks / 2 FFMA beats 2.5 issue slots


def test_the_loop_around_the_inner_loop_is_counted_statically():
    outer = [(0x00, "MOV R1, R2"), *SASS[1:5], (0x50, "@P0 BRA 0x10"), (0x60, "LDG R3, [R4]"),
             (0x70, "@P1 BRA 0x0")]
    loop = report.inner_loop(outer)
    assert (loop.instructions, loop.ffma, loop.outer, loop.outer_ffma) == (5, 2, 8, 2)
    assert report.inner_loop(SASS).outer == 0


def test_a_kernel_without_an_ffma_loop_has_no_inner_loop():
    loop = report.inner_loop([(0x0, "FADD R1, R2, R3"), (0x10, "@P0 BRA 0x0")])
    assert loop.ffma == 0 and loop.instructions == 0


@pytest.mark.parametrize("regs, threads, shared, expected", [
    (32, 256, 0, 8),          # 2048 threads per SM
    (128, 256, 0, 2),         # 65536 registers / (128 * 256)
    (64, 256, 40 * 1024, 4),  # registers: 4 blocks; shared: 228 KiB / 41 KiB = 5
    (255, 1024, 0, 0),        # too many registers for one block
    (16, 32, 0, 32),          # the block limit
])
def test_blocks_per_sm(regs, threads, shared, expected):
    assert report.blocks_per_sm(regs, threads, shared) == expected


def test_the_dry_step_records_lenet5_launches_without_running_a_kernel():
    launches = report.step_launches("lenet5", 4)
    names = [launch.name for launch in launches]
    assert "adam_update" in names and names[-1] == "adam_update"
    assert sum(report.launch_fmas(launch) for launch in launches) > 0


@pytest.mark.nvrtc
def test_the_report_reads_every_kernel_and_labels_its_figures_estimates(capsys, tmp_path):
    pytest.importorskip("nvidia")
    assert report.main(["--shapes", "lenet5:8", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATE" in out and "lenet5 batch 8" in out
    data = (tmp_path / "r.json").read_text()
    for kernel in ("conv2d_forward_tiled", "gemm_matmul", "conv2d_gemm_backward_weight", "adam_update"):
        assert f"| {kernel} |" in out and kernel in data


@pytest.mark.parametrize("model, batch, most", [("lenet5", 64, 30), ("lenet5", 256, 30), ("lenet5", 4096, 30),
                                                ("vgg-small", 64, 45), ("vgg-small", 256, 45)])
def test_the_steps_launch_counts_meet_issue_18s_goals_at_the_benchmark_batches(model, batch, most):
    names = [launch.name for launch in report.step_launches(model, batch)]
    assert len(names) <= most, names
    assert not {"fill", "add_into", "relu_forward", "relu_backward"} & set(names)

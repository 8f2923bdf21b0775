"""What gpucnn's kernels would cost on a GPU, read from the compiled kernels on the CPU: every figure an estimate.

    python bench/kernel_report.py [--arch sm_90] [--json out.json]

For every kernel of ``kernels/*.cu`` (compiled by NVRTC with CuPy's options): registers, static shared
memory, spills, and the static SASS of its inner loop (``cuobjdump -sass``, from the pip wheels
nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm): the innermost loop that holds FFMAs, its instructions,
FFMAs, shared loads by width and global loads, and so its instructions per FMA.

Then the launch list of one Adam training step of LeNet-5 (batch 64, 256, 4096) and vgg-small (batch 64,
256), recorded without running a kernel (a dry runtime stands in for the emulator's), and for every
launch: threads, shared memory, blocks per SM (occupancy), FLOPs, compulsory bytes and an estimated
time on an H200 from the model below. No GPU is involved, so no figure here is a measurement.

The time model (per launch; a stated model, not a measurement):
  t = LAUNCH_US + max(t_compute, t_memory)
  t_memory  = compulsory bytes (every array argument read or written once) / (0.8 * 4.8 TB/s)
  t_compute = waves * (FMAs per block / 32 * cost) / (issue rate per block * 1.9 GHz)
    FMAs     = the multiply-adds the blocks execute: for the GEMM kernels whole tiles (rows and
               columns past the problem's edge included), so an almost empty tile costs in full;
    cost     = max(instructions per FMA of the inner loop, 4 * shared-memory clocks per FMA); an SM
               issues 4 warp-instructions and serves 128 bytes of shared memory per clock, so a
               32-bit shared load per warp costs one clock and a 128-bit one four;
    waves    = ceil(blocks / (132 SMs * blocks per SM)); resident = min(blocks per SM, ceil(blocks / 132));
    issue rate per block = min(4, 0.5 * resident * warps per block) / resident warp-instructions per
               clock: a warp issues at most every other clock on average, so 8 warps fill an SM.
  FMAs are counted only for the GEMM-like kernels (convolutions, matrix products); the others are
  modelled as memory traffic. The cuDNN anchor beside each convolution layer is its FLOPs at 57% of
  fp32 peak (cuDNN's fp32 ResNet-50 on a V100, NVIDIA DeepLearningExamples), the figure the design
  note (gpu-kernel-model.md) uses.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMS, CLOCK_HZ, PEAK_FLOPS, HBM_BYTES_S = 132, 1.9e9, 67e12, 4.8e12
MEMORY_EFFICIENCY = 0.8
LAUNCH_US = 2.0                   # a kernel launched from a CUDA graph: launch plus ramp, a floor
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 64, 32
SHARED_PER_SM, SHARED_RESERVED_PER_BLOCK = 228 * 1024, 1024
CUDNN_FRACTION = 0.57             # the cuDNN anchor: fp32 ResNet-50 on a V100 at ~57% of peak
SHAPES = (("lenet5", 64), ("lenet5", 256), ("lenet5", 4096), ("vgg-small", 64), ("vgg-small", 256))


# ---------------------------------------------------------------- static: NVRTC + SASS

@dataclass
class InnerLoop:
    """The innermost SASS loop holding FFMAs: counts of its instructions, for one pass through it."""
    instructions: int = 0
    ffma: int = 0
    lds: dict = None          # shared loads by width in bits: {32: n, 64: n, 128: n}
    ldg: int = 0              # global loads
    shared_clocks: float = 0.0
    outer: int = 0            # static instructions of the loop around it (0: none), the inner loop counted once
    outer_ffma: int = 0

    @property
    def per_fma(self) -> float:
        return self.instructions / self.ffma if self.ffma else float("nan")

    @property
    def cost(self) -> float:
        """Issue slots per FMA, the shared-memory clocks counted as 4 issue slots each (see the model)."""
        return max(self.per_fma, 4 * self.shared_clocks / self.ffma) if self.ffma else float("nan")


def _tool(name: str) -> str:
    import nvidia  # noqa: PLC0415 - the pip wheels nvidia-cuda-cuobjdump / -nvdisasm
    for folder in nvidia.__path__:   # cu13/bin in the CUDA 13 wheels, cuda_<tool>/bin in the CUDA 12 ones
        for path in sorted(Path(folder).glob(f"*/bin/{name}")):
            return str(path)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} was not found: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")
    return found


def sass_by_kernel(cubin: bytes) -> dict[str, list[tuple[int, str]]]:
    """(address, instruction text) per kernel of a CUBIN, from cuobjdump -sass."""
    cuobjdump = _tool("cuobjdump")
    env = dict(os.environ, PATH=str(Path(_tool("nvdisasm")).parent) + os.pathsep + os.environ.get("PATH", ""))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True, check=True,
                              env=env).stdout
    kernels, current = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\w+)", line)
        if m:
            current = kernels.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and current is not None:
            current.append((int(m.group(1), 16), m.group(2)))
    return kernels


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def inner_loop(sass: list[tuple[int, str]]) -> InnerLoop:
    """The innermost loop (a backward branch's span) that holds FFMAs; with several, the one with most."""
    loops = []
    for address, text in sass:
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if m and _opcode(text).startswith("BRA") and int(m.group(1), 16) <= address:
            body = [t for a, t in sass if int(m.group(1), 16) <= a <= address]
            if any(_opcode(t).startswith("FFMA") for t in body):
                loops.append((int(m.group(1), 16), address, body))
    innermost = [loop for loop in loops
                 if not any(o is not loop and loop[0] <= o[0] and o[1] <= loop[1] for o in loops)]
    if not innermost:
        return InnerLoop(lds={})
    chosen = max(innermost, key=lambda loop: sum(_opcode(t).startswith("FFMA") for t in loop[2]))
    body = chosen[2]
    result = InnerLoop(instructions=len(body), lds={32: 0, 64: 0, 128: 0})
    around = [o for o in loops if o is not chosen and o[0] <= chosen[0] and chosen[1] <= o[1]]
    if around:  # the GEMM kernels' depth step: loads, gathers and stores to shared around the FMAs
        step = min(around, key=lambda o: o[1] - o[0])[2]
        result.outer, result.outer_ffma = len(step), sum(_opcode(t).startswith("FFMA") for t in step)
    for text in body:
        op = _opcode(text)
        if op.startswith("FFMA"):
            result.ffma += 1
        elif op.startswith("LDS"):
            width = 128 if ".128" in op else 64 if ".64" in op else 32
            result.lds[width] += 1
            result.shared_clocks += width / 32
        elif op.startswith("LDG") or op.startswith("LD."):
            result.ldg += 1
    return result


@dataclass
class KernelStatic:
    name: str
    file: str
    registers: int
    shared_bytes: int
    spill_bytes: int
    loop: InnerLoop
    ffma_share: float       # FFMA among all the kernel's SASS instructions


def static_report(arch: str) -> dict[str, KernelStatic]:
    from gpucnn.kernel_sources import kernels_dir
    from gpucnn.testing import nvrtc
    report = {}
    for path in sorted(kernels_dir().glob("*.cu")):
        result = nvrtc.compile_file(path, arch=arch)
        sass = sass_by_kernel(result.cubin)
        for name, res in result.kernels.items():
            code = sass.get(name, [])
            ffma = sum(_opcode(t).startswith("FFMA") for _, t in code)
            report[name] = KernelStatic(name, path.name, res.registers, res.shared_bytes,
                                        res.spill_stores + res.spill_loads, inner_loop(code),
                                        ffma / len(code) if code else 0.0)
    return report


# ---------------------------------------------------------------- the launch list of one step, dry

@dataclass
class DryLaunch:
    name: str
    grid: tuple
    block: tuple
    shared_mem: int
    args: tuple


class DryRuntime:
    """The emulator device's runtime, except that kernels are recorded and never run (the values are garbage)."""

    xp = np

    def __init__(self):
        self.launches: list[DryLaunch] = []

    def function(self, file, name):
        def launch(grid, block, args, shared_mem=0):
            self.launches.append(DryLaunch(name, tuple(grid), tuple(block), int(shared_mem), tuple(args)))
        return launch

    def empty(self, shape, dtype):
        from gpucnn import backend
        return np.empty(shape, dtype).view(backend.EmulatorArray)

    def zeros(self, shape, dtype):
        from gpucnn import backend
        return np.zeros(shape, dtype).view(backend.EmulatorArray)


def step_launches(model_name: str, batch: int) -> list[DryLaunch]:
    """The launches of one Adam TrainStep (after the planning step) of the model at this batch."""
    from gpucnn import backend, optim
    from gpucnn.emulator import runtime as emulator_runtime
    from gpucnn.models import build_model, default_input_shape
    from gpucnn.step import TrainStep
    dry = DryRuntime()
    # The emulator device's runtime for a made-up thread order is the dry one, while the step runs.
    order = emulator_runtime._order_in_force
    emulator_runtime._device_runtimes["dry"] = dry
    emulator_runtime._order_in_force = "dry"
    try:
        model = build_model(model_name, seed=0).to("emulator")
        step = TrainStep(model, optim.Adam(list(model.parameters()), lr=1e-3), batch, graph=False)
        x = backend.to_device(np.zeros((batch, *default_input_shape(model_name)), np.float32), "emulator")
        y = backend.to_device(np.zeros(batch, np.int32), "emulator")
        step(x, y)
        dry.launches.clear()
        step(x, y)
        return list(dry.launches)
    finally:
        emulator_runtime._order_in_force = order
        del emulator_runtime._device_runtimes["dry"]


# ---------------------------------------------------------------- FLOPs, bytes, occupancy, time

def _per_filter(weight) -> int:
    return weight.size // weight.shape[0]  # C*KH*KW


# Multiply-adds of the GEMM-like kernels, from their arguments (kernel name -> function of the args).
FMAS = {
    "conv2d_forward_tiled": lambda a: a[3].size * _per_filter(a[1]),
    "conv2d_forward_direct": lambda a: a[3].size * _per_filter(a[1]),
    "conv2d_backward_data": lambda a: a[0].size * _per_filter(a[1]),
    "conv2d_backward_weight_partial": lambda a: a[0].size * a[2].shape[1] // a[0].shape[1],
    "linear_matmul_tiled": lambda a: int(a[4]) * int(a[5]) * int(a[6]),
    # the GEMM core (kernels/gemm.cu): rows x cols x depth as launched (the data gradient's zero taps
    # at strides > 1 and the weight gradient's column of ones included)
    "conv2d_gemm_forward": lambda a: a[3].size * _per_filter(a[1]),
    "conv2d_gemm_backward_data": lambda a: a[2].size * (a[1].size // a[1].shape[1]),
    "conv2d_gemm_backward_weight": lambda a: a[0].size * (int(a[5]) * int(a[9]) * int(a[10]) + int(a[20])),
    "gemm_matmul": lambda a: int(a[5]) * (int(a[6]) + int(a[13])) * int(a[7]),
    "conv2d_small_backward_weight": lambda a: a[0].size * (int(a[5]) * int(a[9]) * int(a[10]) + int(a[20])),
    "conv2d_small_backward_data": lambda a: a[2].size * (a[1].size // a[1].shape[1]),
}


def launch_fmas(launch: DryLaunch) -> int:
    """Multiply-adds of the GEMM-like kernels (0 for the others): from the shapes of their arguments."""
    count = FMAS.get(launch.name)
    return int(count(launch.args)) if count else 0


# The GEMM kernels' (rows, cols, depth), to count whole tiles: kernel name -> function of the args.
GEMM_SHAPES = {
    "conv2d_gemm_forward": lambda a: (int(a[8]), a[3].size // int(a[8]), _per_filter(a[1])),
    "conv2d_gemm_backward_data": lambda a: (int(a[5]), a[2].size // int(a[5]), a[1].size // a[1].shape[1]),
    "conv2d_gemm_backward_weight": lambda a: (int(a[8]), int(a[5]) * int(a[9]) * int(a[10]) + int(a[20]),
                                              a[0].size // int(a[8])),
    "gemm_matmul": lambda a: (int(a[5]), int(a[6]) + int(a[13]), int(a[7])),
}


def executed_fmas(launch: DryLaunch, fmas: int) -> int:
    """The multiply-adds the launch's blocks execute: whole tiles for the GEMM kernels, else ``fmas``."""
    shape = GEMM_SHAPES.get(launch.name)
    if shape is None:
        return fmas
    _, _, depth = shape(launch.args)
    tile = launch.block[0] * 8
    return math.prod(launch.grid) * tile * tile * math.ceil(depth / launch.grid[2])


def launch_bytes(launch: DryLaunch) -> int:
    return sum(a.nbytes for a in launch.args if isinstance(a, np.ndarray))


def blocks_per_sm(regs: int, threads: int, shared: int) -> int:
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * warps)
    by_warps = MAX_WARPS_PER_SM // warps
    by_shared = SHARED_PER_SM // (shared + SHARED_RESERVED_PER_BLOCK)
    return max(0, min(by_regs, by_warps, by_shared, MAX_BLOCKS_PER_SM))


@dataclass
class LaunchEstimate:
    name: str
    grid: tuple
    block: tuple
    shared_bytes: int
    blocks_per_sm: int
    occupancy: float          # resident warps per SM / 64
    flops: int
    bytes: int
    est_us: float


def estimate(launch: DryLaunch, static: KernelStatic) -> LaunchEstimate:
    threads = math.prod(launch.block)
    blocks = math.prod(launch.grid)
    shared = static.shared_bytes + launch.shared_mem
    per_sm = blocks_per_sm(static.registers, threads, shared)
    warps = per_sm * math.ceil(threads / 32)
    fmas = launch_fmas(launch)
    nbytes = launch_bytes(launch)
    t_memory = nbytes / (MEMORY_EFFICIENCY * HBM_BYTES_S)
    t_compute = 0.0
    if fmas and static.loop.ffma and per_sm:
        waves = math.ceil(blocks / (SMS * per_sm))
        resident = min(per_sm, math.ceil(blocks / SMS))
        rate = min(4.0, 0.5 * resident * math.ceil(threads / 32)) / resident
        executed = executed_fmas(launch, fmas)
        t_compute = waves * (executed / blocks / 32 * static.loop.cost) / (rate * CLOCK_HZ)
    est = LAUNCH_US + 1e6 * max(t_compute, t_memory)
    return LaunchEstimate(launch.name, launch.grid, launch.block, shared, per_sm, warps / MAX_WARPS_PER_SM,
                          2 * fmas, nbytes, est)


# ---------------------------------------------------------------- the report

def _static_table(report: dict[str, KernelStatic]) -> list[str]:
    lines = ["## Kernels as compiled (NVRTC, CuPy's options; SASS by cuobjdump)", "",
             "The enclosing loop (for the GEMM kernels the depth step: global loads, gathers, shared stores) is",
             "a static span: the inner loop counted once, every branch of it counted; the model uses only the",
             "inner loop, so it leaves the gathers out.", "",
             "| kernel | file | registers | static shared B | spills B | inner loop: instr / FFMA / LDS.32,64,128 / "
             "LDG | instr per FMA | cost per FMA (model) | enclosing loop: instr / FFMA (static) | "
             "FFMA share of all SASS |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k in sorted(report.values(), key=lambda k: (k.file, k.name)):
        loop = k.loop
        shape = (f"{loop.instructions} / {loop.ffma} / {loop.lds.get(32, 0)},{loop.lds.get(64, 0)},"
                 f"{loop.lds.get(128, 0)} / {loop.ldg}") if loop.ffma else "no FFMA loop"
        per = f"{loop.per_fma:.2f}" if loop.ffma else "-"
        cost = f"{loop.cost:.2f}" if loop.ffma else "-"
        outer = f"{loop.outer} / {loop.outer_ffma}" if loop.outer else "-"
        lines.append(f"| {k.name} | {k.file} | {k.registers} | {k.shared_bytes} | {k.spill_bytes} | {shape} | "
                     f"{per} | {cost} | {outer} | {k.ffma_share:.2f} |")
    return lines


def _conv_anchor_lines(model_name: str, batch: int) -> list[str]:
    """Per convolution layer: its FLOPs (forward + both gradients) and the cuDNN anchor time."""
    from gpucnn import nn
    from gpucnn.models import build_model, default_input_shape
    from gpucnn.receptive import layer_geometry
    model = build_model(model_name, seed=0)
    rows = {row.name: row for row in layer_geometry(model, default_input_shape(model_name))}
    lines = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            oc, oh, ow = rows[name].output_shape
            c = module.weight.data.shape[1]
            kh, kw = module.weight.data.shape[2:]
            flops = 3 * 2 * batch * oc * oh * ow * c * kh * kw
            lines.append(f"  {name}: forward + data + weight gradient {flops / 1e9:.3f} GFLOP; cuDNN anchor "
                         f"(57% of fp32 peak) {1e6 * flops / (CUDNN_FRACTION * PEAK_FLOPS):.1f} us")
    return lines


def shape_section(model_name: str, batch: int, report: dict[str, KernelStatic]) -> tuple[list[str], dict]:
    launches = step_launches(model_name, batch)
    rows = [estimate(launch, report[launch.name]) for launch in launches]
    total = sum(r.est_us for r in rows)
    by_name: dict[str, list] = {}
    for r in rows:
        by_name.setdefault(r.name, []).append(r)
    lines = [f"## {model_name} batch {batch}: one Adam step, {len(rows)} launches, estimated {total / 1e3:.3f} ms "
             "of GPU time (estimate)", "",
             "| kernel | launches | est. us (sum) | share | GFLOP | MB | blocks/SM (min-max) | occupancy (min-max) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, group in sorted(by_name.items(), key=lambda kv: -sum(r.est_us for r in kv[1])):
        t = sum(r.est_us for r in group)
        bps = [r.blocks_per_sm for r in group]
        occ = [r.occupancy for r in group]
        lines.append(f"| {name} | {len(group)} | {t:.1f} | {t / total:.0%} | {sum(r.flops for r in group) / 1e9:.3f} | "
                     f"{sum(r.bytes for r in group) / 1e6:.2f} | {min(bps)}-{max(bps)} | "
                     f"{min(occ):.2f}-{max(occ):.2f} |")
    lines += ["", "Per launch (in order): kernel grid block shared-B blocks/SM GFLOP MB est-us"]
    lines += [f"  {r.name} {r.grid} {r.block} {r.shared_bytes} {r.blocks_per_sm} {r.flops / 1e9:.4f} "
              f"{r.bytes / 1e6:.3f} {r.est_us:.1f}" for r in rows]
    lines += ["", "Convolution layers beside the cuDNN anchor (estimates):"] + _conv_anchor_lines(model_name, batch)
    data = {"model": model_name, "batch": batch, "launches": len(rows), "est_total_us": total,
            "rows": [asdict(r) for r in rows]}
    return lines + [""], data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--shapes", default=",".join(f"{m}:{b}" for m, b in SHAPES),
                        help="model:batch pairs, comma-separated")
    args = parser.parse_args(argv)
    report = static_report(args.arch)
    from gpucnn.testing import nvrtc
    out = [f"# gpucnn kernel report ({args.arch}, NVRTC {'.'.join(map(str, nvrtc.version()))}): every figure is an "
           "ESTIMATE from the compiled kernels and a stated model, not a GPU measurement", "",
           f"command: python bench/kernel_report.py --arch {args.arch} --shapes {args.shapes}", "",
           "The time model" + __doc__.split("The time model", 1)[1].rstrip()]
    out += [""] + _static_table(report) + [""]
    shapes = []
    for pair in args.shapes.split(","):
        model_name, batch = pair.split(":")
        lines, data = shape_section(model_name, int(batch), report)
        out += lines
        shapes.append(data)
    print("\n".join(out))
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps({"arch": args.arch,
                                   "kernels": {k: {**asdict(v), "per_fma": v.loop.per_fma, "cost": v.loop.cost}
                                               for k, v in report.items()},
                                   "shapes": shapes}, indent=1, default=str))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""LeNet-5 (or vgg-small) training steps on the GPU: gpucnn (captured and eager) against PyTorch and JAX, in images/s.

    python bench/gpu_train.py [--model lenet5|vgg-small] [--batch-sizes 64,256] [--rounds 7]
                              [--round-steps 50] [--warmup-steps 20] [--pool 16] [--only VARIANTS]
                              [--determinism-steps 20] [--no-torch] [--no-compile-times] [--json FILE]

--model vgg-small trains gpucnn's vgg-small on 3x32x32 images against the same network in PyTorch
(bench/bench_models.py; JAX has only LeNet-5). The rest of this text describes LeNet-5, the default.

The network everywhere: conv 1->6 5x5 pad 2, ReLU, max-pool 2, conv 6->16 5x5, ReLU, max-pool 2,
400-120-84-10, softmax cross-entropy, Adam at lr 1e-3, float32, TF32 off. The data is resident: per
batch size, --pool batches of fresh random 28x28 images and labels are made on the device before
timing, and step i trains on batch i % pool (no host copies, no gather). Variants:

  gpucnn-graph   gpucnn.step.TrainStep(model, FusedAdam(...), B, graph=True): the whole step on
                 gpucnn's kernels, captured once as a CUDA graph and replayed.
  gpucnn-eager   the same TrainStep with graph=False (without gpucnn.step: the model, the loss of
                 kernels/loss.cu and FusedAdam, launched eagerly).
  pytorch-eager  the network in PyTorch eager (cuDNN, torch.optim.Adam's default): the baseline.
  torch-compile  the model under torch.compile(mode="reduce-overhead") (CUDA graphs), Adam eager.
  jax-jit        the whole step (forward, grad, Adam) under jax.jit, where JAX with a GPU is installed.

Each variant warms up (--warmup-steps; the captures and compilations happen there, their seconds
recorded), then --rounds rounds of --round-steps steps alternate between the variants; a round is
timed with CUDA events on the variant's stream (JAX: the host clock between two waits for its
results). Reported: the median seconds per step, images/s = B / median, and the ratio to
pytorch-eager at the same batch size. Also: whether two gpucnn runs from one seed end with bitwise
identical weights, and the seconds to compile every kernels/*.cu cold and warm (fresh processes).
Without a GPU it says so in one line ("no GPU: ...") and exits with status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_env  # noqa: E402 - also puts the repository on sys.path

NUM_CLASSES = 10
LR = 1e-3
KERNEL_NAME = re.compile(r'extern "C" __global__ void (\w+)\(')
VARIANTS = ("gpucnn-graph", "gpucnn-eager", "pytorch-eager", "torch-compile", "jax-jit")
BASELINE = "pytorch-eager"
INPUT_SHAPES = {"lenet5": (1, 28, 28), "vgg-small": (3, 32, 32)}
MODEL = "lenet5"   # the model every variant trains; main() sets it from --model
# issue 10's goals at batch 64: the captured step against PyTorch eager and torch.compile
GOALS = (("gpucnn-graph", "pytorch-eager", 3.0), ("gpucnn-graph", "torch-compile", 1.0))


class Unavailable(Exception):
    """A variant that cannot run here (a library missing, no GPU for it); the message says why."""


@dataclass
class Variant:
    """One way to train: ``run(first, steps)`` trains on resident batches first, first+1, ... (mod pool).

    ``timer(run, first, steps)`` gives the seconds those steps took on the device; ``result()`` reads
    losses (host, after timing: a dict for the row) to show it trained; ``setup_s``: build + warm-up.
    """
    name: str
    run: Callable[[int, int], object]
    timer: Callable
    result: Callable[[], float]
    setup_s: float = 0.0
    rounds_s: list = field(default_factory=list)


# ---- timing and results (pure Python: tested on the CPU) -------------------------------------------

def cupy_timer(cp):
    """Seconds of ``run(first, steps)`` between two CUDA events on CuPy's current stream."""
    def timer(run, first, steps):
        stream = cp.cuda.get_current_stream()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        cp.cuda.Device().synchronize()
        start.record(stream)
        run(first, steps)
        end.record(stream)
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) / 1e3
    return timer


def torch_timer(torch):
    """Seconds of ``run(first, steps)`` between two CUDA events on PyTorch's current stream."""
    def timer(run, first, steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        run(first, steps)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return timer


def host_timer(wait):
    """Seconds of ``run(first, steps)`` on the host clock, ``wait(output)`` blocking on the last result."""
    def timer(run, first, steps):
        wait(run(first, 1))
        start = time.perf_counter()
        wait(run(first + 1, steps))
        return time.perf_counter() - start
    return timer


def summarize(name: str, batch_size: int, rounds_s, round_steps: int) -> dict:
    """One result row from a variant's round times: median and spread per step, images/s from the median."""
    if not rounds_s or round_steps < 1:
        raise ValueError("summarize needs at least one timed round of at least one step.")
    per_step = sorted(s / round_steps for s in rounds_s)
    median = statistics.median(per_step)
    return {"variant": name, "batch_size": batch_size, "rounds": len(per_step), "round_steps": round_steps,
            "median_step_ms": median * 1e3, "min_step_ms": per_step[0] * 1e3, "max_step_ms": per_step[-1] * 1e3,
            "images_per_s": batch_size / median}


def add_ratios(rows, baseline: str = BASELINE) -> list:
    """Each row gains ``vs_<baseline>``: its images/s over the baseline's at the same batch size."""
    base = {r["batch_size"]: r["images_per_s"] for r in rows if r["variant"] == baseline}
    for r in rows:
        if r["batch_size"] in base:
            r[f"vs_{baseline}"] = r["images_per_s"] / base[r["batch_size"]]
    return rows


def goals(rows, batch_size: int = 64) -> list:
    """(text, met) for each of issue 10's throughput goals whose two variants were measured."""
    rate = {r["variant"]: r["images_per_s"] for r in rows if r["batch_size"] == batch_size}
    out = []
    for ours, theirs, factor in GOALS:
        if ours in rate and theirs in rate:
            ratio = rate[ours] / rate[theirs]
            out.append((f"{ours} >= {factor:g}x {theirs} at batch {batch_size}: x{ratio:.2f}", ratio >= factor))
    return out


def format_table(rows, baseline: str = BASELINE) -> str:
    """The rows as a fixed-width table; a missing ratio shows as '-'."""
    key = f"vs_{baseline}"
    lines = [f"{'variant':<14} {'batch':>5} {'ms/step':>8} {'min':>7} {'max':>7} {'images/s':>10} "
             f"{'vs ' + baseline:>17} {'setup s':>8}"]
    for r in rows:
        ratio = f"{r[key]:17.2f}" if key in r else f"{'-':>17}"
        setup = f"{r['setup_s']:8.1f}" if "setup_s" in r else f"{'-':>8}"
        lines.append(f"{r['variant']:<14} {r['batch_size']:>5} {r['median_step_ms']:8.3f} {r['min_step_ms']:7.3f} "
                     f"{r['max_step_ms']:7.3f} {r['images_per_s']:10.0f} {ratio} {setup}")
    return "\n".join(lines)


def measure(variants, rounds: int, round_steps: int, pool: int) -> None:
    """Alternate timed rounds between the variants (so drifts in clocks or heat hit all alike)."""
    for r in range(rounds):
        for v in variants:
            v.rounds_s.append(v.timer(v.run, (r * round_steps) % pool, round_steps))


# ---- gpucnn ----------------------------------------------------------------------------------------

def _train_step_class():
    try:
        from gpucnn.step import TrainStep
    except ImportError as exc:
        raise Unavailable(f"gpucnn.step.TrainStep cannot be imported ({exc}); the captured step is not "
                          "measured") from None
    return TrainStep


def gpucnn_trainer(variant: str, seed: int, device: str = "gpu", runtime=None):
    """(model, step) for gpucnn without gpucnn.step: step(x, y) trains on one batch, returns the loss.

    ``variant`` "gpucnn": the library as a user calls it (ops.softmax_cross_entropy, optim.Adam);
    "gpucnn-fused": the loss of kernels/loss.cu and FusedAdam. ``device`` and ``runtime`` let
    tests run it on the CPU and the emulator.
    """
    from gpucnn import ops, optim
    from gpucnn.cuda import loss as cuda_loss
    from gpucnn.cuda.optim import FusedAdam

    model = _gpucnn_model(seed).to(device)
    if variant == "gpucnn":
        opt = optim.Adam(model.parameters(), lr=LR)

        def step(x, y):
            opt.zero_grad()
            loss, probs = ops.softmax_cross_entropy(model(x), y)
            model.backward(ops.softmax_cross_entropy_backward(probs, y))
            opt.step()
            return loss
    elif variant == "gpucnn-fused":
        opt = FusedAdam(list(model.parameters()), lr=LR, runtime=runtime)

        def step(x, y):
            opt.zero_grad()
            loss, probs = cuda_loss.softmax_cross_entropy(model(x), y, check_labels=False, runtime=runtime)
            model.backward(cuda_loss.softmax_cross_entropy_backward(probs, y, check_labels=False, runtime=runtime))
            opt.step()
            return loss
    else:
        raise ValueError(f"unknown gpucnn variant {variant!r}.")
    return model, step


def _gpucnn_model(seed: int):
    """gpucnn's MODEL: LeNet5 as before, or the registry's vgg-small."""
    from gpucnn.models import LeNet5, build_model
    if MODEL == "lenet5":
        return LeNet5(num_classes=NUM_CLASSES, seed=seed)
    return build_model(MODEL, seed=seed)


def gpucnn_train_step(batch_size: int, seed: int, graph: bool, device: str = "gpu"):
    """(model, TrainStep) of gpucnn.step: step(x, y) trains, step.totals() reads the device sums."""
    TrainStep = _train_step_class()
    from gpucnn.cuda.optim import FusedAdam

    model = _gpucnn_model(seed).to(device)
    return model, TrainStep(model, FusedAdam(model.parameters(), lr=LR), batch_size, graph=graph)


def gpucnn_variant(cp, name: str, images, labels, batch_size: int, warmup_steps: int, device: str = "gpu",
                   runtime=None) -> Variant:
    """gpucnn-graph or gpucnn-eager on the resident batches ``images[i]``, ``labels[i]``.

    ``device`` and ``runtime`` (the fallback's fused kernels) let tests run it on the CPU emulator.
    """
    pool = len(images)
    started = time.perf_counter()
    try:
        _, step = gpucnn_train_step(batch_size, seed=0, graph=name == "gpucnn-graph", device=device)
        captured = True
    except Unavailable:
        if name == "gpucnn-graph":
            raise
        # eager gpucnn without gpucnn.step
        _, step = gpucnn_trainer("gpucnn-fused", seed=0, device=device, runtime=runtime)
        captured = False
    last = {"steps": 0, "loss": None}

    def run(first, steps):
        if captured:
            step.reset_totals()
        out = None
        for i in range(first, first + steps):
            out = step(images[i % pool], labels[i % pool])
        last.update(steps=steps, loss=out)

    def result():
        """TrainStep: its device sums over the last round; else the last step's loss."""
        if captured:
            loss_sum, correct = step.totals()
            return {"round_loss_sum": float(loss_sum), "round_correct": int(correct), "round_steps": last["steps"]}
        return {"last_loss": float(last["loss"])}

    run(0, warmup_steps)
    cp.cuda.Device().synchronize()
    return Variant(name, run, cupy_timer(cp), result, setup_s=time.perf_counter() - started)


def gpucnn_weights_are_reproducible(cp, make_step, images, labels, steps: int) -> bool:
    """Two runs of ``steps`` steps from ``make_step()`` -> (model, step): True when the weights end bitwise equal."""
    finals = []
    for _ in range(2):
        model, step = make_step()
        for i in range(steps):
            step(images[i % len(images)], labels[i % len(labels)])
        finals.append([cp.asnumpy(p.data) for p in model.parameters()])
    return all(a.tobytes() == b.tobytes() for a, b in zip(*finals))


# ---- PyTorch -----------------------------------------------------------------------------------------

def torch_trainer(torch, seed: int, device: str = "cuda", compile_mode: str | None = None):
    """(model, step) for the same LeNet-5 in PyTorch; ``compile_mode``: the model under torch.compile."""
    torch.manual_seed(seed)
    nn = torch.nn
    if MODEL == "lenet5":
        model = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, NUM_CLASSES)).to(device)
    else:
        import bench_models  # noqa: PLC0415 - the CPU benchmarks' PyTorch forms
        model = bench_models.torch_model(torch, MODEL).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    forward = model if compile_mode is None else torch.compile(model, mode=compile_mode, dynamic=False)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        return loss.detach()
    return model, step


def torch_variant(torch, name: str, images, labels, batch_size: int, warmup_steps: int) -> Variant:
    """pytorch-eager or torch-compile on resident batches (torch tensors, labels int64)."""
    started = time.perf_counter()
    _, step = torch_trainer(torch, seed=0, compile_mode="reduce-overhead" if name == "torch-compile" else None)
    pool = len(images)
    losses = []

    def run(first, steps):
        out = None
        for i in range(first, first + steps):
            if name == "torch-compile":
                torch.compiler.cudagraph_mark_step_begin()
            out = step(images[i % pool], labels[i % pool])
        losses[:] = [out.clone()]

    run(0, max(warmup_steps, 3))   # torch.compile compiles and records its graphs in the first steps
    torch.cuda.synchronize()
    return Variant(name, run, torch_timer(torch), lambda: {"last_loss": float(losses[0])},
                   setup_s=time.perf_counter() - started)


# ---- JAX ---------------------------------------------------------------------------------------------

def jax_lenet_step(jax, seed: int):
    """(params, state, step): ``step(params, state, x, y) -> (params, state, loss)``, jitted, Adam inside."""
    jnp = jax.numpy
    lax = jax.lax
    shapes = {"w1": (6, 1, 5, 5), "b1": (6,), "w2": (16, 6, 5, 5), "b2": (16,), "w3": (400, 120), "b3": (120,),
              "w4": (120, 84), "b4": (84,), "w5": (84, NUM_CLASSES), "b5": (NUM_CLASSES,)}
    fan_in = {"w1": 25, "w2": 150, "w3": 400, "w4": 120, "w5": 84}
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    params = {}
    for key, (name, shape) in zip(keys, shapes.items()):
        bound = 1.0 / (fan_in.get(name, fan_in.get("w" + name[1:])) ** 0.5)  # PyTorch's default init range
        params[name] = jax.random.uniform(key, shape, jnp.float32, -bound, bound)

    def conv(x, w, b, pad):
        y = lax.conv_general_dilated(x, w, (1, 1), [(pad, pad), (pad, pad)],
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return y + b[None, :, None, None]

    def pool(x):
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

    def loss_fn(p, x, y):
        h = pool(jax.nn.relu(conv(x, p["w1"], p["b1"], 2)))
        h = pool(jax.nn.relu(conv(h, p["w2"], p["b2"], 0))).reshape(x.shape[0], 400)
        h = jax.nn.relu(h @ p["w3"] + p["b3"])
        h = jax.nn.relu(h @ p["w4"] + p["b4"])
        logp = jax.nn.log_softmax(h @ p["w5"] + p["b5"])
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    b1, b2, eps = 0.9, 0.999, 1e-8
    tree_map = jax.tree_util.tree_map

    @jax.jit
    def step(p, state, x, y):
        m, v, t = state
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        t = t + 1
        m = tree_map(lambda m_, g_: b1 * m_ + (1 - b1) * g_, m, g)
        v = tree_map(lambda v_, g_: b2 * v_ + (1 - b2) * g_ * g_, v, g)
        step_size = LR / (1 - b1 ** t)
        correction2 = jnp.sqrt(1 - b2 ** t)
        p = tree_map(lambda p_, m_, v_: p_ - step_size * m_ / (jnp.sqrt(v_) / correction2 + eps), p, m, v)
        return p, (m, v, t), loss

    zeros = tree_map(jnp.zeros_like, params)
    return params, (zeros, zeros, jnp.zeros((), jnp.float32)), step


def import_jax_gpu():
    """JAX with a GPU device, full float32 products, no memory preallocation; Unavailable if not installed."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # share the GPU with CuPy and PyTorch
    try:
        import jax
    except ImportError:
        raise Unavailable("JAX is not installed") from None
    if not any(d.platform == "gpu" for d in jax.devices()):
        raise Unavailable(f"JAX {jax.__version__} sees no GPU (devices: {jax.devices()})")
    jax.config.update("jax_default_matmul_precision", "highest")   # no TF32, like the others
    return jax


def jax_variant(cp, batch_size: int, pool: int, warmup_steps: int) -> Variant:
    """jax-jit on its own resident random batches (made by JAX on its GPU)."""
    jax = import_jax_gpu()
    started = time.perf_counter()
    params, state, step = jax_lenet_step(jax, seed=0)
    keys = jax.random.split(jax.random.PRNGKey(1), 2 * pool)
    images = [jax.random.normal(keys[2 * i], (batch_size, 1, 28, 28), jax.numpy.float32) for i in range(pool)]
    labels = [jax.random.randint(keys[2 * i + 1], (batch_size,), 0, NUM_CLASSES) for i in range(pool)]
    held = {"params": params, "state": state, "loss": None}

    def run(first, steps):
        p, s, loss = held["params"], held["state"], None
        for i in range(first, first + steps):
            p, s, loss = step(p, s, images[i % pool], labels[i % pool])
        held.update(params=p, state=s, loss=loss)
        return loss

    run(0, max(warmup_steps, 2))
    held["loss"].block_until_ready()
    return Variant("jax-jit", run, host_timer(lambda out: out.block_until_ready()),
                   lambda: {"last_loss": float(held["loss"])}, setup_s=time.perf_counter() - started)


# ---- compile times ---------------------------------------------------------------------------------

def compile_probe() -> dict:
    """In this (fresh) process: seconds to compile each kernels/*.cu through CupyRuntime, device ready first."""
    cp = gpu_env.require_gpu()
    from gpucnn.cuda.runtime import CupyRuntime, kernels_dir

    cp.zeros(1).sum()  # the CUDA context exists before the clock starts
    cp.cuda.Device().synchronize()
    runtime = CupyRuntime()
    seconds = {}
    for path in sorted(kernels_dir().glob("*.cu")):
        start = time.perf_counter()
        for name in KERNEL_NAME.findall(path.read_text()):
            runtime.function(path.name, name)
        seconds[path.name] = time.perf_counter() - start
    return seconds


def compile_times() -> dict:
    """Cold (empty CUPY_CACHE_DIR) and warm (same cache) compile seconds per kernel file, each in a fresh process."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpucnn-cupy-cache-") as cache:
        env = {**os.environ, "CUPY_CACHE_DIR": cache}
        env.pop("CUPY_CACHE_IN_MEMORY", None)
        for label in ("cold", "warm"):
            probe = subprocess.run([sys.executable, __file__, "--compile-probe"], env=env, capture_output=True,
                                   text=True, timeout=120)
            if probe.returncode != 0:
                raise SystemExit(f"the compile probe failed: {probe.stderr.strip().splitlines()[-1:]}")
            results[label] = json.loads(probe.stdout.strip().splitlines()[-1])
    return results


# ---- main ------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(INPUT_SHAPES), default="lenet5")
    parser.add_argument("--batch-sizes", default="64,256")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--round-steps", type=int, default=50)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--pool", type=int, default=16, help="resident random batches per batch size")
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants")
    parser.add_argument("--determinism-steps", type=int, default=20, help="0 skips the reproducibility check")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch variants")
    parser.add_argument("--no-compile-times", action="store_true")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_sizes = gpu_env.comma_list(parser, args.batch_sizes, what="batch sizes", convert=int)
    args.only = gpu_env.comma_list(parser, args.only, VARIANTS, what="variant(s)")
    if args.no_torch:
        args.only = [v for v in args.only if v not in ("pytorch-eager", "torch-compile")]
    if not args.batch_sizes or min(args.batch_sizes) < 1 or min(args.rounds, args.round_steps, args.pool) < 1 \
            or args.warmup_steps < 0 or args.determinism_steps < 0:
        parser.error("batch sizes, --rounds, --round-steps and --pool must be positive, --warmup-steps and "
                     "--determinism-steps at least 0")
    return args


def build_variants(cp, torch, names, batch_size: int, args) -> tuple[list, dict]:
    """The variants that can run, warmed up, and {name: reason} for those that cannot."""
    random = cp.random.RandomState(batch_size)
    images = [random.standard_normal((batch_size, *INPUT_SHAPES[MODEL]), dtype=cp.float32) for _ in range(args.pool)]
    labels = [random.randint(0, NUM_CLASSES, batch_size).astype(cp.int32) for _ in range(args.pool)]
    built, skipped = [], {}
    for name in names:
        try:
            if name.startswith("gpucnn"):
                variant = gpucnn_variant(cp, name, images, labels, batch_size, args.warmup_steps)
            elif name == "jax-jit":
                if MODEL != "lenet5":
                    raise Unavailable(f"the JAX step exists for LeNet-5 only, not {MODEL}")
                variant = jax_variant(cp, batch_size, args.pool, args.warmup_steps)
            else:
                if torch is None:
                    raise Unavailable("PyTorch is not used (--no-torch or not installed)")
                t_images = [torch.from_dlpack(x) for x in images]
                t_labels = [torch.from_dlpack(y).long() for y in labels]
                variant = torch_variant(torch, name, t_images, t_labels, batch_size, args.warmup_steps)
        except Unavailable as exc:
            skipped[name] = str(exc)
            print(f"{name:<14} batch {batch_size:>4}: not measured: {exc}", flush=True)
            continue
        except Exception as exc:  # noqa: BLE001 - one failing variant must not cost the others' figures
            skipped[name] = f"failed: {type(exc).__name__}: {exc}"
            print(f"{name:<14} batch {batch_size:>4}: FAILED: {type(exc).__name__}: {exc}", flush=True)
            continue
        print(f"{name:<14} batch {batch_size:>4}: ready in {variant.setup_s:.1f} s", flush=True)
        built.append(variant)
    return built, skipped


def main(argv=None) -> int:
    global MODEL
    args = parse_args(argv)
    MODEL = args.model
    if args.compile_probe:
        print(json.dumps(compile_probe()))
        return 0
    cp = gpu_env.require_gpu()
    torch = None
    if any(v in args.only for v in ("pytorch-eager", "torch-compile")):
        try:
            torch = gpu_env.require_torch()
        except SystemExit as exc:   # the gpucnn and JAX figures are still worth having
            print(f"PyTorch variants not measured: {exc}", flush=True)
    env = gpu_env.environment(cp, torch)
    try:
        env["jax"] = import_jax_gpu().__version__ if "jax-jit" in args.only else None
    except Exception as exc:  # noqa: BLE001 - a broken JAX install only loses the JAX row
        env["jax"] = f"not used: {exc}"
    print(gpu_env.describe(env), flush=True)
    payload = {"environment": env,
               "settings": {k: v for k, v in vars(args).items() if k not in ("json", "compile_probe")},
               "rows": [], "not_measured": {}, "goals": [], "reproducible_weights": {}, "compile_seconds": None}

    for batch_size in args.batch_sizes:
        variants, skipped = build_variants(cp, torch, args.only, batch_size, args)
        payload["not_measured"][str(batch_size)] = skipped
        gpu_env.write_json(args.json, payload)  # a time-out while measuring keeps what was set up
        measure(variants, args.rounds, args.round_steps, args.pool)
        for v in variants:
            row = summarize(v.name, batch_size, v.rounds_s, args.round_steps)
            row.update(setup_s=v.setup_s, rounds_s=v.rounds_s, **v.result())
            payload["rows"].append(row)
        add_ratios(payload["rows"])
        gpu_env.write_json(args.json, payload)
        del variants

    print()
    print(format_table(payload["rows"]))
    payload["goals"] = goals(payload["rows"], 64)
    for text, met in payload["goals"]:
        print(f"goal {text}: {'met' if met else 'NOT met'}")

    if args.determinism_steps:
        checks = {"gpucnn-eager": lambda: gpucnn_trainer("gpucnn-fused", seed=0)}
        try:
            _train_step_class()
            checks = {name: (lambda graph=name == "gpucnn-graph": gpucnn_train_step(64, 0, graph))
                      for name in ("gpucnn-graph", "gpucnn-eager")}
        except Unavailable:
            pass
        random = cp.random.RandomState(7)
        images = [random.standard_normal((64, *INPUT_SHAPES[MODEL]), dtype=cp.float32) for _ in range(4)]
        labels = [random.randint(0, NUM_CLASSES, 64).astype(cp.int32) for _ in range(4)]
        for name, make_step in checks.items():
            same = gpucnn_weights_are_reproducible(cp, make_step, images, labels, args.determinism_steps)
            payload["reproducible_weights"][name] = same
            print(f"{name}: two runs from seed 0, {args.determinism_steps} steps: weights "
                  f"{'bitwise identical' if same else 'DIFFER'}", flush=True)
    if not args.no_compile_times:
        payload["compile_seconds"] = compiled = compile_times()
        for label in ("cold", "warm"):
            files = ", ".join(f"{name} {sec:.2f}" for name, sec in compiled[label].items())
            print(f"kernel compile, {label} cache: {sum(compiled[label].values()):.2f} s ({files})")
    gpu_env.write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())

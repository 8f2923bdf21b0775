"""CNNs on the CPU: gpucnn (NumPy) against PyTorch's CPU build and ONNX Runtime, each library in its own process.

    python bench/cpu_throughput.py [--model lenet5|vgg-small] [--threads 2] [--batch-sizes 64,256,1000]
                                   [--rounds 7] [--steps 50] [--modes train,loop,infer]
                                   [--libraries gpucnn,pytorch,onnxruntime] [--rss] [--epochs 1]
                                   [--cli-epochs 5] [--json PATH]

Every library runs in a worker process of its own (a library's thread pool never meets the other's);
the parent alternates the rounds between the workers (ABBA...), so machine noise falls on both, and
only one works at a time. Training: Adam 1e-3, the same network (bench/bench_models.py), float32
images held in memory, each batch gathered by fresh random indices from a pool of random images;
mode "train" is gpucnn's Trainer.train_step, mode "loop" the library loop a user writes in one
process (forward, loss, backward, step); PyTorch runs its usual loop in both. Inference ("infer"):
eval mode, no gradients (gpucnn.no_grad, torch.no_grad); ONNX Runtime (inference rows only) runs
gpucnn's model with gpucnn's weights, exported by gpucnn.export, at all graph optimisations. Each round times --steps steps after --warmup steps at the first round and
--round-warmup steps at the start of every round (the other library ran in between: with 20-step
rounds and no per-round warm-up PyTorch's batch-64 training showed 11,800-17,800 images/s against
19,500 in 100-step rounds, a bias in gpucnn's favour); the table gives the median images/s over
rounds and the ratio gpucnn / PyTorch.

--rss: peak resident memory (VmHWM) of a fresh process doing batch-1000 inference, per library, and
its growth over the process after imports and model set-up.
--epochs E: E real Fashion-MNIST epochs (batch 64, Adam 1e-3, cosine schedule, test set evaluated
after every epoch): gpucnn's Trainer.fit against the same loop in PyTorch, in fresh processes, data
loading excluded. --cli-epochs E: the wall time of `python cli.py train --device cpu --dataset
fashion-mnist --epochs E --quiet` against a fresh process running the PyTorch loop (imports and data
loading included on both sides). Epoch runs alternate libraries over --epoch-repeats repeats.

The load averages of the machine (`uptime`) are recorded before and after every part, and for
every throughput row the mean number of cores that OTHER processes kept busy during its rounds
(/proc/stat's busy time less the worker's own CPU time and its children's: gpucnn's split step) and the cores the hypervisor gave to
other machines ("steal"): on a shared machine only rows with both near 0 compare the libraries
at full speed.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_steps import gpucnn_adam_step, torch_adam_step  # noqa: E402 - the step both CPU benchmarks time
from bench_models import MODELS, gpucnn_model, onnx_session, torch_model  # noqa: E402
from train_steps import gpucnn_loop_step  # noqa: E402
LIBRARIES = ("gpucnn", "pytorch", "onnxruntime")
MODES = ("train", "loop", "infer")
INFERENCE_ONLY = ("onnxruntime",)


def _positive_ints(text):
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, not {text!r}")
    return values


def _choices(allowed):
    def parse(text):
        values = text.split(",")
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {','.join(allowed)}")
        return values
    return parse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="lenet5")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=_positive_ints, default=[64, 256, 1000])
    parser.add_argument("--modes", type=_choices(MODES), default=list(MODES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--round-warmup", type=int, default=3,
                        help="untimed steps at the start of every round (the other library ran in between)")
    parser.add_argument("--pool", type=int, default=4096, help="random images to draw batches from")
    parser.add_argument("--libraries", type=_choices(LIBRARIES), default=list(LIBRARIES),
                        help="onnxruntime times inference only")
    parser.add_argument("--cpu-path", choices=("fast", "reference"), default="fast",
                        help="gpucnn's CPU implementation: gpucnn.cpu (fast) or the NumPy reference")
    parser.add_argument("--rss", action="store_true", help="also measure peak memory of batch-1000 inference")
    parser.add_argument("--epochs", type=int, default=0, help="also time this many real Fashion-MNIST epochs")
    parser.add_argument("--cli-epochs", type=int, default=0, help="also time the CLI run of this many epochs")
    parser.add_argument("--epoch-repeats", type=int, default=2)
    parser.add_argument("--no-throughput", action="store_true", help="only the --rss/--epochs/--cli-epochs parts")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--task", default="serve", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("threads", "rounds", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as `uptime` prints them."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def machine_cpu_seconds() -> tuple[float, float] | None:
    """(busy, stolen) CPU seconds of the whole machine so far, from /proc/stat: busy counts every
    process on every core; stolen is time the hypervisor gave the cores to other machines."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    hz = os.sysconf("SC_CLK_TCK")
    busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]  # user nice system irq softirq
    return busy / hz, ticks[7] / hz


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its live child processes (gpucnn's split-step worker)."""
    total = time.process_time()
    hz = os.sysconf("SC_CLK_TCK")
    try:
        children = Path(f"/proc/self/task/{os.getpid()}/children").read_text().split()
    except OSError:
        return total
    for pid in children:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it has just exited
        total += (int(fields[11]) + int(fields[12])) / hz  # utime, stime
    return total


def median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _worker_env(threads: int) -> dict:
    env = dict(os.environ)
    # Thread counts must be fixed before NumPy's BLAS or PyTorch's OpenMP start their pools.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GPUCNN_CPU_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# --------------------------------------------------------------------------------------------
# Worker side: one library, one process


def _set_cpu_path(path: str):
    """Select gpucnn's CPU implementation (the dispatch's cpu_path), kept for the whole process."""
    from gpucnn import dispatch  # noqa: PLC0415
    context = dispatch.cpu_path(path)
    context.__enter__()
    return context


class _Steppers:
    """The worker's step functions, one per (mode, batch size), built on first use."""

    def __init__(self, library, pool, model_name):
        import numpy as np  # noqa: PLC0415
        self.library = library
        self.model_name = model_name
        self.rng = np.random.default_rng(0)
        shape = gpucnn_model(model_name).input_shape
        self.images = self.rng.standard_normal((pool, *shape), dtype=np.float32)
        self.labels = self.rng.integers(0, 10, pool)
        self.made = {}
        if library == "pytorch":
            import torch  # noqa: PLC0415
            self.torch = torch
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    def batch(self, batch_size):
        index = self.rng.integers(0, len(self.images), batch_size)
        return self.images[index], self.labels[index]

    def get(self, mode, batch_size):
        key = (mode, batch_size)
        if key not in self.made:
            make = {"gpucnn": self._gpucnn, "pytorch": self._torch, "onnxruntime": self._onnxruntime}[self.library]
            self.made[key] = make(mode, batch_size)
        return self.made[key]

    def _gpucnn(self, mode, batch_size):
        model = gpucnn_model(self.model_name)
        if mode == "infer":
            import gpucnn  # noqa: PLC0415
            model.eval()

            def infer():
                with gpucnn.no_grad():  # as PyTorch's torch.no_grad() below
                    return model(self.batch(batch_size)[0])
            return infer
        make = gpucnn_adam_step if mode == "train" else gpucnn_loop_step
        return make(model, lambda: self.batch(batch_size))

    def _torch(self, mode, batch_size):
        torch = self.torch
        torch.manual_seed(0)
        model = torch_model(torch, self.model_name)
        if mode == "infer":
            model.eval()

            def infer():
                with torch.no_grad():
                    return model(torch.from_numpy(self.batch(batch_size)[0]))
            return infer
        return torch_adam_step(torch, model, lambda: self.batch(batch_size))

    def _onnxruntime(self, mode, batch_size):
        if mode != "infer":
            raise SystemExit("ONNX Runtime times inference only")
        import numpy as np  # noqa: PLC0415

        import gpucnn  # noqa: PLC0415
        model = gpucnn_model(self.model_name)
        model.eval()
        session, input_name = onnx_session(model, int(os.environ["OMP_NUM_THREADS"]))
        probe = self.images[:4]
        with gpucnn.no_grad():  # the same weights: ONNX Runtime's logits are gpucnn's
            np.testing.assert_allclose(session.run(None, {input_name: probe})[0], model(probe), rtol=1e-3, atol=1e-4)

        def infer():
            return session.run(None, {input_name: self.batch(batch_size)[0]})
        return infer


def _serve(args):
    """Answer the parent's round requests (one JSON line each) until stdin closes."""
    steppers = _Steppers(args.worker, args.pool, args.model)
    warmed = set()
    for line in sys.stdin:
        request = json.loads(line)
        mode, batch_size = request["mode"], request["batch_size"]
        step = steppers.get(mode, batch_size)
        if (mode, batch_size) not in warmed:
            for _ in range(args.warmup):
                step()
            warmed.add((mode, batch_size))
        for _ in range(args.round_warmup):  # the other library ran meanwhile: caches, thread pools
            step()
        start, cpu_start, machine_start = time.perf_counter(), own_cpu_seconds(), machine_cpu_seconds()
        for _ in range(args.steps):
            step()
        seconds = time.perf_counter() - start
        answer = {"images_per_s": args.steps * batch_size / seconds, "seconds": seconds}
        if machine_start is not None:  # CPU seconds that other processes (and machines) took meanwhile
            busy, stolen = machine_cpu_seconds()
            answer["other_cpu_seconds"] = busy - machine_start[0] - (own_cpu_seconds() - cpu_start)
            answer["stolen_cpu_seconds"] = stolen - machine_start[1]
        print(json.dumps(answer), flush=True)


def _peak_rss(args):
    """Batch-1000 inference in this fresh process: VmHWM (peak) and VmRSS before inference, in MiB."""
    steppers = _Steppers(args.worker, 1000, args.model)
    step = steppers.get("infer", 1000)
    before = _status_mib("VmRSS")
    for _ in range(5):
        step()
    return {"peak_rss_mib": _status_mib("VmHWM"), "rss_before_inference_mib": before}


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _fashion_mnist():
    from gpucnn.data import DATASETS, load_dataset, normalize  # noqa: PLC0415
    spec = DATASETS["fashion-mnist"]
    data = {}
    for split in ("train", "test"):
        images, labels = load_dataset("fashion-mnist", split, download=False, progress=False)
        data[split] = (normalize(images, spec.mean, spec.std), labels)
    return data


def _epochs(args, epochs):
    """`epochs` Fashion-MNIST epochs, batch 64, Adam 1e-3, cosine schedule; seconds and test accuracy."""
    import numpy as np  # noqa: PLC0415
    data = _fashion_mnist()
    (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
    if args.worker == "gpucnn":
        from gpucnn import optim  # noqa: PLC0415
        from gpucnn.train import Trainer  # noqa: PLC0415
        model = gpucnn_model("lenet5")
        opt = optim.Adam(model.parameters(), lr=1e-3)
        trainer = Trainer(model, opt, optim.CosineAnnealingLR(opt, T_max=epochs), device="cpu", seed=0)
        start = time.perf_counter()
        history = trainer.fit((train_x, train_y), (test_x, test_y), epochs=epochs, batch_size=64, progress=False)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "test_accuracy": [r["test_acc"] for r in history]}
    import torch  # noqa: PLC0415
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    torch.manual_seed(0)
    model = torch_model(torch, "lenet5")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = torch.nn.CrossEntropyLoss()
    train_x, test_x = torch.from_numpy(train_x), torch.from_numpy(test_x)
    train_y, test_y = torch.from_numpy(train_y), torch.from_numpy(test_y)
    rng = np.random.default_rng(0)
    accuracy = []
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(train_y)))
        for first in range(0, len(order), 64):
            index = order[first: first + 64]
            opt.zero_grad()
            loss = loss_fn(model(train_x[index]), train_y[index])
            loss.backward()
            opt.step()
        scheduler.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for first in range(0, len(test_y), 500):
                logits = model(test_x[first: first + 500])
                correct += int((logits.argmax(1) == test_y[first: first + 500]).sum())
        accuracy.append(correct / len(test_y))
    return {"seconds": time.perf_counter() - start, "test_accuracy": accuracy}


def worker_main(args):
    if args.worker == "gpucnn":
        _set_cpu_path(args.cpu_path)
    if args.task == "serve":
        _serve(args)
        return
    if args.task == "rss":
        result = _peak_rss(args)
    elif args.task.startswith("epochs="):
        result = _epochs(args, int(args.task.split("=")[1]))
    else:
        raise SystemExit(f"unknown worker task {args.task!r}")
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# Parent side


def _worker_command(args, library, task):
    return [sys.executable, str(Path(__file__).resolve()), "--worker", library, "--task", task,
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--round-warmup", str(args.round_warmup),
            "--pool", str(args.pool), "--model", args.model,
            "--cpu-path", args.cpu_path]


def _run_once(args, library, task) -> dict:
    """A fresh worker process for one task; its JSON answer."""
    result = subprocess.run(_worker_command(args, library, task), env=_worker_env(args.threads),
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"the {library} worker failed ({task}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _row_libraries(args, mode) -> list:
    """The libraries that time `mode` (ONNX Runtime only infers)."""
    return [name for name in args.libraries if mode == "infer" or name not in INFERENCE_ONLY]


def _ask(worker, name, mode, batch_size) -> dict:
    """One round of `mode` at `batch_size` in the worker process; its JSON answer."""
    worker.stdin.write(json.dumps({"mode": mode, "batch_size": batch_size}) + "\n")
    worker.stdin.flush()
    answer = worker.stdout.readline()
    if not answer:
        raise SystemExit(f"the {name} worker stopped (exit code {worker.wait()})")
    return json.loads(answer)


def _measure_row(args, workers, mode, batch_size) -> dict:
    """--rounds rounds of every library alternating (ABC, CBA, ...); medians, ratios and the load."""
    libraries = _row_libraries(args, mode)
    rates = {name: [] for name in libraries}
    others = []  # (CPU seconds the rest of the machine used, stolen, seconds) of each round
    load_before = load_average()
    for round_index in range(args.rounds):
        for name in libraries if round_index % 2 == 0 else libraries[::-1]:
            answer = _ask(workers[name], name, mode, batch_size)
            rates[name].append(answer["images_per_s"])
            if "other_cpu_seconds" in answer:
                others.append((answer["other_cpu_seconds"], answer["stolen_cpu_seconds"], answer["seconds"]))
            time.sleep(0.05)  # let the other library's idle threads go to sleep
    row = {"mode": mode, "batch_size": batch_size, "load_before": load_before,
           "load_after": load_average(), "other_cores_busy": None, "cores_stolen": None}
    if others:
        seconds = sum(o[2] for o in others)
        row["other_cores_busy"] = max(0.0, sum(o[0] for o in others) / seconds)
        row["cores_stolen"] = sum(o[1] for o in others) / seconds
    for name in libraries:
        row[f"{name}_images_per_s"] = median(rates[name])
        row[f"{name}_rounds"] = [round(r) for r in rates[name]]
    if "gpucnn" in libraries and "pytorch" in libraries:
        row["ratio"] = row["gpucnn_images_per_s"] / row["pytorch_images_per_s"]
    if "gpucnn" in libraries and "onnxruntime" in libraries:
        row["ratio_onnxruntime"] = row["gpucnn_images_per_s"] / row["onnxruntime_images_per_s"]
    return row


def throughput(args) -> list:
    needed = [name for name in args.libraries if any(name in _row_libraries(args, mode) for mode in args.modes)]
    workers = {name: subprocess.Popen(_worker_command(args, name, "serve"), env=_worker_env(args.threads),
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for name in needed}
    rows = []
    try:
        for mode in args.modes:
            for batch_size in args.batch_sizes:
                rows.append(_measure_row(args, workers, mode, batch_size))
                print(format_row(rows[-1], args.libraries), flush=True)
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
    return rows


def format_row(row, libraries) -> str:
    text = f"{row['mode']:>6} {row['batch_size']:>6}" + "".join(
        f" {row[name + '_images_per_s']:>14.0f}" if name + "_images_per_s" in row else f" {'-':>14}"
        for name in libraries)
    for key in ("ratio", "ratio_onnxruntime"):
        text += f" {row[key]:>11.2f}" if key in row else f" {'-':>11}"
    others, stolen = row.get("other_cores_busy"), row.get("cores_stolen")
    return text + f"   load {row['load_before']} -> {row['load_after']}" + (
        f", other processes {others:.2f} cores, stolen {stolen:.2f} cores" if others is not None else "")


def alternating(args, task, libraries) -> list:
    """task in a fresh process per library, libraries alternating over --epoch-repeats repeats."""
    runs = []
    for repeat in range(args.epoch_repeats):
        order = libraries if repeat % 2 == 0 else libraries[::-1]
        for name in order:
            load_before = load_average()
            result = _run_once(args, name, task)
            result.update(library=name, repeat=repeat, load_before=load_before, load_after=load_average())
            runs.append(result)
            print(f"{task} {name}: " + json.dumps(result), flush=True)
    return runs


def cli_run(args, repeat) -> dict:
    """Wall time of the CLI's Fashion-MNIST run in a fresh process; its final test accuracy."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(ROOT / "cli.py"), "train", "--device", "cpu", "--dataset", "fashion-mnist",
                   "--epochs", str(args.cli_epochs), "--quiet", "--no-download", "--out", out]
        load_before = load_average()
        start = time.perf_counter()
        result = subprocess.run(command, env=_worker_env(args.threads), capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"the CLI run failed:\n{result.stderr[-2000:]}")
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"library": "gpucnn-cli", "repeat": repeat, "wall_seconds": seconds,
            "test_accuracy": [r["test_acc"] for r in records], "load_before": load_before,
            "load_after": load_average(), "command": " ".join(command[1:])}


def cli_comparison(args) -> list:
    runs = []
    for repeat in range(args.epoch_repeats):
        parts = ["cli", "pytorch"] if repeat % 2 == 0 else ["pytorch", "cli"]
        for part in parts:
            if part == "cli":
                result = cli_run(args, repeat)
            else:
                load_before = load_average()
                start = time.perf_counter()
                result = _run_once(args, "pytorch", f"epochs={args.cli_epochs}")
                result.update(library="pytorch", repeat=repeat, wall_seconds=time.perf_counter() - start,
                              load_before=load_before, load_after=load_average())
            runs.append(result)
            print(f"cli-epochs={args.cli_epochs} {part}: " + json.dumps(result), flush=True)
    return runs


def environment(args) -> dict:
    import numpy  # noqa: PLC0415
    versions = {"numpy": numpy.__version__}
    try:  # the version without importing torch into this process
        versions["torch"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        versions["torch"] = None
    try:
        import threadpoolctl  # noqa: PLC0415
        versions["openblas"] = [lib.get("version") for lib in threadpoolctl.threadpool_info()
                                if lib.get("internal_api") == "openblas"]
    except ImportError:
        pass
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
            **versions, "gpucnn_cpu_path": args.cpu_path, "steps_per_round": args.steps, "rounds": args.rounds,
            "warmup_steps": args.warmup, "round_warmup_steps": args.round_warmup,
            "optimizer": "Adam(lr=1e-3)", "model": args.model, **_library_versions(args.libraries),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}


def _library_versions(libraries) -> dict:
    found = {}
    for name in ("onnxruntime", "onnx"):
        if "onnxruntime" in libraries:
            try:
                found[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                found[name] = None
    return found


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    env = environment(args)
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    report = {"env": env}
    if not args.no_throughput:
        print(f"{'mode':>6} {'batch':>6}" + "".join(f" {name[:8] + ' img/s':>14}" for name in args.libraries)
              + f" {'/pytorch':>11} {'/onnxrt':>11}", flush=True)
        report["throughput"] = throughput(args)
    if args.rss:
        report["peak_rss_batch_1000_inference"] = alternating(args, "rss", args.libraries)
    if args.epochs:
        report["fashion_mnist_epochs"] = alternating(args, f"epochs={args.epochs}", _row_libraries(args, "train"))
    if args.cli_epochs:
        report["cli"] = cli_comparison(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.json.with_name(args.json.name + ".tmp")
        temporary.write_text(json.dumps(report, indent=2) + "\n")
        temporary.replace(args.json)


if __name__ == "__main__":
    main()

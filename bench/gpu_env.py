"""What the GPU benchmarks need before they start: a usable GPU (or one clear line saying why not),
PyTorch on the same GPU with TF32 off, and a record of the device and the versions.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def comma_list(parser, text: str, allowed=None, what: str = "entries", convert=str) -> list:
    """A comma-separated option value as a list of ``convert``-ed entries; ``parser.error`` names a bad one."""
    try:
        values = [convert(part) for part in text.split(",") if part]
    except ValueError:
        parser.error(f"{text!r} is not a comma-separated list of {what}")
    unknown = sorted(set(values) - set(allowed)) if allowed is not None else []
    if unknown:
        parser.error(f"unknown {what} {', '.join(map(str, unknown))}; choose from {', '.join(allowed)}")
    return values


def require_gpu():
    """The CuPy module, checked by ``preflight``; exits with status 1 and the line "no GPU: <reason>"
    where no GPU is usable or a library the benchmarks need is missing."""
    os.environ["CUPY_TF32"] = "0"  # fp32 products everywhere: the ceilings and cuBLAS stay full precision
    from gpucnn import backend

    if not backend.gpu_available():
        raise SystemExit(f"no GPU: {backend.gpu_unavailable_reason()}")
    cp = backend.cupy_module()
    preflight(cp)
    return cp


PREFLIGHT_KERNEL = 'extern "C" __global__ void gpucnn_preflight(float* x) { x[0] = 1.0f; }'


def _compile_and_launch(cp):
    from gpucnn.kernel_sources import COMPILE_OPTIONS

    kernel = cp.RawModule(code=PREFLIGHT_KERNEL, options=COMPILE_OPTIONS).get_function("gpucnn_preflight")
    x = cp.zeros(1, dtype=cp.float32)
    kernel((1,), (1,), (x,))
    return float(x[0]) == 1.0


# Each library a later step needs, tried once (what, call): a missing one would fail every step.
PREFLIGHT = (
    ("the CUDA runtime (cupy.zeros(1).sum())", lambda cp: float(cp.zeros(1).sum()) == 0.0),
    ("cuRAND (a cupy.random.RandomState draw)",
     lambda cp: cp.random.RandomState(0).standard_normal((1,), dtype=cp.float32).shape == (1,)),
    ("cuBLAS (a 2x2 matmul)",
     lambda cp: float(cp.matmul(cp.ones((2, 2), cp.float32), cp.ones((2, 2), cp.float32))[0, 0]) == 2.0),
    ("NVRTC (one RawModule compile and launch)", _compile_and_launch),
)


def preflight(cp) -> None:
    """Run each PREFLIGHT check; the first that fails stops the process with one line naming it."""
    for what, check in PREFLIGHT:
        try:
            ok = check(cp)
        except Exception as exc:  # noqa: BLE001 - any failure here means the library is unusable
            reason = (str(exc).strip().splitlines() or [""])[0]
            raise SystemExit(f"no GPU: {what} failed ({type(exc).__name__}: {reason})") from None
        if not ok:
            raise SystemExit(f"no GPU: {what} gave a wrong result")


def require_torch():
    """PyTorch with CUDA, TF32 off for convolutions and products; exits with one line where unusable."""
    try:
        import torch
    except ImportError as exc:
        raise SystemExit(f"no PyTorch: {exc} (install a CUDA build of torch, or pass --no-torch)") from None
    if not torch.cuda.is_available():
        raise SystemExit(f"no GPU for PyTorch: torch {torch.__version__} sees no CUDA device "
                         "(install a CUDA build of torch, or pass --no-torch)")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest algorithm during the warm-up
    return torch


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def environment(cp, torch=None) -> dict:
    """Date, device, driver and library versions, for the results files."""
    import numpy as np

    import gpucnn

    device = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(device.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    env = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": name,
        "compute_capability": f"{props['major']}.{props['minor']}",
        "multiprocessors": props["multiProcessorCount"],
        "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
        "cuda_driver": cp.cuda.runtime.driverGetVersion(),
        "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
        "nvrtc": ".".join(map(str, cp.cuda.nvrtc.getVersion())),
        "cupy": cp.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "gpucnn": gpucnn.__version__,
        "git_commit": _git_commit(),
    }
    if torch is not None:
        env.update({"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                    "cudnn": torch.backends.cudnn.version(), "tf32": False})
    return env


def write_json(path, payload) -> None:
    """Write to a temp name then rename, so a run cut short by its timeout leaves the last whole file
    (nothing when ``path`` is None)."""
    if path is None:
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)


def describe(env: dict) -> str:
    """The environment as one line."""
    return " ".join(f"{k}={v}" for k, v in env.items())

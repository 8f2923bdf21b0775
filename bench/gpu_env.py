"""What the GPU benchmarks need before they start: a usable GPU (or one clear line saying why not),
PyTorch on the same GPU with TF32 off, and a record of the device and the versions.
"""
from __future__ import annotations

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
    """The CuPy module; exits with status 1 and the line "no GPU: <reason>" where no GPU is usable."""
    os.environ["CUPY_TF32"] = "0"  # fp32 products everywhere: the ceilings and cuBLAS stay full precision
    from gpucnn import backend

    if not backend.gpu_available():
        raise SystemExit(f"no GPU: {backend.gpu_unavailable_reason()}")
    return backend.cupy_module()


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


def describe(env: dict) -> str:
    """The environment as one line."""
    return " ".join(f"{k}={v}" for k, v in env.items())

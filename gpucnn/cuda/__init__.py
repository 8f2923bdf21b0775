"""The CUDA path: launchers for kernels/*.cu with the signatures of gpucnn.ops, plus a ``runtime``.

Importing this package never imports CuPy; the default runtime asks gpucnn.backend for it on
first use.
"""
from gpucnn.cuda.conv import conv2d_backward, conv2d_forward
from gpucnn.cuda.pool import avg_pool2d_backward, avg_pool2d_forward, max_pool2d_backward, max_pool2d_forward
from gpucnn.cuda.runtime import CupyRuntime, default_runtime, kernels_dir

__all__ = [
    "CupyRuntime", "avg_pool2d_backward", "avg_pool2d_forward", "conv2d_backward", "conv2d_forward",
    "default_runtime", "kernels_dir", "max_pool2d_backward", "max_pool2d_forward",
]

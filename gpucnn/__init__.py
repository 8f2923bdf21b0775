"""gpucnn: a small, readable CNN library on NumPy (CPU) or CuPy (GPU)."""
__version__ = "0.1.0"

from gpucnn.grad_mode import is_grad_enabled, no_grad  # noqa: E402 - PyTorch's spelling: gpucnn.no_grad()

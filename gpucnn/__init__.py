"""gpucnn: a small, readable CNN library on NumPy (CPU) or CuPy (GPU)."""
__version__ = "0.1.0"

"""Shared pytest set-up: GPU tests are skipped cleanly where CuPy or a GPU is missing."""
import pytest

from gpucnn import backend


def pytest_collection_modifyitems(config, items):
    if backend.gpu_available():
        return
    skip_gpu = pytest.mark.skip(reason=f"no GPU: {backend.gpu_unavailable_reason()}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

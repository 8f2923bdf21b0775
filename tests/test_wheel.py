"""The built wheel carries the kernels, the emulator's sources and every subpackage, and an installed copy finds them."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("gpucnn-*.whl")
    return path


@pytest.mark.slow
def test_wheel_ships_every_kernel_and_the_emulator_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for cu in sorted((ROOT / "kernels").glob("*.cu")):
        assert f"gpucnn/kernels/{cu.name}" in names
    assert "gpucnn/emulator/cuda_emu.h" in names
    assert "gpucnn/emulator/emu_runtime.cpp" in names
    assert "gpucnn/emulator/__init__.py" in names and "gpucnn/kernel_sources.py" in names
    assert "gpucnn/cli/__init__.py" in names and "gpucnn/cli/train.py" in names  # pyproject lists packages


@pytest.mark.slow
@pytest.mark.emulator
def test_installed_copy_finds_and_runs_its_own_kernels(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = (
        "import numpy as np, gpucnn.cuda.runtime as r\n"
        "from gpucnn.emulator import EmulatorRuntime\n"
        "from gpucnn.cuda import pool\n"
        "print(r.kernels_dir())\n"
        "x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)\n"
        "y, _ = pool.max_pool2d_forward(x, 2, runtime=EmulatorRuntime())\n"
        "print(y.ravel().tolist())\n")
    # Run from an empty folder so the checkout is not on sys.path.
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin",
                                 "HOME": str(tmp_path)}, timeout=300)
    assert result.returncode == 0, result.stderr
    kernels_line, values_line = result.stdout.strip().splitlines()[-2:]
    assert Path(kernels_line) == site / "gpucnn" / "kernels"
    assert values_line == "[5.0, 7.0, 13.0, 15.0]"

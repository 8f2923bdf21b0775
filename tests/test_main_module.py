"""``python -m gpucnn`` runs the command line (gpucnn/__main__.py), as the console script does."""
import subprocess
import sys

import gpucnn


def _run(*args):
    return subprocess.run([sys.executable, "-m", "gpucnn", *args], capture_output=True, text=True, timeout=120)


def test_python_dash_m_gpucnn_runs_the_command_line():
    version = _run("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"gpucnn, version {gpucnn.__version__}"
    summary = _run("summary", "--model", "lenet5")
    assert summary.returncode == 0, summary.stderr
    assert "total parameters: 61,706" in summary.stdout


def test_python_dash_m_gpucnn_reports_a_bad_option_on_one_line():
    result = _run("summary", "--model", "no-such-model")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "no-such-model" in lines[0]
    assert "Traceback" not in result.stderr

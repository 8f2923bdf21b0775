"""A run's folder, with real processes (issue 22): a resume cannot write into another run's folder, two
runs cannot share one (a lock that a SIGKILLed run does not leave stuck), a full disk (a real tmpfs)
leaves a folder that says truly what it holds, and SIGTERM saves and exits 143 like Ctrl-C."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpucnn.checkpoint import load_checkpoint
from gpucnn.runfolder import LOCK_FILE, RUN_FILES
from gpucnn.train import BEST_FILE, CHECKPOINT_FILE, METRICS_FILE
from tests.helpers import (ROOT, assert_one_line_error, clean_env, mount_namespace, run_cli, run_cli_together,
                           wait_until)
from tests.synthetic_data import write_random_split


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("run-folder-data")
    (root / "mnist").mkdir()
    write_random_split(root / "mnist", "train", seed=0, n=48)
    write_random_split(root / "mnist", "test", seed=1, n=16)
    return root


def train(data, out, *extra):
    return ("train", "--device", "cpu", "--data-dir", data, "--no-download", "--batch-size", 16, "--out", out,
            "--quiet", *extra)


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name in RUN_FILES}


def start(*args, **kwargs):
    return subprocess.Popen([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finish(process, timeout=120):
    try:
        return process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


# ---------------------------------------------------------------- item 1: resuming into another run's folder

def test_resuming_into_another_runs_folder_is_refused_and_destroys_nothing(data, tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    first, second = run_cli_together(train(data, a, "--epochs", 2), train(data, b, "--epochs", 3, "--seed", 5))
    assert first.returncode == 0 and second.returncode == 0, (first.stderr, second.stderr)
    before = snapshot(b)
    result = run_cli("train", "--resume", a / CHECKPOINT_FILE, "--epochs", 3, "--out", b, "--device", "cpu",
                     "--data-dir", data, "--no-download", "--quiet", check=False)
    assert_one_line_error(result.returncode, result.stderr, f"--out {b} holds another run")
    assert snapshot(b) == before  # before the fix: B's checkpoint, best and metrics were run A's
    # its own folder, or an empty one, is fine
    resumed = run_cli("train", "--resume", a / CHECKPOINT_FILE, "--epochs", 3, "--out", tmp_path / "empty",
                      "--device", "cpu", "--data-dir", data, "--no-download", "--quiet")
    assert "done: epoch 3" in resumed.stdout
    assert load_checkpoint(b / CHECKPOINT_FILE)["trainer"]["seed"] == 5


# ---------------------------------------------------------------- item 2: one run per folder, for its whole life

def test_two_runs_started_into_one_folder_at_once_one_is_refused(data, tmp_path):
    out = tmp_path / "shared"
    results = run_cli_together(train(data, out, "--epochs", 3), train(data, out, "--epochs", 3, "--seed", 1))
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 1], [r.stderr for r in results]  # before the fix: both 0, metrics interleaved
    loser = next(r for r in results if r.returncode == 1)
    assert_one_line_error(1, loser.stderr, f"{out} is in use by another training run (process ")
    epochs = [json.loads(line)["epoch"] for line in (out / METRICS_FILE).read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_a_live_run_owns_its_folder_and_a_killed_one_leaves_no_stuck_lock(data, tmp_path):
    out = tmp_path / "run"
    process = start(*train(data, out, "--epochs", 1000))
    try:
        assert wait_until(lambda: (out / CHECKPOINT_FILE).exists() or process.poll() is not None, timeout=120)
        assert process.poll() is None, process.communicate()[1]
        resumed = run_cli("train", "--resume", out / CHECKPOINT_FILE, "--epochs", 1000, "--device", "cpu",
                          "--data-dir", data, "--no-download", "--quiet", check=False)
        assert_one_line_error(resumed.returncode, resumed.stderr,
                              f"{out} is in use by another training run (process {process.pid})")
        process.kill()  # SIGKILL: no handler runs, the kernel drops the lock
        finish(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    saved = load_checkpoint(out / CHECKPOINT_FILE)["epoch"]
    again = run_cli("train", "--resume", out / CHECKPOINT_FILE, "--epochs", saved + 1, "--device", "cpu",
                    "--data-dir", data, "--no-download", "--quiet")
    assert f"done: epoch {saved + 1}" in again.stdout
    assert (out / LOCK_FILE).exists()  # it stays, unlocked: harmless


# ---------------------------------------------------------------- item 4: SIGTERM

@pytest.mark.parametrize("whole_group", [False, True], ids=["process", "process-group"])
def test_sigterm_saves_a_checkpoint_and_exits_143(data, tmp_path, whole_group):
    """`timeout` and `docker stop` signal the process; Slurm signals every process of the job step (the
    split step's worker included, at batch 64 on two cores)."""
    out = tmp_path / "run"
    env = clean_env()
    env["GPUCNN_CPU_THREADS"] = env["GPUCNN_CPU_PROCESSES"] = "2"
    args = ("train", "--device", "cpu", "--data-dir", data, "--no-download", "--batch-size", 48, "--out", out,
            "--quiet", "--epochs", 1000)  # batch 48 of 48 images: one split step per epoch
    process = subprocess.Popen([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert wait_until(lambda: (out / CHECKPOINT_FILE).exists() or process.poll() is not None, timeout=120)
        time.sleep(0.3)
        if whole_group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        stdout, stderr = finish(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 143, stderr  # before the fix: -15, nothing saved, nothing printed
    assert "Traceback" not in stderr and "worker" not in stderr, stderr
    assert f"terminated (SIGTERM); continue with: gpucnn train --resume {out / CHECKPOINT_FILE}" in stderr
    saved = load_checkpoint(out / CHECKPOINT_FILE)
    target = saved["epoch"] + 1
    resumed = run_cli("train", "--resume", out / CHECKPOINT_FILE, "--epochs", target, "--device", "cpu",
                      "--data-dir", data, "--no-download", "--quiet")
    assert f"done: epoch {target}" in resumed.stdout


# ---------------------------------------------------------------- item 3: a full disk (a real tmpfs)

DISK_SCRIPT = r"""
set -u
cd "$ROOT"
train() { "$PYTHON" cli.py train --device cpu --data-dir "$DATA" --no-download --batch-size 16 --quiet "$@"; }
remount() { umount "$DISK" 2>/dev/null; mount -t tmpfs -o size="$1" tmpfs "$DISK" || exit 77; }
record() { echo $? > "$LOG/$1.rc"; ls -a "$2" > "$LOG/$1.ls"; }

remount "$SIZE"
train --epochs 2 --out "$DISK/run" > "$LOG/first.out" 2> "$LOG/first.err"; record first "$DISK/run"
train --epochs 2 --out "$DISK/run" > "$LOG/again.out" 2> "$LOG/again.err"; record again "$DISK/run"
train --resume "$DISK/run/best.npz" --epochs 2 > "$LOG/best.out" 2> "$LOG/best.err"; record best "$DISK/run"

remount "$SIZE"
mkdir "$DISK/full" && cp "$PREPARED/checkpoint.npz" "$PREPARED/metrics.jsonl" "$DISK/full/"
head -c 100000000 /dev/zero > "$DISK/filler" 2>/dev/null
train --resume "$DISK/full/checkpoint.npz" --epochs 3 > "$LOG/trim.out" 2> "$LOG/trim.err"; record trim "$DISK/full"
cmp -s "$PREPARED/metrics.jsonl" "$DISK/full/metrics.jsonl"; echo $? > "$LOG/trim.cmp"
"""


def test_a_full_disk_names_the_file_and_leaves_a_folder_that_says_truly_what_it_holds(data, tmp_path):
    prefix = mount_namespace()
    if prefix is None:
        pytest.skip("needs a small tmpfs: unshare and mount in a mount namespace (root, or user namespaces)")
    prepared = tmp_path / "prepared"  # a run at epoch 1 whose metrics run on to epoch 3 (killed later, say)
    run_cli(*train(data, prepared, "--epochs", 1))
    line = json.loads((prepared / METRICS_FILE).read_text())
    with open(prepared / METRICS_FILE, "a") as f:
        for epoch in (2, 3):
            f.write(json.dumps({**line, "epoch": epoch}) + "\n")
    size = (prepared / CHECKPOINT_FILE).stat().st_size
    disk, log = tmp_path / "disk", tmp_path / "log"
    disk.mkdir()
    log.mkdir()
    env = {**clean_env(), "ROOT": str(ROOT), "PYTHON": sys.executable, "DATA": str(data), "DISK": str(disk),
           "LOG": str(log), "PREPARED": str(prepared),
           "SIZE": f"{(size * 3 // 2) // 4096 * 4096}"}  # room for best.npz, not for checkpoint.npz too
    script = subprocess.run([*prefix, "bash", "-c", DISK_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    if script.returncode == 77:
        pytest.skip(f"could not mount a tmpfs: {script.stderr.strip()}")

    def read(name):
        return (log / name).read_text()

    # epoch 1: metrics.jsonl and best.npz fit, checkpoint.npz does not
    assert_one_line_error(int(read("first.rc")), read("first.err"),
                          f"could not write {disk}/run/checkpoint.npz (No space left on device)")
    listed = set(read("first.ls").split())
    assert {BEST_FILE, METRICS_FILE} <= listed and CHECKPOINT_FILE not in listed
    assert not [name for name in listed if name.endswith(".tmp")], listed
    # a new run into it is told what is there, and to resume from best.npz (before: from a missing checkpoint)
    assert_one_line_error(int(read("again.rc")), read("again.err"),
                          f"holds best.npz, metrics.jsonl but no checkpoint.npz")
    assert f"--resume {disk}/run/best.npz" in read("again.err")
    assert "could not write" in read("best.err") and "No space left on device" in read("best.err")
    # a resume that must rewrite metrics.jsonl on a full disk: one line naming it, the log intact, no temporary
    assert_one_line_error(int(read("trim.rc")), read("trim.err"),
                          f"could not write {disk}/full/metrics.jsonl (No space left on device)")
    assert read("trim.cmp").strip() == "0"
    assert not [name for name in read("trim.ls").split() if name.endswith(".tmp")], read("trim.ls")


def test_a_file_system_without_locks_warns_and_runs(tmp_path, monkeypatch):
    from gpucnn import runfolder  # noqa: PLC0415

    def no_locks(fd, operation):
        raise OSError(37, "No locks available")
    monkeypatch.setattr(runfolder.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match=r"cannot lock .*\.gpucnn-run\.lock \(No locks available\)"):
        runfolder.claim(tmp_path / "run")
    runfolder.release(tmp_path / "run")


def test_resuming_an_older_checkpoint_in_the_runs_folder_would_drop_later_epochs_and_is_refused(data, tmp_path):
    out = tmp_path / "run"
    run_cli(*train(data, out, "--epochs", 1))
    early = out / "epoch1.npz"
    early.write_bytes((out / CHECKPOINT_FILE).read_bytes())
    run_cli("train", "--resume", out / CHECKPOINT_FILE, "--epochs", 2, "--device", "cpu", "--data-dir", data,
            "--no-download", "--quiet")
    before = snapshot(out)
    result = run_cli("train", "--resume", early, "--epochs", 3, "--device", "cpu", "--data-dir", data,
                     "--no-download", "--quiet", check=False)
    assert_one_line_error(result.returncode, result.stderr, f"resuming {early} (epoch 1) in {out} would overwrite "
                                                            "its checkpoint.npz (epoch 2)")
    assert snapshot(out) == before  # before: epoch 2's checkpoint and metrics line were replaced
    branched = run_cli("train", "--resume", early, "--epochs", 2, "--out", tmp_path / "branch", "--device", "cpu",
                       "--data-dir", data, "--no-download", "--quiet")
    assert "done: epoch 2" in branched.stdout


def test_sighup_saves_and_exits_129_unless_the_run_was_started_under_nohup(data, tmp_path):
    """A closed terminal or a dropped ssh session sends SIGHUP: the run saves as for Ctrl-C. Under nohup
    (SIGHUP ignored from the start) it keeps running."""
    def start_run(out, ignore_hangup):
        def setup():  # set either way: a test run started under nohup would hand its SIG_IGN down
            signal.signal(signal.SIGHUP, signal.SIG_IGN if ignore_hangup else signal.SIG_DFL)
        return start(*train(data, out, "--epochs", 1000), preexec_fn=setup)

    hung, nohup = start_run(tmp_path / "hung", False), start_run(tmp_path / "nohup", True)
    try:
        for out, process in ((tmp_path / "hung", hung), (tmp_path / "nohup", nohup)):
            assert wait_until(lambda: (out / CHECKPOINT_FILE).exists() or process.poll() is not None, timeout=120)
            process.send_signal(signal.SIGHUP)
        stdout, stderr = finish(hung)
        assert hung.returncode == 129, stderr  # before: killed by SIGHUP (-1), nothing saved
        assert f"hung up (SIGHUP); continue with: gpucnn train --resume {tmp_path / 'hung' / CHECKPOINT_FILE}" in stderr
        assert load_checkpoint(tmp_path / "hung" / CHECKPOINT_FILE)["epoch"] < 1000
        time.sleep(1.0)
        assert nohup.poll() is None  # still training
        nohup.send_signal(signal.SIGTERM)
        assert finish(nohup) and nohup.returncode == 143
    finally:
        for process in (hung, nohup):
            if process.poll() is None:
                process.kill()
                process.communicate()

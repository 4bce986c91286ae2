"""Nothing lost: stop signals, a concurrent start, a damaged checkpoint and user mistakes, on real training runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_utils import TINY, popen_train, run_train, tiny_overrides

from ssl_distill.train.checkpoint import find_latest_checkpoint, list_checkpoints
from ssl_distill.train.metrics import read_metrics
from ssl_distill.train.run_lock import LOCK_FILE, RunLock, RunLockedError

LOSS_KEYS = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "total_loss")


def _losses(out: Path) -> list[tuple[int, tuple[float, ...]]]:
    return [(r["iteration"], tuple(r[k] for k in LOSS_KEYS)) for r in read_metrics(out)]


def _overrides(photo_folder: str) -> list[str]:
    # 24 iterations, a checkpoint every 2, stochastic depth on (its draws must survive every stop too)
    return tiny_overrides(photo_folder, **{"optim.epochs": 6, "student.drop_path_rate": 0.3})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, photo_folder) -> Path:
    """An uninterrupted run to compare every interrupted one with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = run_train(out, _overrides(photo_folder))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _wait_for(proc: subprocess.Popen, path: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_checkpoint_the_current_iteration(tmp_path, photo_folder, reference, signum):
    """With DataLoader workers: they must not outlive the stop (a worker ignoring SIGTERM once hung the exit)."""
    out = tmp_path / "run"
    proc = popen_train(out, [*_overrides(photo_folder), "train.num_workers=2"])
    _wait_for(proc, out / "model_0000006.pth")
    proc.send_signal(signum)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stdout[-3000:]
    assert "Traceback" not in stdout
    assert "KeyboardInterrupt" not in stdout
    last = [line for line in stdout.splitlines() if line.strip()][-1]
    name = signal.Signals(signum).name
    assert last.startswith(f"ssl-distill train: stopped by {name} at iteration ")
    assert "Run the same command" in last
    stopped_at = int(last.split("at iteration ")[1].split(";")[0])
    assert (out / f"model_{stopped_at:07d}.pth").exists()
    assert not (out / "teacher_backbone.pth").exists()
    assert [r["iteration"] for r in read_metrics(out)] == list(range(1, stopped_at + 1))  # nothing after the stop
    resumed = run_train(out, [*_overrides(photo_folder), "train.num_workers=2"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(out) == _losses(reference)  # as if nothing had happened (any num_workers)


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once_without_saving(tmp_path, photo_folder):
    out = tmp_path / "run"
    # ViT-S with 64 px crops: an iteration lasts long enough to press Ctrl-C twice inside it
    overrides = tiny_overrides(photo_folder, **{"optim.epochs": 6, "student.arch": "vit_small",
                                                "crops.global_crops_size": 64, "crops.local_crops_size": 32})
    proc = popen_train(out, overrides)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        # the metric line of iteration 3, written after the checkpoint of 2, just before iteration 4 begins: a
        # Ctrl-C sent then lands inside iteration 4 (sent on the checkpoint file's appearance instead, it could
        # land before the next iteration boundary, which then saves and stops before the second Ctrl-C)
        if "[it 3/" in line:
            break
    assert (out / "model_0000002.pth").exists(), "".join(seen)[-3000:]
    proc.send_signal(signal.SIGINT)
    for line in proc.stdout:  # the first Ctrl-C is acknowledged before the iteration ends ...
        seen.append(line)
        if "received SIGINT" in line:
            proc.send_signal(signal.SIGINT)  # ... and the second one does not wait for the checkpoint
            break
    rest, _ = proc.communicate(timeout=120)
    output = "".join(seen) + rest
    assert proc.returncode == 130, output[-3000:]
    assert "Ctrl-C again to exit at once" in output
    assert "Traceback" not in output
    last = [line for line in output.splitlines() if line.strip()][-1]
    assert last.startswith("ssl-distill train: interrupted; exited at once without saving")
    assert "model_0000002.pth" in last  # where a rerun resumes
    saved = [p.name for p in list_checkpoints(out)]
    assert saved == ["model_0000002.pth"]
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_a_second_run_in_the_same_directory_is_refused(tmp_path, photo_folder, reference):
    out = tmp_path / "run"
    first = popen_train(out, _overrides(photo_folder))
    _wait_for(first, out / "model_0000002.pth")
    second = run_train(out, _overrides(photo_folder))
    assert second.returncode == 2
    err = second.stderr.strip().splitlines()
    assert len(err) == 1, second.stderr
    assert "is in use by another training run" in err[0], second.stderr
    assert f"process {first.pid} on " in err[0]
    assert "choose another --output-dir" in err[0]
    stdout, _ = first.communicate(timeout=300)
    assert first.returncode == 0, stdout[-3000:]
    assert _losses(out) == _losses(reference)  # every metric line once, the checkpoints its own
    holder = json.loads((out / LOCK_FILE).read_text())
    assert holder["pid"] == first.pid  # the refused run never took the lock over


def test_a_lock_left_by_a_dead_runs_children_is_waited_for(tmp_path):
    """The holder is dead but a child that inherited the lock (e.g. a data-loader worker) still lives: the next run
    waits for it rather than refusing; if it lives on, the refusal says what holds the lock."""
    script = (
        "import subprocess, sys\n"
        "from ssl_distill.train.run_lock import RunLock\n"
        "lock = RunLock(sys.argv[1]).acquire()\n"
        "subprocess.Popen(['sleep', sys.argv[2]], pass_fds=[lock._fd])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path), "3"], check=True, timeout=60)
    t0 = time.monotonic()
    lock = RunLock(tmp_path).acquire()
    assert 1.0 < time.monotonic() - t0 < 20
    lock.release()
    subprocess.run([sys.executable, "-c", script, str(tmp_path), "30"], check=True, timeout=60)
    with pytest.raises(RunLockedError, match="still locked by leftover processes of a dead run.*fuser -v"):
        RunLock(tmp_path, stale_wait_s=0.5).acquire()
    with pytest.raises(RunLockedError, match="still locked"):  # released on the refusal: nothing leaks
        RunLock(tmp_path, stale_wait_s=0.1).acquire()


@pytest.mark.slow
def test_a_truncated_latest_checkpoint_falls_back_and_continues(tmp_path, photo_folder, reference):
    out = tmp_path / "run"
    proc = popen_train(out, _overrides(photo_folder))
    _wait_for(proc, out / "model_0000010.pth")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = find_latest_checkpoint(out)  # the one a resume would use (last_checkpoint names it)
    latest.write_bytes(latest.read_bytes()[:1000])  # cut short, as by a full disk during the kill
    resumed = run_train(out, _overrides(photo_folder))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"cannot resume from {latest}" in resumed.stderr
    assert f"kept it as {latest}.damaged" in resumed.stderr
    assert (out / f"{latest.name}.damaged").stat().st_size == 1000  # kept, never deleted
    assert _losses(out) == _losses(reference)


def test_user_mistakes_in_train_are_one_line(tmp_path, photo_folder):
    image = sorted(Path(photo_folder).iterdir())[0]
    cases = {
        "is a single image": tiny_overrides(str(image)),
        "Not a directory": tiny_overrides(photo_folder),
    }
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for expected, overrides in cases.items():
        out = blocker / "run" if expected == "Not a directory" else tmp_path / "run"
        proc = run_train(out, overrides)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert len(err) == 1, proc.stderr[-3000:]
        assert err[0].startswith("ssl-distill train: error: "), err
        assert expected in err[0], err
    (tmp_path / "cfgdir").mkdir()
    proc = subprocess.run([sys.executable, "-m", "ssl_distill.cli", "train", "--config-file", str(tmp_path / "cfgdir"),
                           "--output-dir", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "is a directory; pass a YAML file" in proc.stderr


def test_an_unwritable_output_directory_is_one_line(tmp_path, photo_folder):
    """A read-only output directory (real permissions: as root, the tests drop the capabilities that bypass
    them) gives one line naming the path and the fix, before anything is built."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
              "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    cmd = [*prefix, sys.executable, "-m", "ssl_distill.cli", "train", "--config-file", TINY,
           "--output-dir", str(locked / "run"), *tiny_overrides(photo_folder)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        locked.chmod(0o755)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert err[0].startswith("ssl-distill train: error: Permission denied:") and str(locked / "run") in err[0]
    assert "choose one you can write to" in err[0]


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _stopped(proc: subprocess.Popen, out: Path, expected_rc: int, starts: str) -> str:
    """Wait for ``proc``; check its one-line report, the checkpoint of the saved iteration, the metrics."""
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == expected_rc, stdout[-3000:]
    assert "Traceback" not in stdout, stdout[-3000:]
    last = [line for line in stdout.splitlines() if line.strip()][-1]
    assert last.startswith(starts), stdout[-3000:]
    assert "Run the same command again to resume" in last
    stopped_at = int(last.split("at iteration ")[1].split(";")[0])
    assert f"saved {out / f'model_{stopped_at:07d}.pth'}" in last
    assert [r["iteration"] for r in read_metrics(out)] == list(range(1, stopped_at + 1))  # nothing after the stop
    assert not (out / "teacher_backbone.pth").exists()
    return last


@pytest.mark.slow
def test_dead_workers_and_sigterm_to_the_process_group_save_the_last_iteration(tmp_path, photo_folder, reference):
    """With 2 real DataLoader workers. (1) The OOM killer takes one worker: the main process saves the last
    completed iteration, names the worker and the signal in one line, exits 1. (2) After the resume, SIGTERM to the
    whole process group (Slurm's scancel / time limit, `timeout`): the workers die first; the last completed
    iteration is saved, exit 143. The run finished after both is the uninterrupted one."""
    out = tmp_path / "run"
    overrides = [*_overrides(photo_folder), "train.num_workers=2"]
    proc = popen_train(out, overrides)
    _wait_for(proc, out / "model_0000004.pth")
    victim = _children(proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    last = _stopped(proc, out, 1, "ssl-distill train: stopped: DataLoader worker ")
    assert f"DataLoader worker {victim} was killed by SIGKILL" in last
    proc = popen_train(out, overrides)
    _wait_for(proc, out / "model_0000014.pth")
    os.killpg(proc.pid, signal.SIGTERM)
    _stopped(proc, out, 143, "ssl-distill train: stopped by SIGTERM at iteration ")
    resumed = run_train(out, overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(out) == _losses(reference)  # as if nothing had happened

"""The output directory holds one run: another run's checkpoints are refused, starting over moves the earlier run
aside, the run lock survives `rm` of its file, temp files of a killed write are removed — on real processes and files.
(Signals and dead workers: tests/test_reliability.py; full disks: tests/test_disk_full.py.)"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_utils import run_train, tiny_overrides

from ssl_distill.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from ssl_distill.train.metrics import read_metrics
from ssl_distill.train.run_dir import prepare_output_dir
from ssl_distill.train.run_identity import PREVIOUS_RUNS, RUN_ID_FILE, read_run_id
from ssl_distill.train.run_lock import LOCK_FILE, RunLock, RunLockedError


def _other_runs_checkpoint(tmp_path: Path) -> tuple[Path, str]:
    """A checkpoint as another run writes it (its run id, its output directory in its config), in its directory."""
    other = tmp_path / "other"
    state = {"iteration": 12, "model": {"w": torch.ones(3)}, "run_id": "20260101-000000-0badc0de",
             "config": f"train:\n  output_dir: {other}\n"}
    return save_checkpoint(other, state), state["run_id"]


@pytest.mark.slow
def test_a_foreign_checkpoint_is_refused_and_start_over_moves_the_old_run_aside(tmp_path, photo_folder):
    theirs_path, theirs = _other_runs_checkpoint(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    for name in (theirs_path.name, "last_checkpoint"):  # copied in
        shutil.copy(theirs_path.parent / name, out / name)
    short = tiny_overrides(photo_folder, **{"optim.epochs": 1})  # 4 iterations, checkpoints at 2 and 4
    refused = run_train(out, short)
    err = [line for line in refused.stderr.strip().splitlines() if " INFO " not in line]  # the log says what ran
    assert refused.returncode == 2 and len(err) == 1, refused.stderr[-3000:]
    assert err[0].startswith("ssl-distill train: error: ")
    assert f"belongs to another run ({theirs}, written in {theirs_path.parent}) than {out}" in err[0]
    assert "which records no run" in err[0]
    assert "--no-resume" in err[0] and "another --output-dir" in err[0] and "copy its run_id file" in err[0]
    assert not (out / "teacher_backbone.pth").exists() and not (out / "config.yaml").exists()

    # start over: the other run's files go to previous_runs/<its id>/, the new run's checkpoints are all its own
    fresh = run_train(out, short, extra_args=("--no-resume",))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    aside = out / PREVIOUS_RUNS
    [moved] = aside.iterdir()
    assert f"moved the earlier run's 2 files (last_checkpoint, model_0000012.pth) to {moved}" in fresh.stderr
    assert sorted(p.name for p in moved.iterdir()) == ["last_checkpoint", "model_0000012.pth"]
    assert load_checkpoint(moved / "model_0000012.pth")["run_id"] == theirs  # kept as it was
    assert [p.name for p in list_checkpoints(out)] == ["model_0000002.pth", "model_0000004.pth"]  # none pruned
    own = read_run_id(out)
    assert own not in (None, theirs)
    assert all(load_checkpoint(p)["run_id"] == own for p in list_checkpoints(out))
    assert [r["iteration"] for r in read_metrics(out)] == [1, 2, 3, 4]


def test_a_directory_with_its_own_run_id_refuses_another_runs_checkpoint(tmp_path):
    theirs_path, theirs = _other_runs_checkpoint(tmp_path)
    out = tmp_path / "run"
    save_checkpoint(out, {"iteration": 4, "model": {"w": torch.ones(3)}, "run_id": "mine"})
    (out / RUN_ID_FILE).write_text("mine\n")
    assert prepare_output_dir(out, resume=True)[1] == "mine"  # its own: fine
    for name in (theirs_path.name, "last_checkpoint"):  # another run's, copied in
        shutil.copy(theirs_path.parent / name, out / name)
    with pytest.raises(CheckpointError, match=f"belongs to another run \\({theirs}.*which records run mine"):
        prepare_output_dir(out, resume=True)


def test_checkpoints_without_a_run_id_still_resume(tmp_path):
    """Checkpoints written before run ids existed are this directory's run; it gets an id from then on."""
    save_checkpoint(tmp_path, {"iteration": 4, "model": {"w": torch.ones(2)}})
    assert "run_id" not in load_checkpoint(tmp_path / "model_0000004.pth")
    found, run_id = prepare_output_dir(tmp_path, resume=True)
    assert found is not None and found[0] == tmp_path / "model_0000004.pth"
    assert read_run_id(tmp_path) == run_id


def test_stale_temp_files_of_a_killed_write_are_removed_at_start(tmp_path):
    """SIGKILL in the middle of an atomic write leaves its hidden temp file; the next start removes it."""
    script = ("import os, sys\nfrom ssl_distill.fileio import atomic_open\n"
              "with atomic_open(sys.argv[1]) as f:\n    f.write(b'x' * 100000); f.flush(); os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model_0000002.pth")], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    leftover = list(tmp_path.glob(".model_0000002.pth.*.tmp"))
    assert len(leftover) == 1 and leftover[0].stat().st_size == 100000
    (tmp_path / ".notes.tmp").write_text("not ours")  # not an atomic_open name: kept
    prepare_output_dir(tmp_path, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", RUN_ID_FILE]


def test_the_run_lock_survives_rm_of_its_file(tmp_path):
    """`rm OUT/.ssl_distill.lock` while a run holds it: a second start is still refused (the lock is on the
    directory), and the directory is free again once the holder ends."""
    script = ("import sys, time\nfrom ssl_distill.train.run_lock import RunLock\n"
              "lock = RunLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (tmp_path / LOCK_FILE).unlink()
        with pytest.raises(RunLockedError, match="is in use by another training run"):
            RunLock(tmp_path, stale_wait_s=0.5).acquire()
    finally:
        holder.kill()
        holder.wait()
    RunLock(tmp_path).acquire().release()

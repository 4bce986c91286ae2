"""A full disk on a real small file system (tmpfs, mounted as root): one line with the file, the size needed and the
space free; the previous file intact; no temp file left; a training run that fails early and resumes."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hub_fixtures import serve_directory
from train_utils import popen_train, run_train, tiny_overrides

from ssl_distill.cli import main
from ssl_distill.fileio import DiskFullError, atomic_open
from ssl_distill.hub.convert import save_weights
from ssl_distill.hub.download import download_url
from ssl_distill.hub.registry import HubError
from ssl_distill.models.vit import vit_small
from ssl_distill.train.checkpoint import list_checkpoints, load_checkpoint

MB = 1 << 20


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Callable[[int], Path]]:
    """``small_disk(mb)``: a fresh tmpfs of ``mb`` MiB; skipped where mounting is not permitted."""
    mounted: list[Path] = []

    def mount(mb: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"mounting a small tmpfs is not permitted here ({proc.stderr.strip() or proc.returncode}); "
                        "the full-disk tests need root")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(directory: Path, leave: int = 0) -> Path:
    """Take the file system's free space but ``leave`` bytes with a real file (another user's data)."""
    st = os.statvfs(directory)
    filler = directory / "someone_elses_data"
    with open(filler, "wb") as f:
        try:
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_write_that_runs_out_of_space_is_one_line_and_keeps_the_previous_file(small_disk):
    disk = small_disk(2)
    target = disk / "weights.pth"
    save_weights({"w": torch.ones(1000)}, target)
    before = target.read_bytes()
    big = {"w": torch.randn(3 * MB // 4)}  # 3 MiB of float32
    with pytest.raises(DiskFullError) as info:  # the size is not announced: torch.save fails in the middle
        with atomic_open(target, "wb") as f:
            torch.save(big, f)
    line = str(info.value)
    assert line.startswith(f"disk full: '{target}' needs more than ") and " free on that file system" in line
    assert "\n" not in line
    with pytest.raises(DiskFullError, match=r"needs about 3\.1 MB, .* free"):  # announced: refused before writing
        save_weights(big, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in disk.iterdir()) == ["weights.pth"]  # no temp file left


def test_convert_onto_a_full_disk_is_one_line(small_disk, tmp_path, capsys):
    disk = small_disk(2)
    src = tmp_path / "in.pth"
    torch.save(vit_small(patch_size=14, depth=1, img_size=56).state_dict(), src)  # 1.8 M parameters: 7 MB
    code = main(["convert", "--from", "dinov2", "--to", "timm", str(src), str(disk / "out.pth")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"ssl-distill convert: error: disk full: '{disk / 'out.pth'}' needs about "), err
    assert not list(disk.iterdir())


def test_a_full_cache_during_a_download_says_disk_full(small_disk, tmp_path):
    cache = small_disk(2)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "w.pth").write_bytes(os.urandom(3 * MB))
    with serve_directory(mirror) as base, pytest.raises(HubError) as info:
        download_url(f"{base}/w.pth", cache / "w.pth", retries=0, size=3 * MB)
    text = str(info.value)
    assert "disk full while downloading" in text and "network" not in text
    assert "it needs 3.1 MB more" in text or " MB more, " in text  # what is missing of the file
    assert "are kept and the download resumes" in text


@pytest.mark.slow
def test_training_on_a_disk_that_fills_up_stops_with_one_line_and_resumes(small_disk, photo_folder):
    """The first checkpoint fits; then someone else fills the disk: the next checkpoint is refused before it is
    written (one line, exit 2), the first stays intact; with space freed the same command resumes and finishes. On a
    disk too small for any checkpoint the run fails at its start."""
    overrides = tiny_overrides(photo_folder, **{"optim.epochs": 2, "train.keep_last_checkpoints": 1})
    tiny = small_disk(8)
    refused = run_train(tiny / "run", overrides)
    err = [line for line in refused.stderr.strip().splitlines() if " INFO " not in line]  # the log says what ran
    assert refused.returncode == 2 and len(err) == 1, refused.stderr[-3000:]
    assert "disk full: " in err[0] and "the run could not save a checkpoint" in err[0]
    assert not list_checkpoints(tiny / "run")

    disk = small_disk(256)
    out = disk / "run"
    proc = popen_train(out, overrides)
    deadline = time.time() + 240
    while not (out / "last_checkpoint").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.02)
    filler = _fill(disk, leave=1 * MB)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, stdout[-3000:]
    assert "Traceback" not in stdout
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("ssl-distill train: error: disk full: '") and " needs about " in last, last
    assert "run the same command again to resume" in last
    kept = list_checkpoints(out)  # the one before the disk filled (2, or 4 when the filler was slow), intact
    assert len(kept) == 1 and load_checkpoint(kept[0])["iteration"] == int(kept[0].stem.split("_")[1]) < 8
    assert not list(out.glob(".*.tmp"))
    filler.unlink()
    resumed = run_train(out, overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and (out / "teacher_backbone.pth").exists()

"""Checkpoint files: atomic writes, pointer, pruning, weights-only loading, export."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from ssl_distill import __version__
from ssl_distill.checkpoint_format import CHECKPOINT_VERSION, NewerCheckpointError
from ssl_distill.fileio import atomic_write_text
from ssl_distill.hub.registry import HubError
from ssl_distill.hub.resolve import read_weights
from ssl_distill.train.checkpoint import (
    CheckpointError,
    export_backbone,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest_intact,
    save_checkpoint,
)


def _state(it: int) -> dict:
    return {
        "iteration": it,
        "model": {
            "teacher.backbone.cls_token": torch.full((1, 1, 4), float(it)),
            "student.backbone.cls_token": torch.zeros(1, 1, 4),
        },
        "rng": {"torch": torch.get_rng_state()},
        "config": "optim:\n  epochs: 1\n",
    }


def test_save_prunes_and_points_to_latest(tmp_path):
    for it in (10, 20, 30, 40):
        save_checkpoint(tmp_path, _state(it), keep_last=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["model_0000030.pth", "model_0000040.pth"]
    assert find_latest_checkpoint(tmp_path).name == "model_0000040.pth"
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000040.pth"
    assert not list(tmp_path.glob(".*.tmp"))
    state = load_checkpoint(find_latest_checkpoint(tmp_path))
    assert state["iteration"] == 40
    assert state["model"]["teacher.backbone.cls_token"][0, 0, 0] == 40


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, _state(10))

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, _state(20))
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["model_0000010.pth"]
    assert find_latest_checkpoint(tmp_path).name == "model_0000010.pth"
    assert not list(tmp_path.glob(".*.tmp"))


def test_load_rejects_foreign_and_broken_files(tmp_path):
    foreign = tmp_path / "weights.pth"
    torch.save({"cls_token": torch.zeros(1)}, foreign)
    with pytest.raises(ValueError, match="not an ssl_distill training checkpoint"):
        load_checkpoint(foreign)
    broken = tmp_path / "model_0000001.pth"
    broken.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="cannot read weights file.*is it a complete PyTorch"):
        load_checkpoint(broken)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")


def test_a_newer_format_version_is_refused_older_and_unversioned_files_load(tmp_path):
    path = save_checkpoint(tmp_path, _state(10))
    state = torch.load(path, weights_only=True)
    assert state["version"] == CHECKPOINT_VERSION
    for newer in (CHECKPOINT_VERSION + 1, "2", None):
        edited = {**state, "version": newer} if newer is not None else {k: v for k, v in state.items()
                                                                        if k != "version"}
        torch.save(edited, path)
        if newer is None:  # written before the version was recorded: loads as before
            assert load_checkpoint(path)["iteration"] == 10
            continue
        with pytest.raises(NewerCheckpointError) as err:
            load_checkpoint(path)
        assert str(err.value) == (
            f"'{path}' is a training checkpoint of format version {newer!r}, but this ssl_distill ({__version__}) "
            f"reads versions up to {CHECKPOINT_VERSION}: it was written by a newer release. Upgrade ssl_distill "
            "(pip install --upgrade ssl_distill, or update your checkout) to load it.")
        # a resume stops on it (the file is intact: it is not set aside as damaged, nor an older one used)
        with pytest.raises(CheckpointError, match="Upgrade ssl_distill"):
            load_latest_intact(tmp_path)
        assert [p.name for p in tmp_path.iterdir() if p.suffix == ".damaged"] == []
        assert path.exists()
        with pytest.raises(HubError, match="format version .* Upgrade ssl_distill"):  # as weights to evaluate
            read_weights(path)


def test_export_backbone_strips_prefix(tmp_path):
    ckpt = save_checkpoint(tmp_path, _state(5))
    out = export_backbone(ckpt, tmp_path / "teacher_backbone.pth")
    weights = torch.load(out, weights_only=True)
    assert list(weights) == ["cls_token"]
    assert weights["cls_token"][0, 0, 0] == 5


def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog):
    for it in (2, 4, 6):
        save_checkpoint(tmp_path, _state(it), keep_last=0)
    good = (tmp_path / "model_0000006.pth").read_bytes()
    (tmp_path / "model_0000006.pth").write_bytes(good[: len(good) // 2])  # truncated by a full disk / a kill -9
    with caplog.at_level("WARNING"):
        path, state = load_latest_intact(tmp_path)
    assert path.name == "model_0000004.pth"
    assert state["iteration"] == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "model_0000006.pth" in warnings[0]
    assert "model_0000006.pth.damaged" in warnings[0]
    # never deleted: kept aside, out of the pruning and of the next resume (which no longer warns)
    assert (tmp_path / "model_0000006.pth.damaged").read_bytes() == good[: len(good) // 2]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["model_0000002.pth", "model_0000004.pth"]
    caplog.clear()
    assert load_latest_intact(tmp_path)[0].name == "model_0000004.pth"
    assert not caplog.records


@pytest.mark.parametrize("pointer", [b"\x00\x9f\x92\x96garbage\xff", b"config.yaml\n", b"model_0000009.pth\n"])
def test_unusable_last_checkpoint_pointer_is_ignored(tmp_path, pointer, caplog):
    for it in (2, 4):
        save_checkpoint(tmp_path, _state(it), keep_last=0)
    (tmp_path / "config.yaml").write_text("optim:\n  epochs: 1\n")
    (tmp_path / "last_checkpoint").write_bytes(pointer)
    with caplog.at_level("WARNING"):
        path, state = load_latest_intact(tmp_path)
    assert path.name == "model_0000004.pth"
    assert state["iteration"] == 4
    assert (tmp_path / "config.yaml").read_text() == "optim:\n  epochs: 1\n"  # a user's file is never renamed
    if pointer != b"model_0000009.pth\n":  # a missing file is simply not a candidate
        assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1


def test_no_intact_checkpoint_and_a_pointer_outside_are_clear_errors(tmp_path):
    assert load_latest_intact(tmp_path) is None  # a fresh directory: nothing to resume
    for it in (2, 4):
        save_checkpoint(tmp_path, _state(it), keep_last=0)
    (tmp_path / "last_checkpoint").write_text(str(tmp_path.parent / "elsewhere" / "model_0000004.pth"))
    with pytest.raises(CheckpointError, match="outside the output directory.*delete last_checkpoint"):
        load_latest_intact(tmp_path)
    (tmp_path / "last_checkpoint").write_text("../model_0000004.pth")
    with pytest.raises(CheckpointError, match="outside the output directory"):
        load_latest_intact(tmp_path)
    (tmp_path / "last_checkpoint").unlink()
    for p in list_checkpoints(tmp_path):
        p.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint.*model_0000004.pth.damaged, "
                                              r"model_0000002.pth.damaged.*--no-resume"):
        load_latest_intact(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_0000002.pth.damaged", "model_0000004.pth.damaged"]


def test_files_get_the_mode_open_would_give(tmp_path):
    old = os.umask(0o027)
    try:
        ckpt = save_checkpoint(tmp_path, _state(1))
        text = atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    finally:
        os.umask(old)
    for path in (ckpt, text, tmp_path / "last_checkpoint"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    old = os.umask(0o022)
    try:
        exported = export_backbone(ckpt, tmp_path / "teacher_backbone.pth")
    finally:
        os.umask(old)
    assert stat.S_IMODE(exported.stat().st_mode) == 0o644

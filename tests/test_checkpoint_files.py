"""Checkpoint files: atomic writes, pointer, pruning, weights-only loading, export."""

from __future__ import annotations

import pytest
import torch

from ssl_distill.train.checkpoint import (
    export_backbone,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
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
    assert state["iteration"] == 40 and state["model"]["teacher.backbone.cls_token"][0, 0, 0] == 40


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
    with pytest.raises(ValueError, match="Cannot read checkpoint"):
        load_checkpoint(broken)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")


def test_export_backbone_strips_prefix(tmp_path):
    ckpt = save_checkpoint(tmp_path, _state(5))
    out = export_backbone(ckpt, tmp_path / "teacher_backbone.pth")
    weights = torch.load(out, weights_only=True)
    assert list(weights) == ["cls_token"] and weights["cls_token"][0, 0, 0] == 5

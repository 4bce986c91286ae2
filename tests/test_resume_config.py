"""Resuming with a changed config (issue 26, item 7): settings are applied with one warning and the old config is
kept; an architecture change is refused in one line that names the keys and the choices. Real `ssl-distill train`
processes on real photos."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from train_utils import run_train, tiny_overrides

from ssl_distill.checkpoint_format import CHECKPOINT_VERSION
from ssl_distill.cli import main
from ssl_distill.train.checkpoint import list_checkpoints, load_checkpoint
from ssl_distill.train.metrics import read_metrics


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_changed_settings_are_applied_with_a_warning_and_the_old_config_kept(tmp_path, photo_folder):
    out = tmp_path / "run"
    _ok(run_train(out, tiny_overrides(photo_folder)))  # 8 iterations
    proc = run_train(out, tiny_overrides(photo_folder, **{"optim.epochs": 3, "optim.base_lr": 0.001}))
    _ok(proc)
    warning = [line for line in proc.stderr.splitlines() if "with a changed config" in line]
    assert len(warning) == 1, proc.stderr[-3000:]
    assert "optim.epochs: 2 -> 3" in warning[0]
    assert "optim.base_lr: 0.004 -> 0.001" in warning[0]
    assert "train.output_dir" not in warning[0]
    kept = OmegaConf.load(out / "config_until_0000008.yaml")
    assert (kept.optim.epochs, kept.optim.base_lr) == (2, 0.004)
    now = OmegaConf.load(out / "config.yaml")
    assert (now.optim.epochs, now.optim.base_lr) == (3, 0.001)
    assert [r["iteration"] for r in read_metrics(out)][-4:] == [9, 10, 11, 12]
    # resuming again with the same config: no warning, nothing more kept
    proc = run_train(out, tiny_overrides(photo_folder, **{"optim.epochs": 3, "optim.base_lr": 0.001}))
    _ok(proc)
    assert "with a changed config" not in proc.stderr
    assert sorted(p.name for p in out.glob("config_until_*.yaml")) == ["config_until_0000008.yaml"]


def test_changed_architecture_is_refused_in_one_line(tmp_path, photo_folder):
    out = tmp_path / "run"
    _ok(run_train(out, tiny_overrides(photo_folder, **{"optim.epochs": 1, "train.iters_per_epoch": 2})))
    before = [p.name for p in list_checkpoints(out)]
    for key, old, new in (("student.patch_size", 8, 4), ("dino.head_n_prototypes", 512, 256)):
        proc = run_train(out, tiny_overrides(photo_folder, **{"optim.epochs": 2, "train.iters_per_epoch": 2,
                                                              key: new}))
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1, proc.stderr[-3000:]
        assert f"{key}: {old} -> {new}" in errors[0]
        assert "--no-resume" in errors[0]
        assert "--output-dir" in errors[0]
        assert [p.name for p in list_checkpoints(out)] == before  # nothing of the run was touched


@pytest.mark.slow
def test_a_newer_checkpoint_format_is_refused_and_the_data_stream_resumes_where_it_stopped(tmp_path, photo_folder,
                                                                                            capsys):
    out = tmp_path / "run"
    _ok(run_train(out, tiny_overrides(photo_folder, **{"optim.epochs": 1})))  # 4 iterations of 8 images
    before = list_checkpoints(out)
    path = before[-1]
    state = torch.load(path, weights_only=True)
    assert (state["iteration"], state["version"], state["sampler_position"], state["world_size"]) == \
        (4, CHECKPOINT_VERSION, 32, 1)
    torch.save({**state, "version": CHECKPOINT_VERSION + 1}, path)  # as a newer release would write it
    proc = run_train(out, tiny_overrides(photo_folder))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith(f"ssl-distill train: error: '{path}' is a training checkpoint of format version "
                                f"{CHECKPOINT_VERSION + 1!r}, but this ssl_distill"), errors[0]
    assert "Upgrade ssl_distill" in errors[0]
    assert list_checkpoints(out) == before  # kept as it is, not set aside as damaged, and no older one resumed
    assert main(["export", "--checkpoint", str(path), "--output", str(tmp_path / "t.pth")]) == 2
    assert "Upgrade ssl_distill" in capsys.readouterr().err
    # without a version (files written before it was recorded) it resumes; with half the batch, the data stream
    # continues at the 32nd sample rather than at iteration 4 x the new global batch
    torch.save({k: v for k, v in state.items() if k != "version"}, path)
    proc = run_train(out, tiny_overrides(photo_folder, **{"train.batch_size_per_gpu": 4}))
    _ok(proc)
    assert "the data stream continues at sample 32" in proc.stderr
    final = load_checkpoint(list_checkpoints(out)[-1])
    assert (final["iteration"], final["sampler_position"]) == (8, 32 + 4 * 4)

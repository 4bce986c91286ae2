"""Resuming with a changed config (issue 26, item 7): settings are applied with one warning and the old config is
kept; an architecture change is refused in one line that names the keys and the choices. Real `ssl-distill train`
processes on real photos."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from train_utils import run_train, tiny_overrides

from ssl_distill.train.checkpoint import list_checkpoints
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

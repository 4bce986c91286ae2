"""Issue 26 item 12: small misleading messages, each on the real thing (a real ENOSPC from /dev/full, a real NaN TIFF,
the real command-line parser, ``submit``'s real checks with Slurm stand-ins on PATH)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from cli_utils import one_line_error
from PIL import Image
from train_utils import TINY

from ssl_distill.cli import build_parser, main
from ssl_distill.commands import UserError, describe_file_error, parse_command, run_command
from ssl_distill.commands.submit import validate_submitted
from ssl_distill.data.datasets import BrokenImageError, build_image_dataset
from ssl_distill.launch import slurm


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_without_a_file_name_names_the_output_dir() -> None:
    with pytest.raises(OSError) as err, open("/dev/full", "wb", buffering=0) as f:
        f.write(b"checkpoint bytes")  # a write error carries no file name, as from torch.save
    assert err.value.errno == errno.ENOSPC and err.value.filename is None
    line = describe_file_error(err.value, "runs/vit")
    assert line.startswith("No space left on device while writing under 'runs/vit'; the disk is full"), line
    assert ":;" not in describe_file_error(err.value) and ":;" not in line
    named = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/vit/model_0000010.pth")
    assert describe_file_error(named).startswith("No space left on device: 'runs/vit/model_0000010.pth'; ")


def test_a_nan_tiff_is_refused_for_its_nans(tmp_path: Path) -> None:
    values = np.array([[0.001, np.nan, 0.999, np.nan]], dtype=np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "nan.tiff")
    with Image.open(tmp_path / "nan.tiff") as raw:
        assert raw.mode == "F" and np.isnan(np.asarray(raw)).sum() == 2  # really a float file with NaNs
    with pytest.raises(BrokenImageError, match=r"2 of 4 pixels NaN or infinite, the others in \[0.001, 0.999\]"):
        build_image_dataset(tmp_path, bad_image_policy="error")[0]


def test_overrides_split_around_flags_are_all_applied(capsys, tmp_path: Path) -> None:
    args = parse_command("train", ["optim.epochs=3", "--output-dir", "X", "train.seed=5", "--no-resume",
                                   "optim.epochs=4"])
    assert args.opts == ["optim.epochs=3", "train.seed=5", "optim.epochs=4"]  # command-line order: the last wins
    assert args.output_dir == "X" and args.no_resume
    assert main(["config", "optim.epochs=3", "--config-file", TINY, "train.seed=5", "--changed"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out and "seed: 5" in out
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--checkpoint", "a.pth", "x=1", "--output", "b.pth"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: x=1 (this command takes no key=value config overrides)" in err


def _eval_args(tmp_path: Path, weights: str) -> list[str]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return ["--pretrained-weights", weights, "--train-dataset", str(data), "--val-dataset", str(data),
            "--output-dir", str(tmp_path / "out")]


def test_submit_checks_the_pretrained_weights(tmp_path: Path, photo_folder: str) -> None:
    for weights, expected in (("missing.pth", "--pretrained-weights missing.pth is not a file"),
                              (str(tmp_path / "nope" / "w.pth"), "is not a file"),
                              ("dinov2_vitz14", "--pretrained-weights: unknown model 'dinov2_vitz14'")):
        with pytest.raises(UserError, match=expected):
            validate_submitted("eval-knn", _eval_args(tmp_path, weights))
    (tmp_path / "w.pth").write_bytes(b"")
    for weights in ("random", "dinov2_vits14", str(tmp_path / "w.pth"), "https://example.org/w.pth"):
        validate_submitted("eval-linear", _eval_args(tmp_path, weights))  # accepted: the job resolves them
    with pytest.raises(UserError, match="student.pretrained_weights: unknown model 'dinov2_vits14_nope'"):
        validate_submitted("train", ["--config-file", TINY, f"train.dataset_path={photo_folder}",
                                     "student.pretrained_weights=dinov2_vits14_nope", "--output-dir", "o"])


def _fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tools: tuple[str, ...]) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        (bin_dir / tool).write_text(f"#!/bin/sh\necho 'fake {tool}' >&2\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


def test_submit_without_srun_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    _fake_tools(tmp_path, monkeypatch, ("sbatch", "squeue"))  # a login node with sbatch but no srun
    line = one_line_error(capsys, ["submit", "--output-dir", str(tmp_path / "run"), "eval-knn",
                                   *_eval_args(tmp_path, "random")])
    assert "srun not found on PATH" in line and "To run without Slurm" in line
    monkeypatch.setattr(slurm, "check_slurm_available", lambda: None)  # submitit's own check, behind ours
    args = build_parser().parse_args(["submit", "--output-dir", str(tmp_path / "run"), "eval-knn"])
    with pytest.raises(slurm.SubmitError, match='submitit cannot use Slurm here: Could not detect "srun"'):
        slurm.submit(args, [], run_command)

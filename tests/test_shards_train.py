"""Training on shards is training on the folder they were packed from: bit-identical losses and weights, on one
process and on two gloo ranks, and a SIGKILL + resume on shards replays the uninterrupted folder run exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_utils import popen_train, run_train, tiny_overrides

from ssl_distill.data.pack import pack_shards
from ssl_distill.train.checkpoint import find_latest_checkpoint, load_checkpoint
from ssl_distill.train.metrics import read_metrics

LOSS_KEYS = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "total_loss")


@pytest.fixture(scope="module")
def photo_shards(photo_folder, tmp_path_factory) -> str:
    """The 48 photos of ``photo_folder`` packed into shards of about 8 images."""
    out = tmp_path_factory.mktemp("photo_shards")
    summary = pack_shards(photo_folder, out, shard_size=40 << 10, workers=0)
    assert summary.images == 48 and summary.shards >= 4
    return str(out)


def _losses(out: Path) -> list[tuple[int, tuple[float, ...]]]:
    return [(r["iteration"], tuple(r[k] for k in LOSS_KEYS)) for r in read_metrics(out)]


def _assert_ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _assert_same_run(a: Path, b: Path, iterations: int) -> None:
    assert [i for i, _ in _losses(a)] == list(range(1, iterations + 1))
    assert _losses(a) == _losses(b)  # every iteration, every loss, bit for bit
    wa = load_checkpoint(find_latest_checkpoint(a))["model"]
    wb = load_checkpoint(find_latest_checkpoint(b))["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_sigkill_and_resume_on_shards_equals_the_folder_run(tmp_path, photo_folder, photo_shards):
    """Folder run (no workers) = shards run with 2 workers, killed with SIGKILL after iteration 6 and resumed."""
    from test_train_engine import _kill_after

    folder, shards = tmp_path / "folder", tmp_path / "shards"
    common = {"optim.epochs": 3, "student.drop_path_rate": 0.3}  # 12 iterations, a checkpoint every 2
    _assert_ok(run_train(folder, tiny_overrides(photo_folder, **common)))
    overrides = tiny_overrides(photo_shards, **common, **{"train.num_workers": 2})
    proc = popen_train(shards, overrides)
    _kill_after(proc, shards, "model_0000006.pth")
    _assert_ok(run_train(shards, overrides))
    _assert_same_run(shards, folder, 12)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_on_shards_equal_two_ranks_on_the_folder(tmp_path, photo_folder, photo_shards):
    folder, shards = tmp_path / "folder", tmp_path / "shards"
    common = {"train.batch_size_per_gpu": 4, "student.layerscale": 1.0}
    _assert_ok(run_train(folder, tiny_overrides(photo_folder, **common), nproc=2))
    _assert_ok(run_train(shards, tiny_overrides(photo_shards, **common, **{"train.num_workers": 1}), nproc=2))
    _assert_same_run(shards, folder, 8)

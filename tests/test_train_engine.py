"""The training engine on real images and real processes: end to end, resume, distributed equivalence, errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from train_utils import TINY, popen_train, run_train, tiny_overrides

from ssl_distill.config import load_config
from ssl_distill.data.digits import write_digits_folders
from ssl_distill.models import vit_tiny
from ssl_distill.train.checkpoint import find_latest_checkpoint, list_checkpoints, load_checkpoint
from ssl_distill.train.metrics import read_metrics
from ssl_distill.train.trainer import Trainer, TrainingDiverged

LOSS_KEYS = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "total_loss")


def _losses(out: Path) -> list[tuple[int, tuple[float, ...]]]:
    return [(r["iteration"], tuple(r[k] for k in LOSS_KEYS)) for r in read_metrics(out)]


def _assert_ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_end_to_end_tiny_training(tmp_path, photo_folder):
    out = tmp_path / "run"
    _assert_ok(run_train(out, tiny_overrides(photo_folder)))
    metrics = read_metrics(out)
    assert [r["iteration"] for r in metrics] == list(range(1, 9))
    for r in metrics:
        for key in (*LOSS_KEYS, "lr", "wd", "momentum", "teacher_temp", "images_per_s", "data_time_s",
                    "peak_memory_mb", "broken_images"):
            assert key in r, key
        assert all(torch.isfinite(torch.tensor(r[k])) for k in LOSS_KEYS)
    assert metrics[0]["teacher_temp"] == pytest.approx(0.04)
    assert [p.name for p in list_checkpoints(out)] == ["model_0000004.pth", "model_0000006.pth", "model_0000008.pth"]
    assert load_config(out / "config.yaml").train.dataset_path == photo_folder
    # the exported teacher loads strictly into the architecture and equals the checkpoint's teacher
    weights = torch.load(out / "teacher_backbone.pth", weights_only=True)
    backbone = vit_tiny(patch_size=8, img_size=32, init_values=1e-5)
    backbone.load_state_dict(weights, strict=True)
    state = load_checkpoint(find_latest_checkpoint(out))
    assert state["iteration"] == 8
    assert state["sampler_position"] == 64
    torch.testing.assert_close(weights["cls_token"], state["model"]["teacher.backbone.cls_token"])
    assert not torch.equal(state["model"]["teacher.backbone.cls_token"], state["model"]["student.backbone.cls_token"])
    # export command: same weights
    from ssl_distill.cli import main

    assert main(["export", "--checkpoint", str(find_latest_checkpoint(out)), "--output", str(tmp_path / "t.pth")]) == 0
    torch.testing.assert_close(torch.load(tmp_path / "t.pth", weights_only=True), weights)


def _kill_after(proc, out: Path, checkpoint: str) -> None:
    """SIGKILL ``proc`` (and its process group: torchrun's workers) once ``out/checkpoint`` exists."""
    deadline = time.time() + 240
    while not (out / checkpoint).exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "teacher_backbone.pth").exists(), "the run finished before it could be killed"


def _assert_same_run(a: Path, b: Path) -> None:
    assert _losses(a) == _losses(b)  # every iteration, every loss, bit for bit
    wa = load_checkpoint(find_latest_checkpoint(a))["model"]
    wb = load_checkpoint(find_latest_checkpoint(b))["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_and_resume_is_bit_identical(tmp_path, photo_folder, workers):
    """Stochastic depth at the recipe's rate 0.3: its draws are keyed by the sample, so they survive the kill."""
    ref, killed = tmp_path / "reference", tmp_path / "killed"
    overrides = tiny_overrides(photo_folder, **{"optim.epochs": 6, "student.drop_path_rate": 0.3,
                                                "train.num_workers": workers})  # 24 iterations, checkpoint every 2
    _assert_ok(run_train(ref, overrides))
    proc = popen_train(killed, overrides)
    _kill_after(proc, killed, "model_0000006.pth")
    _assert_ok(run_train(killed, overrides))  # same output dir: resumes automatically
    _assert_same_run(killed, ref)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_sigkill_resume_and_resume_on_one_rank(tmp_path, photo_folder):
    """2 gloo ranks with stochastic depth 0.3: SIGKILL + resume on 2 ranks is bit-identical. The 2-rank checkpoint
    resumes on 1 rank from the same state and data order; the stochastic-depth subsets are drawn per rank's batch
    (a fixed number per batch: static shapes), so other samples drop there and the trajectory is continued, not
    replayed: the first resumed step's total loss, from identical weights and images, agrees to ~1 % (without
    stochastic depth a world-size change is exact: test_resume_on_a_different_world_size)."""
    ref, killed, switched = tmp_path / "ref", tmp_path / "killed", tmp_path / "switched"
    common = {"optim.epochs": 3, "student.drop_path_rate": 0.3, "student.layerscale": 1.0,
              "train.keep_last_checkpoints": 0}
    overrides = tiny_overrides(photo_folder, **common, **{"train.batch_size_per_gpu": 4})
    _assert_ok(run_train(ref, overrides, nproc=2))
    proc = popen_train(killed, overrides, nproc=2)
    _kill_after(proc, killed, "model_0000006.pth")
    _assert_ok(run_train(killed, overrides, nproc=2))
    _assert_same_run(killed, ref)
    switched.mkdir()
    for name in ("config.yaml", "model_0000006.pth", "run_id"):  # run_id: continue that run here on purpose
        shutil.copy(ref / name, switched / name)
    one_rank = tiny_overrides(photo_folder, **common, **{"train.batch_size_per_gpu": 8})
    _assert_ok(run_train(switched, one_rank))
    got, want = _losses(switched), [x for x in _losses(ref) if x[0] > 6]
    assert [i for i, _ in got] == list(range(7, 13))
    total = LOSS_KEYS.index("total_loss")
    assert got[0][1][total] == pytest.approx(want[0][1][total], rel=1e-2)
    assert all(math.isfinite(v) for _, losses in got for v in losses)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_ddp_and_fsdp_match_one_process(tmp_path, photo_folder):
    # LayerScale 1.0: with the tiny config's 1e-5 the random-init CLS tokens are near-duplicates (nearest-neighbour
    # distance ~3e-5), where KoLeo's -log(distance) turns fp32 rounding of different batch splits into ~0.2%.
    one, ddp, fsdp = tmp_path / "one", tmp_path / "ddp", tmp_path / "fsdp"
    train_dir, val_dir = write_digits_folders(tmp_path / "digits", 6, 3)
    ls = {"student.layerscale": 1.0, "evaluation.knn_train_dataset": train_dir, "evaluation.knn_val_dataset": val_dir,
          "evaluation.eval_period_iterations": 4}
    _assert_ok(run_train(one, tiny_overrides(photo_folder, **{"train.batch_size_per_gpu": 8}, **ls)))
    _assert_ok(run_train(ddp, tiny_overrides(photo_folder, **{"train.batch_size_per_gpu": 4}, **ls), nproc=2))
    _assert_ok(run_train(fsdp, tiny_overrides(photo_folder, **{"train.batch_size_per_gpu": 4,
                                                               "train.sharding": "fsdp"}, **ls), nproc=2))
    ref = _losses(one)
    for run in (ddp, fsdp):
        got = _losses(run)
        assert [i for i, _ in got] == [i for i, _ in ref]
        for (_, a), (_, b) in zip(got, ref):
            assert a == pytest.approx(b, rel=2e-4, abs=2e-5), run.name
    # the k-NN monitor ran at iterations 4 and 8 in every run, FSDP included (plain copy of the sharded teacher)
    for run in (one, ddp, fsdp):
        knn = [(r["iteration"], r["knn_top1_k10"]) for r in read_metrics(run) if "knn_top1_k10" in r]
        assert [i for i, _ in knn] == [4, 8], run.name
        assert all(0.0 <= a <= 100.0 for _, a in knn), run.name
    assert [r.get("knn_top1_k20") for r in read_metrics(ddp)] == [r.get("knn_top1_k20") for r in read_metrics(fsdp)]
    # FSDP writes the same full (unsharded) state as DDP, with the same keys and shapes
    d = load_checkpoint(find_latest_checkpoint(ddp))
    f = load_checkpoint(find_latest_checkpoint(fsdp))
    assert d["model"].keys() == f["model"].keys()
    for k in d["model"]:
        torch.testing.assert_close(f["model"][k], d["model"][k], rtol=1e-3, atol=1e-4, msg=k)
    assert d["optimizer"]["state"].keys() == f["optimizer"]["state"].keys()


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_with_heavy_stochastic_depth(tmp_path, photo_folder):
    """Stochastic depth runs each residual branch on the kept samples only. At rate 0.9 with 2 images per rank,
    whole branches are dropped on one rank and not the other; DDP still sees a gradient for every parameter."""
    out = tmp_path / "dp"
    _assert_ok(run_train(out, tiny_overrides(photo_folder, **{"train.batch_size_per_gpu": 2,
                                                              "student.drop_path_rate": 0.9,
                                                              "optim.epochs": 1}), nproc=2))
    got = _losses(out)
    assert [i for i, _ in got] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(v)).all() for _, v in got)


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_on_a_different_world_size(tmp_path, photo_folder):
    ref, switched = tmp_path / "ref", tmp_path / "switched"
    ls = {"student.layerscale": 1.0}  # well-conditioned KoLeo (see the test above)
    _assert_ok(run_train(ref, tiny_overrides(photo_folder, **{"train.batch_size_per_gpu": 8}, **ls)))
    # a 1-process run (global batch 8) "interrupted" after iteration 4: roll it back to that checkpoint ...
    _assert_ok(run_train(switched, tiny_overrides(photo_folder, **{"train.batch_size_per_gpu": 8}, **ls)))
    for later in ("model_0000006.pth", "model_0000008.pth", "teacher_backbone.pth", "last_checkpoint"):
        (switched / later).unlink()
    state = load_checkpoint(find_latest_checkpoint(switched))
    assert state["iteration"] == 4
    # ... and resume it on 2 processes x 4
    _assert_ok(run_train(switched, tiny_overrides(photo_folder, **{"train.batch_size_per_gpu": 4}, **ls), nproc=2))
    got, want = _losses(switched), _losses(ref)
    assert [i for i, _ in got] == list(range(1, 9))
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=2e-4, abs=2e-5)


@pytest.mark.slow
def test_broken_images_are_skipped_and_counted(tmp_path, photo_folder):
    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(Path(photo_folder).iterdir()):
        (data / p.name).write_bytes(p.read_bytes())
    (data / "zz_empty.jpg").write_bytes(b"")
    (data / "zz_text.png").write_text("not an image")
    good = (data / "photo_000.jpg").read_bytes()
    (data / "zz_truncated.jpg").write_bytes(good[: len(good) // 2])
    out = tmp_path / "run"
    _assert_ok(run_train(out, tiny_overrides(str(data), **{"optim.epochs": 4})))  # 16 it x 8 = 2.5 epochs
    metrics = read_metrics(out)
    assert metrics[-1]["broken_images"] >= 3  # each broken file met at least once, replaced, counted
    assert (out / "teacher_backbone.pth").exists()
    proc = run_train(tmp_path / "strict", tiny_overrides(str(data), **{"train.bad_image_policy": "error"}))
    assert proc.returncode == 2
    assert "zz_" in proc.stderr
    assert "train.bad_image_policy=skip" in proc.stderr


@pytest.mark.parametrize("log_period", [1, 8])
def test_nan_loss_stops_with_iteration_and_last_checkpoint(tmp_path, photo_folder, monkeypatch, log_period):
    """The loss is read only at log periods (no device sync in the other steps); a NaN in between is still named
    by its iteration, and the checkpoint due after it (iteration 4) is never written."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = load_config(TINY, tiny_overrides(photo_folder, **{"train.log_period": log_period}))
    trainer = Trainer(cfg, tmp_path)
    real = trainer.meta.compute_losses
    calls = {"n": 0}

    def poisoned(batch, teacher_temp, *args):
        total, losses = real(batch, teacher_temp, *args)
        calls["n"] += 1
        if calls["n"] == 4:  # iteration 3 (0-based): after the checkpoint at iteration 2
            total = total * float("nan")
            losses["total_loss"] = total.detach()
        return total, losses

    trainer.meta.compute_losses = poisoned
    with pytest.raises(TrainingDiverged, match=r"at iteration 3 .*model_0000002.pth.*left untouched"):
        trainer.run()
    good = load_checkpoint(tmp_path / "model_0000002.pth")
    assert good["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())
    assert [p.name for p in list_checkpoints(tmp_path)] == ["model_0000002.pth"]


def test_cli_reports_config_and_data_errors(tmp_path, photo_folder):
    proc = run_train(tmp_path / "a", tiny_overrides(photo_folder, **{"optim.bas_lr": 1}))
    assert proc.returncode == 2
    assert "Did you mean 'optim.base_lr'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_train(tmp_path / "b", tiny_overrides(str(tmp_path / "missing")))
    assert proc.returncode == 2
    assert "missing" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_train(tmp_path / "c", tiny_overrides(photo_folder, **{"crops.local_crops_size": 12}))
    assert proc.returncode == 2
    assert "crops.local_crops_size" in proc.stderr


def test_metrics_are_truncated_to_the_resume_point(tmp_path):
    from ssl_distill.train.metrics import MetricsWriter

    path = tmp_path / "training_metrics.jsonl"
    path.write_text("".join(json.dumps({"iteration": i}) + "\n" for i in range(1, 8)) + '{"iteration": 8, "lo')
    MetricsWriter(tmp_path, start_iteration=4).close()
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_stop_request_checkpoints_the_current_iteration_and_resumes(tmp_path, photo_folder, monkeypatch):
    from ssl_distill.train.trainer import TrainingInterrupted

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = load_config(TINY, tiny_overrides(photo_folder, **{"train.checkpoint_period": 100}))
    trainer = Trainer(cfg, tmp_path)
    real_step = trainer.step

    def step(batch, it):
        if it == 3:
            trainer.request_stop()  # as a SIGUSR2/SIGTERM handler would, mid-iteration
        return real_step(batch, it)

    trainer.step = step
    with pytest.raises(TrainingInterrupted) as info:
        trainer.run()
    assert info.value.iteration == 4  # iteration 3 finished; nothing after it ran
    assert load_checkpoint(info.value.checkpoint)["iteration"] == 4
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    Trainer(load_config(TINY, tiny_overrides(photo_folder)), tmp_path).run()
    assert [r["iteration"] for r in read_metrics(tmp_path)] == list(range(1, 9))

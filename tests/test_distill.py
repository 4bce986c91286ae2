"""Distillation from a frozen teacher (train.mode=distill): both recipes on real images and real processes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from train_utils import TINY, popen_train, run_train, tiny_overrides

from ssl_distill.config import ConfigError, load_config
from ssl_distill.train.checkpoint import find_latest_checkpoint, load_checkpoint
from ssl_distill.train.metrics import read_metrics
from ssl_distill.train.trainer import Trainer

TEACHER_ARCH = ["student.arch=vit_small"]  # the tiny config's student is a ViT-Ti/8: a ViT-S/8 teaches it


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, photo_folder) -> Path:
    """A short ViT-S/8 pretraining: its checkpoint (with heads) and its exported backbone are the teachers."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    proc = run_train(out, tiny_overrides(photo_folder, **{"student.arch": "vit_small", "optim.epochs": 1}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _distill(photo_folder: str, teacher: str, recipe: str = "auto", **extra: object) -> list[str]:
    opts = {"train.mode": "distill", "distill.teacher_weights": teacher, "distill.recipe": recipe,
            "optim.epochs": 3, **extra}
    if not teacher.endswith("model_0000004.pth"):  # a plain backbone: say what it is
        opts.update({"distill.teacher_config": TINY, "distill.teacher_overrides": "[student.arch=vit_small]"})
    return tiny_overrides(photo_folder, **opts)


def _losses(out: Path) -> list[tuple[int, dict[str, float]]]:
    return [(r["iteration"], {k: v for k, v in r.items() if k.endswith("_loss")}) for r in read_metrics(out)]


@pytest.mark.parametrize("recipe", ["heads", "features"])
def test_the_teacher_stays_frozen_and_out_of_the_checkpoint(tmp_path, photo_folder, teacher_run, recipe,
                                                             monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    teacher = teacher_run / ("model_0000004.pth" if recipe == "heads" else "teacher_backbone.pth")
    cfg = load_config(TINY, _distill(photo_folder, str(teacher), recipe, **{"optim.epochs": 1}))
    trainer = Trainer(cfg, tmp_path)
    arch = trainer.meta
    assert arch.recipe == recipe
    frozen = {f"{i}.{k}": v.clone() for i, m in enumerate(arch.frozen.modules()) for k, v in m.state_dict().items()}
    student_before = {k: v.clone() for k, v in arch.student.backbone.state_dict().items()}
    assert not any(m.training for m in arch.frozen.modules())
    assert all(not p.requires_grad for m in arch.frozen.modules() for p in m.parameters())
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for m in arch.frozen.modules() for p in m.parameters()}
    trainer.run()
    after = {f"{i}.{k}": v for i, m in enumerate(arch.frozen.modules()) for k, v in m.state_dict().items()}
    assert frozen.keys() == after.keys() and all(torch.equal(frozen[k], after[k]) for k in frozen)  # bit-identical
    assert not all(torch.equal(v, arch.student.backbone.state_dict()[k]) for k, v in student_before.items())
    state = load_checkpoint(find_latest_checkpoint(tmp_path))
    assert state["distill_teacher"]["weights_hash"] == arch.frozen.weights_hash
    assert {k.split(".")[0] for k in state["model"]} <= {"student", "teacher", "objective"}
    exported = torch.load(tmp_path / "teacher_backbone.pth", weights_only=True)  # the student's EMA, no projection
    assert exported.keys() == student_before.keys()
    assert [r["iteration"] for r in read_metrics(tmp_path)] == list(range(1, 5))
    if recipe == "heads":  # the student's own heads, on the teacher's prototypes
        assert arch.student.dino_head.last_layer.out_features == arch.frozen.n_prototypes[0] == 512
        assert arch.student.dino_head.mlp[0].in_features == 192 and arch.frozen.backbone.embed_dim == 384
        assert {"dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"} <= set(
            read_metrics(tmp_path)[-1])
    else:  # projections from the student's width to the teacher's, dropped at export
        assert arch.student.cls_proj.weight.shape == (384, 192)
        assert not any(k.startswith(("cls_proj", "patch_proj")) for k in exported)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["heads", "features"])
def test_sigkill_and_resume_is_bit_identical_in_distillation(tmp_path, photo_folder, teacher_run, recipe):
    teacher = str(teacher_run / ("model_0000004.pth" if recipe == "heads" else "teacher_backbone.pth"))
    overrides = _distill(photo_folder, teacher, recipe)  # 12 iterations, a checkpoint every 2
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert run_train(ref, overrides).returncode == 0
    proc = popen_train(killed, overrides)
    deadline = time.time() + 240
    while not (killed / "model_0000006.pth").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "teacher_backbone.pth").exists()
    resumed = run_train(killed, overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(killed) == _losses(ref)
    a = load_checkpoint(find_latest_checkpoint(ref))["model"]
    b = load_checkpoint(find_latest_checkpoint(killed))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_ranks_equal_one_process_in_distillation(tmp_path, photo_folder, teacher_run):
    for recipe, teacher in (("heads", "model_0000004.pth"), ("features", "teacher_backbone.pth")):
        # random student start: a selection of this 4-iteration teacher has near-duplicate CLS tokens, and KoLeo's
        # log nearest-neighbour distance turns the batch-size rounding of the forward (8 vs 4 rows) into 1 %
        common = {"optim.epochs": 2, "student.layerscale": 1.0, "distill.student_init": "random"}
        one = run_train(tmp_path / f"one_{recipe}", _distill(photo_folder, str(teacher_run / teacher), recipe,
                                                             **common, **{"train.batch_size_per_gpu": 8}))
        two = run_train(tmp_path / f"two_{recipe}", _distill(photo_folder, str(teacher_run / teacher), recipe,
                                                             **common, **{"train.batch_size_per_gpu": 4}), nproc=2)
        assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
        got, want = _losses(tmp_path / f"two_{recipe}"), _losses(tmp_path / f"one_{recipe}")
        assert [i for i, _ in got] == [i for i, _ in want] == list(range(1, 9))
        for (_, a), (_, b) in zip(got, want):
            assert a.keys() == b.keys()
            for k in a:
                assert a[k] == pytest.approx(b[k], rel=2e-4, abs=2e-5), (recipe, k)


@pytest.mark.parametrize("recipe", ["heads", "features"])
def test_teacher_selection_starts_the_student_from_the_teachers_weights(tmp_path, photo_folder, teacher_run,
                                                                        recipe):
    """distill.student_init (auto here: the ViT-Ti/8 fits the ViT-S/8 teacher): at iteration 0 the student and its
    EMA are the weight selection of the teacher; the features recipe's projections put each kept channel back where
    it came from, the heads recipe's student heads are the teacher's on the kept channels."""
    from ssl_distill.models.weight_selection import select_weights, selected_channels

    teacher = str(teacher_run / ("model_0000004.pth" if recipe == "heads" else "teacher_backbone.pth"))
    arch = Trainer(load_config(TINY, _distill(photo_folder, teacher, recipe, **{"optim.epochs": 1})), tmp_path).meta
    expected = select_weights(arch.frozen.backbone, arch.student.backbone)
    for part in (arch.student, arch.teacher):
        got = part.backbone.state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.items())
    chan = selected_channels(384, 192)
    if recipe == "features":
        w = arch.student.cls_proj.weight
        assert torch.equal(w[chan].diagonal(), torch.ones(192)) and w.abs().sum() == 192
    else:
        mine, theirs = arch.student.dino_head.state_dict(), arch.frozen.heads["dino_head"].state_dict()
        assert torch.equal(mine["mlp.0.weight"], theirs["mlp.0.weight"][:, chan])
        assert all(torch.equal(v, theirs[k]) for k, v in mine.items() if k != "mlp.0.weight")
    random_cfg = load_config(TINY, _distill(photo_folder, teacher, recipe, **{
        "optim.epochs": 1, "distill.student_init": "random"}))
    random_start = Trainer(random_cfg, tmp_path / "random").meta.student.backbone.state_dict()
    assert not torch.equal(random_start["blocks.0.attn.qkv.weight"], expected["blocks.0.attn.qkv.weight"])
    with pytest.raises(ConfigError, match="keep one"):
        load_config(TINY, _distill(photo_folder, teacher, recipe, **{
            "distill.student_init": "teacher_selection", "student.pretrained_weights": teacher}))


def test_bad_teachers_are_one_clear_error(tmp_path, photo_folder, teacher_run):
    backbone = str(teacher_run / "teacher_backbone.pth")
    cases = {
        "does not exist": _distill(photo_folder, str(tmp_path / "missing.pth")),
        "distill.teacher_overrides=": tiny_overrides(photo_folder, **{
            "train.mode": "distill", "distill.teacher_weights": backbone}),  # no architecture given for a backbone
        "distill.recipe=heads needs a teacher with its DINO/iBOT heads": _distill(photo_folder, backbone, "heads"),
        "set distill.resize_patch_tokens=true": _distill(photo_folder, backbone, "features", **{
            "student.patch_size": 16, "distill.resize_patch_tokens": False}),
        "train.mode=distill needs a teacher": tiny_overrides(photo_folder, **{"train.mode": "distill"}),
        "distill.student_init=teacher_selection: cannot initialise the student by weight selection from the "
        "teacher: patch size 8 vs 16": _distill(photo_folder, backbone, "features", **{
            "student.patch_size": 16, "distill.student_init": "teacher_selection"}),
    }
    for expected, overrides in cases.items():
        proc = run_train(tmp_path / "run", overrides)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (expected, proc.stderr[-2000:])
        assert last.startswith("ssl-distill train: error: ") and expected in last, (expected, last)
    with pytest.raises(ConfigError, match="distill.teacher_weights.*is set but train.mode=pretrain"):
        load_config(TINY, ["distill.teacher_weights=x.pth"])


@pytest.mark.slow
def test_resume_with_another_teacher_is_refused(tmp_path, photo_folder, teacher_run):
    backbone = teacher_run / "teacher_backbone.pth"
    out = tmp_path / "run"
    assert run_train(out, _distill(photo_folder, str(backbone), "features", **{"optim.epochs": 1})).returncode == 0
    other = tmp_path / "other.pth"
    weights = torch.load(backbone, weights_only=True)
    torch.save({k: v + 0.01 if k == "norm.weight" else v for k, v in weights.items()}, other)
    (out / "teacher_backbone.pth").unlink()
    proc = run_train(out, _distill(photo_folder, str(other), "features", **{"optim.epochs": 2}))
    assert proc.returncode == 2 and "was distilled from a teacher with sha256" in proc.stderr
    assert "--no-resume" in proc.stderr

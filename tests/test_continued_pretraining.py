"""Continued pretraining: student.pretrained_weights (files, zoo names, our checkpoints), head warm-up, errors."""

from __future__ import annotations

import pytest
import torch
from hub_fixtures import allow_stand_in_weights
from train_utils import TINY, run_train, tiny_overrides

from ssl_distill import hub
from ssl_distill.config import ConfigError, load_config
from ssl_distill.models import vit_tiny
from ssl_distill.train.checkpoint import load_checkpoint
from ssl_distill.train.trainer import Trainer


def _features(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.eval().forward_features(x)


@pytest.fixture
def released_backbone(tmp_path) -> tuple[torch.nn.Module, str]:
    """A 'released' ViT-Ti/8 trained at 64 px (an 8x8 position grid), saved as a plain state dict."""
    torch.manual_seed(11)
    model = vit_tiny(patch_size=8, img_size=64, init_values=1e-5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # not an initialisation: every tensor matters
    path = tmp_path / "released.pth"
    torch.save(model.state_dict(), path)
    return model.eval(), str(path)


def test_iteration_0_teacher_equals_the_pretrained_backbone(tmp_path, photo_folder, released_backbone, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model, path = released_backbone
    cfg = load_config(TINY, tiny_overrides(photo_folder, **{"student.pretrained_weights": path}))
    trainer = Trainer(cfg, tmp_path / "run")  # 32 px crops: the 8x8 grid is resampled to 4x4 as the reference does
    trainer.close()
    x = torch.randn(3, 3, 32, 32)
    want = _features(model, x)  # the released model resamples its position embedding at run time, the same way
    for got_model in (trainer.meta.teacher.backbone, trainer.meta.student.backbone):
        got = _features(got_model, x)
        for key in ("x_norm_clstoken", "x_norm_patchtokens"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
    assert trainer.meta.student.backbone.pos_embed.shape == (1, 1 + 16, 192)


def test_zoo_weights_need_a_matching_config(tmp_path, photo_folder, monkeypatch):
    monkeypatch.setenv("SSL_DISTILL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SSL_DISTILL_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    allow_stand_in_weights(monkeypatch)
    cache = tmp_path / "home" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(0)
    released = hub.load("dinov2_vits14", pretrained=False, depth=2)
    torch.save(released.state_dict(), cache / "dinov2_vits14_pretrain.pth")  # the official file, in the cache
    wrong = load_config(TINY, tiny_overrides(photo_folder, **{"student.pretrained_weights": "dinov2_vits14"}))
    with pytest.raises(ConfigError, match=r"dinov2_vits14' is a vit_small with 14 px patches and 0 registers.*set "
                                          r"student.arch=vit_small student.patch_size=14"):
        Trainer(wrong, tmp_path / "wrong")
    # described correctly (crops of 28 / 14 px for 14 px patches); depth=2 only because the stand-in is shallow
    cfg = load_config(TINY, tiny_overrides(photo_folder, **{
        "student.pretrained_weights": "dinov2_vits14", "student.arch": "vit_small", "student.patch_size": 14,
        "crops.global_crops_size": 28, "crops.local_crops_size": 14}))
    import ssl_distill.models.build as build

    real = build.build_backbone
    monkeypatch.setattr(build, "build_backbone", lambda name, **kw: real(name, **{**kw, "depth": 2}))
    trainer = Trainer(cfg, tmp_path / "right")
    trainer.close()
    x = torch.randn(2, 3, 28, 28)
    got, want = _features(trainer.meta.teacher.backbone, x), _features(released, x)
    torch.testing.assert_close(got["x_norm_clstoken"], want["x_norm_clstoken"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_heads_from_our_checkpoint_and_a_backbone_warm_up(tmp_path, photo_folder, released_backbone):
    # a training checkpoint carries heads and loss centres: take them too
    source = tmp_path / "source"
    assert run_train(source, tiny_overrides(photo_folder, **{"optim.epochs": 1})).returncode == 0
    ckpt = load_checkpoint(source / "model_0000004.pth")
    cfg = load_config(TINY, tiny_overrides(photo_folder, **{
        "student.pretrained_weights": str(source / "model_0000004.pth"), "student.pretrained_heads": True}))
    trainer = Trainer(cfg, tmp_path / "heads")
    trainer.close()
    for k, v in trainer.meta.student.dino_head.state_dict().items():
        assert torch.equal(v, ckpt["model"][f"teacher.dino_head.{k}"]), k
    assert torch.equal(trainer.meta.objective.dino_loss.center, ckpt["model"]["objective.dino_loss.center"])
    _, backbone_file = released_backbone
    with pytest.raises(ConfigError, match="pretrained_heads=true needs one of our training checkpoints.*backbone "
                                          "only"):
        Trainer(load_config(TINY, tiny_overrides(photo_folder, **{
            "student.pretrained_weights": backbone_file, "student.pretrained_heads": True})), tmp_path / "no")
    # fresh heads over a pretrained backbone: optim.freeze_backbone_epochs keeps the backbone fixed meanwhile
    out = tmp_path / "warm"
    overrides = tiny_overrides(photo_folder, **{"student.pretrained_weights": backbone_file, "optim.epochs": 2,
                                                "optim.freeze_backbone_epochs": 1, "train.checkpoint_period": 4,
                                                "train.keep_last_checkpoints": 0})
    assert run_train(out, overrides).returncode == 0
    first, second = (load_checkpoint(out / f"model_000000{i}.pth")["model"] for i in (4, 8))
    start = Trainer(load_config(TINY, overrides), tmp_path / "start")
    start.close()
    initial = start.meta.student.state_dict()
    backbone_keys = [k for k in initial if k.startswith("backbone.")]
    assert all(torch.equal(first[f"student.{k}"], initial[k]) for k in backbone_keys)  # frozen for 4 iterations
    assert not torch.equal(first["student.dino_head.mlp.0.weight"], initial["dino_head.mlp.0.weight"])
    assert not all(torch.equal(second[f"student.{k}"], initial[k]) for k in backbone_keys)  # then it learns
    # a resume never reads the pretrained weights again (the checkpoint has everything)
    (tmp_path / "released.pth").unlink()
    (out / "teacher_backbone.pth").unlink()
    more = tiny_overrides(photo_folder, **{"student.pretrained_weights": backbone_file, "optim.epochs": 3})
    proc = run_train(out, more)
    assert proc.returncode == 0, proc.stderr[-2000:]

"""timm's ViTs behind the backbone contract (models/contract.py, models/timm_vit.py): shapes, masks, keyed drop
path, resume, learning on the digits, export + eval-knn, continued pretraining from a timm weights file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from train_utils import TINY, cli_env, popen_train, run_train, tiny_overrides

from ssl_distill.config import ConfigError, load_config
from ssl_distill.models import Backbone, build_backbone, vit_tiny
from ssl_distill.models.contract import check_backbone
from ssl_distill.models.stochastic_depth import DropPath, DropPlan, kept_count, sample_keys
from ssl_distill.train.checkpoint import find_latest_checkpoint, load_checkpoint
from ssl_distill.train.metrics import read_metrics
from ssl_distill.train.trainer import Trainer

FAMILIES = ["vit_tiny_patch16_224", "deit3_small_patch16_224", "vit_small_patch14_reg4_dinov2",
            "eva02_small_patch14_224"]
SMALL = {"img_size": 32, "patch_size": 8, "depth": 2}  # a 4x4 grid at 32 px; two blocks keep the CPU time down


def _timm(name: str, **kw: object) -> torch.nn.Module:
    return build_backbone(f"timm/{name}", **{**SMALL, **kw})


def _reference(name: str, model: torch.nn.Module) -> torch.nn.Module:
    """timm's own model with the adapter's weights (all but iBOT's mask token)."""
    ref = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **SMALL)
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if k != "mask_token"}, strict=True)
    return ref.eval()


def test_both_backbones_satisfy_the_contract():
    for model in (vit_tiny(patch_size=8, img_size=32, depth=1), _timm("vit_tiny_patch16_224")):
        assert isinstance(model, Backbone)
        assert check_backbone(model) is model
    assert not isinstance(torch.nn.Linear(2, 2), Backbone)
    with pytest.raises(TypeError, match="lacks embed_dim.*forward_train"):
        check_backbone(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", FAMILIES)
def test_features_are_timms_and_training_outputs_have_the_contract_shapes(name):
    torch.manual_seed(0)
    model = _timm(name).eval()
    regs = 4 if "reg4" in name else 0
    assert (model.patch_size, model.n_blocks, model.num_register_tokens) == (8, 2, regs)
    x = torch.randn(2, 3, 40, 32)  # not the 32 px of the learned grid, not square: dynamic image size
    ref = _reference(name, model)
    tokens = ref.forward_features(x)
    want = (ref.fc_norm(tokens) if isinstance(ref.norm, torch.nn.Identity) else tokens)[:, 0]
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)
    g, loc = torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16)
    masks = torch.zeros(4, 16, dtype=torch.bool)
    masks[:, :5] = True
    sel = torch.tensor([0, 1, 17, 63])
    out_g, out_l = model.forward_train([g, loc], [masks, None], select_patches=[sel, None])
    D = model.embed_dim
    assert out_g["x_norm_clstoken"].shape == (4, D) and out_g["x_norm_selected_patchtokens"].shape == (4, D)
    assert out_l["x_norm_patchtokens"].shape == (6, 4, D) and out_l["x_norm_regtokens"].shape == (6, regs, D)
    assert out_l["x_prenorm"].shape == (6, 1 + regs + 4, D)
    full = model.forward_features(g, masks)
    torch.testing.assert_close(out_g["x_norm_selected_patchtokens"], full["x_norm_patchtokens"].flatten(0, 1)[sel])
    # masked patches see the mask token, not the image: a masked crop's features differ from the plain crop's, and
    # two images that differ only in masked patches give the same features
    assert not torch.allclose(full["x_norm_clstoken"], model.forward_features(g)["x_norm_clstoken"])
    other = g.clone()
    other[:, :, :8, :] = torch.randn(4, 3, 8, 32)  # the first patch row (patches 0-3) is masked
    torch.testing.assert_close(model.forward_features(other, masks)["x_norm_clstoken"], full["x_norm_clstoken"])
    attn = model.get_last_self_attention(g[:1])
    assert attn.shape[-1] == 1 + regs + 16 and torch.allclose(attn.sum(-1), torch.ones(()), atol=1e-5)
    layers = model.get_intermediate_layers(g, 2, reshape=True, return_class_token=True)
    assert layers[1][0].shape == (4, D, 4, 4) and layers[1][1].shape == (4, D)


def test_drop_path_uses_our_keyed_draws_and_replays_under_checkpointing():
    model = _timm("vit_tiny_patch16_224", drop_path_rate=0.5, drop_path_uniform=True).train()
    drops = [(blk.drop_path1, blk.drop_path2) for blk in model.blocks]
    assert [(a.stream, b.stream) for a, b in drops] == [(0, 1), (2, 3)]
    assert all(isinstance(d, DropPath) for pair in drops for d in pair)
    keys = sample_keys(7, torch.arange(100, 108), [0])
    seen: list[torch.Tensor] = []
    hook = model.blocks[1].drop_path2.register_forward_hook(lambda m, i, o: seen.append((o.flatten(1) != 0).any(1)))
    x = torch.randn(8, 3, 32, 32)
    torch.manual_seed(1)
    a = model.forward_train([x], sample_keys=[keys])[0]["x_norm_clstoken"]
    torch.manual_seed(2)  # torch's RNG does not matter, the keys do
    b = model.forward_train([x], sample_keys=[keys])[0]["x_norm_clstoken"]
    hook.remove()
    assert torch.equal(a, b)
    want = DropPlan({3: 0.5}, [(8, 1)], keys, "cpu").kept_samples(3)  # our ViT's draw for block 1, branch 2
    assert len(want) == kept_count(8, 0.5)
    assert seen[0].nonzero().flatten().tolist() == want
    other = sample_keys(8, torch.arange(100, 108), [0])
    assert not torch.equal(a, model.forward_train([x], sample_keys=[other])[0]["x_norm_clstoken"])
    grads = []
    for ckpt in (False, True):
        model.grad_checkpointing = ckpt
        model.zero_grad()
        out = model.forward_train([x], sample_keys=[keys])[0]["x_norm_clstoken"]
        out.square().sum().backward()
        grads.append((out.detach(), model.blocks[0].attn.qkv.weight.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1], atol=1e-6)
    assert all(d.step_plan is None for pair in drops for d in pair)  # the plan lives for one block call only


def test_optimizer_view_of_a_timm_backbone():
    model = _timm("vit_small_patch14_reg4_dinov2")
    assert model.layer_id("reg_token") == model.layer_id("patch_embed.proj.weight") == model.layer_id("mask_token") == 0
    assert model.layer_id("blocks.1.mlp.fc1.weight") == 2 and model.layer_id("norm.weight") == 3
    nwd = model.no_weight_decay()
    assert {"cls_token", "reg_token", "pos_embed", "mask_token", "blocks.0.ls1.gamma", "norm.weight"} <= nwd
    assert "blocks.0.attn.qkv.weight" not in nwd and "blocks.0.attn.qkv.bias" in nwd


def test_unknown_or_unsupported_timm_names_are_config_errors():
    with pytest.raises(ConfigError, match="timm has no model 'vit_smal_patch16_224'.*timm/vit_small_patch16_224"):
        load_config(None, ["student.arch=timm/vit_smal_patch16_224"])
    with pytest.raises(ConfigError, match="timm/resnet50 is not one of timm's ViTs"):
        load_config(None, ["student.arch=timm/resnet50"])
    with pytest.raises(ConfigError, match="not one of .*timm/<model name>"):
        load_config(None, ["student.arch=vit_huge"])
    with pytest.raises(ValueError, match="distillation token"):
        build_backbone("timm/deit_tiny_distilled_patch16_224", **SMALL)


def _timm_run(dataset: str, **extra: object) -> list[str]:
    opts = {"student.arch": "timm/vit_tiny_patch16_224", "student.depth": 2, "student.drop_path_rate": 0.2,
            "optim.epochs": 3, **extra}
    return tiny_overrides(dataset, **opts)


def _losses(out: Path) -> list[tuple[int, dict[str, float]]]:
    return [(r["iteration"], {k: v for k, v in r.items() if k.endswith("_loss")}) for r in read_metrics(out)]


@pytest.mark.slow
def test_sigkill_and_resume_of_a_timm_student_is_bit_identical(tmp_path, photo_folder):
    overrides = _timm_run(photo_folder)  # 12 iterations, a checkpoint every 2, drop path keyed by sample
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    done = run_train(ref, overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    proc = popen_train(killed, overrides)
    deadline = time.time() + 240
    while not (killed / "model_0000006.pth").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = run_train(killed, overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(killed) == _losses(ref)
    a = load_checkpoint(find_latest_checkpoint(ref))["model"]
    b = load_checkpoint(find_latest_checkpoint(killed))["model"]
    assert "student.backbone.mask_token" in a and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_timm_vit_learns_the_digits_exports_and_evaluates(tmp_path):
    """configs/small_data.yaml with a timm ViT-Ti (4 blocks, 8 px patches): the demo pretrains it on the digits and
    evaluates random init and the exported teacher by k-NN (measured: 74.4 vs 52.8 % at k=20 after 80 iterations;
    the teacher must be far above its random init, and the collapse monitor silent); then ``eval-knn`` runs on
    the export."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "ssl_distill.cli", "demo", "--config-file", "configs/small_data.yaml",
           "--output-dir", str(out), "student.arch=timm/vit_tiny_patch16_224", "optim.epochs=3",
           "train.num_workers=0", "crops.horizontal_flip_p=0"]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "demo_results.json").read_text())
    rows = {r["backbone"]: r["k=20 top-1 (%)"] for r in results["rows"]}
    assert rows["pretrained teacher"] >= rows["random init"] + 10, rows
    assert results["collapse_warning"] is None
    run = out / "run"
    exported = torch.load(run / "teacher_backbone.pth", weights_only=True)
    assert "mask_token" in exported and "blocks.3.attn.qkv.weight" in exported  # timm's keys
    knn = subprocess.run(
        [sys.executable, "-m", "ssl_distill.cli", "eval-knn", "--pretrained-weights", str(run / "teacher_backbone.pth"),
         "--config-file", str(run / "config.yaml"), "--train-dataset", str(out / "digits" / "train"),
         "--val-dataset", str(out / "digits" / "val"), "--output-dir", str(tmp_path / "knn"), "--image-size", "32",
         "--nb-knn", "20", "--num-workers", "0", "--device", "cpu"],
        env=cli_env(), capture_output=True, text=True, timeout=600)
    assert knn.returncode == 0, knn.stderr[-3000:]
    results = json.loads((tmp_path / "knn" / "results_eval_knn.json").read_text())["results"]
    top1 = [v["top1"] for per_k in results.values() for v in per_k.values()]
    assert top1 and abs(top1[0] - rows["pretrained teacher"]) < 0.05, (top1, rows)  # the demo's k-NN, same features


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_continued_pretraining_from_a_timm_weights_file(tmp_path, photo_folder, fmt, monkeypatch):
    """A timm classifier's weights file (trained at 64 px: a 4x4 grid of 16 px patches) starts student and teacher:
    the classifier is dropped, the position embedding resampled to the 32 px crops as timm does at run time."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.manual_seed(3)
    released = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64, depth=2,
                                 dynamic_img_size=True)
    with torch.no_grad():
        for p in released.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / f"released.{fmt}"
    if fmt == "pth":
        torch.save(released.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in released.state_dict().items()}, str(path))
    cfg = load_config(TINY, _timm_run(photo_folder, **{"student.patch_size": 16, "student.pretrained_weights": path,
                                                       "student.drop_path_rate": 0.0}))
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.close()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = released.eval().forward_features(x)[:, 0]
        for backbone in (trainer.meta.teacher.backbone, trainer.meta.student.backbone):
            torch.testing.assert_close(backbone.eval()(x), want, rtol=1e-5, atol=1e-5)
    assert trainer.meta.student.backbone.pos_embed.shape == (1, 1 + 4, 192)

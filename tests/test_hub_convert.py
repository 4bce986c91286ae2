"""Weights formats: DINOv2 (ours) <-> timm (checked against timm's own forward) and Hugging Face layouts; CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from ssl_distill import hub
from ssl_distill.cli import main
from ssl_distill.hub import HubError
from ssl_distill.hub.convert import (
    convert_state_dict,
    detect_format,
    dinov2_to_hf,
    dinov2_to_timm,
    hf_to_dinov2,
    read_weights,
    save_weights,
    timm_to_dinov2,
)
from ssl_distill.models import VisionTransformer, vit_giant2


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial tokens, position embeddings, norms and LayerScale so every converted tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k.endswith("gamma") or ("norm" in k and k.endswith("weight")):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "token" in k or "pos_embed" in k or "norm" in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def assert_sd_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------- timm reference
@pytest.mark.parametrize("name,timm_name,R", [("dinov2_vits14", "vit_small_patch14_dinov2", 0),
                                              ("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2", 4)])
def test_export_to_timm_gives_timm_the_same_features_at_518(name: str, timm_name: str, R: int) -> None:
    torch.manual_seed(0)
    ours = randomise(hub.load(name, pretrained=False, depth=2))
    ref = timm.create_model(timm_name, pretrained=False, img_size=518, depth=2).eval()
    ref.load_state_dict(convert_state_dict(ours.state_dict(), "dinov2", "timm"), strict=True)
    x = torch.randn(2, 3, 518, 518)
    with torch.no_grad():
        o, t = ours.forward_features(x), ref.forward_features(x)
    assert t.shape == (2, 1 + R + 37 * 37, 384)
    torch.testing.assert_close(o["x_norm_clstoken"], t[:, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o["x_norm_patchtokens"], t[:, 1 + R :], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o["x_norm_regtokens"], t[:, 1 : 1 + R], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("timm_name,R", [("vit_small_patch14_reg4_dinov2", 4), ("vit_giant_patch14_dinov2", 0)])
def test_timm_round_trip_and_swiglu(timm_name: str, R: int) -> None:
    torch.manual_seed(1)
    small = dict(img_size=56, depth=2, embed_dim=96, num_heads=4)  # giant: SwiGLU hidden 256, packed fc1 = 512
    ref = randomise(timm.create_model(timm_name, pretrained=False, **small), seed=1)
    sd = ref.state_dict()
    assert detect_format(sd) == "timm"
    native = convert_state_dict(sd, "timm", "ssl_distill")
    assert torch.count_nonzero(native["mask_token"]) == 0
    ffn = "swiglufused" if "giant" in timm_name else "mlp"
    ours = vit_giant2(patch_size=14, init_values=1.0, num_register_tokens=R, ffn_layer=ffn, **small).eval()
    ours.load_state_dict(native, strict=True)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        o, t = ours.forward_features(x), ref.forward_features(x)
    torch.testing.assert_close(o["x_norm_clstoken"], t[:, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o["x_norm_patchtokens"], t[:, 1 + R :], atol=1e-4, rtol=1e-4)
    assert_sd_equal(dinov2_to_timm(native), sd)  # timm -> ours -> timm is exact


def test_every_zoo_entry_matches_timm_key_layout_on_meta() -> None:
    for entry in hub.MODELS.values():
        with torch.device("meta"):
            ours = hub.load(entry.name, pretrained=False).state_dict()
            theirs = timm.create_model(entry.timm_name, pretrained=False).state_dict()
        exported = dinov2_to_timm(ours)
        assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
        back = timm_to_dinov2(theirs)
        assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in ours.items()}


# ---------------------------------------------------------------------------------------- Hugging Face
def hf_layout_by_hand(sd: dict, depth: int, D: int, swiglu: bool, prefix: str = "") -> dict:
    """The documented transformers Dinov2Model key layout, written out independently of the converter."""
    hf = {prefix + "embeddings.cls_token": sd["cls_token"], prefix + "embeddings.mask_token": sd["mask_token"],
          prefix + "embeddings.position_embeddings": sd["pos_embed"],
          prefix + "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
          prefix + "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
          prefix + "layernorm.weight": sd["norm.weight"], prefix + "layernorm.bias": sd["norm.bias"]}
    if "register_tokens" in sd:
        hf[prefix + "embeddings.register_tokens"] = sd["register_tokens"]
    for i in range(depth):
        h, b = f"{prefix}encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            qkv = sd[b + f"attn.qkv.{p}"]
            hf[h + f"attention.attention.query.{p}"] = qkv[:D]
            hf[h + f"attention.attention.key.{p}"] = qkv[D : 2 * D]
            hf[h + f"attention.attention.value.{p}"] = qkv[2 * D :]
            hf[h + f"attention.output.dense.{p}"] = sd[b + f"attn.proj.{p}"]
            hf[h + f"norm1.{p}"] = sd[b + f"norm1.{p}"]
            hf[h + f"norm2.{p}"] = sd[b + f"norm2.{p}"]
            if swiglu:
                hf[h + f"mlp.weights_in.{p}"] = sd[b + f"mlp.w12.{p}"]
                hf[h + f"mlp.weights_out.{p}"] = sd[b + f"mlp.w3.{p}"]
            else:
                hf[h + f"mlp.fc1.{p}"] = sd[b + f"mlp.fc1.{p}"]
                hf[h + f"mlp.fc2.{p}"] = sd[b + f"mlp.fc2.{p}"]
        hf[h + "layer_scale1.lambda1"] = sd[b + "ls1.gamma"]
        hf[h + "layer_scale2.lambda1"] = sd[b + "ls2.gamma"]
    return hf


@pytest.mark.parametrize("swiglu,R", [(False, 0), (True, 4)])
def test_hugging_face_layout_round_trip(swiglu: bool, R: int) -> None:
    torch.manual_seed(2)
    ours = randomise(VisionTransformer(img_size=28, patch_size=14, embed_dim=48, depth=3, num_heads=3,
                                       init_values=1.0, num_register_tokens=R,
                                       ffn_layer="swiglufused" if swiglu else "mlp"))
    sd = ours.state_dict()
    hf = hf_layout_by_hand(sd, 3, 48, swiglu)
    assert detect_format(hf) == "hf"
    assert_sd_equal(hf_to_dinov2(hf), sd)
    assert_sd_equal(dinov2_to_hf(sd), hf)
    # Dinov2ForImageClassification-style checkpoint: model prefix + classifier head
    wrapped = {**hf_layout_by_hand(sd, 3, 48, swiglu, prefix="dinov2."), "classifier.weight": torch.zeros(10, 96)}
    assert_sd_equal(convert_state_dict(wrapped, "auto", "ssl_distill"), sd)


def test_bad_layouts_are_clear_errors() -> None:
    ours = VisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=2, init_values=1.0)
    hf = hf_layout_by_hand(ours.state_dict(), 1, 32, False)
    with pytest.raises(HubError, match="unexpected keys.*encoder.layer.0.foo.weight"):
        hf_to_dinov2({**hf, "encoder.layer.0.foo.weight": torch.zeros(1)})
    del hf["encoder.layer.0.attention.attention.key.bias"]
    with pytest.raises(HubError, match="lacks \\['key'\\]"):
        hf_to_dinov2(hf)
    with pytest.raises(HubError, match="cannot recognise"):
        detect_format({"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(HubError, match="unknown weights format 'onnx'"):
        convert_state_dict(ours.state_dict(), "onnx")
    with pytest.raises(HubError, match="unexpected keys: head.weight"):
        convert_state_dict({**ours.state_dict(), "head.weight": torch.zeros(3)}, "dinov2")


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_convert_round_trips_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(3)
    ref = randomise(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, depth=1))
    save_weights(ref.state_dict(), tmp_path / "timm.safetensors")
    assert main(["convert", "--from", "timm", "--to", "ssl_distill", str(tmp_path / "timm.safetensors"),
                 str(tmp_path / "ours.pth")]) == 0
    assert "ours.pth" in capsys.readouterr().out
    ours = hub.load("dinov2_vits14_reg", weights=tmp_path / "ours.pth", img_size=56, depth=1)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref.forward_features(x)[:, 0], atol=1e-4, rtol=1e-4)
    assert main(["convert", "--to", "hf", str(tmp_path / "ours.pth"), str(tmp_path / "hf.safetensors")]) == 0
    assert detect_format(read_weights(tmp_path / "hf.safetensors")) == "hf"
    assert main(["convert", "--from", "hf", "--to", "timm", str(tmp_path / "hf.safetensors"),
                 str(tmp_path / "back.pth")]) == 0
    assert_sd_equal(torch.load(tmp_path / "back.pth", weights_only=True), ref.state_dict())
    (tmp_path / "notes.pth").write_text("not weights")
    assert main(["convert", "--from", "timm", str(tmp_path / "notes.pth"), str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err
    assert "cannot read weights file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.pth").exists()

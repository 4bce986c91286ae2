"""Weights formats: DINOv2 (ours) <-> timm, checked against timm's own forward; layout errors; `ssl-distill convert`.

The Hugging Face side is tested against transformers itself in tests/test_hub_hf.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from hub_fixtures import assert_same_tokens, assert_sd_equal, randomise

from ssl_distill import hub
from ssl_distill.cli import main
from ssl_distill.hub import HubError
from ssl_distill.hub.convert import (
    convert_state_dict,
    detect_format,
    dinov2_to_timm,
    save_weights,
    timm_to_dinov2,
)
from ssl_distill.hub.resolve import read_weights
from ssl_distill.models import VisionTransformer, vit_giant2


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
    assert_same_tokens(o, t, R)


TIMM_VARIANTS = [("vit_small_patch14_dinov2", 0, "mlp"), ("vit_small_patch14_reg4_dinov2", 4, "mlp"),
                 ("vit_giant_patch14_dinov2", 0, "swiglufused"), ("vit_giant_patch14_reg4_dinov2", 4, "swiglufused")]
SMALL = dict(img_size=56, depth=2, embed_dim=96, num_heads=4)  # giant: SwiGLU hidden 256, packed fc1 = 512


@pytest.mark.parametrize("timm_name,R,ffn", TIMM_VARIANTS)
def test_timm_both_directions_same_tokens(timm_name: str, R: int, ffn: str) -> None:
    """ours -> timm and timm -> ours: same CLS, register and patch tokens on the native 4 x 4 grid."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 56, 56)
    ours = randomise(vit_giant2(patch_size=14, init_values=1.0, num_register_tokens=R, ffn_layer=ffn, **SMALL), 1)
    theirs = timm.create_model(timm_name, pretrained=False, **SMALL).eval()
    theirs.load_state_dict(convert_state_dict(ours.state_dict(), "dinov2", "timm"), strict=True)
    with torch.no_grad():
        assert_same_tokens(ours.forward_features(x), theirs.forward_features(x), R)

    theirs = randomise(timm.create_model(timm_name, pretrained=False, **SMALL), seed=2)
    sd = theirs.state_dict()
    assert detect_format(sd) == "timm"
    native = convert_state_dict(sd, "auto", "ssl_distill")
    assert torch.count_nonzero(native["mask_token"]) == 0
    ours.load_state_dict(native, strict=True)
    with torch.no_grad():
        assert_same_tokens(ours.forward_features(x), theirs.forward_features(x), R)
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


def test_bad_layouts_are_clear_errors() -> None:
    ours = VisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=2, init_values=1.0)
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
    assert "give a directory as OUT" in capsys.readouterr().out
    assert detect_format(read_weights(tmp_path / "hf.safetensors")) == "hf"
    assert main(["convert", "--from", "hf", "--to", "timm", str(tmp_path / "hf.safetensors"),
                 str(tmp_path / "back.pth")]) == 0
    assert_sd_equal(torch.load(tmp_path / "back.pth", weights_only=True), ref.state_dict())
    (tmp_path / "notes.pth").write_text("not weights")
    assert main(["convert", "--from", "timm", str(tmp_path / "notes.pth"), str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err
    assert "cannot read weights file" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.pth").exists()


@pytest.mark.parametrize("R", [0, 4])
def test_cli_ours_to_timm_to_ours(R: int, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Bit-exact features; the state dict too, except what timm's layout has no place for (documented)."""
    ours = randomise(VisionTransformer(img_size=28, patch_size=14, embed_dim=64, depth=2, num_heads=1,
                                       init_values=1.0, num_register_tokens=R), seed=5)
    save_weights(ours.state_dict(), tmp_path / "ours.pth")
    assert main(["convert", "--to", "timm", str(tmp_path / "ours.pth"), str(tmp_path / "timm.safetensors")]) == 0
    out = capsys.readouterr().out
    assert ("no registers" in out and "28x28 px" in out and "MODEL_ZOO.md" in out) == (R == 0)
    assert main(["convert", "--from", "timm", str(tmp_path / "timm.safetensors"), str(tmp_path / "back.pth")]) == 0
    back = read_weights(tmp_path / "back.pth")
    sd = ours.state_dict()
    assert torch.count_nonzero(back.pop("mask_token")) == 0
    assert torch.count_nonzero(sd.pop("mask_token")) > 0
    if R:  # the class position moves into cls_token: their sum, all the forward pass uses, is the same
        torch.testing.assert_close(back.pop("cls_token"), sd.pop("cls_token") + sd["pos_embed"][:, :1], rtol=0, atol=0)
        assert torch.count_nonzero(back["pos_embed"][:, 0]) == 0
        back["pos_embed"], sd["pos_embed"] = back["pos_embed"][:, 1:], sd["pos_embed"][:, 1:]
    assert_sd_equal(back, sd)
    model = hub.load("dinov2_vits14", weights=tmp_path / "back.pth", img_size=28, embed_dim=64, depth=2, num_heads=1,
                     num_register_tokens=R)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        a, b = model.forward_features(x), ours.forward_features(x)
    for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
        assert torch.equal(a[key], b[key]), key

"""Hugging Face interop tested against transformers itself: both key spellings, config.json, both directions,
`ssl-distill convert` round trips, and where position-embedding resizing agrees (also with timm)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from hub_fixtures import assert_same_tokens, assert_sd_equal, randomise
from transformers import (  # the dev extra installs transformers>=5 (tested: 5.24.0)
    AutoModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

from ssl_distill import hub
from ssl_distill.cli import main
from ssl_distill.hub import HubError
from ssl_distill.hub.convert import (
    convert_state_dict,
    detect_format,
    export_weights,
    save_weights,
    to_dinov2,
)
from ssl_distill.hub.hf import hf_config, hf_to_dinov2
from ssl_distill.hub.resolve import read_weights
from ssl_distill.models import VisionTransformer

VARIANTS = [(0, "mlp"), (4, "mlp"), (0, "swiglufused"), (4, "swiglufused")]
WIDTH, DEPTH, HEADS, SIZE = 128, 2, 2, 56  # a 4 x 4 grid of 14 px patches


def ours_model(R: int, ffn: str, seed: int = 0) -> VisionTransformer:
    model = VisionTransformer(img_size=SIZE, patch_size=14, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                              init_values=1.0, num_register_tokens=R, ffn_layer=ffn)
    return randomise(model, seed)


def hf_model(R: int, ffn: str, seed: int | None = None) -> torch.nn.Module:
    kw = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=SIZE, patch_size=14,
              use_swiglu_ffn=ffn != "mlp")
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=R, **kw)) if R else \
        Dinov2Model(Dinov2Config(**kw))
    return randomise(model, seed) if seed is not None else model.eval()


def tokens(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' normalised tokens ``(B, 1 + R + N, D)``."""
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state


def features(model: VisionTransformer, x: torch.Tensor) -> dict:
    with torch.no_grad():
        return model.forward_features(x)


@pytest.mark.parametrize("R,ffn", VARIANTS)
def test_ours_to_transformers_in_both_spellings(R: int, ffn: str, tmp_path: Path) -> None:
    ours = ours_model(R, ffn)
    x = torch.randn(2, 3, SIZE, SIZE)
    live = hf_model(R, ffn)  # transformers 5 in memory: q_proj/..., gate_proj/up_proj/down_proj
    live.load_state_dict(convert_state_dict(ours.state_dict(), "dinov2", "hf", hf_keys="memory"), strict=True)
    assert_same_tokens(features(ours, x), tokens(live, x), R)

    written = export_weights(ours.state_dict(), tmp_path / "export", "hf")  # disk spelling + config.json
    assert [p.name for p in written] == ["model.safetensors", "config.json"]
    cls = Dinov2WithRegistersModel if R else Dinov2Model
    loaded, info = cls.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    assert_same_tokens(features(ours, x), tokens(loaded.eval(), x), R)
    assert type(AutoModel.from_pretrained(tmp_path / "export")) is cls
    export_weights(ours.state_dict(), tmp_path / "memory", "hf", hf_keys="memory")  # from_pretrained reads it too
    loaded, info = cls.from_pretrained(tmp_path / "memory", output_loading_info=True)
    assert not any(info.values()), info
    assert_same_tokens(features(ours, x), tokens(loaded.eval(), x), R)


@pytest.mark.parametrize("R,ffn", VARIANTS)
def test_transformers_to_ours_from_both_spellings(R: int, ffn: str, tmp_path: Path) -> None:
    theirs = hf_model(R, ffn, seed=3)
    x = torch.randn(2, 3, SIZE, SIZE)
    in_memory = theirs.state_dict()
    assert detect_format(in_memory) == "hf"
    native = to_dinov2(in_memory)
    ours = ours_model(R, ffn)
    ours.load_state_dict(native, strict=True)
    assert_same_tokens(features(ours, x), tokens(theirs, x), R)
    theirs.save_pretrained(tmp_path / "saved")
    on_disk = read_weights(tmp_path / "saved" / "model.safetensors")
    assert set(on_disk) != set(in_memory)  # the two spellings really differ ...
    assert_sd_equal(to_dinov2(on_disk), native)  # ... and give the same backbone


@pytest.mark.parametrize("keys", ["disk", "memory"])
@pytest.mark.parametrize("R,ffn", [(0, "mlp"), (4, "swiglufused")])
def test_cli_round_trip_through_hf_is_bit_exact(keys: str, R: int, ffn: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    ours = ours_model(R, ffn, seed=4)
    save_weights(ours.state_dict(), tmp_path / "ours.pth")
    assert main(["convert", "--to", "hf", "--hf-keys", keys, str(tmp_path / "ours.pth"), str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert f"({keys} key names)" in out
    assert "config.json" in out
    assert ("no registers" in out and "56x56 px" in out) == (R == 0)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["num_register_tokens"] if R else 0) == \
        (WIDTH, WIDTH // 64, R)
    back = tmp_path / "back.pth"
    assert main(["convert", "--from", "hf", str(tmp_path / "hf" / "model.safetensors"), str(back)]) == 0
    assert_sd_equal(read_weights(back), ours.state_dict())


def test_hf_file_names_and_classification_checkpoints(tmp_path: Path) -> None:
    ours = ours_model(0, "mlp")
    export_weights(ours.state_dict(), tmp_path / "d" / "pytorch_model.bin", "hf")  # save_pretrained's name
    assert (tmp_path / "d" / "config.json").is_file()
    export_weights(ours.state_dict(), tmp_path / "e" / "vits.safetensors", "hf")  # any other name: weights alone
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["vits.safetensors"]
    clf = Dinov2ForImageClassification(Dinov2Config(hidden_size=WIDTH, num_hidden_layers=DEPTH,
                                                    num_attention_heads=HEADS, image_size=SIZE, patch_size=14,
                                                    num_labels=7))
    sd = clf.state_dict()  # "dinov2." prefix + "classifier.*" head
    assert_sd_equal(to_dinov2(sd), to_dinov2(clf.dinov2.state_dict()))


def test_hf_mistakes_are_clear_errors() -> None:
    sd = hf_model(0, "swiglufused").state_dict()
    with pytest.raises(HubError, match="unexpected keys for a Hugging Face Dinov2Model: encoder.layer.0.foo.weight"):
        hf_to_dinov2({**sd, "encoder.layer.0.foo.weight": torch.zeros(1)})
    del sd["encoder.layer.1.attention.v_proj.bias"], sd["encoder.layer.0.mlp.up_proj.weight"]
    with pytest.raises(HubError, match=r"encoder\.layer\.0\.mlp\.up_proj\.weight missing"):
        hf_to_dinov2(sd)
    native = ours_model(0, "mlp").state_dict()
    with pytest.raises(HubError, match="unknown Hugging Face key spelling 'v5'.*'disk'.*'memory'"):
        convert_state_dict(native, "dinov2", "hf", hf_keys="v5")
    odd = VisionTransformer(img_size=28, patch_size=14, embed_dim=96, depth=1, num_heads=3, init_values=1.0,
                            mlp_ratio=2.5).state_dict()
    with pytest.raises(HubError, match="cannot infer the number of attention heads.*--num-heads"):
        hf_config(odd)
    with pytest.raises(HubError, match="no integer mlp_ratio"):
        hf_config(odd, num_heads=3)


# ------------------------------------------------------------------- position embeddings at other sizes
@pytest.mark.parametrize("name,timm_name,R", [("dinov2_vits14", "vit_small_patch14_dinov2", 0),
                                              ("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2", 4)])
def test_position_embedding_resizing_agrees_where_documented(name: str, timm_name: str, R: int,
                                                             tmp_path: Path) -> None:
    """MODEL_ZOO.md: with registers all three resize identically; without, timm and transformers agree with the
    official code only at the learned 37 x 37 grid (518 px)."""
    ours = randomise(hub.load(name, pretrained=False, depth=1), seed=6)
    sd = ours.state_dict()
    with_timm = timm.create_model(timm_name, pretrained=False, img_size=518, depth=1, dynamic_img_size=True).eval()
    with_timm.load_state_dict(convert_state_dict(sd, "dinov2", "timm"), strict=True)
    export_weights(sd, tmp_path / "hf", "hf")
    with_hf = AutoModel.from_pretrained(tmp_path / "hf").eval()
    for size in [(518, 518), (224, 224), (518, 252)]:
        x = torch.randn(1, 3, *size)
        ref = features(ours, x)
        with torch.no_grad():
            others = {"timm": with_timm.forward_features(x), "hf": tokens(with_hf, x)}
        for lib, out in others.items():
            gap = (ref["x_norm_patchtokens"] - out[:, 1 + R :]).abs().max().item()
            exact = R > 0 or size == (518, 518)
            assert (gap < 1e-4) == exact, (lib, size, gap)

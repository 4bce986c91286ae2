"""Model-zoo registry: architectures, parameter counts, URLs, names; hubconf / torch.hub; `ssl-distill models`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ssl_distill import hub
from ssl_distill.cli import main
from ssl_distill.hub import HubError
from ssl_distill.hub.registry import LINEAR_HEADS, format_table, get_linear_head, markdown_table
from ssl_distill.models.layers import SwiGLUFFNFused

REPO = Path(__file__).resolve().parents[1]

# Written out from the DINOv2 hubconf / README, independently of the registry:
# name -> (width, depth, heads, registers, swiglu, published k-NN, published linear, published params in M)
OFFICIAL = {
    "dinov2_vits14": (384, 12, 6, 0, False, 79.0, 81.1, 21),
    "dinov2_vits14_reg": (384, 12, 6, 4, False, 79.1, 80.9, 21),
    "dinov2_vitb14": (768, 12, 12, 0, False, 82.1, 84.5, 86),
    "dinov2_vitb14_reg": (768, 12, 12, 4, False, 82.0, 84.6, 86),
    "dinov2_vitl14": (1024, 24, 16, 0, False, 83.5, 86.3, 300),
    "dinov2_vitl14_reg": (1024, 24, 16, 4, False, 83.8, 86.7, 300),
    "dinov2_vitg14": (1536, 40, 24, 0, True, 83.5, 86.5, 1100),
    "dinov2_vitg14_reg": (1536, 40, 24, 4, True, 83.7, 87.1, 1100),
}


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_DISTILL_BASE_URL", raising=False)


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_architectures_and_parameter_counts(name: str) -> None:
    D, depth, heads, R, swiglu, knn, linear, published_m = OFFICIAL[name]
    entry = hub.get_model(name)
    with torch.device("meta"):
        model = hub.load(name, pretrained=False)
    assert (model.embed_dim, model.n_blocks, model.num_heads, model.num_register_tokens) == (D, depth, heads, R)
    assert model.patch_size == 14
    assert model.pos_embed.shape == (1, 1 + 37 * 37, D)  # 518 px / 14 = 37
    assert entry.arch_kwargs["init_values"] == 1.0
    assert entry.arch_kwargs["img_size"] == 518
    assert isinstance(model.blocks[0].mlp, SwiGLUFFNFused) == swiglu
    assert (model.interpolate_antialias, model.interpolate_offset) == ((True, 0.0) if R else (False, 0.1))
    n = sum(p.numel() for p in model.parameters())
    assert entry.params == n
    assert abs(n / 1e6 - published_m) / published_m < 0.06  # published counts are rounded ("21 M", "1,100 M")
    assert (entry.knn_top1, entry.linear_top1) == (knn, linear)
    assert entry.license == "Apache-2.0"
    assert entry.sha256 is None


def test_layerscale_starts_at_one() -> None:
    model = hub.load("dinov2_vits14_reg", pretrained=False, depth=1)
    assert torch.equal(model.blocks[0].ls1.gamma, torch.ones(384))
    assert torch.equal(model.blocks[0].ls2.gamma, torch.ones(384))


def test_official_urls_and_mirror_override(monkeypatch: pytest.MonkeyPatch) -> None:
    assert list(hub.MODELS) == list(OFFICIAL)
    assert hub.get_model("dinov2_vits14").url() == \
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
    assert hub.get_model("dinov2_vits14_reg").url() == \
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"
    assert hub.get_model("dinov2_vitg14_reg").url() == \
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth"
    monkeypatch.setenv("SSL_DISTILL_BASE_URL", "http://mirror.local/models/dinov2/")
    assert hub.get_model("dinov2_vitl14").url() == \
        "http://mirror.local/models/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"


def test_linear_head_urls_follow_the_official_naming(monkeypatch: pytest.MonkeyPatch) -> None:
    base = "https://dl.fbaipublicfiles.com/dinov2"
    assert len(LINEAR_HEADS) == 16
    assert {b for b, _ in LINEAR_HEADS} == set(OFFICIAL)
    assert get_linear_head("dinov2_vits14").url() == f"{base}/dinov2_vits14/dinov2_vits14_linear4_head.pth"
    assert get_linear_head("dinov2_vitb14", 1).url() == f"{base}/dinov2_vitb14/dinov2_vitb14_linear_head.pth"
    assert get_linear_head("dinov2_vitg14_reg", 1).url() == \
        f"{base}/dinov2_vitg14/dinov2_vitg14_reg4_linear_head.pth"
    assert get_linear_head("dinov2_vitl14_reg", 4).filename == "dinov2_vitl14_reg4_linear4_head.pth"
    monkeypatch.setenv("SSL_DISTILL_BASE_URL", "http://mirror.local/dinov2")
    assert get_linear_head("dinov2_vits14_reg").url() == \
        "http://mirror.local/dinov2/dinov2_vits14/dinov2_vits14_reg4_linear4_head.pth"
    with pytest.raises(HubError, match="no published linear head for 'vit_ours'.*eval-linear"):
        get_linear_head("vit_ours")


def test_unknown_names_suggest_the_nearest() -> None:
    with pytest.raises(HubError, match="unknown model 'dinov2_vitb14_regs'.*Did you mean 'dinov2_vitb14_reg'"):
        hub.get_model("dinov2_vitb14_regs")
    with pytest.raises(HubError, match="Known models: dinov2_vits14, "):
        hub.load("resnet50")


def test_hubconf_exposes_the_registry_names_and_loads_locally() -> None:
    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    public = {f for f in dir(module) if callable(getattr(module, f)) and not f.startswith("_")}  # torch.hub.list
    assert public == set(hub.MODELS) | {f"{name}_lc" for name in hub.MODELS}  # backbones + linear classifiers
    model = torch.hub.load(str(REPO), "dinov2_vits14_reg", source="local", pretrained=False, depth=1)
    assert model.num_register_tokens == 4
    assert model.embed_dim == 384
    assert len(model.blocks) == 1
    assert not model.training


def test_cli_models_table_and_json(capsys: pytest.CaptureFixture) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name, (*_, knn, linear, _m) in OFFICIAL.items():
        row = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert f"{knn:.1f}" in row
        assert f"{linear:.1f}" in row
        assert "Apache-2.0" in row
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(OFFICIAL)
    assert rows[0]["url"].endswith("/dinov2_vits14/dinov2_vits14_pretrain.pth")
    assert rows[0]["sha256"] is None
    assert rows[6]["arch_kwargs"]["ffn_layer"] == "swiglufused"


def test_model_zoo_md_shows_the_registry_table() -> None:
    text = (REPO / "MODEL_ZOO.md").read_text(encoding="utf-8")
    assert markdown_table() in text
    assert len(format_table().splitlines()) == 2 + len(OFFICIAL)

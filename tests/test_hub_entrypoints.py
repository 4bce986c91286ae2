"""The official DINOv2 torch.hub calls, unchanged, against our hubconf.py: every official backbone and linear
classifier name, the official arguments, heads from the official URLs (served on 127.0.0.1) or the cache, and
heads saved by `ssl-distill eval-linear`; outputs checked against the official computation written out here."""

from __future__ import annotations

import importlib.util
import json
from enum import Enum
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hub_fixtures import allow_stand_in_weights, randomise, serve_directory

from ssl_distill import hub
from ssl_distill.hub import HubError
from ssl_distill.hub.entrypoints import LinearClassifier

REPO = Path(__file__).resolve().parents[1]
# facebookresearch/dinov2 hubconf.py: backbones and linear classifiers (depth heads and dino.txt are not provided)
OFFICIAL = [f"dinov2_vit{s}14{reg}{lc}" for s in "sblg" for reg in ("", "_reg") for lc in ("", "_lc")]


class Weights(Enum):  # what `from dinov2.hub.backbones import Weights` gives
    LVD142M = "LVD142M"


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SSL_DISTILL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SSL_DISTILL_BASE_URL", raising=False)
    monkeypatch.delenv("SSL_DISTILL_OFFLINE", raising=False)
    allow_stand_in_weights(monkeypatch)  # shallow models stand in for the official files
    (tmp_path / "home" / "checkpoints").mkdir(parents=True)
    return tmp_path / "home" / "checkpoints"


def hub_load(name: str, **kwargs) -> torch.nn.Module:
    return torch.hub.load(str(REPO), name, source="local", **kwargs)


def official_logits(backbone: torch.nn.Module, head: dict, layers: int, x: torch.Tensor) -> torch.Tensor:
    """dinov2.hub.classifiers._LinearClassifierWrapper.forward, written out: images (B, 3, H, W) -> (B, 1000)."""
    with torch.no_grad():
        if layers == 1:
            out = backbone.forward_features(x)
            linear_input = torch.cat([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(dim=1)], dim=1)
        else:
            out = backbone.get_intermediate_layers(x, n=4, return_class_token=True)
            linear_input = torch.cat([out[0][1], out[1][1], out[2][1], out[3][1], out[3][0].mean(dim=1)], dim=1)
        return F.linear(linear_input, head["weight"], head["bias"])


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_official_backbone_and_classifier_name_is_listed() -> None:
    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    public = [f for f in dir(module) if callable(getattr(module, f)) and not f.startswith("_")]  # torch.hub.list
    assert sorted(public) == sorted(OFFICIAL)
    assert "block_chunks" in module.dinov2_vitg14_reg.__doc__
    assert "layers" in module.dinov2_vitg14_reg_lc.__doc__


def test_official_backbone_calls_offline_from_the_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = hub_load("dinov2_vits14", pretrained=False, block_chunks=0)  # the acceptance call, verbatim
    assert len(model.blocks) == 12
    assert model.embed_dim == 384
    assert model.interpolate_offset == 0.1
    ref = randomise(hub.load("dinov2_vits14", pretrained=False, depth=2), seed=1)
    torch.save(ref.state_dict(), cache / "dinov2_vits14_pretrain.pth")  # a file placed in the cache
    monkeypatch.setenv("SSL_DISTILL_OFFLINE", "1")
    for weights in ("LVD142M", Weights.LVD142M):
        assert same_weights(hub_load("dinov2_vits14", weights=weights, block_chunks=4, depth=2), ref)
    assert same_weights(hub_load("dinov2_vits14", depth=2), ref)  # default: pretrained, LVD142M
    # every architecture argument of the reference DinoVisionTransformer is accepted
    model = hub_load("dinov2_vitb14_reg", pretrained=False, img_size=224, patch_size=14, in_chans=3, depth=2,
                     mlp_ratio=4, qkv_bias=True, ffn_bias=True, proj_bias=True, drop_path_rate=0.1,
                     drop_path_uniform=True, init_values=1e-5, ffn_layer="swiglufused", block_chunks=1,
                     num_register_tokens=2, interpolate_antialias=False, interpolate_offset=0.1)
    assert model.pos_embed.shape == (1, 1 + 16 * 16, 768)
    assert model.num_register_tokens == 2
    assert (model.interpolate_antialias, model.interpolate_offset) == (False, 0.1)


def test_official_argument_mistakes_are_clear_errors() -> None:
    with pytest.raises(HubError, match="weights='LVD1689M' is neither the official 'LVD142M'.*file path"):
        hub_load("dinov2_vits14", weights="LVD1689M")
    with pytest.raises(HubError, match="unsupported weights.*official enum is 'IMAGENET1K'"):
        hub_load("dinov2_vits14_lc", weights=Weights.LVD142M)
    with pytest.raises(HubError, match="act_layer .*cannot be passed"):
        hub_load("dinov2_vits14", pretrained=False, act_layer=torch.nn.GELU)
    with pytest.raises(HubError, match="unknown argument\\(s\\) num_layers; the architecture arguments are"):
        hub_load("dinov2_vits14", pretrained=False, num_layers=2)
    with pytest.raises(HubError, match="layers=2 is not supported.*last 1 or 4 blocks"):
        hub_load("dinov2_vits14_lc", layers=2, pretrained=False)


HEADS = [("dinov2_vits14", 4, "dinov2_vits14/dinov2_vits14_linear4_head.pth"),
         ("dinov2_vits14", 1, "dinov2_vits14/dinov2_vits14_linear_head.pth"),
         ("dinov2_vits14_reg", 4, "dinov2_vits14/dinov2_vits14_reg4_linear4_head.pth"),
         ("dinov2_vits14_reg", 1, "dinov2_vits14/dinov2_vits14_reg4_linear_head.pth")]


@pytest.mark.parametrize("name,layers,head_path", HEADS)
def test_linear_classifier_from_the_official_urls(name: str, layers: int, head_path: str, tmp_path: Path,
                                                  cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    ref = randomise(hub.load(name, pretrained=False, depth=4), seed=2)
    backbone_path = mirror / hub.get_model(name).path
    backbone_path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), backbone_path)
    g = torch.Generator().manual_seed(3)
    head = {"weight": torch.randn(1000, (1 + layers) * 384, generator=g) * 0.05, "bias": torch.randn(1000, generator=g)}
    torch.save(head, mirror / head_path)
    x = torch.randn(2, 3, 56, 70)
    with serve_directory(mirror) as base:
        monkeypatch.setenv("SSL_DISTILL_BASE_URL", base)
        kwargs = {} if layers == 4 else {"layers": 1}  # layers=4 is the official default
        model = hub_load(f"{name}_lc", block_chunks=0, depth=4, **kwargs)
    assert isinstance(model, LinearClassifier)
    assert model.classes is None
    assert not model.training
    assert model.layers == layers
    assert model.linear_head.weight.shape == (1000, (1 + layers) * 384)
    assert (cache / Path(head_path).name).is_file()  # verified download into the cache
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_logits(ref, head, layers, x))
    monkeypatch.setenv("SSL_DISTILL_OFFLINE", "1")  # server gone: the cached files serve the next call
    again = hub_load(f"{name}_lc", weights="IMAGENET1K", depth=4, **kwargs)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    fresh = hub_load(f"{name}_lc", pretrained=False, depth=4, **kwargs)  # architecture only, no network
    assert fresh.linear_head.weight.shape == (1000, (1 + layers) * 384)


def test_head_that_does_not_fit_is_a_clear_error(tmp_path: Path, cache: Path) -> None:
    torch.save(hub.load("dinov2_vits14", pretrained=False, depth=4).state_dict(), cache / "dinov2_vits14_pretrain.pth")
    torch.save({"weight": torch.zeros(1000, 2 * 384), "bias": torch.zeros(1000)}, tmp_path / "one.pth")
    with pytest.raises(HubError, match="takes 768 features, but layers=4 on a width-384 backbone gives 1920; pass "
                                       "layers=1"):
        hub_load("dinov2_vits14_lc", weights=str(tmp_path / "one.pth"), depth=4)
    torch.save({"weight": torch.zeros(10, 768), "extra": torch.zeros(1)}, tmp_path / "junk.pth")
    with pytest.raises(HubError, match="is not a linear head"):
        hub_load("dinov2_vits14_lc", weights=str(tmp_path / "junk.pth"), layers=1, depth=4)


@pytest.mark.slow
def test_head_saved_by_eval_linear_loads_as_the_classifier(tmp_path: Path, cache: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from ssl_distill.cli import main
    from ssl_distill.data.digits import write_digits_folders
    from ssl_distill.eval.data import load_labelled_datasets
    from ssl_distill.eval.transforms import make_eval_transform

    torch.manual_seed(0)
    torch.save(hub.load("dinov2_vits14", pretrained=False).state_dict(), cache / "dinov2_vits14_pretrain.pth")
    monkeypatch.setenv("SSL_DISTILL_OFFLINE", "1")
    train, val = write_digits_folders(tmp_path / "digits", 12, 6, size=32)
    out = tmp_path / "linear"
    assert main(["eval-linear", "--pretrained-weights", "dinov2_vits14", "--train-dataset", str(train),
                 "--val-dataset", str(val), "--output-dir", str(out), "--image-size", "28", "--num-workers", "0",
                 "--epochs", "2", "--batch-size", "32", "--learning-rates", "0.01", "0.1", "--autocast", "none",
                 "--device", "cpu", "--precomputed-features"]) == 0
    best = json.loads((out / "results_eval_linear.json").read_text())["best"]
    saved = torch.load(out / "best_linear_head.pth", weights_only=True)
    model = hub_load("dinov2_vits14_lc", weights=str(out / "best_linear_head.pth"), layers=best["n_blocks"])
    assert model.classes == [str(d) for d in range(10)]
    assert model.avgpool == best["avgpool"]
    _, val_set = load_labelled_datasets(str(train), str(val), None, make_eval_transform(28))
    images = torch.stack([val_set[i][0] for i in range(len(val_set))])
    labels = torch.tensor([val_set[i][1] for i in range(len(val_set))])
    with torch.no_grad():
        logits = model(images)
        outputs = model.backbone.get_intermediate_layers(images, n=best["n_blocks"], return_class_token=True)
    expected_input = torch.cat([c for _, c in outputs] + ([outputs[-1][0].mean(1)] if best["avgpool"] else []), 1)
    torch.testing.assert_close(logits, F.linear(expected_input, **saved["state_dict"]))
    top1 = 100.0 * (logits.argmax(1) == labels).float().mean().item()
    assert abs(top1 - best["top1"]) <= 100.0 / len(labels) + 1e-6  # eval-linear's own score, up to one image

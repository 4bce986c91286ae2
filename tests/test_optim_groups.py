"""Parameter-group membership: layer-wise lr decay, patch-embed multiplier, no-decay sets, last-layer flag."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ssl_distill.models import DINOHead, vit_tiny
from ssl_distill.train.optim import apply_optim_schedule, build_optimizer, param_groups

REPO = Path(__file__).resolve().parents[1]


def _by_name(groups):
    return {name: g for g in groups for name in g["names"]}


def test_backbone_groups():
    model = vit_tiny(patch_size=16, img_size=32, depth=4, init_values=1e-5, num_register_tokens=2)
    groups = _by_name(param_groups(model, layerwise_decay=0.5, patch_embed_lr_mult=0.2, is_backbone=True))
    assert set(groups) == {n for n, _ in model.named_parameters()}  # every parameter, exactly once
    depth = 4
    # layer 0: tokens and patch embedding; block i: layer i + 1; final norm: depth + 1
    for name in ("cls_token", "pos_embed", "register_tokens", "mask_token"):
        assert groups[name]["lr_multiplier"] == pytest.approx(0.5 ** (depth + 1))
        assert groups[name]["wd_multiplier"] == 0.0
    assert groups["patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.5 ** (depth + 1) * 0.2)
    assert groups["patch_embed.proj.weight"]["wd_multiplier"] == 1.0
    for i in range(depth):
        assert groups[f"blocks.{i}.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.5 ** (depth - i))
        assert groups[f"blocks.{i}.attn.qkv.weight"]["wd_multiplier"] == 1.0
        for no_wd in (f"blocks.{i}.attn.qkv.bias", f"blocks.{i}.norm1.weight", f"blocks.{i}.ls1.gamma"):
            assert groups[no_wd]["wd_multiplier"] == 0.0, no_wd
    assert groups["norm.weight"]["lr_multiplier"] == 1.0
    assert groups["norm.weight"]["wd_multiplier"] == 0.0
    assert not any(g["is_last_layer"] for g in groups.values())


def test_head_groups_and_schedule_application():
    head = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16)
    groups = param_groups(head)
    by_name = _by_name(groups)
    assert by_name["last_layer.weight_v"]["is_last_layer"]
    assert by_name["last_layer.weight_g"]["is_last_layer"]
    assert not by_name["mlp.0.weight"]["is_last_layer"]
    assert by_name["mlp.0.bias"]["wd_multiplier"] == 0.0
    assert by_name["mlp.0.weight"]["wd_multiplier"] == 1.0
    opt = build_optimizer(groups, (0.9, 0.999), torch.device("cpu"))
    apply_optim_schedule(opt, lr=1e-3, wd=0.04, last_layer_lr=0.0)
    for g in opt.param_groups:
        assert g["lr"] == (0.0 if g["is_last_layer"] else pytest.approx(1e-3 * g["lr_multiplier"]))
        assert g["weight_decay"] == pytest.approx(0.04 * g["wd_multiplier"])
    # a frozen last layer does not move in a step; the rest does
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    head(torch.randn(4, 32)).square().sum().backward()
    opt.step()
    assert torch.equal(head.last_layer.weight_v, before["last_layer.weight_v"])
    assert not torch.equal(head.mlp[0].weight, before["mlp.0.weight"])


# ---------------------------------------------------------------- the groups the name-matching rules gave
_TOKEN_NAMES = ("cls_token", "pos_embed", "register_tokens", "mask_token")


def _name_rule_groups(module, layerwise_decay=1.0, patch_embed_lr_mult=1.0, is_backbone=False):
    """The grouping optim.py computed from parameter names before the models declared theirs (kept as the
    reference: the declarations must give exactly these groups)."""
    num_layers = len(module.blocks) if is_backbone else 0

    def layer_id(name):
        if "patch_embed" in name or any(t in name for t in _TOKEN_NAMES):
            return 0
        m = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
        return int(m.group(1)) + 1 if m else num_layers + 1

    fused = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult = layerwise_decay ** (num_layers + 1 - layer_id(name)) if is_backbone else 1.0
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        no_wd = name.endswith(".bias") or "norm" in name or "gamma" in name or any(t in name for t in _TOKEN_NAMES)
        key = (lr_mult, 0.0 if no_wd else 1.0, "last_layer" in name)
        group = fused.setdefault(key, {"names": [], "lr_multiplier": key[0], "wd_multiplier": key[1],
                                       "is_last_layer": key[2], "is_backbone": is_backbone})
        group["names"].append(name)
    return list(fused.values())


def _without_params(groups):
    return [{k: v for k, v in g.items() if k != "params"} for g in groups]


@pytest.mark.parametrize("kwargs", [
    {"init_values": 1e-5, "num_register_tokens": 4},
    {"init_values": None, "ffn_layer": "swiglu", "qkv_bias": False},
    {"init_values": 1.0, "ffn_layer": "swiglufused", "proj_bias": False, "ffn_bias": False, "depth": 6},
])
def test_declared_groups_equal_the_name_rules_for_backbones(kwargs):
    model = vit_tiny(patch_size=8, img_size=32, **{"depth": 3, **kwargs})
    for decay, mult in ((0.9, 0.2), (1.0, 1.0)):
        got = param_groups(model, decay, mult, is_backbone=True)
        assert _without_params(got) == _name_rule_groups(model, decay, mult, is_backbone=True)


@pytest.mark.parametrize("kwargs", [{}, {"use_bn": True}, {"nlayers": 1}, {"mlp_bias": False, "nlayers": 2}])
def test_declared_groups_equal_the_name_rules_for_heads(kwargs):
    head = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16, **kwargs)
    assert _without_params(param_groups(head)) == _name_rule_groups(head)


def test_declared_groups_equal_the_name_rules_for_the_trainers_student():
    from ssl_distill.config import load_config
    from ssl_distill.train.meta_arch import SSLMetaArch

    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", ["ibot.separate_head=true", "student.num_register_tokens=2"])
    meta = SSLMetaArch(cfg)
    for name, module in meta.student.items():
        args = (cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult, name == "backbone")
        assert _without_params(param_groups(module, *args)) == _name_rule_groups(module, *args), name


def test_a_module_without_declarations_is_refused():
    with pytest.raises(TypeError, match="no_weight_decay"):
        param_groups(torch.nn.Linear(2, 2))


def test_freeze_backbone_sets_only_the_backbone_lr_to_zero():
    """optim.freeze_backbone_epochs: the backbone's groups get lr 0 (AdamW then leaves those weights and their
    decoupled decay alone), the heads keep theirs."""
    from ssl_distill.config import load_config
    from ssl_distill.train.schedules import build_schedules

    cfg = load_config(None, ["optim.epochs=4", "train.iters_per_epoch=5", "optim.freeze_backbone_epochs=1",
                             "optim.warmup_epochs=0", "optim.lr=0.01"])
    schedules = build_schedules(cfg)
    assert [schedules.at(it)["backbone_lr_factor"] for it in (0, 4, 5, 19)] == [0.0, 0.0, 1.0, 1.0]
    model = vit_tiny(patch_size=8, img_size=32, depth=2)
    head = DINOHead(192, 64, hidden_dim=32, bottleneck_dim=16)
    opt = build_optimizer(param_groups(model, 0.9, 0.2, is_backbone=True) + param_groups(head), (0.9, 0.999),
                          torch.device("cpu"))
    values = schedules.at(0)
    apply_optim_schedule(opt, values["lr"], values["wd"], values["last_layer_lr"], values["backbone_lr_factor"])
    for group in opt.param_groups:
        assert (group["lr"] == 0.0) == (group["is_backbone"] or group["is_last_layer"]), group["names"]

"""Parameter-group membership: layer-wise lr decay, patch-embed multiplier, no-decay sets, last-layer flag."""

from __future__ import annotations

import pytest
import torch

from ssl_distill.models import DINOHead, vit_tiny
from ssl_distill.train.optim import apply_optim_schedule, build_optimizer, param_groups


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
    assert groups["norm.weight"]["lr_multiplier"] == 1.0 and groups["norm.weight"]["wd_multiplier"] == 0.0
    assert not any(g["is_last_layer"] for g in groups.values())


def test_head_groups_and_schedule_application():
    head = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16)
    groups = param_groups(head)
    by_name = _by_name(groups)
    assert by_name["last_layer.weight_v"]["is_last_layer"] and by_name["last_layer.weight_g"]["is_last_layer"]
    assert not by_name["mlp.0.weight"]["is_last_layer"]
    assert by_name["mlp.0.bias"]["wd_multiplier"] == 0.0 and by_name["mlp.0.weight"]["wd_multiplier"] == 1.0
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

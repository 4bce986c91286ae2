"""Weight selection (Xu et al. 2024): which teacher element each student weight is, and the errors."""

from __future__ import annotations

import pytest
import torch

from ssl_distill.models import VisionTransformer
from ssl_distill.models.weight_selection import WeightSelectionError, select_weights


def vit(dim: int, depth: int, heads: int, **kw) -> VisionTransformer:
    torch.manual_seed(dim * 100 + depth)
    return VisionTransformer(img_size=kw.pop("img_size", 32), patch_size=kw.pop("patch_size", 8), embed_dim=dim,
                             depth=depth, num_heads=heads, init_values=1.0, **kw).eval()


def test_same_size_is_the_identity() -> None:
    big = vit(64, 2, 2, num_register_tokens=2)
    small = vit(64, 2, 2, num_register_tokens=2)
    small.load_state_dict(select_weights(big, small))
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(small(x), big(x), rtol=0, atol=0)


def test_narrower_shallower_student_takes_evenly_spaced_channels_whole_heads_and_the_first_blocks() -> None:
    big, small = vit(128, 3, 4), vit(64, 2, 2)  # head width 32 in both
    sd = select_weights(big, small)
    small.load_state_dict(sd)
    b = big.state_dict()
    chan = torch.linspace(0, 127, 64).round().long()
    assert chan[0] == 0 and chan[-1] == 127 and len(set(chan.tolist())) == 64
    heads = [0, 3]  # evenly spaced of 4 heads
    head_chan = torch.cat([torch.arange(h * 32, h * 32 + 32) for h in heads])
    # q, k and v of head 3 of the teacher are rows 96..127 of each third; the student's head 1 is exactly them
    q_rows, k_rows = head_chan, head_chan + 128
    torch.testing.assert_close(sd["blocks.1.attn.qkv.weight"][:64], b["blocks.1.attn.qkv.weight"][q_rows][:, chan])
    torch.testing.assert_close(sd["blocks.1.attn.qkv.weight"][64:128], b["blocks.1.attn.qkv.weight"][k_rows][:, chan])
    torch.testing.assert_close(sd["blocks.0.attn.proj.weight"], b["blocks.0.attn.proj.weight"][chan][:, head_chan])
    hidden = torch.linspace(0, 511, 256).round().long()
    torch.testing.assert_close(sd["blocks.1.mlp.fc1.weight"], b["blocks.1.mlp.fc1.weight"][hidden][:, chan])
    torch.testing.assert_close(sd["blocks.1.mlp.fc2.weight"], b["blocks.1.mlp.fc2.weight"][chan][:, hidden])
    for name in ("blocks.0.norm1.weight", "blocks.1.ls2.gamma", "norm.bias", "cls_token", "patch_embed.proj.bias"):
        torch.testing.assert_close(sd[name], b[name][..., chan])
    torch.testing.assert_close(sd["patch_embed.proj.weight"], b["patch_embed.proj.weight"][chan])
    assert not any(k.startswith("blocks.2.") for k in sd)  # first-N layer selection


def test_swiglu_registers_and_position_embedding_grid() -> None:
    big = vit(128, 2, 4, ffn_layer="swiglufused", num_register_tokens=4, img_size=64)
    small = vit(64, 2, 2, ffn_layer="swiglufused", num_register_tokens=2, img_size=32)
    sd = select_weights(big, small)
    small.load_state_dict(sd)  # strict: every key, every shape
    h_big, h_small = big.blocks[0].mlp.w3.in_features, small.blocks[0].mlp.w3.in_features
    hidden = torch.linspace(0, h_big - 1, h_small).round().long()
    chan = torch.linspace(0, 127, 64).round().long()
    w12 = big.state_dict()["blocks.0.mlp.w12.weight"]
    torch.testing.assert_close(sd["blocks.0.mlp.w12.weight"], torch.cat([w12[hidden], w12[hidden + h_big]])[:, chan])
    torch.testing.assert_close(sd["register_tokens"], big.register_tokens[:, [0, 3]][..., chan])
    assert sd["pos_embed"].shape == (1, 1 + 16, 64)  # resampled from the 8x8 grid to 4x4
    assert torch.isfinite(small(torch.randn(2, 3, 32, 32))).all()


@pytest.mark.parametrize("big_kw, small_kw, words", [
    ((128, 2, 4), (64, 2, 1), "head width 32 vs 64"),
    ((64, 2, 2), (128, 2, 4), "is not smaller"),
    ((64, 2, 2), (64, 3, 2), "is not smaller"),
    ((64, 2, 2, {"patch_size": 4}), (64, 2, 2), "patch size 4 vs 8"),
    ((64, 2, 2, {"ffn_layer": "swiglufused"}), (64, 2, 2), "feed-forward"),
    ((64, 2, 2), (64, 2, 2, {"num_register_tokens": 4}), "4 registers vs the teacher's 0"),
])
def test_mismatches_are_one_clear_error(big_kw, small_kw, words) -> None:
    def make(args):
        *a, kw = args if isinstance(args[-1], dict) else (*args, {})
        return vit(*a, **kw)
    with pytest.raises(WeightSelectionError, match=words):
        select_weights(make(big_kw), make(small_kw))

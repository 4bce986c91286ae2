"""VisionTransformer: DINOv2 key layout, timm reference forward, masks, crop lists, interpolation, layers."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from ssl_distill.models import (
    BACKBONE_NAMES,
    VisionTransformer,
    build_backbone,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_tiny,
)
from ssl_distill.models.layers import SwiGLUFFNFused
from ssl_distill.models.stochastic_depth import DropPath

# width, depth, heads, written out independently of the implementation
ARCH = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12),
        "vit_large": (1024, 24, 16), "vit_giant2": (1536, 40, 24)}
FACTORIES = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base, "vit_large": vit_large,
             "vit_giant2": vit_giant2}


def expected_layout(D: int, depth: int, patch: int, img: int, R: int, ls: bool, ffn: str) -> dict[str, tuple]:
    """The official DINOv2 state-dict layout, written out by hand."""
    N = (img // patch) ** 2
    exp = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + N, D), "mask_token": (1, D),
           "patch_embed.proj.weight": (D, 3, patch, patch), "patch_embed.proj.bias": (D,)}
    if R:
        exp["register_tokens"] = (1, R, D)
    hidden = 4 * D
    for i in range(depth):
        b = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            exp[b + norm + ".weight"] = exp[b + norm + ".bias"] = (D,)
        exp.update({b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
                    b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,)})
        if ffn == "mlp":
            exp.update({b + "mlp.fc1.weight": (hidden, D), b + "mlp.fc1.bias": (hidden,),
                        b + "mlp.fc2.weight": (D, hidden), b + "mlp.fc2.bias": (D,)})
        else:
            h = (int(hidden * 2 / 3) + 7) // 8 * 8
            exp.update({b + "mlp.w12.weight": (2 * h, D), b + "mlp.w12.bias": (2 * h,),
                        b + "mlp.w3.weight": (D, h), b + "mlp.w3.bias": (D,)})
        if ls:
            exp[b + "ls1.gamma"] = exp[b + "ls2.gamma"] = (D,)
    exp["norm.weight"] = exp["norm.bias"] = (D,)
    return exp


def shapes(m: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def tiny(**kw) -> VisionTransformer:
    """64-wide, 2-deep, 4-head ViT on a 4x4 grid of 8-pixel patches, with non-trivial LayerScale."""
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, init_values=0.5)
    return VisionTransformer(**{**args, **kw}).eval()


# ------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("name", list(ARCH))
@pytest.mark.parametrize("cfg", [dict(), dict(patch_size=14, img_size=518, init_values=1e-5, num_register_tokens=4,
                                              ffn_layer="swiglufused")])
def test_every_factory_has_the_dinov2_layout(name: str, cfg: dict) -> None:
    with torch.device("meta"):
        m = FACTORIES[name](**cfg)
    D, depth, heads = ARCH[name]
    exp = expected_layout(D, depth, cfg.get("patch_size", 16), cfg.get("img_size", 224),
                          cfg.get("num_register_tokens", 0), "init_values" in cfg, cfg.get("ffn_layer", "mlp"))
    assert shapes(m) == exp
    assert list(m.buffers()) == []
    assert (m.embed_dim, m.num_features, m.n_blocks, m.num_heads) == (D, D, depth, heads)
    assert m.patch_size == cfg.get("patch_size", 16)
    assert m.num_register_tokens == cfg.get("num_register_tokens", 0)


def test_vit_small_reg4_example_and_giant2_swiglu_sizes() -> None:
    with torch.device("meta"):
        s = vit_small(patch_size=14, img_size=518, init_values=1.0, num_register_tokens=4)
        g = vit_giant2(patch_size=14, ffn_layer="swiglufused")
    sd = shapes(s)
    assert sd["pos_embed"] == (1, 1370, 384)
    assert sd["register_tokens"] == (1, 4, 384)
    assert sd["mask_token"] == (1, 384)
    assert sd["blocks.11.attn.qkv.weight"] == (1152, 384)
    assert sd["blocks.0.ls1.gamma"] == (384,)
    assert "blocks.12.norm1.weight" not in sd
    gd = shapes(g)
    assert gd["blocks.39.mlp.w12.weight"] == (8192, 1536)
    assert gd["blocks.0.mlp.w3.weight"] == (1536, 4096)
    assert not any(".fc1." in k or "gamma" in k for k in gd)  # init_values None -> no LayerScale
    assert "register_tokens" not in gd
    assert "head.weight" not in gd


def test_swiglu_names_and_forward() -> None:
    a, b = tiny(ffn_layer="swiglu"), tiny(ffn_layer="swiglufused")
    assert shapes(a) == shapes(b)
    assert isinstance(a.blocks[0].mlp, SwiGLUFFNFused)
    ffn = SwiGLUFFNFused(16, 64)
    assert ffn.w12.weight.shape == (96, 16)
    assert ffn.w3.weight.shape == (16, 48)  # (int(64*2/3)+7)//8*8 = 48
    x = torch.randn(3, 16)
    h = x @ ffn.w12.weight.T + ffn.w12.bias
    ref = (F.silu(h[:, :48]) * h[:, 48:]) @ ffn.w3.weight.T + ffn.w3.bias
    torch.testing.assert_close(ffn(x), ref)


def test_init_and_drop_path_schedule() -> None:
    m = tiny(init_values=0.25, num_register_tokens=2, drop_path_rate=0.3, depth=4)
    assert torch.count_nonzero(m.mask_token) == 0
    assert m.cls_token.abs().max() < 1e-4
    assert m.register_tokens.abs().max() < 1e-4
    assert 0.01 < m.pos_embed.std() < 0.03
    assert torch.equal(m.blocks[1].ls2.gamma, torch.full((64,), 0.25))
    assert torch.count_nonzero(m.blocks[0].attn.qkv.bias) == 0
    assert torch.count_nonzero(m.blocks[3].mlp.fc2.bias) == 0
    assert [getattr(b.drop_path1, "drop_prob", 0.0) for b in m.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    u = tiny(drop_path_rate=0.3, drop_path_uniform=True, depth=3)
    assert [b.drop_path2.drop_prob for b in u.blocks] == pytest.approx([0.3] * 3)
    assert not any("gamma" in k for k in tiny(init_values=0).state_dict())


def test_drop_path_is_per_sample() -> None:
    torch.manual_seed(0)
    dp = DropPath(0.5).train()
    y = dp(torch.ones(400, 3, 2))
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()  # dropped or scaled by 1/keep, whole sample
    assert 0.35 < (per_sample[:, 0] == 0).float().mean() < 0.65
    assert torch.equal(dp.eval()(torch.ones(4, 3)), torch.ones(4, 3))


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="ffn_layer 'geglu'"):
        tiny(ffn_layer="geglu")
    with pytest.raises(ValueError, match="attention impl 'flash'"):
        tiny(attn_impl="flash")
    with pytest.raises(ValueError, match="vit_tiny, vit_small, vit_base, vit_large, vit_giant2"):
        build_backbone("vit_huge")
    with torch.device("meta"):
        assert build_backbone("vit_base", patch_size=14).patch_size == 14
    assert BACKBONE_NAMES == tuple(ARCH)
    m = tiny()
    with pytest.raises(ValueError, match="33x32.*patch size 8"):
        m(torch.randn(1, 3, 33, 32))
    with pytest.raises(ValueError, match="masks"):
        m.forward_features(torch.randn(2, 3, 32, 32), masks=torch.zeros(2, 15, dtype=torch.bool))


# ------------------------------------------------------------------------------ reference forward
def test_strict_state_dict_round_trip(tmp_path) -> None:
    a = tiny(num_register_tokens=2)
    torch.save(a.state_dict(), tmp_path / "w.pth")
    b = tiny(num_register_tokens=2)
    torch.manual_seed(1)
    b.init_weights()
    b.load_state_dict(torch.load(tmp_path / "w.pth", weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a.forward_features(x)["x_prenorm"], b.forward_features(x)["x_prenorm"], rtol=0, atol=0)


@pytest.mark.parametrize("timm_name,R", [("vit_small_patch14_dinov2", 0), ("vit_small_patch14_reg4_dinov2", 4)])
def test_matches_timm_dinov2(timm_name: str, R: int) -> None:
    torch.manual_seed(0)
    ref = timm.create_model(timm_name, pretrained=False, img_size=56, depth=2).eval()
    with torch.no_grad():  # make LayerScale / norms / tokens non-trivial so the blocks matter
        for k, p in ref.named_parameters():
            if "gamma" in k or "norm" in k or "token" in k:
                p.copy_(torch.rand_like(p) + 0.5 if k.endswith(("gamma", "weight")) else torch.randn_like(p) * 0.3)
    sd = dict(ref.state_dict())
    if R:  # timm: reg_token, no class position in pos_embed (DINOv2's cls position is folded into cls_token)
        sd["register_tokens"] = sd.pop("reg_token")
        sd["pos_embed"] = torch.cat([torch.zeros(1, 1, 384), sd["pos_embed"]], dim=1)
    sd["mask_token"] = torch.zeros(1, 384)
    ours = vit_small(patch_size=14, img_size=56, depth=2, init_values=1.0, num_register_tokens=R).eval()
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        t = ref.forward_features(x)
        o = ours.forward_features(x)
    torch.testing.assert_close(o["x_norm_clstoken"], t[:, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o["x_norm_regtokens"], t[:, 1 : 1 + R], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o["x_norm_patchtokens"], t[:, 1 + R :], atol=1e-4, rtol=1e-4)
    assert o["x_norm_patchtokens"].shape == (2, 16, 384)


def test_attn_impl_switch_keeps_outputs() -> None:
    m = tiny()
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    m.set_attn_impl("math")
    assert all(b.attn.impl == "math" for b in m.blocks)
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown attention impl"):
        m.set_attn_impl("nope")


# ------------------------------------------------------------------------------------------ masks
def _manual_forward(m: VisionTransformer, x: torch.Tensor, emb: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Independent token pipeline: given patch embeddings and position embeddings, run blocks + norm."""
    cls = m.cls_token.expand(x.shape[0], -1, -1) + pos[:, :1]
    toks = [cls]
    if m.register_tokens is not None:
        toks.append(m.register_tokens.expand(x.shape[0], -1, -1))
    toks.append(emb + pos[:, 1:])
    t = torch.cat(toks, dim=1)
    for blk in m.blocks:
        t = blk(t)
    return m.norm(t)


def test_masks_replace_patch_embeddings_by_mask_token() -> None:
    m = tiny(num_register_tokens=2)
    with torch.no_grad():
        m.mask_token.normal_()
    x = torch.randn(3, 3, 32, 32)
    masks = torch.rand(3, 16) < 0.4
    masks[:, 0] = True
    out = m.forward_features(x, masks=masks)
    assert out["masks"] is masks
    # independent: conv by hand, overwrite the masked rows with the mask token
    emb = F.conv2d(x, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=8).flatten(2).transpose(1, 2)
    emb = emb.clone()
    emb[masks] = m.mask_token[0]
    ref = _manual_forward(m, x, emb, m.pos_embed)
    torch.testing.assert_close(out["x_norm_patchtokens"], ref[:, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["x_norm_clstoken"], ref[:, 0], atol=1e-5, rtol=1e-5)
    plain = m.forward_features(x)
    assert not torch.allclose(plain["x_norm_clstoken"], out["x_norm_clstoken"], atol=1e-3)
    other = m.forward_features(x, masks=torch.roll(masks, 1, dims=1))
    assert not torch.allclose(other["x_norm_clstoken"], out["x_norm_clstoken"], atol=1e-3)
    none = m.forward_features(x, masks=torch.zeros(3, 16, dtype=torch.bool))
    torch.testing.assert_close(none["x_prenorm"], plain["x_prenorm"], rtol=0, atol=0)


def test_mask_token_equal_to_patch_embedding_changes_nothing() -> None:
    m = tiny()
    x = torch.randn(2, 3, 32, 32)
    x[:, :, 8:16, 0:8] = x[0, :, 8:16, 0:8]  # patch (1, 0) = token 4 identical in both images
    with torch.no_grad():
        m.mask_token.copy_(m.patch_embed(x)[0, 4])
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[:, 4] = True
    torch.testing.assert_close(m.forward_features(x, masks)["x_prenorm"], m.forward_features(x)["x_prenorm"],
                               atol=1e-6, rtol=1e-6)


def test_list_of_crops_equals_separate_forwards() -> None:
    m = tiny(num_register_tokens=1)
    with torch.no_grad():
        m.mask_token.normal_()
    g, loc = torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 24)  # 2 globals x B=2; 6 rectangular locals
    mg = torch.rand(4, 16) < 0.5
    outs = m.forward_features([g, loc], [mg, None])
    assert isinstance(outs, list)
    assert len(outs) == 2
    for out, ref in zip(outs, [m.forward_features(g, mg), m.forward_features(loc)]):
        assert out.keys() == ref.keys()
        for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(out[k], ref[k], atol=1e-6, rtol=1e-6)
    assert outs[0]["masks"] is mg
    assert outs[1]["masks"] is None
    assert outs[1]["x_norm_patchtokens"].shape == (6, 6, 64)
    cls = m([g, loc])
    torch.testing.assert_close(cls[1], outs[1]["x_norm_clstoken"])
    with pytest.raises(ValueError, match="same length"):
        m.forward_features([g, loc], [mg])


# -------------------------------------------------------------------------------- interpolation
@pytest.mark.parametrize("offset", [0.0, 0.1])
def test_rectangular_inputs_use_bicubic_interpolated_positions(offset: float) -> None:
    m = tiny(interpolate_offset=offset, num_register_tokens=2)
    x = torch.randn(2, 3, 14 * 8, 28 * 8)  # 14 x 28 patch grid from a 4 x 4 learned grid
    grid = m.pos_embed[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    if offset:
        res = F.interpolate(grid, scale_factor=((14 + offset) / 4, (28 + offset) / 4), mode="bicubic")
    else:
        res = F.interpolate(grid, size=(14, 28), mode="bicubic")
    assert res.shape[-2:] == (14, 28)
    # row-major: token r * 28 + c has the position of grid cell (r, c)
    patch_pos = torch.stack([res[0, :, r, c] for r in range(14) for c in range(28)])[None]
    pos = torch.cat([m.pos_embed[:, :1], patch_pos], dim=1)
    torch.testing.assert_close(m.interpolate_pos_encoding(torch.zeros(1, 1 + 14 * 28, 64), 112, 224), pos)
    emb = m.patch_embed(x)
    out = m.forward_features(x)
    assert out["x_prenorm"].shape == (2, 1 + 2 + 392, 64)
    torch.testing.assert_close(out["x_norm_patchtokens"], _manual_forward(m, x, emb, pos)[:, 3:],
                               atol=1e-5, rtol=1e-5)


def test_native_size_uses_pos_embed_unchanged() -> None:
    m = tiny()
    assert m.interpolate_pos_encoding(torch.zeros(1, 17, 64), 32, 32) is m.pos_embed


# ---------------------------------------------------------------------------- intermediate layers
def test_get_intermediate_layers() -> None:
    m = tiny(depth=3, num_register_tokens=2)
    x = torch.randn(2, 3, 16, 32)  # 2 x 4 patches
    ff = m.forward_features(x)
    (last,) = m.get_intermediate_layers(x)
    torch.testing.assert_close(last, ff["x_norm_patchtokens"])
    (raw,) = m.get_intermediate_layers(x, n=1, norm=False)
    torch.testing.assert_close(raw, ff["x_prenorm"][:, 3:])
    # explicit computation of block 0's normalised output
    t = m.blocks[0](m.prepare_tokens_with_masks(x))
    outs = m.get_intermediate_layers(x, n=[2, 0], return_class_token=True)
    assert isinstance(outs, tuple)
    assert len(outs) == 2
    torch.testing.assert_close(outs[1][0], m.norm(t)[:, 3:])
    torch.testing.assert_close(outs[1][1], m.norm(t)[:, 0])
    torch.testing.assert_close(outs[0][1], ff["x_norm_clstoken"])
    two = m.get_intermediate_layers(x, n=2)
    torch.testing.assert_close(two[1], last)
    maps = m.get_intermediate_layers(x, n=2, reshape=True)
    assert maps[0].shape == (2, 64, 2, 4)
    torch.testing.assert_close(maps[1][1, :, 1, 2], last[1, 1 * 4 + 2])
    with pytest.raises(ValueError, match="blocks"):
        m.get_intermediate_layers(x, n=4)
    with pytest.raises(ValueError, match="out of range"):
        m.get_intermediate_layers(x, n=[3])


def test_last_self_attention_weights() -> None:
    m = tiny(num_register_tokens=1)
    w = m.get_last_self_attention(torch.randn(2, 3, 32, 32))
    assert w.shape == (2, 4, 18, 18)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 18))


def _linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_xavier_init_is_maes_and_the_default_stays_dinov2s() -> None:
    torch.manual_seed(0)
    ref = vit_small(patch_size=8, img_size=32, depth=2, init_values=1.0)
    xav = vit_small(patch_size=8, img_size=32, depth=2, init_values=1.0, weight_init="xavier")
    for name, m in _linears(ref):  # DINOv2 / timm: trunc-normal 0.02, zero bias
        assert abs(m.weight.std().item() - 0.02) < 0.001, name
        assert not m.bias.any(), name
    assert ref.cls_token.abs().max() < 1e-4
    for name, m in [*_linears(xav), ("patch_embed", xav.patch_embed.proj)]:  # Xavier-uniform on (out, in)
        w = m.weight.reshape(m.weight.shape[0], -1)
        bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
        assert w.abs().max() <= bound, name
        assert abs(w.std().item() - bound / 3**0.5) < 0.03 * bound, name  # uniform(-b, b) has std b / sqrt(3)
        assert name == "patch_embed" or not m.bias.any(), name  # the conv keeps PyTorch's bias init (as MAE's)
    assert 0.015 < xav.cls_token.std().item() < 0.025
    assert not xav.mask_token.any()
    for a, b in zip(ref.modules(), xav.modules()):
        if isinstance(a, torch.nn.LayerNorm):
            assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    with pytest.raises(ValueError, match="unknown weight_init 'kaiming'; choose one of trunc_normal, xavier"):
        vit_tiny(weight_init="kaiming")


def test_student_weight_init_reaches_the_backbone_and_is_checked() -> None:
    from ssl_distill.config import ConfigError, load_config
    from ssl_distill.models import backbone_from_config
    from ssl_distill.models.names import WEIGHT_INITS
    from ssl_distill.models.vit import LINEAR_WEIGHT_INITS

    cfg = load_config(None, ["student.arch=vit_tiny", "student.depth=1", "student.patch_size=8",
                             "crops.global_crops_size=32", "crops.local_crops_size=16", "student.weight_init=xavier"])
    qkv = backbone_from_config(cfg).blocks[0].attn.qkv.weight
    assert abs(qkv.std().item() - (6 / (192 + 576)) ** 0.5 / 3**0.5) < 0.002
    with pytest.raises(ConfigError, match="student.weight_init"):
        load_config(None, ["student.weight_init=he"])
    assert tuple(LINEAR_WEIGHT_INITS) == WEIGHT_INITS  # the one table of names: every mode has its init

"""The packed multi-crop pass and activation checkpointing compute exactly what the per-resolution pass computes."""

from __future__ import annotations

import pytest
import torch

from ssl_distill.models import vit_tiny
from ssl_distill.models.attention import Attention
from ssl_distill.models.layers import drop_path_packed, pack_tokens, unpack_tokens


def _model(**kw):
    torch.manual_seed(0)
    return vit_tiny(patch_size=8, img_size=32, depth=3, init_values=1e-1, num_register_tokens=1, **kw)


def _crops():
    g = torch.Generator().manual_seed(1)
    glob = torch.randn(4, 3, 32, 32, generator=g)
    loc = torch.randn(6, 3, 16, 16, generator=g)
    masks = torch.rand(4, 16, generator=g) < 0.3
    return glob, loc, masks


def _run(model, glob, loc, masks):
    """Features of both crop batches and the gradients of a loss touching every output."""
    model.zero_grad(set_to_none=True)
    outs = model([glob, loc], masks=[masks, None], is_training=True)
    loss = sum((o["x_norm_clstoken"] ** 2).sum() + o["x_norm_patchtokens"].sin().sum() for o in outs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return outs, grads


def test_pack_unpack_roundtrip():
    xs = [torch.randn(2, 5, 4), torch.randn(3, 2, 4)]
    packed, layout = pack_tokens(xs)
    assert packed.shape == (16, 4) and layout == [(2, 5), (3, 2)]
    for a, b in zip(unpack_tokens(packed, layout), xs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_packed_pass_equals_per_resolution_pass(impl):
    glob, loc, masks = _crops()
    packed, per_res = _model(attn_impl=impl, packed=True), _model(attn_impl=impl, packed=False)
    assert per_res.state_dict().keys() == packed.state_dict().keys()
    out_p, grad_p = _run(packed, glob, loc, masks)
    out_r, grad_r = _run(per_res, glob, loc, masks)
    for op, orr in zip(out_p, out_r):
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            assert op[key].shape == orr[key].shape
            torch.testing.assert_close(op[key], orr[key], rtol=1e-5, atol=1e-5)
    assert grad_p.keys() == grad_r.keys()
    for name in grad_p:
        torch.testing.assert_close(grad_p[name], grad_r[name], rtol=1e-4, atol=1e-5, msg=name)


def test_packed_list_equals_separate_single_batch_calls():
    glob, loc, masks = _crops()
    model = _model().eval()
    with torch.no_grad():
        both = model.forward_features([glob, loc], masks=[masks, None])
        alone = [model.forward_features(glob, masks), model.forward_features(loc)]
    for a, b in zip(both, alone):
        torch.testing.assert_close(a["x_prenorm"], b["x_prenorm"], rtol=1e-5, atol=1e-5)


def test_block_list_call_is_packed_and_matches_per_tensor_call():
    model = _model().eval()
    blk = model.blocks[0]
    xs = [torch.randn(2, 17, 192), torch.randn(3, 5, 192)]
    with torch.no_grad():
        listed = blk(xs)
        single = [blk(x) for x in xs]
    for a, b in zip(listed, single):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    glob, loc, masks = _crops()
    plain, ckpt = _model(), _model(grad_checkpointing=True)
    _, grad_plain = _run(plain, glob, loc, masks)
    _, grad_ckpt = _run(ckpt, glob, loc, masks)
    for name in grad_plain:
        torch.testing.assert_close(grad_ckpt[name], grad_plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_drop_path_packed_drops_whole_samples():
    torch.manual_seed(0)
    layout = [(50, 3), (40, 2)]
    x = torch.ones(50 * 3 + 40 * 2, 4)
    out = drop_path_packed(x, layout, drop_prob=0.5, training=True)
    per_sample = [t.reshape(b, -1) for t, (b, n) in zip(out.split([150, 80]), layout)]
    for s in per_sample:  # every sample is all-zero or all 1 / keep
        assert set(s.unique().tolist()) <= {0.0, 2.0}
        assert ((s == 0).all(1) | (s == 2).all(1)).all()
    kept = torch.cat([s[:, 0] for s in per_sample]).ne(0).float().mean()
    assert 0.3 < kept < 0.7
    assert torch.equal(drop_path_packed(x, layout, 0.5, training=False), x)


def test_packed_attention_rejects_wrong_layout():
    attn = Attention(8, num_heads=2)
    with pytest.raises(ValueError, match="covers"):
        attn(torch.randn(10, 8), layout=[(2, 3)])
    with pytest.raises(ValueError, match="return_attention"):
        attn(torch.randn(6, 8), layout=[(2, 3)], return_attention=True)

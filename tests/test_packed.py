"""The packed multi-crop pass and activation checkpointing compute exactly what the per-resolution pass computes."""

from __future__ import annotations

import pytest
import torch

from ssl_distill.models import vit_tiny
from ssl_distill.models.attention import Attention
from ssl_distill.models.packing import pack_tokens, unpack_tokens
from ssl_distill.models.stochastic_depth import DropPath


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
    assert packed.shape == (16, 4)
    assert layout == [(2, 5), (3, 2)]
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
    out = DropPath(0.5).train()(x, layout)
    per_sample = [t.reshape(b, -1) for t, (b, n) in zip(out.split([150, 80]), layout)]
    for s in per_sample:  # every sample is all-zero or all 1 / keep
        assert set(s.unique().tolist()) <= {0.0, 2.0}
        assert ((s == 0).all(1) | (s == 2).all(1)).all()
    kept = torch.cat([s[:, 0] for s in per_sample]).ne(0).float().mean()
    assert 0.3 < kept < 0.7
    assert torch.equal(DropPath(0.5).eval()(x, layout), x)


def test_packed_attention_rejects_wrong_layout():
    attn = Attention(8, num_heads=2)
    with pytest.raises(ValueError, match="covers"):
        attn(torch.randn(10, 8), layout=[(2, 3)])
    with pytest.raises(ValueError, match="return_attention"):
        attn(torch.randn(6, 8), layout=[(2, 3)], return_attention=True)


def _block(drop: float):
    from ssl_distill.models.layers import Block

    torch.manual_seed(0)
    return Block(16, num_heads=2, drop_path=drop, init_values=0.5).train()


def _reference_block(blk, x, attn_keep, ffn_keep, keep):
    """``x + mask * branch(x) / keep`` for both residual branches with given per-sample masks (branches in
    eval mode, per sample batch), the formula the subset computation must reproduce."""
    def scale(m):
        return (m.float() / keep).view(-1, 1, 1)
    y = x + scale(attn_keep) * blk._attn_branch(x, None)
    return y + scale(ffn_keep) * blk._ffn_branch(y, None)


def _which_kept(blk, x, out, keep):
    """Recover, per sample, which branches ran, by matching the output against the four possibilities."""
    a_keep, f_keep = [], []
    with torch.no_grad():
        for i in range(x.shape[0]):
            xi = x[i:i + 1]
            found = [(a, f) for a in (0, 1) for f in (0, 1)
                     if torch.allclose(out[i:i + 1], _reference_block(blk, xi, torch.tensor([a]), torch.tensor([f]),
                                                                      keep), atol=1e-5)]
            assert len(found) == 1, (i, found)
            a_keep.append(found[0][0])
            f_keep.append(found[0][1])
    return torch.tensor(a_keep), torch.tensor(f_keep)


@pytest.mark.parametrize("packed", [False, True])
def test_stochastic_depth_runs_branches_on_kept_samples_only(packed):
    """With drop rate p the block computes each residual branch on the kept samples only, and the output and
    every gradient equal the plain formula ``x + mask * branch(x) / (1 - p)`` with the same masks."""
    blk, keep = _block(0.5), 0.5
    seen = []
    blk.mlp.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(40, 5, 16, generator=g), torch.randn(30, 3, 16, generator=g)]
    if packed:
        x, layout = pack_tokens([t.clone().requires_grad_() for t in xs])
        out = unpack_tokens(blk(x, layout=layout), layout)
        leaves = None
    else:
        leaves = [t.clone().requires_grad_() for t in xs]
        out = [blk(t) for t in leaves]
    masks = [_which_kept(blk, t, o, keep) for t, o in zip(xs, out)]
    a_keep = torch.cat([m[0] for m in masks])
    f_keep = torch.cat([m[1] for m in masks])
    assert 0.3 < a_keep.float().mean() < 0.7
    assert 0.3 < f_keep.float().mean() < 0.7
    # The FFN saw only the kept samples' tokens (one call packed, one per batch otherwise).
    kept_tokens = [int(m[1].sum()) * t.shape[1] for m, t in zip(masks, xs)]
    assert seen[: (1 if packed else 2)] == ([sum(kept_tokens)] if packed else [m[1].sum().item() for m in masks])

    w = [torch.randn(o.shape, generator=g) for o in out]
    blk.zero_grad(set_to_none=True)
    sum((o * wi).sum() for o, wi in zip(out, w)).backward()
    got = {n: p.grad.clone() for n, p in blk.named_parameters()}
    blk.zero_grad(set_to_none=True)
    ref = [_reference_block(blk, t, m[0], m[1], keep) for t, m in zip(xs, masks)]
    sum((r * wi).sum() for r, wi in zip(ref, w)).backward()
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    for n, p in blk.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_stochastic_depth_dropping_everything_keeps_every_parameter_in_the_graph():
    """Rate 1.0 drops both branches for all samples: the output is the input, yet every parameter gets a (zero)
    gradient, which DDP needs to see every parameter used in every step."""
    blk = _block(1.0)
    x = torch.randn(3, 4, 16, requires_grad=True)
    out = blk(x)
    assert torch.equal(out, x)
    out.sum().backward()
    for n, p in blk.named_parameters():
        assert p.grad is not None, n
        assert not p.grad.any(), n
    blk.eval()
    assert not torch.equal(blk(x), x)  # eval mode never drops


@pytest.mark.parametrize(("drop", "ckpt"), [(0.0, False), (0.5, False), (0.5, True)])
def test_selected_patches_equal_the_full_forward(drop, ckpt):
    """``select_patches`` computes the last block for the CLS tokens and the selected patches only: same values
    and same gradients as reading them from the full output (stochastic depth included: the masks are drawn
    in the same order from the same generator, so a fixed seed gives the same draw on both paths; with
    activation checkpointing the recomputation replays the same draws)."""
    model = _model(drop_path_rate=drop).train()
    glob, loc, masks = _crops()
    sel = torch.tensor([0, 5, 6, 17, 40, 63, 33])  # into the (4 * 16) flattened patch grid of the global batch

    def run(select):
        torch.manual_seed(7)
        model.zero_grad(set_to_none=True)
        model.grad_checkpointing = ckpt and select  # reference: the full forward without checkpointing
        if select:
            g, lo = model([glob, loc], masks=[masks, None], is_training=True,
                          select_patches=[sel, torch.empty(0, dtype=torch.long)])
            patches = g["x_norm_selected_patchtokens"]
        else:
            g, lo = model([glob, loc], masks=[masks, None], is_training=True)
            patches = g["x_norm_patchtokens"].flatten(0, 1)[sel]
        feats = [g["x_norm_clstoken"], lo["x_norm_clstoken"], patches]
        (feats[0].sin().sum() + (feats[1] ** 2).sum() + feats[2].cos().sum()).backward()
        return feats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, grad_full = run(False)
    sel_out, grad_sel = run(True)
    for a, b in zip(sel_out, full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert grad_sel.keys() == grad_full.keys()
    for n in grad_full:
        torch.testing.assert_close(grad_sel[n], grad_full[n], rtol=1e-4, atol=1e-5, msg=n)


def test_selected_patches_with_a_none_entry_and_a_single_batch():
    model = _model().eval()
    glob, loc, masks = _crops()
    sel = torch.tensor([3, 20])
    g, lo = model.forward_train([glob, loc], [masks, None], select_patches=[sel, None])
    ref_g, ref_lo = model.forward_features([glob, loc], [masks, None])
    torch.testing.assert_close(g["x_norm_selected_patchtokens"], ref_g["x_norm_patchtokens"].flatten(0, 1)[sel])
    for k in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        torch.testing.assert_close(lo[k], ref_lo[k], rtol=1e-5, atol=1e-5)
    model.packed = False  # blocks per batch list, the last one packed for the row selection: same values
    g2, _ = model.forward_train([glob, loc], [masks, None], select_patches=[sel, None])
    torch.testing.assert_close(g2["x_norm_selected_patchtokens"], g["x_norm_selected_patchtokens"], rtol=1e-5,
                               atol=1e-5)
    (single,) = model.forward_train([glob], [masks], select_patches=[sel])
    torch.testing.assert_close(single["x_norm_clstoken"], ref_g["x_norm_clstoken"], rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="integer index"):
        model.forward_train([glob], [masks], select_patches=[torch.zeros(2, dtype=torch.bool)])
    with pytest.raises(ValueError, match="select_patches must be None or a list of the same length"):
        model.forward_train([glob, loc], [masks, None], select_patches=[sel])
    with pytest.raises(TypeError, match="need a list of crop batches and is_training=True"):
        model(glob, masks, select_patches=[sel])
    with pytest.raises(ValueError, match="rows= needs packed"):
        model.blocks[-1](torch.randn(2, 5, model.embed_dim), rows=torch.tensor([0]))
    with pytest.raises(ValueError, match="rows= needs packed"):
        model.blocks[-1].attn(torch.randn(2, 5, model.embed_dim), rows=torch.tensor([0]))

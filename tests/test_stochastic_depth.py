"""Keyed stochastic depth: each sample's draws are a function of (seed, position, crop, block, branch) only."""

from __future__ import annotations

import pytest
import torch

from ssl_distill.models import vit_tiny
from ssl_distill.models.stochastic_depth import DropPath, sample_keys, uniform_from_keys


def _reference_fmix32(h: int) -> int:
    """MurmurHash3's fmix32 on Python ints (arbitrary precision), the independent computation."""
    m = 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & m
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & m
    return h ^ (h >> 16)


def test_hash_matches_python_integers_and_is_uniform():
    keys = sample_keys(7, torch.arange(0, 4000, 3), range(3))
    assert keys.dtype == torch.int64
    assert keys.shape == (3 * 1334,)
    assert (keys >= 0).all()
    assert len(set(keys.tolist())) == keys.numel()  # distinct (position, crop) pairs, distinct keys
    u = uniform_from_keys(keys, stream=5)
    for key, got in zip(keys[:50].tolist(), u[:50].tolist()):
        lo, hi = key & 0xFFFFFFFF, key >> 32
        h = _reference_fmix32(lo ^ _reference_fmix32(5))
        assert got == _reference_fmix32(h ^ hi) / 2**32
    assert 0.0 <= float(u.min())
    assert float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.02
    assert abs(float((u < 0.3).double().mean()) - 0.3) < 0.02
    # streams (blocks / branches) and seeds give unrelated draws
    v = uniform_from_keys(keys, stream=6)
    assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < 0.05
    other_seed = uniform_from_keys(sample_keys(8, torch.arange(0, 4000, 3), range(3)), stream=5)
    assert abs(float(torch.corrcoef(torch.stack([u, other_seed]))[0, 1])) < 0.05


def test_draws_depend_on_the_sample_not_on_the_batch_or_the_global_rng():
    """The same sample keeps or drops its branch whatever batch it is in, in whatever order, on whatever rank."""
    positions = torch.arange(100, 132)
    keys = sample_keys(0, positions, [0])
    dp = DropPath(0.4, stream=3).train()
    torch.manual_seed(0)
    whole = dp.keep_mask(32, keys)
    torch.manual_seed(123)  # the global RNG does not matter
    halves = torch.cat([dp.keep_mask(16, keys[:16]), dp.keep_mask(16, keys[16:])])
    assert torch.equal(whole, halves)
    perm = torch.randperm(32)
    assert torch.equal(dp.keep_mask(32, keys[perm]), whole[perm])
    assert 0.4 < whole.float().mean() < 0.8
    with pytest.raises(ValueError, match="one key per sample"):
        dp.keep_mask(31, keys)


def test_model_output_is_a_function_of_the_keys():
    """Two forward passes with the same keys give the same output whatever torch's RNG state; a sample's output
    does not depend on the other samples in the batch (split the batch in two: same rows)."""
    model = vit_tiny(patch_size=8, img_size=32, depth=4, drop_path_rate=0.5, drop_path_uniform=True).train()
    g = torch.Generator().manual_seed(0)
    glob, loc = torch.randn(6, 3, 32, 32, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    positions = torch.tensor([10, 11])
    keys = [sample_keys(0, positions, range(3)), sample_keys(0, positions, range(3, 5))]

    def cls(crops, k, seed):
        torch.manual_seed(seed)
        return [o["x_norm_clstoken"] for o in model.forward_train(crops, sample_keys=k)]

    a, b = cls([glob, loc], keys, 1), cls([glob, loc], keys, 2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    unkeyed = cls([glob, loc], None, 1), cls([glob, loc], None, 2)
    assert not torch.equal(unkeyed[0][0], unkeyed[1][0])  # without keys: torch's RNG decides
    # sample 0 alone (its global crops are rows 0, 2, 4 crop-major; its local crops rows 0, 2)
    alone = cls([glob[0::2], loc[0::2]], [keys[0][0::2], keys[1][0::2]], 3)
    torch.testing.assert_close(alone[0], a[0][0::2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone[1], a[1][0::2], rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_and_selected_rows_replay_the_keyed_draws():
    """With keys, the recomputation of a checkpointed block and the last block's row-selected path draw exactly
    what the plain forward draws, whatever happens to torch's RNG in between."""
    model = vit_tiny(patch_size=8, img_size=32, depth=3, drop_path_rate=0.5, drop_path_uniform=True).train()
    g = torch.Generator().manual_seed(1)
    glob, loc = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    keys = [sample_keys(3, torch.tensor([5, 6]), range(2)), sample_keys(3, torch.tensor([5, 6]), range(2, 4))]
    sel = torch.tensor([0, 7, 20, 33, 63])

    def run(ckpt: bool, select: bool):
        model.zero_grad(set_to_none=True)
        model.grad_checkpointing = ckpt
        torch.manual_seed(int(ckpt) * 10 + int(select))
        g_out, l_out = model.forward_train([glob, loc], select_patches=[sel, None] if select else None,
                                           sample_keys=keys)
        patches = g_out["x_norm_selected_patchtokens"] if select else g_out["x_norm_patchtokens"].flatten(0, 1)[sel]
        loss = g_out["x_norm_clstoken"].sin().sum() + l_out["x_norm_clstoken"].pow(2).sum() + patches.cos().sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grad = run(False, False)
    for ckpt, select in ((True, False), (False, True), (True, True)):
        loss, grad = run(ckpt, select)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        assert grad.keys() == ref_grad.keys()
        for n in grad:
            torch.testing.assert_close(grad[n], ref_grad[n], rtol=1e-4, atol=1e-5, msg=n)

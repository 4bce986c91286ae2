"""Keyed stochastic depth with static shapes: a fixed number of samples per batch keeps each branch, chosen by
ranking the samples' keyed uniforms, so the draws are a function of the batch's keys (seed, positions, crops) and the
block only."""

from __future__ import annotations

import pytest
import torch

from ssl_distill.models import vit_tiny
from ssl_distill.models.stochastic_depth import (
    DropPath,
    DropPlan,
    kept_count,
    resolve_drop_path_mode,
    sample_keys,
    uniform_from_keys,
)


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


@pytest.mark.parametrize(("n", "p", "want"), [(10, 0.3, 7), (64, 0.1, 57), (128, 0.4, 76), (8, 1.0, 1), (1, 0.5, 1),
                                              (3, 0.9, 1), (40, 0.5, 20)])
def test_kept_count_is_the_references_fixed_subset_size(n, p, want):
    assert kept_count(n, p) == want == max(int(round(n * (1 - p), 9)), 1)


def test_draws_keep_a_fixed_number_chosen_by_ranking_the_keyed_uniforms():
    """Every draw keeps exactly floor(B (1 - p)) samples: the ones with the smallest keyed uniforms (checked against
    plain Python sorting), whatever torch's RNG state; permuting the batch permutes the choice."""
    positions = torch.arange(100, 132)
    keys = sample_keys(0, positions, [0])
    for p in (0.1, 0.3, 0.4, 0.5):
        dp = DropPath(p, stream=3).train()
        torch.manual_seed(0)
        whole = dp.keep_mask(32, keys)
        torch.manual_seed(123)  # the global RNG does not matter
        assert torch.equal(dp.keep_mask(32, keys), whole)
        assert int(whole.sum()) == kept_count(32, p)
        u = uniform_from_keys(keys, 3).tolist()
        smallest = sorted(range(32), key=lambda i: u[i])[: kept_count(32, p)]
        assert sorted(smallest) == whole.nonzero().flatten().tolist()
        perm = torch.randperm(32)
        assert torch.equal(dp.keep_mask(32, keys[perm]), whole[perm])
    with pytest.raises(ValueError, match="one key per sample"):
        DropPath(0.4, stream=3).keep_mask(31, keys)


def test_plan_draws_per_batch_of_the_layout_with_the_reference_scale():
    """In a packed layout every batch keeps its own fixed count; kept samples get B_i / K_i, dropped ones 0."""
    layout = [(8, 5), (32, 2)]
    keys = sample_keys(4, torch.arange(8), range(5))
    plan = DropPlan({0: 0.3, 1: 0.3, 7: 0.1}, layout, keys, "cpu", mode="subset")
    for stream, p in ((0, 0.3), (1, 0.3), (7, 0.1)):
        kept = plan.kept_samples(stream)
        k_glob, k_loc = kept_count(8, p), kept_count(32, p)
        assert len([i for i in kept if i < 8]) == k_glob
        assert len([i for i in kept if i >= 8]) == k_loc
        assert plan.sub_layouts[stream] == [(k_glob, 5), (k_loc, 2)]
        scale = plan.scale[plan.scale_row[stream]]
        assert scale[:8].tolist() == pytest.approx([8 / k_glob if i in kept else 0.0 for i in range(8)])
        assert scale[8:].tolist() == pytest.approx([32 / k_loc if i in kept else 0.0 for i in range(8, 40)])
    assert plan.kept_samples(0) != plan.kept_samples(1)  # streams draw independently
    assert len(plan.kept_tables) == 2  # one table per distinct rate (0.3 shared by streams 0 and 1)
    with pytest.raises(ValueError, match="one key per sample"):
        DropPlan({0: 0.3}, layout, keys[:-1], "cpu")


def test_auto_mode_and_its_errors():
    assert resolve_drop_path_mode("auto", 0.1, "cpu") == "subset"
    assert resolve_drop_path_mode("auto", 0.4, "cpu") == "subset"
    assert resolve_drop_path_mode("auto", 0.1, "cuda") == "mask"
    assert resolve_drop_path_mode("auto", 0.3, "cuda") == "subset"
    assert resolve_drop_path_mode("mask", 0.4, "cpu") == "mask"
    with pytest.raises(ValueError, match="unknown drop_path_mode 'skip'; choose one of auto, subset, mask"):
        resolve_drop_path_mode("skip", 0.1, "cpu")
    with pytest.raises(ValueError, match="drop_path_mode"):
        vit_tiny(drop_path_rate=0.1, drop_path_mode="skip")


def _crops_and_keys(positions):
    g = torch.Generator().manual_seed(0)
    glob, loc = torch.randn(6, 3, 32, 32, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    return glob, loc, [sample_keys(0, positions, range(3)), sample_keys(0, positions, range(3, 5))]


def test_model_output_is_a_function_of_the_keys():
    """Two forward passes with the same keys give the same output whatever torch's RNG state; swapping the two
    samples of the batch (crops and keys together) swaps the output rows."""
    model = vit_tiny(patch_size=8, img_size=32, depth=4, drop_path_rate=0.5, drop_path_uniform=True).train()
    glob, loc, keys = _crops_and_keys(torch.tensor([10, 11]))

    def cls(crops, k, seed):
        torch.manual_seed(seed)
        return [o["x_norm_clstoken"] for o in model.forward_train(crops, sample_keys=k)]

    a, b = cls([glob, loc], keys, 1), cls([glob, loc], keys, 2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    unkeyed = cls([glob, loc], None, 1), cls([glob, loc], None, 2)
    assert not torch.equal(unkeyed[0][0], unkeyed[1][0])  # without keys: torch's RNG decides
    swap_g, swap_l = torch.tensor([1, 0, 3, 2, 5, 4]), torch.tensor([1, 0, 3, 2])  # crop-major rows, samples swapped
    swapped = cls([glob[swap_g], loc[swap_l]], [keys[0][swap_g], keys[1][swap_l]], 3)
    torch.testing.assert_close(swapped[0], a[0][swap_g], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(swapped[1], a[1][swap_l], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("n_batches", [1, 2])
def test_subset_and_mask_modes_compute_the_same(packed, n_batches):
    """The two ways of skipping a dropped branch give the same outputs and gradients (the same draws), with the
    last block on selected rows and with activation checkpointing."""
    glob, loc, keys = _crops_and_keys(torch.tensor([3, 9]))
    crops, keys = [glob, loc][:n_batches], keys[:n_batches]
    sel = [torch.tensor([0, 7, 20, 33])] + [None] * (n_batches - 1)
    results = {}
    for mode in ("subset", "mask"):
        torch.manual_seed(0)
        model = vit_tiny(patch_size=8, img_size=32, depth=3, drop_path_rate=0.4, drop_path_uniform=False,
                         drop_path_mode=mode, packed=packed, grad_checkpointing=True).train()
        for select in (None, sel):
            out = model.forward_train(crops, select_patches=select, sample_keys=keys)
            loss = sum(o["x_norm_clstoken"].sin().sum() for o in out)
            loss = loss + (out[0]["x_norm_selected_patchtokens"].cos().sum() if select else 0.0)
            model.zero_grad(set_to_none=True)
            loss.backward()
            results[mode, select is None] = (loss.detach(), {n: q.grad for n, q in model.named_parameters()})
    for full in (True, False):
        (la, ga), (lb, gb) = results["subset", full], results["mask", full]
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
        assert [n for n in ga if ga[n] is not None] == [n for n in gb if gb[n] is not None]
        for n in ga:
            if ga[n] is not None:  # float rounding of other summation orders, relative to the gradient's size
                assert float((ga[n] - gb[n]).abs().max()) <= 1e-5 * float(ga[n].abs().max()) + 1e-8, n


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

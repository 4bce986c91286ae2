"""Linear heads: grid, inputs, SGD + cosine training, best-head selection, rank sharding of precomputed features."""

from __future__ import annotations

import math

import pytest
import torch
from dist_utils import run_distributed

from ssl_distill.eval.linear import (
    DEFAULT_LEARNING_RATES,
    HeadSpec,
    LinearHeads,
    cosine_factor,
    evaluate_heads,
    head_grid,
    linear_input,
    summarize,
    tensor_batches,
    train_heads,
)


def _feats(n=120, blocks=4, dim=6, num_classes=3, seed=0):
    """Features whose last-block CLS token separates the classes; earlier blocks are noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    cls = torch.randn(n, blocks, dim, generator=gen)
    cls[:, -1, :num_classes] += 4.0 * torch.nn.functional.one_hot(labels, num_classes)
    return {"cls": cls, "patch_mean": torch.randn(n, dim, generator=gen), "labels": labels}


def test_grid_and_inputs():
    assert len(DEFAULT_LEARNING_RATES) == 13
    assert DEFAULT_LEARNING_RATES[0] == 1e-5
    assert DEFAULT_LEARNING_RATES[-1] == 0.1
    specs = head_grid([0.1, 0.01])
    assert len(specs) == 8
    assert len({s.name for s in specs}) == 8
    f = _feats(n=5)
    x = linear_input(f, 4, True)
    assert x.shape == (5, 30)
    assert torch.equal(x[:, :6], f["cls"][:, 0])
    assert torch.equal(x[:, 18:24], f["cls"][:, 3])
    assert torch.equal(x[:, 24:], f["patch_mean"])
    assert torch.equal(linear_input(f, 1, False), f["cls"][:, 3])
    heads = LinearHeads(specs, 6, 3)
    assert [h.in_features for h in heads.heads] == [6, 6, 12, 12, 24, 24, 30, 30]
    logits = heads(f)
    assert len(logits) == 8
    x45 = torch.cat([f["cls"][:, i] for i in range(4)], dim=1)  # heads 4, 5: last 4 blocks, no avgpool
    torch.testing.assert_close(logits[5], x45 @ heads.heads[5].weight.T + heads.heads[5].bias)


def test_cosine_factor():
    assert cosine_factor(0, 10) == 1.0
    assert cosine_factor(10, 10) == pytest.approx(0.0)
    assert cosine_factor(5, 10) == pytest.approx(0.5)


def test_training_learns_and_best_head_is_selected():
    torch.manual_seed(0)
    train, val = _feats(seed=0), _feats(seed=1)
    specs = [HeadSpec(1, False, 0.5), HeadSpec(1, False, 1e-6), HeadSpec(4, True, 0.5)]
    heads = LinearHeads(specs, 6, 3)
    w_tiny = heads.heads[1].weight.detach().clone()
    losses = train_heads(heads, tensor_batches(train, 16), epochs=8, iters_per_epoch=8)
    assert len(losses) == 64
    assert losses[-1] < losses[0]
    acc = evaluate_heads(heads, val)
    expected = [100.0 * float((h(linear_input(val, s.n_blocks, s.avgpool)).argmax(1) == val["labels"]).float().mean())
                for s, h in zip(specs, heads.heads)]
    assert acc == pytest.approx(expected)
    assert acc[0] > 90.0
    assert (heads.heads[1].weight - w_tiny).abs().max() < 1e-3  # lr 1e-6 barely moves
    summary = summarize(specs, acc)
    assert summary["best"]["top1"] == max(acc)
    assert len(summary["heads"]) == 3
    assert summary["best"]["name"] == specs[summary["best"]["index"]].name


def test_tensor_batches_visit_each_sample_once_per_epoch():
    f = _feats(n=37)
    batches = tensor_batches(f, 8, seed=3)
    seen = torch.cat([b["labels"] * 0 + b["patch_mean"][:, 0] for b in batches(0)])
    assert sorted(seen.tolist()) == sorted(f["patch_mean"][:, 0].tolist())
    first = [b["patch_mean"][:, 0] for b in batches(1)]
    assert not torch.equal(torch.cat(first), seen)  # a new shuffle per epoch
    assert len(first) == math.ceil(37 / 8)


def _train_rank(rank, world_size, train):
    torch.manual_seed(0)
    heads = LinearHeads([HeadSpec(1, False, 0.3), HeadSpec(4, True, 0.1)], 6, 3)
    batches = tensor_batches(train, 8, seed=0)
    seen = torch.cat([b["patch_mean"][:, 0] for b in batches(0)])
    train_heads(heads, batches, epochs=2, iters_per_epoch=math.ceil(math.ceil(60 / world_size) / 8))
    return {"state": heads.state_dict(), "seen": seen}


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_share_the_data_and_keep_identical_heads(tmp_path):
    train = _feats(n=60)
    r0, r1 = run_distributed(_train_rank, world_size=2, args=(train,), tmp_path=tmp_path)
    for k in r0["state"]:
        torch.testing.assert_close(r0["state"][k], r1["state"][k])
    both = sorted(torch.cat([r0["seen"], r1["seen"]]).tolist())
    assert both == sorted(train["patch_mean"][:, 0].tolist())  # disjoint shards covering the epoch

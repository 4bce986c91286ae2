"""Linear probes: many linear heads trained at once on a frozen backbone (DINOv2's linear evaluation).

One backbone forward feeds a grid of heads: learning rate x CLS tokens of the last 1 or 4 blocks x with/without
the average-pooled patch tokens of the last block (Oquab et al. 2023, ``dinov2/eval/linear.py``). Each head is
``nn.Linear`` (weights N(0, 0.01), bias 0) trained with SGD (momentum 0.9, no weight decay) and a cosine schedule
to 0; the head with the best validation top-1 is selected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_distill.distributed import all_reduce_mean, get_rank, get_world_size
from ssl_distill.eval.features import Features

DEFAULT_LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


@dataclass(frozen=True)
class HeadSpec:
    """One head: CLS tokens of the last ``n_blocks`` blocks, optionally + pooled patches, trained at ``lr``."""

    n_blocks: int
    avgpool: bool
    lr: float

    @property
    def name(self) -> str:
        return f"blocks{self.n_blocks}_avgpool{int(self.avgpool)}_lr{self.lr:g}"


def head_grid(learning_rates: Sequence[float], n_blocks: Sequence[int] = (1, 4),
              avgpool: Sequence[bool] = (False, True)) -> list[HeadSpec]:
    """The full grid ``n_blocks x avgpool x learning_rates``."""
    return [HeadSpec(n, a, float(lr)) for n in n_blocks for a in avgpool for lr in learning_rates]


def linear_input(feats: Features, n_blocks: int, avgpool: bool) -> Tensor:
    """``cat(cls[:, -n_blocks:] flattened, [patch_mean])``: ``(B, D * (n_blocks + avgpool))``."""
    x = feats["cls"][:, -n_blocks:].flatten(1)
    return torch.cat([x, feats["patch_mean"]], dim=1) if avgpool else x


class LinearHeads(nn.Module):
    """Linear classifiers for a list of :class:`HeadSpec`; ``forward(feats)`` -> one ``(B, C)`` logits per head."""

    def __init__(self, specs: Sequence[HeadSpec], embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.specs = list(specs)
        self.heads = nn.ModuleList(nn.Linear(embed_dim * (s.n_blocks + int(s.avgpool)), num_classes) for s in specs)
        for head in self.heads:
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, feats: Features) -> list[Tensor]:
        inputs: dict[tuple[int, bool], Tensor] = {}
        out = []
        for spec, head in zip(self.specs, self.heads):
            key = (spec.n_blocks, spec.avgpool)
            if key not in inputs:
                inputs[key] = linear_input(feats, *key)
            out.append(head(inputs[key]))
        return out


def cosine_factor(step: int, total: int) -> float:
    """``0.5 * (1 + cos(pi * step / total))``: 1 at the start, 0 at the end."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def train_heads(
    heads: LinearHeads,
    batches: Callable[[int], Iterable[Features]],
    epochs: int,
    iters_per_epoch: int,
    lr_scale: float = 1.0,
    momentum: float = 0.9,
) -> list[float]:
    """Train every head on ``batches(epoch)`` (dicts with ``cls``, ``patch_mean``, ``labels``); returns mean losses.

    Head ``i`` uses ``lr = specs[i].lr * lr_scale`` times the cosine factor of the iteration. Gradients are
    averaged over ranks, so all ranks keep identical heads.
    """
    groups = [{"params": h.parameters(), "lr": s.lr * lr_scale, "base_lr": s.lr * lr_scale}
              for s, h in zip(heads.specs, heads.heads)]
    opt = torch.optim.SGD(groups, momentum=momentum, weight_decay=0.0)
    total, step, losses = epochs * iters_per_epoch, 0, []
    heads.train()
    for epoch in range(epochs):
        for feats in batches(epoch):
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * cosine_factor(step, total)
            logits = heads(feats)
            loss = sum(F.cross_entropy(out, feats["labels"]) for out in logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p in heads.parameters():
                all_reduce_mean(p.grad)
            opt.step()
            losses.append(float(loss.detach()) / len(logits))
            step += 1
    heads.eval()
    return losses


def tensor_batches(feats: Features, batch_size: int, seed: int = 0) -> Callable[[int], Iterator[Features]]:
    """``batches(epoch)`` over precomputed features: a seeded shuffle per epoch, split across ranks.

    Every rank gets ``ceil(N / world)`` samples (the permutation wraps around), so all ranks step equally often.
    """
    n, world, rank = feats["labels"].shape[0], get_world_size(), get_rank()
    per_rank = math.ceil(n / world)

    def batches(epoch: int) -> Iterator[Features]:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        perm = perm.repeat(math.ceil(per_rank * world / n))[: per_rank * world]
        mine = perm[rank * per_rank : (rank + 1) * per_rank]
        for start in range(0, per_rank, batch_size):
            idx = mine[start : start + batch_size]
            yield {k: v[idx] for k, v in feats.items()}

    return batches


@torch.no_grad()
def evaluate_heads(heads: LinearHeads, feats: Features, batch_size: int = 1024) -> list[float]:
    """Top-1 accuracy (percent) of every head on ``feats`` (the same on every rank: features are gathered)."""
    heads.eval()
    correct = torch.zeros(len(heads.heads), dtype=torch.long)
    n = feats["labels"].shape[0]
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in feats.items()}
        for i, logits in enumerate(heads(batch)):
            correct[i] += int((logits.argmax(dim=1) == batch["labels"]).sum())
    return [100.0 * int(c) / n for c in correct]


def summarize(specs: Sequence[HeadSpec], accuracies: Sequence[float]) -> dict:
    """``{"heads": [...every head...], "best": {...}}`` with the best head by validation top-1 (first on ties)."""
    rows = [{"name": s.name, **asdict(s), "top1": acc} for s, acc in zip(specs, accuracies)]
    best = max(range(len(rows)), key=lambda i: (rows[i]["top1"], -i))
    return {"heads": rows, "best": {**rows[best], "index": best}}

"""The training step's shape of work, checked on the CPU so that what makes a GPU step slow is caught without one.

A GPU step is host-bound when its tensor shapes change every step (new kernel plans: 4x on a ViT-S/14 step), when
the host waits for the device inside the step, or when host work (small tensor operations, index building) grows
with the depth of the model. Each test below pins one of these down on real batches from the training loader:

* the attention inputs have the same shapes in every step (stochastic depth keeps a fixed number of samples);
* the stochastic-depth draws of all blocks are made once per step (one :class:`DropPlan`), also when activation
  checkpointing recomputes the blocks;
* the whole step (teacher, student, losses, backward, clipping, AdamW, EMA) runs on PyTorch's ``meta`` device, where
  every read of a tensor's value on the host (``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero``, boolean
  indexing: each a device synchronisation on a GPU) raises. The collapse diagnostics of a log step are the documented
  exception (they read their statistics);
* the number of operations a step dispatches stays within a budget and does not depend on the batch.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ssl_distill.config import load_config
from ssl_distill.data.pipeline import build_train_dataset, build_train_loader
from ssl_distill.models import attention as attn_mod
from ssl_distill.models import vit as vit_mod
from ssl_distill.train.meta_arch import SSLMetaArch
from ssl_distill.train.optim import build_optimizer, param_groups

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"


def _cfg(photo_folder: str, **extra: object):
    overrides = {"train.dataset_path": photo_folder, "train.batch_size_per_gpu": 4, "student.drop_path_rate": 0.3,
                 "student.depth": 4, "student.drop_path_mode": "subset", **extra}
    return load_config(TINY, [f"{k}={v}" for k, v in overrides.items()])


def _batches(cfg, n: int, start: int = 0) -> list[dict]:
    loader = build_train_loader(cfg, build_train_dataset(cfg), start * cfg.train.batch_size_per_gpu, False)
    return list(itertools.islice(iter(loader), n))


def _meta(cfg) -> SSLMetaArch:
    torch.manual_seed(0)
    return SSLMetaArch(cfg).train()


def test_attention_shapes_are_the_same_in_every_step(photo_folder, monkeypatch):
    """Different images, masks and stochastic-depth draws in each step; the same attention input shapes: per
    resolution the full batch and the fixed kept subset of each rate."""
    cfg = _cfg(photo_folder)
    meta = _meta(cfg)
    seen: list[tuple[int, ...]] = []
    real = attn_mod.attention

    def recording(q, k, v, *args, **kwargs):
        seen.append(tuple(q.shape))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attn_mod, "attention", recording)
    per_step = []
    for batch in _batches(cfg, 4):
        seen.clear()
        meta.forward_backward(batch, 0.04)
        per_step.append(Counter(seen))
    assert all(step == per_step[0] for step in per_step), per_step
    shapes = set(per_step[0])
    # 8 global crops (2 x 4 images, 32 px = 16 patches + CLS), 8 local crops (2 x 4, 16 px = 4 patches + CLS)
    b_glob, b_loc = 8, 8
    k_glob, k_loc = int(b_glob * 0.7), int(b_loc * 0.7)
    heads = meta.student.backbone.num_heads
    dh = meta.student.backbone.embed_dim // heads
    assert shapes == {(b_glob, heads, 17, dh), (k_glob, heads, 17, dh), (b_loc, heads, 5, dh), (k_loc, heads, 5, dh)}


def test_drop_plan_is_made_once_per_step(photo_folder, monkeypatch):
    """One DropPlan per student forward (the teacher never drops), with and without activation checkpointing, and
    its device tables are built once."""
    made = []

    class CountingPlan(vit_mod.DropPlan):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(vit_mod, "DropPlan", CountingPlan)
    cfg = _cfg(photo_folder)
    batches = _batches(cfg, 2)
    for ckpt in (False, True):
        meta = _meta(cfg)
        meta.student.backbone.grad_checkpointing = ckpt
        for batch in batches:
            made.clear()
            meta.forward_backward(batch, 0.04)
            assert len(made) == 1, ckpt
            assert len(made[0].rates) == 2 * cfg.student.depth  # every block's two branches, drawn together


@contextlib.contextmanager
def _meta_autocast():
    """``torch.autocast`` accepts no ``"meta"`` device type; on it the losses' autocast-off scopes are no-ops."""
    real = torch.autocast

    def autocast(device_type, *args, **kwargs):
        return contextlib.nullcontext() if device_type == "meta" else real(device_type, *args, **kwargs)

    torch.autocast = autocast
    try:
        yield
    finally:
        torch.autocast = real


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
@pytest.mark.parametrize("mode", ["subset", "mask"])
def test_training_step_reads_no_tensor_value_on_the_host(photo_folder, centering, mode):
    """The step on the meta device, where tensors have shapes but no values: any host read of a value raises."""
    cfg = _cfg(photo_folder, **{"train.centering": centering, "student.drop_path_mode": mode})
    batches = _batches(cfg, 2)
    meta = _meta(cfg).to("meta")
    groups = []
    for name, module in meta.student.items():
        groups += param_groups(module, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult, name == "backbone")
    optimizer = build_optimizer(groups, (0.9, 0.999), torch.device("meta"))
    with _meta_autocast():
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            losses = meta.forward_backward(batch, 0.04)
            meta.clip_gradients(3.0)
            optimizer.step()
            meta.update_teacher(0.99)
        assert losses["total_loss"].device.type == "meta"
        with pytest.raises((RuntimeError, NotImplementedError)):  # the log step's diagnostics do read values
            meta.forward_backward(batches[0], 0.04, diagnostics=True)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _count_step_ops(meta: SSLMetaArch, batch: dict) -> Counter:
    with _meta_autocast(), _CountOps() as counter:
        meta.forward_backward(batch, 0.04)
    return counter.ops


# Operations dispatched by one step of the 4-block tiny model with stochastic depth 0.3 (forward and backward, the
# host-side draws included): 1,894 measured on 2026-12-04 (torch 2.14.1). The budget leaves 10 % for honest growth;
# host work per block and branch (a hash, an index built and copied per block: ~25 operations each, 8 branches)
# exceeds it.
OPS_BUDGET = 2080


def test_dispatched_ops_per_step_stay_within_budget(photo_folder):
    """From the second step on (the first has no pending centre update to apply), every step dispatches the same
    operations, whatever its batch size, and no more than the budget. On the meta device, so the step takes its
    device path (the CPU's split/cat gather of kept samples is made of as many pieces as the draw has runs)."""
    cfg = _cfg(photo_folder)
    meta = _meta(cfg).to("meta")
    counts = [_count_step_ops(meta, b) for b in _batches(cfg, 3)]
    assert counts[1] == counts[2]
    cfg8 = _cfg(photo_folder, **{"train.batch_size_per_gpu": 8})
    meta8 = _meta(cfg8).to("meta")
    assert [_count_step_ops(meta8, b) for b in _batches(cfg8, 2)][1] == counts[1]
    total = sum(counts[1].values())
    assert total <= OPS_BUDGET, counts[1].most_common(25)

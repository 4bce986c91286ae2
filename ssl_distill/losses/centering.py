"""The centring teacher shared by the DINO and iBOT losses: an EMA of batch means subtracted before sharpening
(DINO, Caron et al. 2021; iBOT, Zhou et al. 2022), with the reference's lazy, asynchronously reduced update.

The batch statistics are reduced over all ranks when ``torch.distributed`` is initialised, and computed locally
when it is not. The other teacher, Sinkhorn-Knopp, is :mod:`ssl_distill.losses.sinkhorn`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ssl_distill import distributed

__all__ = ["CenteredTeacherLoss"]


def _all_reduce_sum_async_(tensor: Tensor) -> dist.Work | None:
    """Start an in-place sum over ranks; returns the handle to ``wait()`` on, or None alone."""
    if distributed.get_world_size() > 1:
        return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)
    return None


class _PendingCenter(NamedTuple):
    batch_sum: Tensor
    count: int
    world_size: int
    handle: dist.Work | None


class CenteredTeacherLoss(nn.Module):
    """Base for losses whose teacher is centred by an EMA of batch means (DINO, Caron et al. 2021).

    Holds the ``center`` buffer of shape ``center_shape`` (zeros) and the reference's lazy update:
    :meth:`_start_center_update` stores this rank's batch sum and launches an asynchronous all-reduce (when
    distributed); :meth:`apply_center_update` waits for it and applies

        ``center = center * m + batch_sum / (count * world_size) * (1 - m)``

    exactly once. Subclasses call ``apply_center_update`` before centring, so the communication overlaps
    with the student's forward pass. Two differences from the reference, both intentional: a second
    ``update_center`` before the first was applied applies the first (the reference silently drops it), and
    ``state_dict()`` applies a pending update first so checkpoints hold the up-to-date centre (loading a
    state dict drops any pending update).
    """

    center: Tensor

    def __init__(self, center_shape: tuple[int, ...], center_momentum: float) -> None:
        super().__init__()
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}.")
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(center_shape))
        self._pending: _PendingCenter | None = None
        self.register_state_dict_pre_hook(_apply_pending_before_save)
        self.register_load_state_dict_pre_hook(_drop_pending_before_load)

    def _start_center_update(self, batch_sum: Tensor, count: int, sum_counts: bool = False) -> None:
        """Record this rank's ``batch_sum`` (broadcastable to ``center``) over ``count`` samples.

        ``sum_counts=False`` (reference): the centre uses ``sum / (count * world_size)``, exact when every rank
        holds ``count`` samples. ``sum_counts=True``: the counts are summed over ranks too (one all-reduce with the
        sums), so ranks may hold different numbers of samples; no update is made when the global count is 0.
        """
        self.apply_center_update()
        batch_sum = batch_sum.detach().to(self.center.dtype)
        if sum_counts:
            count_t = torch.full((1,), float(count), dtype=batch_sum.dtype, device=batch_sum.device)  # no copy
            batch_sum = torch.cat([batch_sum.reshape(-1), count_t])
        batch_sum = batch_sum.contiguous()
        handle = _all_reduce_sum_async_(batch_sum)
        world = 1 if sum_counts else distributed.get_world_size()
        self._pending = _PendingCenter(batch_sum, -1 if sum_counts else count, world, handle)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Apply the pending centre update, if any (waits for its all-reduce). Idempotent."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.handle is not None:
            pending.handle.wait()
        m = self.center_momentum
        if pending.count < 0:  # sum_counts: the last element is the global count; none anywhere -> no update
            total = pending.batch_sum[-1]
            batch_center = (pending.batch_sum[:-1] / total.clamp(min=1)).reshape(self.center.shape)
            updated = self.center * m + batch_center * (1 - m)
            self.center.copy_(torch.where(total > 0, updated, self.center))  # decided on the device: no sync
            return
        batch_center = pending.batch_sum / (pending.count * pending.world_size)
        self.center.copy_(self.center * m + batch_center * (1 - m))

    @torch.no_grad()
    def _centered_softmax(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """``softmax((teacher_logits - center) / teacher_temp)`` over the last dim; same shape as the input."""
        if teacher_temp <= 0:
            raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}.")
        if teacher_logits.shape[-1] != self.center.shape[-1]:
            raise ValueError(
                f"teacher logits have {teacher_logits.shape[-1]} classes but the centre has "
                f"{self.center.shape[-1]}; the loss's out_dim must equal the head's output size."
            )
        self.apply_center_update()
        center = self.center.reshape(-1)
        x = torch.sub(teacher_logits, center).mul_(1.0 / teacher_temp)  # one buffer, softmax in place
        x.sub_(x.amax(dim=-1, keepdim=True)).exp_()
        return x.div_(x.sum(dim=-1, keepdim=True))


def _apply_pending_before_save(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    if isinstance(module, CenteredTeacherLoss):
        module.apply_center_update()


def _drop_pending_before_load(module: nn.Module, *args: object, **kwargs: object) -> None:
    if isinstance(module, CenteredTeacherLoss):
        module._pending = None

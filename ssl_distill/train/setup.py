"""Precision and distributed wrapping of one run: the autocast dtype, DDP wrappers or FSDP2 sharding.

What the trainer does to the built model before the optimizer sees it; the training state that is saved and
restored is :mod:`ssl_distill.train.state`.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from ssl_distill import distributed
from ssl_distill.train.arch_base import StudentTeacherArch


def resolve_precision(cfg: DictConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype from ``train.precision`` (None = fp32, no autocast). CPU stays fp32 under ``auto``."""
    p = cfg.train.precision
    if p == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]


def wrap_for_distributed(meta: StudentTeacherArch, cfg: DictConfig, device: torch.device) -> None:
    """DDP wrappers for the student's parts, or FSDP2 ``fully_shard`` of student and teacher (per block).

    Wraps whenever a process group is initialised, also a single-process one (how the CUDA tests compare FSDP2
    with DDP on one GPU); a plain single-process run has none and stays unwrapped."""
    if not distributed.is_enabled():
        return
    import torch.distributed as dist

    meta.set_koleo_group(dist.new_group(backend="gloo" if device.type == "cpu" else None))
    if cfg.train.sharding == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        meta.set_student_forward({k: DDP(m, device_ids=ids, broadcast_buffers=False) for k, m in meta.student.items()})
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (distributed.get_world_size(),))
    for part in (meta.student, meta.teacher):
        for block in part.backbone.blocks:
            fully_shard(block, mesh=mesh)
        for module in part.values():
            fully_shard(module, mesh=mesh)

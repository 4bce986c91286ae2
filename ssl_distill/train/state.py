"""Device, precision, sharding and the full training state (save / restore) of one run.

The checkpoint holds the *full* (unsharded) model and optimizer state keyed by parameter names, gathered with
``torch.distributed.checkpoint.state_dict`` — the same public API for one process, DDP and FSDP2 — so a run may
resume on a different number of processes or with a different sharding. It holds no RNG state: every random draw
of a step (crops, masks, stochastic depth) is a function of the seed and the sample's global stream position.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ssl_distill import distributed
from ssl_distill.train.arch_base import StudentTeacherArch

logger = logging.getLogger(__name__)


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


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_state(
    meta: StudentTeacherArch, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, iteration: int,
    global_batch: int, config_yaml: str,
) -> dict[str, Any] | None:
    """The full training state (collective under FSDP: every rank must call it); None on ranks other than 0."""
    model = get_model_state_dict(meta, options=_FULL)
    optim = get_optimizer_state_dict(meta, optimizer, options=_FULL)
    if not distributed.is_main_process():
        return None
    return {
        "iteration": iteration,
        "model": model,
        "optimizer": optim,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "sampler_position": iteration * global_batch,
        "world_size": distributed.get_world_size(),
        "config": config_yaml,
        **meta.checkpoint_extras(),
    }


def restore_state(
    meta: StudentTeacherArch, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
    state: dict[str, Any],
) -> None:
    """Load a full training state into (possibly wrapped/sharded) model and optimizer, on every rank (after the
    architecture checked that the state belongs to it, e.g. the same distillation teacher)."""
    meta.check_resume(state)
    set_model_state_dict(meta, state["model"], options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(meta, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])

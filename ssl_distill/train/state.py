"""Device, precision, sharding and the full training state (save / restore) of one run.

The checkpoint holds the *full* (unsharded) model and optimizer state keyed by parameter names, gathered with
``torch.distributed.checkpoint.state_dict`` — the same public API for one process, DDP and FSDP2 — so a run may
resume on a different number of processes or with a different sharding.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
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
from ssl_distill.train.meta_arch import SSLMetaArch

logger = logging.getLogger(__name__)


def resolve_device(cfg: DictConfig, local_rank: int = 0) -> torch.device:
    """``train.device``: auto -> this rank's CUDA device when available, else CPU."""
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu (or auto).")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def resolve_precision(cfg: DictConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype from ``train.precision`` (None = fp32, no autocast). CPU stays fp32 under ``auto``."""
    p = cfg.train.precision
    if p == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]


def wrap_for_distributed(meta: SSLMetaArch, cfg: DictConfig, device: torch.device) -> None:
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


def rng_state() -> dict[str, Any]:
    """Every RNG the step may touch, as tensors/ints (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def gather_state(
    meta: SSLMetaArch, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, iteration: int,
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
        "rng": rng_state(),
        "sampler_position": iteration * global_batch,
        "world_size": distributed.get_world_size(),
        "config": config_yaml,
    }


def restore_state(
    meta: SSLMetaArch, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, state: dict[str, Any]
) -> None:
    """Load a full training state into (possibly wrapped/sharded) model and optimizer, on every rank."""
    set_model_state_dict(meta, state["model"], options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(meta, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if state.get("world_size", 1) == distributed.get_world_size():
        set_rng_state(state["rng"])  # per-rank RNG streams only carry over on the same world size

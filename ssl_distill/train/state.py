"""The full training state of one run: gathered for a checkpoint, restored on resume.

The checkpoint holds the *full* (unsharded) model and optimizer state keyed by parameter names, gathered with
``torch.distributed.checkpoint.state_dict`` — the same public API for one process, DDP and FSDP2 — so a run may
resume on a different number of processes or with a different sharding. It holds no RNG state: every random draw
of a step (crops, masks, stochastic depth) is a function of the seed and the sample's global stream position, and
the checkpoint records how far the stream was consumed (``sampler_position``), so a run resumed with another batch
size or number of processes continues the stream where it stopped (:func:`resume_position`).
Device, precision and wrapping are :mod:`ssl_distill.train.setup`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ssl_distill import distributed
from ssl_distill.train.arch_base import StudentTeacherArch, upgrade_model_state

logger = logging.getLogger(__name__)
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_state(
    meta: StudentTeacherArch, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, iteration: int,
    sampler_position: int, config_yaml: str,
) -> dict[str, Any] | None:
    """The full training state (collective under FSDP: every rank must call it); None on ranks other than 0.
    ``sampler_position``: the samples of the data stream the iterations before ``iteration`` consumed."""
    model = get_model_state_dict(meta, options=_FULL)
    optim = get_optimizer_state_dict(meta, optimizer, options=_FULL)
    if not distributed.is_main_process():
        return None
    return {
        "iteration": iteration,
        "model": model,
        "optimizer": optim,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "sampler_position": sampler_position,
        "world_size": distributed.get_world_size(),
        "config": config_yaml,
        **meta.checkpoint_extras(),
    }


def restore_state(
    meta: StudentTeacherArch, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
    state: dict[str, Any],
) -> None:
    """Load a full training state into (possibly wrapped/sharded) model and optimizer, on every rank (after the
    architecture checked that the state belongs to it, e.g. the same distillation teacher). Checkpoints of older
    versions load too (:func:`~ssl_distill.train.arch_base.upgrade_model_state`)."""
    meta.check_resume(state)
    set_model_state_dict(meta, upgrade_model_state(state["model"]), options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(meta, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


def resume_position(state: dict[str, Any], global_batch: int) -> int:
    """Where the resumed run's data stream starts: the checkpoint's ``sampler_position`` (older checkpoints without
    one: ``iteration * global_batch``). Says in the log when the processes or the global batch changed, as that
    changes the samples per iteration (and the derived ``optim.lr``) from here on."""
    iteration = int(state["iteration"])
    position = int(state.get("sampler_position", iteration * global_batch))
    written_by, now = state.get("world_size"), distributed.get_world_size()
    if written_by is not None and int(written_by) != now:
        logger.warning("resuming on %d processes a run checkpointed by %d: the global batch is now %d images; the "
                       "data stream continues at sample %d", now, int(written_by), global_batch, position)
    elif position != iteration * global_batch:
        logger.info("the global batch changed to %d images; the data stream continues at sample %d", global_batch,
                    position)
    return position

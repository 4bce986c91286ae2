"""The output directory of a run, before the first step: lock it, tidy it, settle whose it is, check its room.

:func:`take_run_lock` (one run per directory, :mod:`~ssl_distill.train.run_lock`), then on rank 0
:func:`prepare_output_dir` (temp files of killed writes removed, the run's identity and the checkpoint to resume
from, :mod:`~ssl_distill.train.run_identity`) and :func:`check_room_for_a_checkpoint` (a full disk fails the start,
not the first checkpoint hours later).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ssl_distill import distributed
from ssl_distill.fileio import check_free_space, remove_stale_temp_files, tensor_bytes
from ssl_distill.train import checkpoint as ckpt
from ssl_distill.train.run_identity import check_checkpoint_run, new_run_id, read_run_id, start_over, write_run_id
from ssl_distill.train.run_lock import RunLock, RunLockedError


def take_run_lock(output_dir: Path) -> RunLock | None:
    """Rank 0 locks ``output_dir`` for this run; a refusal is raised on every rank."""
    lock, refusal = None, None
    if distributed.is_main_process():
        try:
            lock = RunLock(output_dir).acquire()
        except RunLockedError as exc:
            refusal = str(exc)
    refusal = distributed.broadcast_object(refusal)
    if refusal is not None:
        raise RunLockedError(refusal)
    return lock


def prepare_output_dir(output_dir: Path, resume: bool) -> tuple[tuple[Path, dict[str, Any]] | None, str]:
    """Rank 0, under the run lock: remove stale temp files; then the checkpoint to resume from (path and state,
    None to start fresh) and the run id to write into new checkpoints. ``resume=False`` moves an earlier run's files
    aside; a checkpoint of another run raises :class:`~ssl_distill.train.run_identity.ForeignCheckpointError`."""
    remove_stale_temp_files(output_dir)
    if not resume:
        return None, start_over(output_dir)
    found = ckpt.load_latest_intact(output_dir)
    if found is not None:
        return found, check_checkpoint_run(output_dir, *found)
    return None, read_run_id(output_dir) or write_run_id(output_dir, new_run_id())


def check_room_for_a_checkpoint(meta: torch.nn.Module, path: Path) -> None:
    """Raise :class:`~ssl_distill.fileio.DiskFullError` when ``path``'s disk cannot hold a checkpoint of ``meta``
    (estimated as its state plus AdamW's two moments per trainable parameter)."""
    trainable = sum(tensor_bytes(p) for p in meta.parameters() if p.requires_grad)
    check_free_space(path, tensor_bytes(meta.state_dict()) + 2 * trainable,
                     advice="the run could not save a checkpoint: free space or choose another --output-dir")

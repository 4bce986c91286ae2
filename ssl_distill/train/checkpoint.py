"""Checkpoint policy: atomic save, keep-last-k, the newest intact checkpoint to resume from, export.

The file format (keys, reading, ``extract_backbone``) lives in :mod:`ssl_distill.checkpoint_format`. Files are
``model_{iteration:07d}.pth`` in the output directory plus a ``last_checkpoint`` pointer; both are written
atomically, and older checkpoints are pruned only after the new one is safely in place.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from ssl_distill.checkpoint_format import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    NewerCheckpointError,
    extract_backbone,
    load_checkpoint,
)
from ssl_distill.fileio import atomic_open, atomic_write_text, tensor_bytes

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "export_backbone", "extract_backbone", "find_latest_checkpoint",
           "list_checkpoints", "load_checkpoint", "load_latest_intact", "save_checkpoint"]
logger = logging.getLogger(__name__)
_NAME_RE = re.compile(r"^model_(\d{7,})\.pth$")
POINTER = "last_checkpoint"
DAMAGED_SUFFIX = ".damaged"
CHECKPOINT_ADVICE = ("free space (older checkpoints: train.keep_last_checkpoints) or move the output directory to a "
                     "larger disk, then run the same command again to resume from the last checkpoint")


def checkpoint_path(output_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(output_dir) / f"model_{iteration:07d}.pth"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints in ``output_dir`` sorted by iteration."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(output_dir: str | os.PathLike, state: dict[str, Any], keep_last: int = 3) -> Path:
    """Write ``state`` atomically as ``model_{iteration}.pth``, point ``last_checkpoint`` at it, prune old ones."""
    path = checkpoint_path(output_dir, int(state["iteration"]))
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    with atomic_open(path, "wb", expected_size=tensor_bytes(payload), advice=CHECKPOINT_ADVICE) as f:
        torch.save(payload, f)
    atomic_write_text(Path(output_dir) / POINTER, path.name + "\n")
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            if old != path:
                old.unlink(missing_ok=True)
    logger.info("saved checkpoint %s", path)
    return path


class CheckpointError(RuntimeError):
    """A resume that cannot go on (no intact checkpoint, a pointer outside the run); the message says what to do."""


def _pointer_target(output_dir: Path) -> Path | None:
    """The file ``last_checkpoint`` names, or None (no pointer, or one that is unreadable: warned about).

    Raises :class:`CheckpointError` when it names a file outside ``output_dir``: a run resumes only from itself.
    """
    pointer = output_dir / POINTER
    if not pointer.is_file():
        return None
    try:
        text = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        logger.warning("ignoring %s: it does not hold a file name (%s)", pointer, type(exc).__name__)
        return None
    if not text or "\n" in text or "\x00" in text:
        logger.warning("ignoring %s: it does not hold a file name", pointer)
        return None
    target = Path(text) if os.path.isabs(text) else output_dir / text
    if target.resolve().parent != output_dir.resolve():
        raise CheckpointError(
            f"{pointer} points to '{text}', outside the output directory {output_dir}. A run resumes only from the "
            f"checkpoints of its own directory: copy that checkpoint into {output_dir} and write its file name into "
            f"{pointer.name}, or delete {pointer.name} to resume from the newest model_*.pth there."
        )
    return target


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``last_checkpoint``, else the highest-numbered one, else None (nothing is read)."""
    d = Path(output_dir)
    candidate = _pointer_target(d)
    if candidate is not None and candidate.is_file():
        return candidate
    found = list_checkpoints(d)
    return found[-1] if found else None


def load_latest_intact(output_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of ``output_dir`` that reads back, and its state; None when there is none at all.

    Tries the file ``last_checkpoint`` names, then every ``model_*.pth`` from the newest down. A file that does not
    read back (truncated, garbage, not a checkpoint) is warned about and renamed ``<name>.damaged`` — kept for
    inspection, never deleted, no longer pruned or tried again — and the next one is tried. When checkpoints exist
    but none is intact, raises :class:`CheckpointError` naming them and the fix. A checkpoint of a newer format
    (:class:`~ssl_distill.checkpoint_format.NewerCheckpointError`) is intact: it stops the resume as it is.
    """
    d = Path(output_dir)
    pointed = _pointer_target(d)
    candidates = ([pointed] if pointed is not None and pointed.is_file() else [])
    candidates += [p for p in reversed(list_checkpoints(d)) if p not in candidates]
    damaged: list[str] = []
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except NewerCheckpointError as exc:
            raise CheckpointError(str(exc)) from None  # resuming from an older one would throw its work away
        except (ValueError, OSError) as exc:
            kept = path
            if _NAME_RE.match(path.name):
                kept = path.with_name(path.name + DAMAGED_SUFFIX)
                os.replace(path, kept)
            logger.warning("cannot resume from %s (%s); kept it as %s and trying an older checkpoint", path, exc, kept)
            damaged.append(kept.name)
    if damaged:
        raise CheckpointError(
            f"no intact checkpoint in {d}: {', '.join(damaged)} cannot be read (they were left in place). Restore a "
            "good copy of a checkpoint into the directory, or start over with --no-resume (or another --output-dir)."
        )
    return None


def export_backbone(checkpoint: str | os.PathLike, output: str | os.PathLike, which: str = "teacher") -> Path:
    """Write the teacher (or student) backbone of a checkpoint as a plain state dict, atomically."""
    weights = {k: v.contiguous() for k, v in extract_backbone(load_checkpoint(checkpoint), which).items()}
    with atomic_open(output, "wb", expected_size=tensor_bytes(weights)) as f:
        torch.save(weights, f)
    logger.info("exported %s backbone (%d tensors) to %s", which, len(weights), output)
    return Path(output)

"""Checkpoint files: atomic save, keep-last-k, find-latest, load, and export of the teacher backbone.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python containers, so it loads with
``torch.load(weights_only=True)``. Layout::

    {"format": "ssl_distill.checkpoint", "version": 1, "iteration": next iteration to run,
     "model": {"student.backbone.*": ..., "teacher.dino_head.*": ..., "dino_loss.center": ...},  # full state dict
     "optimizer": ..., "scaler": ... | None, "sampler_position": global sample index, "world_size": int,
     "config": YAML text}

Files are ``model_{iteration:07d}.pth`` in the output directory plus a ``last_checkpoint`` pointer; both are written
atomically, and older checkpoints are pruned only after the new one is safely in place.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from ssl_distill.fileio import atomic_open, atomic_write_text

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "ssl_distill.checkpoint"
_NAME_RE = re.compile(r"^model_(\d{7,})\.pth$")
POINTER = "last_checkpoint"


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
    payload = {"format": CHECKPOINT_FORMAT, "version": 1, **state}
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)
    atomic_write_text(Path(output_dir) / POINTER, path.name + "\n")
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            if old != path:
                old.unlink(missing_ok=True)
    logger.info("saved checkpoint %s", path)
    return path


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``last_checkpoint``, else the highest-numbered one, else None."""
    d = Path(output_dir)
    pointer = d / POINTER
    if pointer.is_file():
        candidate = d / pointer.read_text().strip()
        if candidate.is_file():
            return candidate
    found = list_checkpoints(d)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one of our training checkpoints (weights_only) and check that it is one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint '{path}' does not exist.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"Cannot read checkpoint '{path}' ({type(exc).__name__}: {exc}). Is it complete?") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"'{path}' is not an ssl_distill training checkpoint. For backbone weights (exported or official "
            "DINOv2 files) load them with ssl_distill.hub instead."
        )
    return state


def extract_backbone(state: dict[str, Any], which: str = "teacher") -> dict[str, torch.Tensor]:
    """The ``which`` backbone's weights in the official DINOv2 key layout."""
    prefix = f"{which}.backbone."
    out = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"The checkpoint holds no '{which}' backbone (keys starting with '{prefix}').")
    return out


def export_backbone(checkpoint: str | os.PathLike, output: str | os.PathLike, which: str = "teacher") -> Path:
    """Write the teacher (or student) backbone of a checkpoint as a plain state dict, atomically."""
    weights = extract_backbone(load_checkpoint(checkpoint), which)
    with atomic_open(output, "wb") as f:
        torch.save({k: v.contiguous() for k, v in weights.items()}, f)
    logger.info("exported %s backbone (%d tensors) to %s", which, len(weights), output)
    return Path(output)

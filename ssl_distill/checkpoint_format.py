"""The training-checkpoint file and safe reading of weights files; used by train, eval and hub alike.

A training checkpoint is one ``torch.save`` file holding only tensors and plain Python containers, so it loads with
``torch.load(weights_only=True)``. Layout::

    {"format": "ssl_distill.checkpoint", "version": 1, "iteration": next iteration to run,
     "model": {"student.backbone.*": ..., "teacher.dino_head.*": ..., "objective.dino_loss.center": ...},
     "optimizer": ..., "scaler": ... | None, "sampler_position": samples of the data stream consumed so far,
     "world_size": processes that wrote it, "config": YAML text,
     "run_id": the writing run's id (absent in checkpoints of older versions)}

``version`` is checked on load (:func:`check_checkpoint_version`): a file of a newer format than this code knows is
refused with one message saying to upgrade; older versions and files without one (written before it was recorded)
load as they are.

``model`` is the full state dict. The backbones inside (``student.backbone.*``, ``teacher.backbone.*``) have the
official DINOv2 key layout; the loss centres are ``objective.*`` (``dino_loss.*`` / ``ibot_patch_loss.*`` at the top
level in checkpoints of older versions, which load too).
Where checkpoints are written, kept and resumed from is :mod:`ssl_distill.train.checkpoint`'s business.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ssl_distill.pickle_scan import unsafe_globals

CHECKPOINT_FORMAT = "ssl_distill.checkpoint"
CHECKPOINT_VERSION = 1  # the format this code writes; every version up to it loads
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class WeightsFileError(ValueError):
    """A weights or checkpoint file that cannot be read as it is; the message names the file and what to do."""


class NewerCheckpointError(WeightsFileError):
    """A training checkpoint written in a format newer than this code knows: the file is fine, the code is old."""


def describe_read_error(path: Path, exc: Exception) -> str:
    """One complete sentence for a failed ``torch.load(weights_only=True)`` / safetensors read of ``path``."""
    text = str(exc)
    found = unsafe_globals(path) if path.suffix != ".safetensors" else []  # whatever torch's wording: the opcodes
    if not found and isinstance(exc, pickle.UnpicklingError) and (match := _UNSAFE_GLOBAL.search(text)):
        found = [match.group(1)]
    if found:
        return (f"'{path}' holds Python objects besides tensors ({', '.join(found[:5])}), which "
                "torch.load(weights_only=True) refuses to unpickle because loading them can run arbitrary code "
                "from the file. Only if you trust its source: load it once with torch.load(path, "
                "weights_only=False) and torch.save just its state dict of tensors to a new file, then use that file.")
    if "WeightsUnpickler error:" in text:  # not a pickle of tensors at all: say what the unpickler met
        text = text.split("WeightsUnpickler error:", 1)[1]
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return (f"cannot read weights file '{path}' ({type(exc).__name__}: {first}); is it a complete PyTorch (.pth) or "
            "safetensors file?")


def read_weights_file(path: str | os.PathLike) -> Any:
    """The object in a ``.safetensors`` file or a ``torch.save`` file (``weights_only=True``), on the CPU.

    Raises :class:`FileNotFoundError` for a missing file and :class:`WeightsFileError` for an unreadable one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file '{path}' does not exist (or is not a file); check the path.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, an HTML error page, a pickle with code, ...
        raise WeightsFileError(describe_read_error(path, exc)) from None


def is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def check_checkpoint_version(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise :class:`NewerCheckpointError` when the checkpoint ``state`` (read from ``path``) records a format
    version this code does not know; a checkpoint without a version (older files) passes."""
    version = state.get("version")
    if version is None or (isinstance(version, int) and not isinstance(version, bool)
                           and 0 < version <= CHECKPOINT_VERSION):
        return
    from ssl_distill import __version__

    raise NewerCheckpointError(
        f"'{path}' is a training checkpoint of format version {version!r}, but this ssl_distill ({__version__}) "
        f"reads versions up to {CHECKPOINT_VERSION}: it was written by a newer release. Upgrade ssl_distill "
        "(pip install --upgrade ssl_distill, or update your checkout) to load it.")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load one of our training checkpoints and check that it is one (:class:`WeightsFileError` otherwise) of a
    format version this code reads (:class:`NewerCheckpointError` otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint '{path}' does not exist.")
    state = read_weights_file(path)
    if not is_training_checkpoint(state):
        raise WeightsFileError(
            f"'{path}' is not an ssl_distill training checkpoint. For backbone weights (exported or official "
            "DINOv2 files) load them with ssl_distill.hub instead."
        )
    check_checkpoint_version(state, path)
    return state


def extract_backbone(state: dict[str, Any], which: str = "teacher") -> dict[str, torch.Tensor]:
    """The ``which`` backbone's weights of a training checkpoint, in the official DINOv2 key layout."""
    prefix = f"{which}.backbone."
    out = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    if not out:
        raise WeightsFileError(f"The checkpoint holds no '{which}' backbone (keys starting with '{prefix}').")
    return out

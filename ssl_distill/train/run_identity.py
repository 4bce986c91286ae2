"""Which run an output directory and its checkpoints belong to; starting over without mixing two runs.

A run gets a random id at its first start, written to ``<output_dir>/run_id`` and into every checkpoint it saves
(``"run_id"``). A resume accepts only checkpoints of the directory's own run, so another run's ``model_*.pth`` copied
into the directory is refused with one line naming both runs, never silently adopted. Checkpoints written before
run ids existed (no ``"run_id"``) are accepted, and the directory adopts an id from then on.

Starting over (``--no-resume``) in a used directory moves the earlier run's files (checkpoints, pointer, metrics,
config, exported teacher, TensorBoard logs, run id) into ``previous_runs/<its run id>/``: nothing is deleted, and
keep-last-N pruning or a later fallback can never pick up the other run's checkpoints.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from ssl_distill.fileio import atomic_write_text
from ssl_distill.train.checkpoint import CheckpointError

logger = logging.getLogger(__name__)
RUN_ID_FILE = "run_id"
PREVIOUS_RUNS = "previous_runs"
# what belongs to one run (``logs/`` stays: it is open, and its lines are dated)
_RUN_FILES = re.compile(r"^(model_\d{7,}\.pth(\.damaged)?|last_checkpoint|teacher_backbone\.pth|"
                        r"training_metrics\.jsonl|config\.yaml|tensorboard|run_id)$")


class ForeignCheckpointError(CheckpointError):
    """A checkpoint of another run in the output directory; the message names both runs and the choices."""


def new_run_id() -> str:
    """A fresh id: the start time (readable, sortable) and 8 random hex digits."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def read_run_id(output_dir: str | os.PathLike) -> str | None:
    """The id recorded in ``output_dir`` (None when there is none or it is unreadable)."""
    try:
        text = (Path(output_dir) / RUN_ID_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if text and "\n" not in text and len(text) < 200 else None


def write_run_id(output_dir: str | os.PathLike, run_id: str) -> str:
    atomic_write_text(Path(output_dir) / RUN_ID_FILE, run_id + "\n")
    return run_id


def check_checkpoint_run(output_dir: Path, checkpoint: Path, state: dict[str, Any]) -> str:
    """The run id to continue with when resuming ``output_dir`` from ``checkpoint`` (its ``state``).

    Raises :class:`ForeignCheckpointError` when the checkpoint names another run than the directory (or names a run
    while the directory records none: it was copied in). A checkpoint without an id (written before ids existed)
    continues the directory's run, which gets an id now if it had none.
    """
    own, theirs = read_run_id(output_dir), state.get("run_id")
    if theirs is None or theirs == own:
        return own or write_run_id(output_dir, new_run_id())
    origin = _config_output_dir(state)
    mine = f"run {own}" if own else "no run (it has no run_id file)"
    raise ForeignCheckpointError(
        f"{checkpoint} belongs to another run ({theirs}{f', written in {origin}' if origin else ''}) than "
        f"{output_dir}, which records {mine}; it was copied in or the directories were mixed up, and resuming "
        "would continue (and overwrite the exports of) the other run. Choose: start over here with --no-resume (the "
        f"files found are moved to {PREVIOUS_RUNS}/), use another --output-dir, or, to continue that run here on "
        f"purpose, copy its {RUN_ID_FILE} file (it holds '{theirs}') into {output_dir}."
    )


def _config_output_dir(state: dict[str, Any]) -> str | None:
    """The ``train.output_dir`` recorded in a checkpoint's config text (None when absent)."""
    found = re.search(r"^  output_dir: (.+)$", str(state.get("config") or ""), re.MULTILINE)
    return found.group(1).strip().strip("'\"") if found else None


def start_over(output_dir: str | os.PathLike) -> str:
    """A new run in ``output_dir``: move an earlier run's files aside (logged in one line); the new run's id."""
    d = Path(output_dir)
    found = sorted(p for p in d.iterdir() if _RUN_FILES.match(p.name)) if d.is_dir() else []
    if found:
        old = re.sub(r"[^A-Za-z0-9._-]", "_", read_run_id(d) or f"before-{time.strftime('%Y%m%d-%H%M%S')}")
        dest = d / PREVIOUS_RUNS / (old.lstrip(".") or "run")
        while dest.exists():
            dest = dest.with_name(dest.name + "+")
        dest.mkdir(parents=True)
        for path in found:
            os.replace(path, dest / path.name)
        logger.warning("starting over (--no-resume): moved the earlier run's %d files (%s) to %s", len(found),
                       ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else ""), dest)
    return write_run_id(d, new_run_id())

"""Collapse diagnostics of self-distillation over a run: :class:`CollapseMonitor` reads the ``diag_*`` statistics of
every metrics record and warns once when ``I / ln K`` (the teacher's information about the image) or the CLS-token
spread stays below a threshold; :class:`DivergenceWatch` notices a non-finite loss without waiting for the device.

The statistics themselves, and the two ways a teacher collapses (uniform, dominant), are
:mod:`ssl_distill.losses.collapse`; the objective computes them once per log period.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from omegaconf import DictConfig
from torch import Tensor

from ssl_distill import distributed
from ssl_distill.losses.collapse import PREFIX

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- the rule
INFO_MIN = 0.02  # teacher mutual information / ln K below which the teacher says (almost) nothing about the image
CLS_STD_MIN = 0.02  # CLS-token spread (x sqrt(D)) below which the features barely depend on the image
PATIENCE = 3  # consecutive log records the condition must hold


def collapse_signs(record: Mapping[str, float]) -> list[str]:
    """The collapse signs in one metrics record (empty when healthy or when the record has no statistics)."""
    signs = []
    for part in ("dino", "ibot"):
        info = record.get(f"{PREFIX}{part}_teacher_info")
        if info is None or info >= INFO_MIN:
            continue
        entropy = record[f"{PREFIX}{part}_teacher_entropy"]
        mode = "uniform" if entropy >= 0.5 else "dominant"
        signs.append(
            f"{part.upper()} teacher {mode} collapse (information about the image {info:.3f} ln K < {INFO_MIN}; "
            f"mean entropy {entropy:.3f} ln K, batch-mean entropy "
            f"{record[f'{PREFIX}{part}_teacher_batch_entropy']:.3f} ln K, "
            f"{record[f'{PREFIX}{part}_prototypes_used']:.0f} prototypes in use)"
        )
    std = record.get(f"{PREFIX}cls_std")
    if std is not None and std < CLS_STD_MIN:
        signs.append(f"CLS features do not depend on the image (std across the batch {std:.4f} x 1/sqrt(D) "
                     f"< {CLS_STD_MIN})")
    return signs


_CAUSES = {
    "uniform": (
        "teacher too soft for the batch (lower teacher.teacher_temp / teacher.warmup_teacher_temp, e.g. 0.04), "
        "residual branches silenced by a tiny LayerScale in a short run (raise student.layerscale, e.g. 0.1-1.0), "
        "learning rate too low or warm-up too long (optim.base_lr, optim.warmup_epochs), too many prototypes for "
        "the batch (dino.head_n_prototypes / ibot.head_n_prototypes), or try train.centering=sinkhorn_knopp"
    ),
    "dominant": (
        "teacher too sharp or centring too slow (raise teacher.teacher_temp, or train.centering=sinkhorn_knopp), "
        "learning rate too high (optim.base_lr), teacher momentum too low (teacher.momentum_teacher)"
    ),
    "features": (
        "residual branches silenced by a tiny LayerScale (student.layerscale), learning rate too low or warm-up "
        "too long (optim.base_lr, optim.warmup_epochs), too little spreading (dino.koleo_loss_weight)"
    ),
}


def collapse_message(iteration: int, signs: list[str], patience: int) -> str:
    """The one warning: what was seen, for how long, the likely causes and the config keys to change."""
    kinds = {"uniform" if "uniform" in s else "dominant" if "dominant" in s else "features" for s in signs}
    causes = "; ".join(_CAUSES[k] for k in ("uniform", "dominant", "features") if k in kinds)
    return (
        f"Self-distillation looks collapsed at iteration {iteration}: for {patience} consecutive log periods "
        f"{'; '.join(signs)}. The student is learning (almost) nothing about the images from such a teacher. "
        f"Likely causes and the keys to change: {causes}. configs/small_data.yaml is a recipe that learns on "
        "small data sets in short runs. (Statistics: diag_* in training_metrics.jsonl.)"
    )


class CollapseMonitor:
    """Watches the ``diag_*`` statistics of every metrics record and logs ONE warning per run when collapse is
    sustained: :func:`collapse_signs` non-empty in :data:`PATIENCE` consecutive records, counted only after the
    learning-rate warm-up (a freshly initialised network may look collapsed before its first updates)."""

    def __init__(self, cfg: DictConfig, patience: int = PATIENCE, log: bool = True) -> None:
        self.grace_iterations = cfg.optim.warmup_epochs * cfg.train.iters_per_epoch
        self.patience = patience
        self.log = log
        self.streak = 0
        self.warning: str | None = None

    def update(self, iteration: int, record: Mapping[str, float]) -> str | None:
        """Feed the record logged after ``iteration`` iterations; returns the warning when it is issued."""
        if self.warning is not None or iteration <= self.grace_iterations:
            return None
        signs = collapse_signs(record)
        self.streak = self.streak + 1 if signs else 0
        if self.streak < self.patience:
            return None
        self.warning = collapse_message(iteration, signs, self.patience)
        if self.log:
            logger.warning(self.warning)
        return self.warning


def replay_collapse_monitor(cfg: DictConfig, records: list[Mapping[str, float]]) -> str | None:
    """The warning a run's metrics records (``read_metrics``) gave or would give, without logging it again."""
    monitor = CollapseMonitor(cfg, log=False)
    for record in records:
        monitor.update(int(record["iteration"]), record)
    return monitor.warning


class DivergenceWatch:
    """Notices a non-finite loss without waiting for the device in every step.

    :meth:`watch` folds each step's total loss into a device-side record of the first bad iteration (no
    synchronisation); :meth:`first_bad` reads it (one device sync and one all-reduce, so every rank agrees). The
    trainer reads it at log periods and before every checkpoint, so a checkpoint never holds the state after a
    diverged step.
    """

    _NONE = 2**62

    def __init__(self) -> None:
        self._first: Tensor | None = None

    def watch(self, total: Tensor, iteration: int) -> None:
        """Record ``iteration`` if ``total`` (a scalar loss on the device) is NaN or infinite."""
        bad = torch.where(torch.isfinite(total.detach()), self._NONE, iteration)
        self._first = bad if self._first is None else torch.minimum(self._first, bad)

    def first_bad(self) -> int | None:
        """The first iteration (on any rank) whose loss was not finite, or None (a collective)."""
        if self._first is None:
            return None
        value = int(distributed.all_reduce_min(self._first.clone().view(1)).item())
        return None if value >= self._NONE else value

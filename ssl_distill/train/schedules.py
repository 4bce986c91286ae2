"""Per-iteration schedules of the DINOv2 recipe, in closed form.

Every schedule is a pure function of the iteration, so resuming at iteration ``it`` needs no replay. They match
DINOv2's ``CosineScheduler`` arrays value for value (``freeze`` zeros, then ``np.linspace`` warm-up including its
end point, then a half cosine from ``base`` to ``final``; ``final`` from ``total_iters`` on).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from omegaconf import DictConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CosineSchedule:
    """``freeze_iters`` zeros, linear warm-up ``start_warmup_value -> base_value``, cosine ``base -> final``."""

    base_value: float
    final_value: float
    total_iters: int
    warmup_iters: int = 0
    start_warmup_value: float = 0.0
    freeze_iters: int = 0

    def __post_init__(self) -> None:
        if self.warmup_iters + self.freeze_iters > self.total_iters:
            raise ValueError(
                f"Schedule warm-up ({self.warmup_iters}) + freeze ({self.freeze_iters}) iterations exceed the "
                f"{self.total_iters} total iterations: shorten the warm-up epochs or train for more epochs."
            )

    def __call__(self, it: int) -> float:
        if it >= self.total_iters:
            return self.final_value
        if it < self.freeze_iters:
            return 0.0
        it -= self.freeze_iters
        if it < self.warmup_iters:
            if self.warmup_iters == 1:  # np.linspace(a, b, 1) == [a]
                return self.start_warmup_value
            return self.start_warmup_value + (self.base_value - self.start_warmup_value) * it / (self.warmup_iters - 1)
        it -= self.warmup_iters
        n = self.total_iters - self.warmup_iters - self.freeze_iters
        return self.final_value + 0.5 * (self.base_value - self.final_value) * (1 + math.cos(math.pi * it / n))


@dataclass(frozen=True)
class WarmEMAMomentum:
    """An EMA momentum schedule capped by ``(1 + it) / (10 + it)`` (the Polyak-average warm-up of TensorFlow's
    ``ExponentialMovingAverage(num_updates=...)``, also timm's ``ModelEmaV3(use_warmup=True)``): the average forgets
    the initial weights within tens of iterations instead of ``1 / (1 - m)``. Used for distillation's EMA student,
    a plain weight average; pretraining's EMA teacher is part of the self-distillation recipe and keeps its
    schedule."""

    schedule: CosineSchedule

    def __call__(self, it: int) -> float:
        return min(self.schedule(it), (1.0 + it) / (10.0 + it))


@dataclass(frozen=True)
class Schedules:
    """All per-iteration values the training step needs."""

    lr: CosineSchedule
    last_layer_lr: CosineSchedule
    wd: CosineSchedule
    momentum: CosineSchedule | WarmEMAMomentum
    teacher_temp: CosineSchedule
    last_layer_freeze_iters: int
    backbone_freeze_iters: int = 0

    def at(self, it: int) -> dict[str, float]:
        last_layer_lr = 0.0 if it < self.last_layer_freeze_iters else self.last_layer_lr(it)
        return {
            "lr": self.lr(it),
            "last_layer_lr": last_layer_lr,
            "backbone_lr_factor": 0.0 if it < self.backbone_freeze_iters else 1.0,
            "wd": self.wd(it),
            "momentum": self.momentum(it),
            "teacher_temp": self.teacher_temp(it),
        }


def scaled_lr(base_lr: float, global_batch_size: int, rule: str) -> float:
    """``optim.lr`` from ``optim.base_lr`` and the global batch size (all ranks together)."""
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch_size / 1024.0)
    if rule == "linear_wrt_256":
        return base_lr * global_batch_size / 256.0
    if rule == "none":
        return base_lr
    raise ValueError(f"Unknown optim.scaling_rule '{rule}': use sqrt_wrt_1024, linear_wrt_256 or none.")


def apply_scaling_rules(cfg: DictConfig, world_size: int) -> float:
    """The peak learning rate ``cfg.optim.lr``; returns it.

    ``optim.lr`` 0 (the default): derived from ``base_lr`` and the global batch by ``scaling_rule``, as DINOv2 does
    at start-up, and written into the config (so the run's config.yaml shows it). A value > 0 set by the user wins:
    it is used as is and ``base_lr`` / ``scaling_rule`` are ignored (logged).
    """
    global_batch = cfg.train.batch_size_per_gpu * world_size
    if cfg.optim.lr > 0:
        logger.info("optim.lr=%g is set: used as the peak learning rate as is (optim.base_lr and optim.scaling_rule "
                    "are ignored; set optim.lr=0 to derive it for the global batch of %d)", cfg.optim.lr, global_batch)
        return cfg.optim.lr
    cfg.optim.lr = scaled_lr(cfg.optim.base_lr, global_batch, cfg.optim.scaling_rule)
    logger.info("optim.lr=%g: optim.base_lr=%g scaled by %s for the global batch of %d", cfg.optim.lr,
                cfg.optim.base_lr, cfg.optim.scaling_rule, global_batch)
    return cfg.optim.lr


def build_schedules(cfg: DictConfig) -> Schedules:
    """The recipe's schedules; ``cfg.optim.lr`` must already be resolved (:func:`apply_scaling_rules`)."""
    ep = cfg.train.iters_per_epoch
    total = cfg.optim.epochs * ep
    lr = CosineSchedule(cfg.optim.lr, cfg.optim.min_lr, total, warmup_iters=cfg.optim.warmup_epochs * ep)
    warm_temp = cfg.teacher.warmup_teacher_temp_epochs * ep
    momentum = CosineSchedule(cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher, total)
    if cfg.train.mode == "distill" and cfg.distill.ema_warmup:
        momentum = WarmEMAMomentum(momentum)
    return Schedules(
        lr=lr,
        last_layer_lr=lr,
        wd=CosineSchedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total),
        momentum=momentum,
        teacher_temp=CosineSchedule(
            cfg.teacher.teacher_temp, cfg.teacher.teacher_temp, warm_temp,
            warmup_iters=warm_temp, start_warmup_value=cfg.teacher.warmup_teacher_temp,
        ),
        last_layer_freeze_iters=cfg.optim.freeze_last_layer_epochs * ep,
        backbone_freeze_iters=cfg.optim.freeze_backbone_epochs * ep,
    )

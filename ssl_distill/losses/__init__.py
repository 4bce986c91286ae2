"""Losses: DINO (CLS token), iBOT (masked patch tokens) and KoLeo, with centring and Sinkhorn-Knopp teachers; the
self-distillation objective that combines them (objective.py) and the distillation objectives (distillation.py)."""

from ssl_distill.losses.dino import DINOLoss
from ssl_distill.losses.distillation import FeatureDistillationObjective
from ssl_distill.losses.ibot import iBOTPatchLoss
from ssl_distill.losses.koleo import KoLeoLoss
from ssl_distill.losses.objective import PatchWeights, SelfDistillationObjective, StudentOutputs, TeacherTargets

__all__ = ["DINOLoss", "FeatureDistillationObjective", "KoLeoLoss", "PatchWeights", "SelfDistillationObjective",
           "StudentOutputs", "TeacherTargets", "iBOTPatchLoss"]

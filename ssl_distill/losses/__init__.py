"""Losses: DINO (CLS token), iBOT (masked patch tokens) and KoLeo, with centring and Sinkhorn-Knopp teachers."""

from ssl_distill.losses.dino import DINOLoss
from ssl_distill.losses.ibot import iBOTPatchLoss
from ssl_distill.losses.koleo import KoLeoLoss

__all__ = ["DINOLoss", "KoLeoLoss", "iBOTPatchLoss"]

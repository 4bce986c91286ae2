"""ssl_distill: self-supervised ViT pretraining in the DINOv2 / iBOT family."""

__version__ = "0.1.0"

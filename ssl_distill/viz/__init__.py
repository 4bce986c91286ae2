"""Visualisation: CLS-attention maps of a ViT's last block to PNG (DINO, Caron et al., 2021)."""

from .attention import cls_attention_maps, save_attention_figure, threshold_attention, visualize_images

__all__ = ["cls_attention_maps", "save_attention_figure", "threshold_attention", "visualize_images"]

"""In-training k-NN monitor: the teacher backbone's weighted k-NN accuracy on a labelled pair of image folders.

Enabled by ``evaluation.knn_train_dataset`` + ``evaluation.knn_val_dataset`` and run every
``evaluation.eval_period_iterations``; the accuracies go into ``training_metrics.jsonl`` as ``knn_top1_k{k}``.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig
from torch import nn

from ssl_distill.eval.data import load_labelled_datasets
from ssl_distill.eval.knn import backbone_knn_top1
from ssl_distill.eval.transforms import make_eval_transform
from ssl_distill.models import backbone_from_config

logger = logging.getLogger(__name__)


class KnnMonitor:
    """Holds the two datasets; ``monitor(teacher_backbone, device)`` returns ``{"knn_top1_k10": ..., ...}``."""

    def __init__(self, cfg: DictConfig) -> None:
        ev = cfg.evaluation
        transform = make_eval_transform(cfg.crops.global_crops_size)
        self.train, self.val = load_labelled_datasets(
            ev.knn_train_dataset, ev.knn_val_dataset, transform, transform, bad_image_policy=cfg.train.bad_image_policy
        )
        self.ks = [int(k) for k in ev.knn_nb]
        self.temperature = float(ev.knn_temperature)
        self.cfg = cfg
        self.batch_size = max(32, cfg.train.batch_size_per_gpu)

    @staticmethod
    def enabled(cfg: DictConfig) -> bool:
        return bool(cfg.evaluation.knn_train_dataset and cfg.evaluation.knn_val_dataset)

    def _plain_copy(self, backbone: nn.Module, device: torch.device) -> nn.Module:
        """A non-sharded copy of an FSDP2 backbone (collective: every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(backbone, options=StateDictOptions(full_state_dict=True))
        plain = backbone_from_config(self.cfg).to(device)
        plain.load_state_dict(state)
        return plain

    @torch.no_grad()
    def __call__(self, backbone: nn.Module, device: torch.device, sharded: bool) -> dict[str, float]:
        model = self._plain_copy(backbone, device) if sharded else backbone
        top1 = backbone_knn_top1(model, self.train, self.val, self.ks, self.temperature, self.batch_size, device,
                                 desc="k-NN")
        return {f"knn_top1_k{k}": acc for k, acc in top1.items()}

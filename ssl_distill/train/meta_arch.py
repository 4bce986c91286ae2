"""SSLMetaArch: student and EMA teacher (backbone + DINO head [+ iBOT head]) wired to the self-distillation
objective, one training step's forward.

The step follows DINOv2 (Oquab et al. 2023, ``ssl_meta_arch.py``): the teacher runs its backbone on the two global
crops (the last block only on the CLS tokens and the masked patches) and its heads; the student runs its backbone on
the masked global crops and the local crops packed together, and one head call for all rows. What happens between
the logits and the loss — crop pairing, centring or Sinkhorn-Knopp, DINO, iBOT with its per-token weights, KoLeo,
their weights, the collapse statistics, and the differences from the reference — is
:class:`~ssl_distill.losses.objective.SelfDistillationObjective`.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from ssl_distill.losses.objective import PatchWeights, StudentOutputs, TeacherTargets
from ssl_distill.models import backbone_from_config
from ssl_distill.train.arch_base import StudentTeacherArch, dino_head, reshard, self_distillation_objective


class SSLMetaArch(StudentTeacherArch):
    """Student, teacher and objective of the DINOv2 recipe.

    ``student`` / ``teacher`` are ``nn.ModuleDict`` s with ``backbone``, ``dino_head`` and, when
    ``ibot.separate_head``, ``ibot_head``; ``objective`` is the
    :class:`~ssl_distill.losses.objective.SelfDistillationObjective` (its centres are the ``objective.*`` state).
    The teacher starts as a copy of the student (after the student took ``student.pretrained_weights``, unless
    ``load_pretrained`` is False, e.g. when a checkpoint is resumed) and never gets gradients.
    """

    def __init__(self, cfg: DictConfig, load_pretrained: bool = True) -> None:
        super().__init__(cfg)
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.ibot_separate_head = bool(cfg.ibot.separate_head)
        self.student = self._build(cfg, student=True)
        self.teacher = self._build(cfg, student=False)
        ibot_dim = cfg.ibot.head_n_prototypes if self.ibot_separate_head else cfg.dino.head_n_prototypes
        self.objective = self_distillation_objective(cfg, cfg.dino.head_n_prototypes, ibot_dim)
        if load_pretrained and cfg.student.pretrained_weights:
            from ssl_distill.train.pretrained import load_pretrained_student

            load_pretrained_student(self, cfg)
        self._student_ready()

    def _build(self, cfg: DictConfig, student: bool) -> nn.ModuleDict:
        backbone = backbone_from_config(cfg, stochastic_depth=student)
        parts = {"backbone": backbone, "dino_head": dino_head(cfg.dino, backbone.embed_dim)}
        if self.do_ibot and self.ibot_separate_head:
            parts["ibot_head"] = dino_head(cfg.ibot, backbone.embed_dim)
        return nn.ModuleDict(parts)

    def _patches_read(self, batch: dict[str, Tensor] | None) -> Tensor:
        """The patch tokens a loss reads (iBOT's masked global patches; none for local crops or without iBOT):
        the backbone's last block computes only those and the CLS tokens (``select_patches``)."""
        if batch is not None and self.do_ibot:
            return batch["mask_indices"]
        return torch.empty(0, dtype=torch.long, device=self.device)

    # ---------------------------------------------------------------------------------------------- teacher
    @torch.no_grad()
    def _teacher_targets(self, batch: dict[str, Tensor], teacher_temp: float) -> TeacherTargets:
        """The teacher's backbone and heads on the global crops (CLS tokens paired with the student's crops before
        the head), turned into targets by the objective."""
        out = self.teacher.backbone([batch["global_crops"]], is_training=True,
                                    select_patches=[self._patches_read(batch)])[0]
        cls = self.objective.pair(out["x_norm_clstoken"])  # student crop A meets teacher crop B
        n_cls = cls.shape[0]
        masked_patches = out["x_norm_selected_patchtokens"] if self.do_ibot else None
        if self.do_ibot and not self.ibot_separate_head:
            logits = self.teacher.dino_head(torch.cat((cls, masked_patches)))
            cls_logits, patch_logits = logits[:n_cls], logits[n_cls:]
        else:
            cls_logits = self.teacher.dino_head(cls)
            patch_logits = self.teacher.ibot_head(masked_patches) if self.do_ibot else None
        return self.objective.targets(cls_logits, patch_logits, teacher_temp, cls)

    # ---------------------------------------------------------------------------------------------- student
    def _student_outputs(self, batch: dict[str, Tensor]) -> StudentOutputs:
        """Student head outputs of the global crops, the local crops and the masked patches, and the backbone's
        global CLS tokens (for KoLeo)."""
        crops, masks = [batch["global_crops"]], [batch["masks"]]
        if self.n_local_crops > 0:
            crops.append(batch["local_crops"])
            masks.append(None)
        select = [self._patches_read(batch)] + [self._patches_read(None)] * (len(crops) - 1)
        outs = self._student_fwd["backbone"](crops, masks=masks, is_training=True, select_patches=select,
                                             sample_keys=batch["drop_path_keys"][: len(crops)])
        g = outs[0]
        pieces = [g["x_norm_clstoken"]]
        if self.n_local_crops > 0:
            pieces.insert(0, outs[1]["x_norm_clstoken"])
        masked = None
        if self.do_ibot:
            masked = g["x_norm_selected_patchtokens"]
            if not self.ibot_separate_head:
                pieces.append(masked)
        sizes = [p.shape[0] for p in pieces]
        logits = list(self._student_fwd["dino_head"](torch.cat(pieces)).split(sizes))  # one head call
        local_cls = logits.pop(0) if self.n_local_crops > 0 else None
        global_cls = logits.pop(0)
        patches = None
        if self.do_ibot:
            patches = logits.pop(0) if not self.ibot_separate_head else self._student_fwd["ibot_head"](masked)
        return StudentOutputs(global_cls, local_cls, g["x_norm_clstoken"], patches)

    def compute_losses(self, batch: dict[str, Any], teacher_temp: float, diagnostics: bool = False
                       ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss (scalar with graph) and the individual losses (detached) for one batch; with ``diagnostics``
        also the collapse statistics (``diag_*``, see :mod:`ssl_distill.losses.collapse`; a collective)."""
        b = self._to_device(batch)
        with self._autocast():
            targets = self._teacher_targets(b, teacher_temp)
            reshard(self.teacher)  # the teacher has no backward to reshard it (FSDP)
            student = self._student_outputs(b)
        patch_weights = PatchWeights(b["masks"], b["masks_weight"])  # the collator's per-token iBOT weights
        return self.objective(student, targets, patch_weights, diagnostics=diagnostics,
                              gather_group=self._koleo_group)

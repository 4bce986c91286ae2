"""Distillation from a frozen teacher: a small, fast student learns from a big pretrained backbone.

The frozen teacher (``distill.teacher_weights``: anything :mod:`ssl_distill.hub.resolve` takes) runs in eval mode,
under ``torch.no_grad()`` and the configured autocast, is never in the optimizer, never updated, and never written
into checkpoints (its sha256 is: a resume checks that the teacher is the same). The student has no stochastic depth;
an EMA copy of it (``teacher`` in the checkpoint layout, as in pretraining) is the model that is exported and
evaluated. Two recipes (``distill.recipe``), whose objectives are :mod:`ssl_distill.losses.distillation`:

* ``heads`` — the DINOv2 paper's (Oquab et al. 2023, §5 "Efficient implementation", paragraph "Model
  distillation": "we use a larger model as a frozen teacher, keep a spare EMA of the student that we use as our
  final model, remove the masking and stochastic depth, and, apply the iBOT loss on the two global crops"), for a
  teacher that comes with its DINO/iBOT heads (one of our training checkpoints): the student gets heads of its own
  on the teacher's prototypes; DINO loss on the CLS tokens with the pretraining pairing (crop swap, local crops
  against both global crops), iBOT on *every* patch token of the unmasked global crops, KoLeo as in pretraining;
  the teacher's outputs are centred (or Sinkhorn-Knopp'ed) with centres that start from its checkpoint's.
* ``features`` — for teachers published without heads (every official DINOv2 backbone, timm, Hugging Face): on
  every crop, the student's CLS token and patch tokens, through a learnable linear projection when the widths
  differ (dropped at export), match the teacher's L2-normalised tokens with a cosine loss ``1 - cos`` — the summary
  and spatial feature losses of AM-RADIO (Ranzinger et al. 2024, "AM-RADIO: Agglomerative Vision Foundation Model
  -- Reduce All Domains Into One"); the same global + dense targets lightly-train's distillation uses.

Different patch sizes: crops are resized for the teacher to a multiple of its patch size and its patch tokens are
resampled onto the student's grid (bilinear; ``distill.resize_patch_tokens``). Registers are not matched.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from ssl_distill.config import ConfigError
from ssl_distill.hub import HubError
from ssl_distill.hub.resolve import resolve_backbone
from ssl_distill.losses.distillation import FeatureDistillationObjective
from ssl_distill.losses.objective import PatchWeights, StudentOutputs
from ssl_distill.models import backbone_from_config
from ssl_distill.models.resample import resize_token_grid
from ssl_distill.models.weight_selection import WeightSelectionError, select_weights, selected_channels
from ssl_distill.train.arch_base import StudentTeacherArch, dino_head, objective_state, self_distillation_objective

logger = logging.getLogger(__name__)


class TokenProjection(nn.Linear):
    """Student width -> teacher width for the ``features`` recipe (a student part, dropped at export)."""

    def no_weight_decay(self) -> set[str]:
        return {"bias"}


class FrozenTeacher:
    """The distillation teacher: a backbone and, for the ``heads`` recipe, its heads and loss centres. Not an
    ``nn.Module`` attribute of the architecture, so it is in no state dict, optimizer or DDP/FSDP wrapper."""

    def __init__(self, cfg: DictConfig) -> None:
        d = cfg.distill
        try:
            self.backbone, info = resolve_backbone(d.teacher_weights, d.teacher_config or None,
                                                   list(d.teacher_overrides), keep_file=True)
        except HubError as exc:
            hint = ""
            if "do not fit the backbone" in str(exc):
                hint = (" The teacher's architecture comes from distill.teacher_config and distill.teacher_overrides: "
                        "give the student.* keys named above there, e.g. "
                        "distill.teacher_overrides=[student.arch=vit_small,student.patch_size=8].")
            raise ConfigError(f"distill.teacher_weights '{d.teacher_weights}': {exc}{hint}") from None
        self.weights_hash = info["weights_hash"]
        self.heads: dict[str, nn.Module] = {}
        self.centers: dict[str, Tensor] = {}
        obj = info.get("file")
        if info["source"] == "checkpoint" and obj is not None:
            self._take_heads(obj["model"], info["config"])

    def _take_heads(self, model: dict[str, Tensor], tcfg: DictConfig) -> None:
        """The checkpoint's teacher heads (and loss centres), sized by its stored config."""
        width = self.backbone.embed_dim
        sections = {"dino_head": tcfg.dino}
        if tcfg.ibot.separate_head:
            sections["ibot_head"] = tcfg.ibot
        for name, section in sections.items():
            prefix = f"teacher.{name}."
            sd = {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)}
            if not sd:
                return  # a checkpoint without heads: the features recipe only
            head = dino_head(section, width)
            head.load_state_dict(sd)
            self.heads[name] = head.eval().requires_grad_(False)
        self.centers = objective_state(model)  # the loss centres

    @property
    def n_prototypes(self) -> tuple[int, int]:
        """K of the DINO head and of the head the iBOT targets come from."""
        dino = self.heads["dino_head"].last_layer.out_features
        ibot = self.heads.get("ibot_head", self.heads["dino_head"]).last_layer.out_features
        return dino, ibot

    def modules(self) -> list[nn.Module]:
        return [self.backbone, *self.heads.values()]


class DistillMetaArch(StudentTeacherArch):
    """Student (+ EMA copy) trained from a :class:`FrozenTeacher`; see the module docstring."""

    def __init__(self, cfg: DictConfig, load_pretrained: bool = True) -> None:
        super().__init__(cfg)
        self.frozen = FrozenTeacher(cfg)
        self.recipe = self._choose_recipe(cfg.distill.recipe)
        backbone = backbone_from_config(cfg)  # no stochastic depth (DINOv2 §5)
        backbone.mask_token.requires_grad_(False)  # no masking: never used, so not in the optimizer either
        self._check_patch_grids(cfg, backbone)
        self.student = nn.ModuleDict({"backbone": backbone, **self._student_parts(cfg, backbone.embed_dim)})
        self.teacher = nn.ModuleDict({"backbone": backbone_from_config(cfg),
                                      **self._student_parts(cfg, backbone.embed_dim)})
        self.objective = self._objective(cfg)
        if cfg.distill.student_init != "random" and not cfg.student.pretrained_weights:
            self._select_from_teacher(backbone, required=cfg.distill.student_init == "teacher_selection")
        if load_pretrained and cfg.student.pretrained_weights:
            from ssl_distill.train.pretrained import load_pretrained_student

            load_pretrained_student(self, cfg)
        self._student_ready()
        logger.info("distilling from %s (%s recipe, sha256 %s)", cfg.distill.teacher_weights, self.recipe,
                    self.frozen.weights_hash[:12])

    def _objective(self, cfg: DictConfig) -> nn.Module:
        """``heads``: the self-distillation objective on the teacher's prototypes, its centres from the teacher's
        checkpoint; ``features``: the cosine feature objective."""
        if self.recipe == "features":
            return FeatureDistillationObjective(cfg.distill.cls_loss_weight, cfg.distill.patch_loss_weight)
        objective = self_distillation_objective(cfg, *self.frozen.n_prototypes)
        objective.load_centres(self.frozen.centers)
        return objective

    def _choose_recipe(self, asked: str) -> str:
        has_heads = "dino_head" in self.frozen.heads
        if asked == "heads" and not has_heads:
            raise ConfigError(f"distill.recipe=heads needs a teacher with its DINO/iBOT heads (one of our training "
                              f"checkpoints); '{self.cfg.distill.teacher_weights}' has a backbone only: set "
                              "distill.recipe=features (or auto).")
        return "heads" if asked == "heads" or (asked == "auto" and has_heads) else "features"

    @torch.no_grad()
    def _select_from_teacher(self, backbone: nn.Module, required: bool) -> None:
        """``distill.student_init=teacher_selection`` (or ``auto`` when the student fits): the student backbone
        starts from a selection of the teacher's weights (:mod:`ssl_distill.models.weight_selection`); the
        ``features`` recipe's projections start as the inverse selection, so that iteration 0 compares each kept
        channel with the teacher channel it came from."""
        try:
            backbone.load_state_dict(select_weights(self.frozen.backbone, backbone))
        except WeightSelectionError as exc:
            if not required:  # auto
                logger.info("the student starts from random weights (distill.student_init=auto): %s", exc)
                return
            raise ConfigError(f"distill.student_init=teacher_selection: {exc}. Set distill.student_init=random, or "
                              "make the student fit (student.arch / student.depth / student.patch_size / "
                              "student.ffn_layer / student.layerscale / student.num_register_tokens).") from None
        chan = selected_channels(self.frozen.backbone.embed_dim, backbone.embed_dim)
        if "cls_proj" in self.student:  # features recipe: the projections put each channel back where it came from
            for proj in (self.student.cls_proj, self.student.patch_proj):
                proj.weight.zero_()
                proj.weight[chan, torch.arange(backbone.embed_dim)] = 1.0
                proj.bias.zero_()
        for name, head in self.frozen.heads.items():  # heads recipe: the teacher's heads on the kept channels
            self._select_head(self.student[name], head, chan)
        logger.info("student starts from a weight selection of the teacher (%d -> %d channels, %d -> %d blocks)",
                    self.frozen.backbone.embed_dim, backbone.embed_dim, self.frozen.backbone.n_blocks,
                    backbone.n_blocks)

    @staticmethod
    def _select_head(student_head: nn.Module, teacher_head: nn.Module, chan: Tensor) -> None:
        """Copy a teacher head into the student's (same hidden / bottleneck / prototype sizes), its input layer
        restricted to the kept channels; a head of other sizes stays as initialised."""
        mine, theirs = student_head.state_dict(), teacher_head.state_dict()
        if mine.keys() != theirs.keys():
            return
        selected = {}
        for key, value in theirs.items():
            if value.shape != mine[key].shape and value.dim() == 2 and value.shape[1] == chan.max() + 1:
                value = value[:, chan]
            if value.shape != mine[key].shape:
                logger.info("the student's heads start fresh: the teacher's have other sizes (%s)", key)
                return
            selected[key] = value
        student_head.load_state_dict(selected)

    def _check_patch_grids(self, cfg: DictConfig, student: nn.Module) -> None:
        pt, ps = self.frozen.backbone.patch_size, student.patch_size
        if pt != ps and not cfg.distill.resize_patch_tokens:
            raise ConfigError(f"the teacher uses {pt} px patches and the student {ps} px: set "
                              f"distill.resize_patch_tokens=true (resample the teacher's patch tokens onto the "
                              f"student's grid) or student.patch_size={pt}.")

    def _student_parts(self, cfg: DictConfig, width: int) -> dict[str, nn.Module]:
        """Heads on the teacher's prototypes (``heads``) or projections to its width (``features``)."""
        if self.recipe == "heads":
            k_dino, k_ibot = self.frozen.n_prototypes
            parts = {"dino_head": dino_head(cfg.dino, width, k_dino)}
            if "ibot_head" in self.frozen.heads:
                parts["ibot_head"] = dino_head(cfg.ibot, width, k_ibot)
            return parts
        t_width = self.frozen.backbone.embed_dim
        if t_width == width:
            return {}
        return {"cls_proj": TokenProjection(width, t_width), "patch_proj": TokenProjection(width, t_width)}

    # ------------------------------------------------------------------------------------------- plumbing
    def to(self, *args: Any, **kwargs: Any) -> DistillMetaArch:
        """Move the frozen teacher along (it is not a submodule)."""
        super().to(*args, **kwargs)
        for module in self.frozen.modules():
            module.to(*args, **kwargs)
        return self

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"distill_teacher": {"weights": self.cfg.distill.teacher_weights,
                                    "weights_hash": self.frozen.weights_hash}}

    def check_resume(self, state: dict[str, Any]) -> None:
        """Refuse to continue a distillation with another teacher than the one the checkpoint was trained with."""
        saved = (state.get("distill_teacher") or {}).get("weights_hash")
        if saved is not None and saved != self.frozen.weights_hash:
            raise ConfigError(f"the checkpoint was distilled from a teacher with sha256 {saved[:12]}, but "
                              f"distill.teacher_weights={self.cfg.distill.teacher_weights} now has "
                              f"{self.frozen.weights_hash[:12]}; point it at the original teacher, or start over "
                              "with --no-resume (or another --output-dir).")

    # ---------------------------------------------------------------------------------------------- teacher
    def _teacher_input(self, crops: Tensor) -> Tensor:
        """Crops resized to a multiple of the teacher's patch size (when the student's size is not one)."""
        p, size = self.frozen.backbone.patch_size, crops.shape[-1]
        if size % p == 0:
            return crops
        side = max(p, round(size / p) * p)
        return F.interpolate(crops, size=(side, side), mode="bilinear", antialias=True, align_corners=False)

    @torch.no_grad()
    def _teacher_tokens(self, crops: list[Tensor], student_grids: list[int]) -> list[tuple[Tensor, Tensor]]:
        """The frozen teacher's normalised ``(CLS (B, D_t), patches (B, N_s, D_t))`` per crop batch, patches on the
        student's grid (side ``student_grids[i]``)."""
        outs = self.frozen.backbone.forward_train([self._teacher_input(c) for c in crops])
        result = []
        for out, side in zip(outs, student_grids):
            patches = out["x_norm_patchtokens"]
            t_side = round(patches.shape[1] ** 0.5)
            result.append((out["x_norm_clstoken"], resize_token_grid(patches, (t_side, t_side), (side, side))))
        return result

    # ------------------------------------------------------------------------------------------------- step
    def compute_losses(self, batch: dict[str, Any], teacher_temp: float, diagnostics: bool = False
                       ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss (scalar with graph) and the individual losses (detached) for one batch; with ``diagnostics``
        and the heads recipe also the collapse statistics of the (frozen) teacher's targets and the student's
        iBOT predictions (the features recipe has no prototypes to watch)."""
        b = self._to_device(batch)
        crops = [b["global_crops"]] + ([b["local_crops"]] if self.n_local_crops > 0 else [])
        grids = [c.shape[-1] // self.student.backbone.patch_size for c in crops]
        with self._autocast():
            if self.recipe == "heads":
                (t_cls, t_patches), = self._teacher_tokens(crops[:1], grids[:1])
                return self._heads_losses(crops, t_cls, t_patches, teacher_temp, diagnostics)
            return self._feature_losses(crops, self._teacher_tokens(crops, grids))

    def _heads_losses(self, crops: list[Tensor], t_cls: Tensor, t_patches: Tensor, teacher_temp: float,
                      diagnostics: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """The DINOv2-paper recipe: the frozen teacher's heads give the targets; the student's backbone (no
        masking) and heads give the DINO logits of every crop and the iBOT logits of every global patch token."""
        heads = self.frozen.heads
        with torch.no_grad():
            swapped = self.objective.pair(t_cls)  # student crop A meets teacher crop B
            patch_head = heads.get("ibot_head", heads["dino_head"])
            targets = self.objective.targets(heads["dino_head"](swapped), patch_head(t_patches.flatten(0, 1)),
                                             teacher_temp, swapped)
        outs = self._student_fwd["backbone"](crops, is_training=True)
        g_cls, g_patches = outs[0]["x_norm_clstoken"], outs[0]["x_norm_patchtokens"]
        pieces = ([outs[1]["x_norm_clstoken"]] if self.n_local_crops > 0 else []) + [g_cls]
        separate = "ibot_head" in self.student
        if not separate:
            pieces.append(g_patches.flatten(0, 1))
        logits = list(self._student_fwd["dino_head"](torch.cat(pieces)).split([p.shape[0] for p in pieces]))
        local_cls = logits.pop(0) if self.n_local_crops > 0 else None
        global_cls = logits.pop(0)
        patch_logits = self._student_fwd["ibot_head"](g_patches.flatten(0, 1)) if separate else logits.pop(0)
        every_patch = PatchWeights.every_patch(*g_patches.shape[:2], device=g_patches.device)
        return self.objective(StudentOutputs(global_cls, local_cls, g_cls, patch_logits), targets, every_patch,
                              diagnostics=diagnostics, gather_group=self._koleo_group)

    def _feature_losses(self, crops: list[Tensor], targets: list[tuple[Tensor, Tensor]]
                        ) -> tuple[Tensor, dict[str, Tensor]]:
        """The head-free recipe: the student's CLS and patch tokens of every crop, projected to the teacher's
        width, against the teacher's."""
        outs = self._student_fwd["backbone"](crops, is_training=True)
        s_cls = torch.cat([o["x_norm_clstoken"] for o in outs])
        s_patch = torch.cat([o["x_norm_patchtokens"].flatten(0, 1) for o in outs])
        if "cls_proj" in self.student:
            s_cls, s_patch = self._student_fwd["cls_proj"](s_cls), self._student_fwd["patch_proj"](s_patch)
        t_cls = torch.cat([t for t, _ in targets])
        t_patch = torch.cat([p.flatten(0, 1) for _, p in targets])
        return self.objective(s_cls, s_patch, t_cls, t_patch)

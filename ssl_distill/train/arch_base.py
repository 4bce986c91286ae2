"""What every training architecture shares: a student trained by gradient, an EMA copy of it (``teacher``), the
batch on the device, KoLeo across ranks, the backward pass, the EMA update and gradient clipping.

:class:`~ssl_distill.train.meta_arch.SSLMetaArch` (self-distillation, DINOv2) and
:class:`~ssl_distill.train.distill_arch.DistillMetaArch` (a frozen teacher) build ``student`` and ``teacher``
(``nn.ModuleDict`` s with a ``backbone``) and implement ``compute_losses``; the trainer sees only this interface.
``teacher`` is always the model that is exported (``teacher_backbone.pth``) and evaluated by the k-NN monitor.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from ssl_distill import distributed
from ssl_distill.models import DINOHead
from ssl_distill.models.stochastic_depth import sample_keys
from ssl_distill.train.diagnostics import collapse_statistics, dino_ce_ratio

N_GLOBAL_CROPS = 2


def dino_head(section: DictConfig, in_dim: int, n_prototypes: int | None = None) -> DINOHead:
    """A DINO / iBOT head from a ``dino`` or ``ibot`` config section (``n_prototypes`` overrides its K)."""
    return DINOHead(
        in_dim, n_prototypes or section.head_n_prototypes, nlayers=section.head_nlayers,
        hidden_dim=section.head_hidden_dim, bottleneck_dim=section.head_bottleneck_dim,
    )


def reshard(modules: nn.Module) -> None:
    """Free the gathered parameters of FSDP2-sharded modules (a no-op without FSDP)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for m in modules.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _local_tensor(t: Tensor) -> Tensor:
    """The local shard of an FSDP2 DTensor parameter, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class StudentTeacherArch(nn.Module):
    """Base of the training architectures (see the module docstring). Subclasses set ``self.student`` and
    ``self.teacher``, then call :meth:`_student_ready`, and implement :meth:`compute_losses`."""

    student: nn.ModuleDict
    teacher: nn.ModuleDict

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_local_crops = cfg.crops.local_crops_number
        self._student_fwd: dict[str, nn.Module] = {}
        self._koleo_group = None
        self.autocast_dtype: torch.dtype | None = None

    def _student_ready(self) -> None:
        """The teacher starts as a copy of the student and never gets gradients; forwards go to the modules."""
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self._student_fwd = dict(self.student.items())

    def compute_losses(self, batch: dict[str, Any], teacher_temp: float, diagnostics: bool = False
                       ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss (scalar with graph) and the individual losses (detached, incl. ``total_loss``)."""
        raise NotImplementedError

    def checkpoint_extras(self) -> dict[str, Any]:
        """Entries this architecture adds to a checkpoint (beside the full state dict)."""
        return {}

    def check_resume(self, state: dict[str, Any]) -> None:
        """Raise when ``state`` (a checkpoint) cannot continue with this architecture as configured."""

    # --------------------------------------------------------------------------------------------- distributed
    def set_student_forward(self, wrappers: dict[str, nn.Module]) -> None:
        """Route the student's forward passes through wrappers (e.g. DDP) that hold the same modules."""
        self._student_fwd = dict(wrappers)

    def set_koleo_group(self, group: Any) -> None:
        """A process group of its own for KoLeo's all-gather, so it never interleaves with DDP's reductions."""
        self._koleo_group = group

    @property
    def device(self) -> torch.device:
        return self.student.backbone.mask_token.device  # a contract member (models/contract.py)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _koleo(self, global_tokens: Tensor) -> Tensor:
        """KoLeo on each global crop's student CLS tokens ``(2B, D)``, gathered from all ranks (with gradient)."""
        terms = []
        for chunk in global_tokens.chunk(N_GLOBAL_CROPS):  # never between two crops of one image
            if distributed.get_world_size() > 1:
                chunk = distributed.all_gather_with_grad(chunk, group=self._koleo_group)
            terms.append(self.koleo_loss(chunk))
        return sum(terms)

    # ----------------------------------------------------------------------------------------------- losses
    @torch.no_grad()
    def _teacher_probabilities(self, cls_logits: Tensor, patch_logits: Tensor | None, teacher_temp: float
                               ) -> tuple[Tensor, Tensor | None]:
        """Teacher targets from head outputs: DINO ``(2, B, K)`` from CLS logits ``(2B, K)`` (already crop-swapped)
        and iBOT ``(M, K')`` from patch logits ``(M, K')`` (or None), by centring (the centres' EMA is updated) or
        Sinkhorn-Knopp (``train.centering``), in fp32."""
        cls_logits = cls_logits.float()
        patch_logits = patch_logits.float() if patch_logits is not None else None
        ibot_t = None
        if self.cfg.train.centering == "centering":
            dino_t = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            self.dino_loss.update_center(cls_logits)
            if patch_logits is not None:
                ibot_t = self.ibot_patch_loss.softmax_center_teacher(patch_logits, teacher_temp)
                self.ibot_patch_loss.update_center_masked(patch_logits)
        else:  # sinkhorn_knopp
            dino_t = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            if patch_logits is not None:
                ibot_t = self.ibot_patch_loss.sinkhorn_knopp_teacher(patch_logits, teacher_temp)
        return dino_t.view(N_GLOBAL_CROPS, -1, dino_t.shape[-1]), ibot_t

    def _diagnostics(self, losses: dict[str, Tensor], dino_t: Tensor, ibot_t: Tensor | None, teacher_cls: Tensor,
                     student_masked: Tensor | None) -> dict[str, Tensor]:
        """Collapse statistics from tensors the step already holds (no extra forward): ``dino_t`` ``(2, B, K)``,
        ``ibot_t`` ``(M, K')`` with the student's logits of the same tokens, the teacher's CLS tokens."""
        stats = collapse_statistics(dino_t.flatten(0, 1), teacher_cls, ibot_t, student_masked,
                                    self.ibot_patch_loss.student_temp)
        out = {k: torch.tensor(v, device=self.device) for k, v in stats.items()}
        dino_sum = sum(v for k, v in losses.items() if k.startswith("dino_"))
        out["diag_dino_ce_ratio"] = dino_ce_ratio(dino_sum, dino_t.shape[-1])
        return out

    def _dino_losses(self, local_cls: Tensor | None, global_cls: Tensor, dino_t: Tensor) -> dict[str, Tensor]:
        """DINO terms, each divided by their number: local crops against both teacher crops, and both global
        pairs at once — student ``(2B, K)`` rows against the swapped teacher rows (x2 = the sum of 2 means)."""
        n_terms = N_GLOBAL_CROPS * (N_GLOBAL_CROPS - 1) + N_GLOBAL_CROPS * self.n_local_crops
        losses: dict[str, Tensor] = {}
        if self.n_local_crops > 0:
            losses["dino_local_crops_loss"] = (
                self.dino_loss(local_cls.float().chunk(self.n_local_crops), list(dino_t)) / n_terms
            )
        losses["dino_global_crops_loss"] = (
            self.dino_loss([global_cls.float()], [dino_t.flatten(0, 1)]) * N_GLOBAL_CROPS / n_terms
        )
        return losses

    # ------------------------------------------------------------------------------------------------- step
    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        dev = self.device
        nb = dev.type == "cuda"
        return {
            "global_crops": batch["collated_global_crops"].to(dev, non_blocking=nb),
            "local_crops": batch["collated_local_crops"].to(dev, non_blocking=nb),
            "masks": batch["collated_masks"].to(dev, non_blocking=nb),
            "mask_indices": batch["mask_indices_list"].to(dev, non_blocking=nb),
            "masks_weight": batch["masks_weight"].to(dev, non_blocking=nb),
            "drop_path_keys": self._drop_path_keys(batch.get("positions")),
        }

    def _drop_path_keys(self, positions: Tensor | None) -> list[Tensor | None]:
        """Stochastic-depth keys of the global and the local crops (CPU int64, crop-major as the crops), from the
        run's seed and each sample's global stream position: the student's draws are then the same on any number
        of ranks and after a resume. Batches without ``positions`` (not from the trainer) draw from torch's RNG."""
        if positions is None:
            return [None, None]
        seed = self.cfg.train.seed
        return [sample_keys(seed, positions, range(N_GLOBAL_CROPS)),
                sample_keys(seed, positions, range(N_GLOBAL_CROPS, N_GLOBAL_CROPS + self.n_local_crops))]

    def forward_backward(
        self, batch: dict[str, Any], teacher_temp: float, scaler: torch.amp.GradScaler | None = None,
        diagnostics: bool = False,
    ) -> dict[str, Tensor]:
        """Compute the losses and back-propagate them; returns the individual (detached) losses (and, with
        ``diagnostics``, the collapse statistics)."""
        total, losses = self.compute_losses(batch, teacher_temp, diagnostics)
        (scaler.scale(total) if scaler is not None else total).backward()
        return losses

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher = m * teacher + (1 - m) * student`` with multi-tensor ops (local shards under FSDP)."""
        t_params, s_params = [], []
        for name, s_mod in self.student.items():
            for (ns, ps), (nt, pt) in zip(s_mod.named_parameters(), self.teacher[name].named_parameters()):
                if ns != nt:
                    raise RuntimeError(f"student/teacher parameter mismatch: {ns} vs {nt}")
                s_params.append(_local_tensor(ps.detach()))
                t_params.append(_local_tensor(pt.detach()))
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)  # t + (1 - m) * (s - t): one pass

    def clip_gradients(self, max_norm: float) -> dict[str, Tensor]:
        """Clip each student part's gradients separately (as DINOv2 does); returns their pre-clip norms (0-dim
        tensors on the device: reading one waits for the device)."""
        norms = {}
        for name, module in self.student.items():
            params = [p for p in module.parameters() if p.grad is not None]
            if params:
                norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                norms[name] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return norms

"""What every training architecture shares: a student trained by gradient, an EMA copy of it (``teacher``), the
batch on the device, the backward pass, the EMA update and gradient clipping.

:class:`~ssl_distill.train.meta_arch.SSLMetaArch` (self-distillation, DINOv2) and
:class:`~ssl_distill.train.distill_arch.DistillMetaArch` (a frozen teacher) build ``student`` and ``teacher``
(``nn.ModuleDict`` s with a ``backbone``) and an ``objective`` (:mod:`ssl_distill.losses.objective`,
:mod:`ssl_distill.losses.distillation`: everything between the logits and the loss), and implement
``compute_losses`` as forward wiring: backbones and heads in, the objective's losses out. The trainer sees only this
interface. ``teacher`` is always the model that is exported (``teacher_backbone.pth``) and evaluated by the k-NN
monitor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from ssl_distill.data.collate import HOST_KEYS
from ssl_distill.losses.objective import N_GLOBAL_CROPS, SelfDistillationObjective
from ssl_distill.models import DINOHead
from ssl_distill.models.stochastic_depth import sample_keys

_OBJECTIVE_STATE = ("dino_loss.", "ibot_patch_loss.")  # the objective's state-dict keys, under "objective."


def dino_head(section: DictConfig, in_dim: int, n_prototypes: int | None = None) -> DINOHead:
    """A DINO / iBOT head from a ``dino`` or ``ibot`` config section (``n_prototypes`` overrides its K)."""
    return DINOHead(
        in_dim, n_prototypes or section.head_n_prototypes, nlayers=section.head_nlayers,
        hidden_dim=section.head_hidden_dim, bottleneck_dim=section.head_bottleneck_dim,
    )


def self_distillation_objective(cfg: DictConfig, dino_prototypes: int, ibot_prototypes: int
                                ) -> SelfDistillationObjective:
    """The DINO + iBOT + KoLeo objective with the config's weights, local crops and teacher (``train.centering``)."""
    return SelfDistillationObjective(
        dino_prototypes, ibot_prototypes, cfg.crops.local_crops_number, dino_weight=cfg.dino.loss_weight,
        ibot_weight=cfg.ibot.loss_weight, koleo_weight=cfg.dino.koleo_loss_weight, centering=cfg.train.centering,
    )


def upgrade_model_state(model: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint's model state dict in today's keys. Checkpoints written before the objective became one object
    (issue 28) hold its centres at the top level (``dino_loss.center``, ``ibot_patch_loss.center``); today they are
    ``objective.dino_loss.center``, ``objective.ibot_patch_loss.center``."""
    return {f"objective.{k}" if k.startswith(_OBJECTIVE_STATE) else k: v for k, v in model.items()}


def objective_state(model: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The objective's entries of a checkpoint's model state dict (either layout), in the objective's own keys
    (``dino_loss.center``, ...)."""
    prefix = "objective."
    return {k[len(prefix):]: v for k, v in upgrade_model_state(model).items() if k.startswith(prefix)}


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
    """Base of the training architectures (see the module docstring). Subclasses set ``self.student``,
    ``self.teacher`` and ``self.objective``, then call :meth:`_student_ready`, and implement
    :meth:`compute_losses`."""

    student: nn.ModuleDict
    teacher: nn.ModuleDict
    objective: nn.Module

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
        """A process group of its own for KoLeo's all-gather (the subclasses hand it to the objective), so it never
        interleaves with DDP's reductions."""
        self._koleo_group = group

    @property
    def device(self) -> torch.device:
        return self.student.backbone.mask_token.device  # a contract member (models/contract.py)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------------------------------------- step
    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch's tensors on the device under the loader's keys (``data/collate.py``; pinned memory: non-blocking),
        the host-only keys left out, plus ``drop_path_keys`` (:meth:`_drop_path_keys`)."""
        dev = self.device
        nb = dev.type == "cuda"
        moved = {k: v.to(dev, non_blocking=nb) for k, v in batch.items() if k not in HOST_KEYS}
        moved["drop_path_keys"] = self._drop_path_keys(batch.get("positions"))
        return moved

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

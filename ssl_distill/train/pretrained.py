"""Continued pretraining: the student (and with it its EMA teacher) starts from released or earlier weights.

``student.pretrained_weights`` takes whatever :mod:`ssl_distill.hub.resolve` takes — a zoo name (downloaded and
verified), a URL, an official / timm / Hugging Face state dict, an exported backbone or one of our training
checkpoints (its teacher backbone). The ``student.*`` architecture must describe the weights: a zoo name is compared
with it key by key, and any other mismatch fails strict loading with the keys to change. The position embedding is
resampled to the configured ``crops.global_crops_size`` with the reference's bicubic interpolation (a released
518 px model has a 37x37 grid; at 224 px the student has 16x16). With ``student.pretrained_heads`` the DINO/iBOT
heads and loss centres of a training checkpoint come too; otherwise the heads start fresh and
``optim.freeze_backbone_epochs`` lets them warm up on the fixed pretrained features first.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ssl_distill.checkpoint_format import is_training_checkpoint
from ssl_distill.config import ConfigError
from ssl_distill.hub import HubError
from ssl_distill.hub.convert import to_backbone_layout
from ssl_distill.hub.resolve import load_strict, read_file, unwrap_state_dict, weights_file
from ssl_distill.train.arch_base import objective_state

logger = logging.getLogger(__name__)


def zoo_architecture(entry: Any) -> dict[str, Any]:
    """The ``student.*`` values that describe zoo entry ``entry``'s architecture."""
    kw = entry.arch_kwargs
    return {
        "student.arch": entry.arch, "student.patch_size": kw["patch_size"],
        "student.num_register_tokens": kw.get("num_register_tokens", 0),
        "student.ffn_layer": kw.get("ffn_layer", "mlp"),
        "student.interpolate_offset": kw.get("interpolate_offset", 0.1),
        "student.interpolate_antialias": kw.get("interpolate_antialias", False),
    }


def zoo_mismatches(entry: Any, cfg: DictConfig, prefix: str = "") -> list[str]:
    """``key=value`` settings (``prefix`` + ``student.*``) the config needs to describe ``entry``'s architecture."""
    fixes = [f"{prefix}{key}={value}" for key, value in zoo_architecture(entry).items()
             if OmegaConf.select(cfg, key) != value]
    if entry.arch_kwargs.get("init_values") and not cfg.student.layerscale:
        fixes.append(f"{prefix}student.layerscale=1.0e-05")
    return fixes


def load_pretrained_student(meta: Any, cfg: DictConfig) -> None:
    """Load ``cfg.student.pretrained_weights`` into ``meta.student`` (see the module docstring); user mistakes raise
    :class:`~ssl_distill.config.ConfigError` naming the key to change."""
    spec = cfg.student.pretrained_weights
    source = f"student.pretrained_weights '{spec}'"
    try:
        path, entry = weights_file(spec)
        if entry is not None and (fixes := zoo_mismatches(entry, cfg)):
            raise ConfigError(f"{source} is a {entry.arch} with {entry.arch_kwargs['patch_size']} px patches and "
                              f"{entry.num_register_tokens} registers; describe it in the config: set "
                              + " ".join(fixes))
        obj = read_file(path)
        backbone = meta.student.backbone
        sd = to_backbone_layout(unwrap_state_dict(obj, path), backbone.weights_layout)
        load_strict(backbone, backbone.fit_pretrained(sd), source)
        if cfg.student.pretrained_heads:
            _load_heads(meta, obj, source)
    except HubError as exc:
        raise ConfigError(str(exc)) from None
    logger.info("student starts from %s%s", source, " (with its heads and loss centres)"
                if cfg.student.pretrained_heads else "")


def _load_heads(meta: Any, obj: Any, source: str) -> None:
    """The teacher heads and loss centres of a training checkpoint into the student (the teacher copies them)."""
    if not is_training_checkpoint(obj):
        raise ConfigError(f"student.pretrained_heads=true needs one of our training checkpoints, but {source} holds a "
                          "backbone only; set student.pretrained_heads=false (the heads then start fresh; see "
                          "optim.freeze_backbone_epochs).")
    model = obj["model"]
    for part in (p for p in meta.student if p != "backbone"):
        prefix = f"teacher.{part}."
        sd = {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)}
        if not sd:
            raise ConfigError(f"{source} has no {part} (it was trained with another ibot.separate_head); set "
                              "ibot.separate_head to the checkpoint's value (see its config)")
        load_strict(meta.student[part], sd, f"{source} ({part})",
                    advice="set dino.* / ibot.* head sizes (head_n_prototypes, head_nlayers, head_hidden_dim, "
                           "head_bottleneck_dim) to the checkpoint's, as in its config")
    meta.objective.load_centres(objective_state(model))

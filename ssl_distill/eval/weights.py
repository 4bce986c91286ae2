"""One place that turns ``--pretrained-weights`` into a backbone with its weights loaded.

Accepted sources (see :func:`load_pretrained_backbone`):

* ``random``: a randomly initialised backbone (a baseline), architecture from the config;
* one of our training checkpoints (``model_*.pth``): the teacher backbone, architecture from the checkpoint's stored
  config unless a config file is given; dotlist overrides apply on top;
* an exported backbone or an official-layout DINOv2 state dict: architecture from the config file / dotlist;
* a model-zoo name (``dinov2_vits14``) when :mod:`ssl_distill.hub` provides a registry.

Loading is strict; a mismatch raises :class:`WeightsError` listing the missing/unexpected keys and the likely
config fix. Files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ssl_distill.config import ConfigError, load_config
from ssl_distill.models import VisionTransformer, build_backbone
from ssl_distill.train.checkpoint import CHECKPOINT_FORMAT, extract_backbone

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"


class WeightsError(ValueError):
    """The weights cannot be used as given; the message names the problem and the fix."""


def backbone_from_config(cfg: DictConfig) -> VisionTransformer:
    """A backbone with the ``student.*`` architecture and ``img_size = crops.global_crops_size`` (no drop path)."""
    s = cfg.student
    return build_backbone(
        s.arch,
        patch_size=s.patch_size,
        img_size=cfg.crops.global_crops_size,
        init_values=s.layerscale or None,
        ffn_layer=s.ffn_layer,
        qkv_bias=s.qkv_bias,
        proj_bias=s.proj_bias,
        ffn_bias=s.ffn_bias,
        num_register_tokens=s.num_register_tokens,
        interpolate_antialias=s.interpolate_antialias,
        interpolate_offset=s.interpolate_offset,
        attn_impl=s.attn_impl,
        **({"depth": s.depth} if s.depth else {}),
    )


def state_dict_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted keys, shapes, dtypes and bytes of a state dict: identifies the weights for caches."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _config(config_file: str | None, overrides: Sequence[str], stored_yaml: str | None = None) -> DictConfig:
    """``load_config`` from the file, else from a checkpoint's stored YAML text, with ``overrides`` on top."""
    try:
        if config_file or stored_yaml is None:
            return load_config(config_file, list(overrides))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "checkpoint_config.yaml"
            path.write_text(stored_yaml, encoding="utf-8")
            return load_config(path, list(overrides))
    except (ConfigError, FileNotFoundError) as err:
        raise WeightsError(str(err)) from None


def _read_file(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(
            f"cannot read weights file '{path}' ({type(err).__name__}: {str(err).splitlines()[0][:200]}). Pass a "
            "training checkpoint (model_*.pth), an exported backbone or an official DINOv2 .pth state dict."
        ) from None


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict from a plain state dict or one nested under ``state_dict``/``model``."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "teacher"):
            if isinstance(obj.get(key), dict) and len(obj) <= 8:
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise WeightsError(
            f"'{path}' holds no state dict of tensors (found {type(obj).__name__}); pass a training checkpoint, "
            "an exported backbone or an official DINOv2 state dict."
        )
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    if any(k.startswith("teacher.backbone.") for k in obj):
        obj = {k[len("teacher.backbone."):]: v for k, v in obj.items() if k.startswith("teacher.backbone.")}
    return obj


def _count_blocks(keys: Any) -> int:
    ids = {int(k.split(".")[1]) for k in keys if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    return max(ids) + 1 if ids else 0


def _likely_causes(model_sd: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> list[str]:
    """Config fixes that explain the differences between the model's and the file's state dicts."""
    hints: list[str] = []
    if "register_tokens" in sd and "register_tokens" not in model_sd:
        n_reg = sd["register_tokens"].shape[1]
        hints.append(f"the weights have register tokens: set student.num_register_tokens={n_reg}")
    elif "register_tokens" in model_sd and "register_tokens" not in sd:
        hints.append("the weights have no register tokens: set student.num_register_tokens=0")
    elif "register_tokens" in sd and sd["register_tokens"].shape != model_sd["register_tokens"].shape:
        hints.append(f"set student.num_register_tokens={sd['register_tokens'].shape[1]}")
    if any(".mlp.w12." in k for k in sd) and not any(".mlp.w12." in k for k in model_sd):
        hints.append("the weights use a SwiGLU FFN (mlp.w12/w3): set student.ffn_layer=swiglufused")
    elif any(".mlp.fc1." in k for k in sd) and not any(".mlp.fc1." in k for k in model_sd):
        hints.append("the weights use a plain MLP FFN (mlp.fc1/fc2): set student.ffn_layer=mlp")
    if any(".ls1.gamma" in k for k in sd) and not any(".ls1.gamma" in k for k in model_sd):
        hints.append("the weights have LayerScale: set student.layerscale=1e-5")
    elif any(".ls1.gamma" in k for k in model_sd) and not any(".ls1.gamma" in k for k in sd):
        hints.append("the weights have no LayerScale: set student.layerscale=0")
    for flag, key in (("qkv_bias", "attn.qkv.bias"), ("proj_bias", "attn.proj.bias")):
        if any(k.endswith(key) for k in sd) != any(k.endswith(key) for k in model_sd):
            hints.append(f"set student.{flag}={any(k.endswith(key) for k in sd)}")
    if any(k.startswith("blocks.") and k.split(".")[2].isdigit() for k in sd if k.count(".") > 2):
        hints.append("the file uses chunked blocks (blocks.<chunk>.<idx>.*): convert it to the flat layout first")
    depth, model_depth = _count_blocks(sd), _count_blocks(model_sd)
    if depth and depth != model_depth:
        hints.append(f"the weights have {depth} blocks, the model {model_depth}: choose the matching student.arch "
                     "(or student.depth)")
    pe, mpe = sd.get("patch_embed.proj.weight"), model_sd.get("patch_embed.proj.weight")
    if pe is not None and mpe is not None and pe.shape != mpe.shape:
        if pe.shape[0] != mpe.shape[0]:
            hints.append(f"the weights have width {pe.shape[0]}, the model {mpe.shape[0]}: choose the matching "
                         "student.arch")
        if pe.shape[-1] != mpe.shape[-1]:
            hints.append(f"the weights use {pe.shape[-1]} px patches: set student.patch_size={pe.shape[-1]}")
    pos, mpos = sd.get("pos_embed"), model_sd.get("pos_embed")
    if pos is not None and mpos is not None and pos.shape[1] != mpos.shape[1] and pe is not None:
        side = int(round((pos.shape[1] - 1) ** 0.5))
        hints.append(f"the position embedding covers a {side}x{side} patch grid: set "
                     f"crops.global_crops_size={side * pe.shape[-1]}")
    return hints


def load_state_dict_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(sd, strict=True)``, but a mismatch raises :class:`WeightsError` with the fix."""
    model_sd = model.state_dict()
    missing = sorted(set(model_sd) - set(sd))
    unexpected = sorted(set(sd) - set(model_sd))
    shapes = sorted(k for k in set(sd) & set(model_sd) if sd[k].shape != model_sd[k].shape)
    if missing or unexpected or shapes:
        hints = _likely_causes(model_sd, sd) or ["check student.arch and the other student.* keys"]
        parts = [f"the weights in {source} do not fit the configured backbone"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:6]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:6]}")
        if shapes:
            parts.append("shape mismatches: " + ", ".join(
                f"{k} {tuple(sd[k].shape)} vs {tuple(model_sd[k].shape)}" for k in shapes[:4]))
        raise WeightsError("; ".join(parts) + ". Likely cause: " + "; ".join(hints) + ".")
    model.load_state_dict(sd, strict=True)


def _from_zoo(name: str, config_file: str | None, overrides: Sequence[str]) -> tuple[torch.nn.Module, dict]:
    try:
        import ssl_distill.hub as hub
        import ssl_distill.hub.registry  # noqa: F401  (the zoo exists only when the registry does)
    except ImportError:
        raise WeightsError(
            f"'{name}' is not a file, and this install has no model zoo (ssl_distill.hub.registry) to resolve "
            "names: pass the path to a checkpoint or a backbone state dict."
        ) from None
    if config_file or overrides:
        logger.warning("model-zoo weights '%s': the architecture comes from the zoo entry; the config file and "
                       "overrides are ignored", name)
    try:
        model = hub.load(name, pretrained=True)
    except (KeyError, ValueError, OSError) as err:  # the hub's HubError is a ValueError
        raise WeightsError(f"'{name}' is not a file and not a usable model-zoo name: {err}") from None
    return model, {"source": "zoo", "name": name}


def load_pretrained_backbone(
    weights: str, config_file: str | None = None, overrides: Sequence[str] = (), seed: int | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Resolve ``weights`` (see the module docstring) into ``(backbone in eval mode, info)``.

    ``seed`` seeds the ``random`` baseline (default: the config's ``train.seed``); the caller's RNG is untouched.

    ``info`` has ``source`` (``random``/``checkpoint``/``state_dict``/``zoo``), ``weights_hash`` (sha256 of the
    loaded state dict, for feature caches) and, for files, ``path``.
    """
    path = Path(os.path.expanduser(weights))
    if weights == RANDOM_WEIGHTS:
        cfg = _config(config_file, overrides)
        with torch.random.fork_rng(devices=[]):  # reproducible baseline: seeded by train.seed, caller's RNG untouched
            seed = int(cfg.train.seed if seed is None else seed)
            torch.manual_seed(seed)
            model = backbone_from_config(cfg)
        info = {"source": "random", "seed": seed}
    elif path.is_file():
        obj = _read_file(path)
        if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
            cfg = _config(config_file, overrides, stored_yaml=obj.get("config"))
            sd, info = extract_backbone(obj, "teacher"), {"source": "checkpoint", "path": str(path)}
        else:
            cfg = _config(config_file, overrides)
            sd, info = _unwrap_state_dict(obj, path), {"source": "state_dict", "path": str(path)}
        model = backbone_from_config(cfg)
        load_state_dict_strict(model, sd, f"'{path}'")
    elif path.exists() or os.sep in weights or path.suffix in (".pth", ".pt", ".ckpt", ".bin", ".safetensors"):
        raise WeightsError(f"weights file '{weights}' does not exist (or is not a file); check the path.")
    else:
        model, info = _from_zoo(weights, config_file, overrides)
    info["weights_hash"] = state_dict_hash(model.state_dict())
    model.eval().requires_grad_(False)
    logger.info("backbone from %s (%s), weights sha256 %s", weights, info["source"], info["weights_hash"][:12])
    return model, info

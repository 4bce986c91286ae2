"""THE one path from a user's weights argument to weights, and to a loaded backbone.

Every consumer — ``eval-knn`` / ``eval-linear`` / ``visualize`` (``--pretrained-weights``), ``convert``,
:func:`ssl_distill.hub.load` and the torch.hub entry points, continued pretraining (``student.pretrained_weights``)
and distillation — goes through here, so each accepts the same things and fails with the same messages:

* ``random``: a randomly initialised backbone (a baseline), architecture from the config, seeded;
* a model-zoo name (``dinov2_vits14``): downloaded and verified through :mod:`ssl_distill.hub.download`;
* an ``http(s)://`` URL: downloaded into the cache;
* a file: one of our training checkpoints (its teacher backbone, and its stored config), an exported backbone, or
  an official DINOv2 / timm / Hugging Face state dict (``.pth``, ``.bin`` or ``.safetensors``; wrappers such as
  ``{"model": ...}``, a DDP ``module.`` prefix and the reference's chunked blocks are undone), converted to the
  official DINOv2 layout.

Loading is strict; a mismatch raises :class:`~ssl_distill.hub.registry.HubError` listing missing / unexpected keys
and the config keys that would fix it. Files are read with ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ssl_distill.checkpoint_format import (
    WeightsFileError,
    check_checkpoint_version,
    extract_backbone,
    is_training_checkpoint,
    read_weights_file,
)
from ssl_distill.hub.convert import StateDict, to_backbone_layout, to_dinov2
from ssl_distill.hub.registry import HubError

logger = logging.getLogger(__name__)
RANDOM_WEIGHTS = "random"
_FILE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")


# ------------------------------------------------------------------------------------------------ files
def read_file(path: str | os.PathLike) -> Any:
    """The object in a weights file (``torch.load(weights_only=True)`` or safetensors); :class:`HubError` if not."""
    try:
        return read_weights_file(path)
    except (FileNotFoundError, WeightsFileError) as exc:
        from ssl_distill.hub.download import weights_dir

        cached = weights_dir().resolve() in Path(path).resolve().parents
        hint = (" It is a download in the cache: delete it and download it again (and check the URL or "
                "SSL_DISTILL_BASE_URL if it keeps failing).") if cached else ""
        raise HubError(str(exc) + hint) from None


def unwrap_state_dict(obj: object, path: str | os.PathLike, which: str = "teacher") -> StateDict:
    """A plain ``{name: tensor}`` backbone dict from a loaded file, layout untouched: our training checkpoints give
    the ``which`` backbone; ``{"state_dict" | "model" | "teacher": ...}`` wrappers are opened; then the backbone
    keys of a reference training file are kept (:func:`_backbone_keys`)."""
    if is_training_checkpoint(obj):
        try:
            check_checkpoint_version(obj, path)
            return extract_backbone(obj, which)
        except WeightsFileError as exc:
            raise HubError(f"'{path}': {exc}") from None
    for key in ("state_dict", "model", "teacher"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise HubError(f"'{path}' holds no state dict of tensors (found {type(obj).__name__}); pass a training "
                       "checkpoint (model_*.pth), an exported backbone or an official DINOv2 / timm / Hugging Face "
                       "state dict.")
    return _backbone_keys({str(k): v for k, v in obj.items()})


def _backbone_keys(sd: StateDict) -> StateDict:
    """Reference DINOv2 training files: keep the (teacher) backbone, drop heads and a DDP ``module.`` prefix, and
    un-chunk FSDP block chunks (``blocks.<chunk>.<i>.`` -> ``blocks.<i>.``)."""
    for prefix in ("teacher.backbone.", "backbone.", "module."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}


def read_weights(path: str | os.PathLike, which: str = "teacher") -> StateDict:
    """The backbone state dict in a weights file, layout untouched (see :func:`unwrap_state_dict`)."""
    return unwrap_state_dict(read_file(path), path, which)


def read_backbone_weights(path: str | os.PathLike, which: str = "teacher") -> tuple[StateDict, str | None]:
    """``(state dict in the official DINOv2 layout, the stored config YAML of a training checkpoint or None)``."""
    obj = read_file(path)
    stored = obj.get("config") if is_training_checkpoint(obj) else None
    return to_dinov2(unwrap_state_dict(obj, path, which)), stored


def local_weights_path(weights: str | os.PathLike, progress: bool | None = None) -> Path:
    """A local file for a path, ``file://`` or ``http(s)://`` URL (downloaded into the cache)."""
    from ssl_distill.hub.download import resolve_weights

    return resolve_weights(weights, progress=progress)


def weights_file(spec: str, progress: bool | None = None) -> tuple[Path, Any]:
    """A local file for a weights argument, and the zoo entry when ``spec`` is a model-zoo name (else None).

    Zoo names are downloaded and verified into the cache; URLs downloaded; paths must exist."""
    if looks_like_a_path(spec):
        return local_weights_path(spec, progress), None
    from ssl_distill.hub.download import download
    from ssl_distill.hub.registry import get_model

    entry = get_model(spec)  # unknown names: HubError with suggestions
    return download(entry, progress=progress), entry


# ------------------------------------------------------------------------------------------ strict loading
def _count_blocks(keys: Any) -> int:
    ids = {int(k.split(".")[1]) for k in keys if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    return max(ids) + 1 if ids else 0


def _has(sd: StateDict, part: str) -> bool:
    return any(part in k for k in sd)


def likely_causes(model_sd: StateDict, sd: StateDict) -> list[str]:
    """Config fixes (``student.*`` keys) that explain the differences between a model's and a file's state dicts."""
    hints: list[str] = []
    reg, mreg = sd.get("register_tokens"), model_sd.get("register_tokens")
    if (reg is None) != (mreg is None) or (reg is not None and mreg is not None and reg.shape != mreg.shape):
        n = reg.shape[1] if reg is not None else 0
        hints.append(f"the weights have {n or 'no'} register tokens: set student.num_register_tokens={n}")
    if _has(sd, ".mlp.w12.") and not _has(model_sd, ".mlp.w12."):
        hints.append("the weights use a SwiGLU FFN (mlp.w12/w3): set student.ffn_layer=swiglufused")
    elif _has(sd, ".mlp.fc1.") and not _has(model_sd, ".mlp.fc1."):
        hints.append("the weights use a plain MLP FFN (mlp.fc1/fc2): set student.ffn_layer=mlp")
    if _has(sd, ".ls1.gamma") != _has(model_sd, ".ls1.gamma"):
        hints.append("the weights have LayerScale: set student.layerscale=1e-5" if _has(sd, ".ls1.gamma")
                     else "the weights have no LayerScale: set student.layerscale=0")
    for flag, key in (("qkv_bias", "attn.qkv.bias"), ("proj_bias", "attn.proj.bias")):
        if any(k.endswith(key) for k in sd) != any(k.endswith(key) for k in model_sd):
            hints.append(f"set student.{flag}={any(k.endswith(key) for k in sd)}")
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
        side = round((pos.shape[1] - 1) ** 0.5)
        hints.append(f"the position embedding covers a {side}x{side} patch grid: set "
                     f"crops.global_crops_size={side * pe.shape[-1]}")
    return hints


def load_strict(model: torch.nn.Module, sd: StateDict, source: str, advice: str | None = None) -> None:
    """``model.load_state_dict(sd, strict=True)``; a mismatch raises :class:`HubError` naming the keys and the fix
    (``advice`` replaces the config-key hints, e.g. for zoo models where the name decides the architecture)."""
    model_sd = model.state_dict()
    missing = sorted(set(model_sd) - set(sd))
    unexpected = sorted(set(sd) - set(model_sd))
    shapes = sorted(k for k in set(sd) & set(model_sd) if sd[k].shape != model_sd[k].shape)
    if missing or unexpected or shapes:
        parts = [f"the weights in {source} do not fit the backbone"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:6]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:6]}")
        if shapes:
            parts.append("shape mismatches: " + ", ".join(
                f"{k} {tuple(sd[k].shape)} vs {tuple(model_sd[k].shape)}" for k in shapes[:4]))
        hints = advice or "; ".join(likely_causes(model_sd, sd) or ["check student.arch and the other student.* "
                                                                    "keys"])
        raise HubError("; ".join(parts) + ". Likely cause: " + hints + ".")
    model.load_state_dict(sd, strict=True)


def state_dict_hash(state: StateDict) -> str:
    """sha256 over the sorted keys, shapes, dtypes and bytes of a state dict: identifies weights (feature caches)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ backbones
def _config(config_file: str | None, overrides: Sequence[str], stored_yaml: str | None = None) -> Any:
    """The config from ``config_file``, else from a checkpoint's stored YAML, with ``overrides`` on top; only its
    architecture (``student.*``) is validated — it describes a model here, not a run."""
    from ssl_distill.config import ConfigError, load_config, validate_architecture

    try:
        if config_file or stored_yaml is None:
            cfg = load_config(config_file, list(overrides), validate=False)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "checkpoint_config.yaml"
                path.write_text(stored_yaml, encoding="utf-8")
                cfg = load_config(path, list(overrides), validate=False)
        validate_architecture(cfg)
        return cfg
    except ConfigError as err:
        raise HubError(str(err)) from None


def looks_like_a_path(weights: str) -> bool:
    """Whether ``weights`` is meant as a file (or URL) rather than a model-zoo name."""
    return (os.sep in weights or "://" in weights or Path(os.path.expanduser(weights)).exists()
            or Path(weights).suffix in _FILE_SUFFIXES)


def resolve_backbone(weights: str, config_file: str | None = None, overrides: Sequence[str] = (),
                     seed: int | None = None, keep_file: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``weights`` (see the module docstring) -> ``(backbone in eval mode, info)``.

    The architecture comes from the zoo entry for a name, else from ``config_file`` + ``overrides``, else from a
    training checkpoint's stored config (+ ``overrides``). ``seed`` seeds the ``random`` baseline (default: the
    config's ``train.seed``); the caller's RNG is untouched. ``info``: ``source`` (``random`` / ``checkpoint`` /
    ``state_dict`` / ``zoo``), ``weights_hash`` (sha256 of the loaded state dict, for feature caches) and, for
    files, ``path`` — with ``keep_file`` also the loaded ``file`` object (e.g. a training checkpoint's heads and
    loss centres, read once) and the ``config`` the architecture came from.
    """
    from ssl_distill.models import backbone_from_config

    if weights == RANDOM_WEIGHTS:
        cfg = _config(config_file, overrides)
        with torch.random.fork_rng(devices=[]):  # reproducible baseline: seeded by train.seed, caller's RNG untouched
            seed = int(cfg.train.seed if seed is None else seed)
            torch.manual_seed(seed)
            model = backbone_from_config(cfg)
        info: dict[str, Any] = {"source": "random", "seed": seed}
    elif looks_like_a_path(weights):
        path = local_weights_path(weights)
        obj = read_file(path)
        stored = obj.get("config") if is_training_checkpoint(obj) else None
        cfg = _config(config_file, overrides, stored_yaml=stored)
        model = backbone_from_config(cfg)
        load_strict(model, to_backbone_layout(unwrap_state_dict(obj, path), model.weights_layout), f"'{path}'")
        info = {"source": "checkpoint" if stored is not None else "state_dict", "path": str(path)}
        if keep_file:
            info.update(file=obj, config=cfg)
    else:
        if config_file or overrides:
            logger.warning("model-zoo weights '%s': the architecture comes from the zoo entry; the config file and "
                           "overrides are ignored", weights)
        from ssl_distill.hub import load

        try:
            model = load(weights, pretrained=True)
        except (KeyError, HubError) as err:
            raise HubError(f"'{weights}' is not a file and not a usable model-zoo name: {err}") from None
        info = {"source": "zoo", "name": weights}
    info["weights_hash"] = state_dict_hash(model.state_dict())
    model.eval().requires_grad_(False)
    logger.info("backbone from %s (%s), weights sha256 %s", weights, info["source"], info["weights_hash"][:12])
    return model, info


def convert_file(src_path: str | os.PathLike, dst_path: str | os.PathLike, src: str = "auto", dst: str = "dinov2",
                 hf_keys: str = "disk", num_heads: int | None = None) -> tuple[list[Path], str | None]:
    """Read ``src_path`` (layout ``src``; ``"auto"`` detects it), write it in layout ``dst`` to ``dst_path``
    atomically (see :func:`ssl_distill.hub.convert.export_weights`). Returns the files written and, when the target
    library resizes position embeddings differently, a note saying for which input size features agree."""
    from ssl_distill.hub.convert import export_weights, resize_note

    native = to_dinov2(read_weights(src_path), src)
    written = export_weights(native, dst_path, dst, hf_keys, num_heads)
    logger.info("converted %s (%s) -> %s (%s)", src_path, src, ", ".join(map(str, written)), dst)
    return written, resize_note(native, dst)

"""Backbone state-dict formats: official DINOv2 (native, = ssl_distill), timm, Hugging Face transformers.

Layouts (``D`` = width, ``N`` = patches of the learned grid, ``R`` = registers):

* **dinov2** (ours): ``cls_token (1,1,D)``, ``pos_embed (1,1+N,D)`` (class position first), ``register_tokens
  (1,R,D)``, ``mask_token (1,D)``, ``blocks.i.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1|w12,
  mlp.fc2|w3, ls2.gamma}``, ``norm``.
* **timm** (``vit_*_patch14_dinov2``, ``vit_*_patch14_reg4_dinov2``): no ``mask_token``; with registers
  ``reg_token (1,R,D)`` and ``pos_embed (1,N,D)`` without the class position, which is folded into ``cls_token``
  (timm's ``no_embed_class``); SwiGLU packed as ``mlp.fc1`` (= ``w12``) / ``mlp.fc2`` (= ``w3``).
* **hf** (``transformers`` ``Dinov2Model`` / ``Dinov2WithRegistersModel``): ``embeddings.{cls_token, mask_token,
  position_embeddings, register_tokens, patch_embeddings.projection}``, ``encoder.layer.i.{norm1,
  attention.attention.{query,key,value}, attention.output.dense, layer_scale1.lambda1, norm2, mlp.fc1|weights_in,
  mlp.fc2|weights_out, layer_scale2.lambda1}``, ``layernorm``; optionally under a ``dinov2.`` prefix. That is the
  spelling of files (``save_pretrained``, transformers 4); transformers 5 renames modules in memory
  (``attention.q_proj``, ``mlp.gate_proj``, ...). Both are read; see :mod:`ssl_distill.hub.hf`.

dinov2 -> timm -> dinov2 moves the class position of register models from ``pos_embed`` into ``cls_token``
(the sum, which is all the forward pass uses, is unchanged); timm -> dinov2 -> timm is exact.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from ssl_distill.fileio import atomic_open, atomic_write_text, tensor_bytes
from ssl_distill.hub.hf import dinov2_to_hf, hf_config, hf_to_dinov2
from ssl_distill.hub.registry import HubError

logger = logging.getLogger(__name__)

StateDict = dict[str, Tensor]
FORMATS = ("dinov2", "timm", "hf")
ALIASES = {"ssl_distill": "dinov2", "native": "dinov2", "huggingface": "hf", "transformers": "hf"}
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")

_DINOV2_KEY = re.compile(
    r"^(cls_token|pos_embed|register_tokens|mask_token|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|mlp\.w12|mlp\.w3)\.(weight|bias)"
    r"|blocks\.\d+\.ls[12]\.gamma)$"
)
def canonical_format(name: str) -> str:
    """``"ssl_distill"``/``"native"`` -> ``"dinov2"``, ``"huggingface"`` -> ``"hf"``; unknown names raise."""
    fmt = ALIASES.get(name, name)
    if fmt not in FORMATS:
        raise HubError(f"unknown weights format {name!r}; use one of dinov2 (= ssl_distill), timm, hf")
    return fmt


def _is_swiglu_packed(sd: StateDict, prefix: str) -> bool:
    """timm packs SwiGLU as fc1 (2H, D) / fc2 (D, H): fc1 has twice as many outputs as fc2 has inputs."""
    fc1, fc2 = sd.get(prefix + "fc1.weight"), sd.get(prefix + "fc2.weight")
    return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


def detect_format(sd: StateDict) -> str:
    """Guess the layout of a backbone state dict: ``"dinov2"``, ``"timm"`` or ``"hf"``."""
    keys = list(sd)
    if any(k.startswith(("embeddings.", "encoder.layer.")) or ".embeddings.patch_embeddings." in k for k in keys):
        return "hf"
    if "reg_token" in sd:
        return "timm"
    if "mask_token" in sd or "register_tokens" in sd or any(".mlp.w12." in k for k in keys):
        return "dinov2"
    if "cls_token" in sd and "patch_embed.proj.weight" in sd:
        return "timm"  # plain ViT without mask token: timm (also what a dinov2 file minus mask_token is)
    sample = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
    raise HubError(
        f"cannot recognise this state dict as a ViT backbone in dinov2, timm or Hugging Face layout (keys: {sample})"
    )


def validate_dinov2(sd: StateDict) -> StateDict:
    """Check that ``sd`` has the DINOv2 key layout (names only; shapes are checked by strict loading)."""
    unknown = [k for k in sd if not _DINOV2_KEY.match(k)]
    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight") if k not in sd]
    if unknown or missing or not any(k.startswith("blocks.") for k in sd):
        raise HubError(
            "not a ViT backbone state dict in DINOv2 layout"
            + (f"; unexpected keys: {', '.join(unknown[:6])}" if unknown else "")
            + (f"; missing keys: {', '.join(missing)}" if missing else "")
            + ". Pass --from timm or --from hf for other layouts."
        )
    return sd


# ---------------------------------------------------------------------------------------------- timm
def timm_to_dinov2(sd: StateDict) -> StateDict:
    """timm ``vit_*_patch14(_reg4)_dinov2`` layout -> DINOv2 layout (adds a zero ``mask_token``)."""
    out: StateDict = {}
    cls = sd["cls_token"]
    pos = sd["pos_embed"]
    side = round(pos.shape[1] ** 0.5)
    for k, v in sd.items():
        if k.startswith("head."):
            logger.warning("dropping classifier weight %s (backbones have no head)", k)
            continue
        if k == "reg_token":
            out["register_tokens"] = v
        elif k == "pos_embed" and side * side == pos.shape[1]:
            # no class position (timm's no_embed_class): it is already folded into cls_token
            out[k] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
        elif (m := re.match(r"^(blocks\.\d+\.mlp\.)fc([12])\.(weight|bias)$", k)) and _is_swiglu_packed(sd, m[1]):
            out[f"{m[1]}{'w12' if m[2] == '1' else 'w3'}.{m[3]}"] = v
        else:
            out[k] = v
    out.setdefault("mask_token", torch.zeros(1, cls.shape[-1], dtype=cls.dtype))
    return out


def dinov2_to_timm(sd: StateDict) -> StateDict:
    """DINOv2 layout -> timm layout (drops ``mask_token``; register models get timm's ``no_embed_class`` form)."""
    out: StateDict = {}
    has_reg = "register_tokens" in sd
    for k, v in sd.items():
        if k == "mask_token":
            continue
        if k == "register_tokens":
            out["reg_token"] = v
        elif has_reg and k == "cls_token":
            out[k] = v + sd["pos_embed"][:, :1]
        elif has_reg and k == "pos_embed":
            out[k] = v[:, 1:]
        elif m := re.match(r"^(blocks\.\d+\.mlp\.)(w12|w3)\.(weight|bias)$", k):
            out[f"{m[1]}{'fc1' if m[2] == 'w12' else 'fc2'}.{m[3]}"] = v
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------- API
def to_dinov2(sd: StateDict, src: str = "auto") -> StateDict:
    """Any supported layout (``src`` = ``"auto"`` detects it, both Hugging Face spellings) -> validated DINOv2."""
    src = detect_format(sd) if src == "auto" else canonical_format(src)
    if src == "timm":
        sd = timm_to_dinov2(sd)
    elif src == "hf":
        sd = hf_to_dinov2(sd)
    return validate_dinov2(dict(sd))


def to_backbone_layout(sd: StateDict, layout: str) -> StateDict:
    """A backbone state dict in any readable layout -> ``layout``, a backbone's ``weights_layout``: ``"dinov2"``
    (our ViT: :func:`to_dinov2`) or ``"timm"`` (a timm ViT: kept as it is unless it is a DINOv2 / Hugging Face
    file, without a classifier ``head.*``, with a zero ``mask_token`` where the file has none)."""
    if layout == "dinov2":
        return to_dinov2(sd)
    if layout != "timm":
        raise HubError(f"unknown backbone weights layout {layout!r}; use dinov2 or timm")
    if "register_tokens" in sd or any(".mlp.w12." in k for k in sd) or detect_format(sd) == "hf":
        sd = dinov2_to_timm(to_dinov2(sd))
    head = sorted(k for k in sd if k.startswith("head."))
    if head:
        logger.info("dropping the classifier weights %s (a backbone has no head)", ", ".join(head))
    out = {k: v for k, v in sd.items() if not k.startswith("head.")}
    cls = out.get("cls_token")
    if cls is not None:
        out.setdefault("mask_token", torch.zeros(1, cls.shape[-1], dtype=cls.dtype))
    return out


def convert_state_dict(sd: StateDict, src: str = "auto", dst: str = "dinov2", hf_keys: str = "disk") -> StateDict:
    """Convert a backbone state dict between layouts (via the DINOv2 layout).

    ``hf_keys`` picks the Hugging Face spelling written for ``dst="hf"``: ``"disk"`` (what ``save_pretrained``
    writes and ``from_pretrained`` reads) or ``"memory"`` (transformers 5 ``model.state_dict()``, for
    ``load_state_dict(strict=True)`` into a live model); see :mod:`ssl_distill.hub.hf`.
    """
    native = to_dinov2(sd, src)
    dst = canonical_format(dst)
    if dst == "timm":
        return dinov2_to_timm(native)
    if dst == "hf":
        return dinov2_to_hf(native, hf_keys)
    return native


def resize_note(sd: StateDict, dst: str) -> str | None:
    """For a timm / Hugging Face export of a backbone without registers (DINOv2 layout ``sd``): a one-line note
    that those libraries resize position embeddings differently, so features agree only at the native size."""
    dst = canonical_format(dst)
    if dst == "dinov2" or "register_tokens" in sd:
        return None
    side = math.isqrt(sd["pos_embed"].shape[1] - 1) * sd["patch_embed.proj.weight"].shape[-1]
    how = ("with antialiasing (resample_abs_pos_embed)" if dst == "timm"
           else "to the target size without the 0.1 offset (Dinov2Model)")
    return (f"note: this backbone has no registers; the official DINOv2 code (and ssl_distill) resizes its position "
            f"embeddings with a 0.1 offset and no antialiasing, {dst} resizes them {how}, so features agree exactly "
            f"only for {side}x{side} px inputs (the learned grid); see MODEL_ZOO.md, 'Position embeddings at other "
            "sizes'.")


def save_weights(sd: StateDict, path: str | os.PathLike) -> Path:
    """Write a state dict atomically: safetensors if ``path`` ends in ``.safetensors``, else ``torch.save``."""
    path = Path(path)
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    with atomic_open(path, "wb", expected_size=tensor_bytes(sd)) as f:
        if path.suffix == ".safetensors":
            from safetensors.torch import save

            f.write(save(sd, metadata={"format": "pt"}))  # transformers' from_pretrained wants the format tag
        else:
            torch.save(sd, f)
    return path


def _hf_targets(dst_path: Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) of a Hugging Face export to ``dst_path``: a directory (an existing one,
    or a path without a weights suffix) gets ``model.safetensors`` + ``config.json``; a file named like
    ``save_pretrained``'s gets ``config.json`` beside it; any other file name is written alone."""
    if dst_path.is_dir() or dst_path.suffix not in _WEIGHT_SUFFIXES:
        return dst_path / "model.safetensors", dst_path / "config.json"
    if dst_path.name in ("model.safetensors", "pytorch_model.bin"):
        return dst_path, dst_path.with_name("config.json")
    return dst_path, None


def export_weights(native: StateDict, dst_path: str | os.PathLike, dst: str = "dinov2", hf_keys: str = "disk",
                   num_heads: int | None = None) -> list[Path]:
    """Write a validated DINOv2-layout state dict in layout ``dst`` atomically; returns the files written.

    For ``dst="hf"`` a directory target receives ``model.safetensors`` and the ``config.json`` (see
    :func:`ssl_distill.hub.hf.hf_config`; ``num_heads`` defaults to width / 64) that
    ``Dinov2Model.from_pretrained(dir)`` / ``Dinov2WithRegistersModel.from_pretrained(dir)`` need.
    """
    dst = canonical_format(dst)
    out = convert_state_dict(native, "dinov2", dst, hf_keys)
    if dst != "hf":
        return [save_weights(out, dst_path)]
    weights_path, config_path = _hf_targets(Path(dst_path))
    config = hf_config(native, num_heads) if config_path is not None else None  # fail before writing anything
    written = [save_weights(out, weights_path)]
    if config_path is not None:
        written.append(atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return written

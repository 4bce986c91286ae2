"""Hugging Face transformers layout of a DINOv2 backbone: both key spellings, and the ``config.json`` it needs.

transformers has two spellings of the same ``Dinov2Model`` / ``Dinov2WithRegistersModel`` weights
(``D`` = width, ``H`` = feed-forward hidden size, per block ``encoder.layer.i.``):

============================  =====================================  ==========================================
ours (``blocks.i.``)          ``"disk"``: files, transformers 4       ``"memory"``: transformers 5 ``state_dict()``
============================  =====================================  ==========================================
``attn.qkv`` (3D, D)          ``attention.attention.{query,key,value}``  ``attention.{q,k,v}_proj``
``attn.proj``                 ``attention.output.dense``             ``attention.o_proj``
``mlp.w12`` (2H, D) SwiGLU    ``mlp.weights_in``                     ``mlp.gate_proj`` + ``mlp.up_proj`` (H, D)
``mlp.w3`` SwiGLU             ``mlp.weights_out``                    ``mlp.down_proj``
============================  =====================================  ==========================================

``norm1``, ``norm2``, ``mlp.fc1``/``fc2`` (plain MLP), ``layer_scale{1,2}.lambda1`` (our ``ls{1,2}.gamma``) and the
embeddings (``embeddings.{cls_token, mask_token, position_embeddings (1, 1+N, D), register_tokens (1, R, D),
patch_embeddings.projection}``, ``layernorm``) are spelled the same in both. transformers 5 renames the modules in
memory but ``save_pretrained`` still writes, and ``from_pretrained`` still reads, the disk spelling; reading here
accepts either, writing produces the one asked for.
"""

from __future__ import annotations

import logging
import math
import re

import torch
from torch import Tensor

from ssl_distill.hub.registry import HubError

logger = logging.getLogger(__name__)

StateDict = dict[str, Tensor]
HF_KEYS = ("disk", "memory")

_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_TOP_INV = {v: k for k, v in _TOP.items()}
_SAME = {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
# HF module -> our module inside a block (weight and bias follow), per spelling
_RENAMED = {
    "disk": {**_SAME, "attention.output.dense": "attn.proj", "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3"},
    "memory": {**_SAME, "attention.o_proj": "attn.proj", "mlp.down_proj": "mlp.w3"},
}
# our module -> the HF modules that hold its row blocks, in order (concatenated along dim 0)
_SPLIT = {
    "disk": {"attn.qkv": ("attention.attention.query", "attention.attention.key", "attention.attention.value")},
    "memory": {"attn.qkv": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
               "mlp.w12": ("mlp.gate_proj", "mlp.up_proj")},
}
_PARAMS = {"layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}
_PARAMS_INV = {v: k for k, v in _PARAMS.items()}
# every HF block module name -> (our module, row-block index or None, spelling)
_READ = {
    **{hf: (ours, None, sp) for sp, table in _RENAMED.items() for hf, ours in table.items()},
    **{hf: (ours, i, sp) for sp, table in _SPLIT.items() for ours, hfs in table.items() for i, hf in enumerate(hfs)},
}
_BLOCK_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
_LAMBDA_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(layer_scale[12]\.lambda1)$")


def check_hf_keys(keys: str) -> str:
    """``"disk"`` or ``"memory"``; anything else raises :class:`HubError` naming the choices."""
    if keys not in HF_KEYS:
        raise HubError(f"unknown Hugging Face key spelling {keys!r}; use 'disk' (save_pretrained files, "
                       "transformers 4) or 'memory' (transformers 5 model.state_dict())")
    return keys


def strip_hf_prefix(sd: StateDict) -> StateDict:
    """Drop a ``dinov2.`` / ``dinov2_with_registers.`` model prefix and a ``classifier.*`` head."""
    out: StateDict = {}
    for k, v in sd.items():
        if k.startswith("classifier."):
            logger.warning("dropping classifier weight %s (backbones have no head)", k)
            continue
        m = re.match(r"^[A-Za-z0-9_]+\.(?=(embeddings|encoder|layernorm)\.)", k)
        out[k[m.end():] if m else k] = v
    return out


def hf_to_dinov2(sd: StateDict) -> StateDict:
    """Hugging Face layout (either spelling, optional model prefix) -> DINOv2 layout.

    q/k/v ``(D, D)`` are concatenated into ``qkv (3D, D)``; transformers 5's ``gate_proj``/``up_proj`` ``(H, D)``
    into ``w12 (2H, D)``. A missing ``mask_token`` (``use_mask_token=False``) becomes zeros, as in timm import.
    """
    out: StateDict = {}
    parts: dict[str, tuple[str, str, dict[int, Tensor]]] = {}  # our key -> (HF layer prefix, spelling, rows)
    unknown = []
    for k, v in strip_hf_prefix(sd).items():
        m, lam = _BLOCK_KEY.match(k), _LAMBDA_KEY.match(k)
        if k in _TOP:
            out[_TOP[k]] = v
        elif lam:
            out[f"blocks.{lam[1]}.{_PARAMS[lam[2]]}"] = v
        elif m and m[2] in _READ:
            ours, index, spelling = _READ[m[2]]
            key = f"blocks.{m[1]}.{ours}.{m[3]}"
            if index is None:
                out[key] = v
            else:
                parts.setdefault(key, (f"encoder.layer.{m[1]}.", spelling, {}))[2][index] = v
        else:
            unknown.append(k)
    if unknown:
        raise HubError(f"unexpected keys for a Hugging Face Dinov2Model: {', '.join(unknown[:6])}")
    for key, (layer, spelling, rows) in sorted(parts.items()):
        names = _SPLIT[spelling][key.split(".", 2)[2].rsplit(".", 1)[0]]
        lacking = [f"{layer}{name}.{key.rsplit('.', 1)[1]}" for i, name in enumerate(names) if i not in rows]
        if lacking:
            raise HubError(f"incomplete Hugging Face weights: {', '.join(lacking)} missing")
        out[key] = torch.cat([rows[i] for i in range(len(names))], dim=0)
    if "cls_token" in out:
        out.setdefault("mask_token", torch.zeros(1, out["cls_token"].shape[-1], dtype=out["cls_token"].dtype))
    return out


def dinov2_to_hf(sd: StateDict, keys: str = "disk") -> StateDict:
    """DINOv2 layout -> Hugging Face layout in spelling ``keys`` (``"disk"`` = what ``save_pretrained`` writes,
    ``"memory"`` = transformers 5 ``Dinov2Model.state_dict()``); ``sd`` must already be validated."""
    renamed = {ours: hf for hf, ours in _RENAMED[check_hf_keys(keys)].items()}
    split = _SPLIT[keys]
    out: StateDict = {}
    for k, v in sd.items():
        if k in _TOP_INV:
            out[_TOP_INV[k]] = v
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+?)\.(weight|bias|gamma)$", k)
        assert m is not None, k  # validate_dinov2 allows only top-level and block keys
        layer = f"encoder.layer.{m[1]}."
        if m[3] == "gamma":
            out[layer + _PARAMS_INV[f"{m[2]}.gamma"]] = v
        elif m[2] in split:
            for name, part in zip(split[m[2]], v.chunk(len(split[m[2]]), dim=0)):
                out[f"{layer}{name}.{m[3]}"] = part
        else:
            out[f"{layer}{renamed[m[2]]}.{m[3]}"] = v
    return out


def _mlp_ratio(width: int, hidden: int, swiglu: bool) -> int:
    """The integer ``mlp_ratio`` for which transformers builds a feed-forward of ``hidden`` units."""
    ratio = round(hidden * (1.5 if swiglu else 1.0) / width)
    built = int(width * ratio)
    if swiglu:
        built = (int(built * 2 / 3) + 7) // 8 * 8
    if ratio < 1 or built != hidden:
        raise HubError(f"a feed-forward of {hidden} units on width {width} has no integer mlp_ratio, which "
                       "transformers' Dinov2Config requires; this backbone cannot be expressed as a Dinov2Model")
    return ratio


def hf_config(sd: StateDict, num_heads: int | None = None) -> dict:
    """The ``config.json`` of a ``Dinov2Model`` (no registers) or ``Dinov2WithRegistersModel`` for a validated
    DINOv2-layout state dict; ``num_heads`` (not stored in weights) defaults to width / 64 as in every DINOv2 and
    ssl_distill architecture."""
    width = sd["cls_token"].shape[-1]
    if num_heads is None:
        if width % 64:
            raise HubError(f"cannot infer the number of attention heads of a width-{width} backbone (not a "
                           "multiple of 64); pass it (--num-heads)")
        num_heads = width // 64
    if width % num_heads:
        raise HubError(f"width {width} is not divisible by {num_heads} attention heads")
    missing = [k for k in ("blocks.0.attn.proj.bias", "blocks.0.ls1.gamma") if k not in sd]
    if missing:
        raise HubError(f"transformers' Dinov2Model always has {' and '.join(missing)}; this backbone lacks them")
    swiglu = "blocks.0.mlp.w12.weight" in sd
    hidden = sd["blocks.0.mlp.w12.weight"].shape[0] // 2 if swiglu else sd["blocks.0.mlp.fc1.weight"].shape[0]
    patch = sd["patch_embed.proj.weight"]
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    config = {
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": width,
        "num_hidden_layers": len({k.split(".")[1] for k in sd if k.startswith("blocks.")}),
        "num_attention_heads": num_heads,
        "mlp_ratio": _mlp_ratio(width, hidden, swiglu),
        "use_swiglu_ffn": swiglu,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "layerscale_value": 1.0,
        "image_size": grid * patch.shape[-1],
        "patch_size": patch.shape[-1],
        "num_channels": patch.shape[1],
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "dtype": str(patch.dtype).removeprefix("torch."),
    }
    if registers:
        config["num_register_tokens"] = registers
    else:
        config["use_mask_token"] = True
    return config

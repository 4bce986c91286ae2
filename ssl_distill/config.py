"""Typed defaults -> YAML experiment file -> command-line dotlist: one validated config.

The defaults below are the DINOv2 recipe (``dinov2/configs/ssl_default_config.yaml``) with the same section and key
names, except ``OFFICIAL_EPOCH_LENGTH`` which is called ``train.iters_per_epoch`` here. This module is the only
place that knows default values.

>>> cfg = load_config("configs/vits14_default.yaml", ["optim.epochs=10", "train.batch_size_per_gpu=32"])
>>> cfg.optim.base_lr
0.004

OmegaConf structured configs give us type checking of every value and YAML/dotlist merging; on top of that we add
the checks a user needs: an unknown key names the nearest valid key, and impossible values name the key and the fix.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssl_distill.fileio import atomic_write_text

ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2")
FFN_LAYERS = ("mlp", "swiglu", "swiglufused")
ATTN_IMPLS = ("auto", "sdpa", "xformers", "math")
CENTERINGS = ("centering", "sinkhorn_knopp")
SCALING_RULES = ("sqrt_wrt_1024", "linear_wrt_256", "none")
BAD_IMAGE_POLICIES = ("skip", "error")
SHARDINGS = ("ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the key and the fix."""


@dataclass
class DinoConfig:
    loss_weight: float = 1.0
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048
    koleo_loss_weight: float = 0.1


@dataclass
class IbotConfig:
    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: list[float] = field(default_factory=lambda: [0.1, 0.5])
    separate_head: bool = False
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048


@dataclass
class TrainConfig:
    batch_size_per_gpu: int = 64
    dataset_path: str = ""
    output_dir: str = "."
    seed: int = 0
    num_workers: int = 10
    iters_per_epoch: int = 1250  # DINOv2's OFFICIAL_EPOCH_LENGTH
    centering: str = "centering"  # or "sinkhorn_knopp"
    bad_image_policy: str = "skip"  # skip (log once, substitute, count) | error
    sharding: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per block)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (with a GradScaler)
    checkpoint_period: int = 1000  # iterations between checkpoints (one is also written at the end)
    keep_last_checkpoints: int = 3
    log_period: int = 10  # iterations between metric lines


@dataclass
class StudentConfig:
    arch: str = "vit_large"
    depth: int = 0  # number of blocks; 0 keeps the architecture's (12 for vit_tiny/small/base), e.g. 4 for tiny data
    patch_size: int = 16
    drop_path_rate: float = 0.3
    layerscale: float = 1.0e-05
    drop_path_uniform: bool = True
    pretrained_weights: str = ""
    ffn_layer: str = "mlp"
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    num_register_tokens: int = 0
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1
    attn_impl: str = "auto"  # auto: xFormers on CUDA when installed, else PyTorch SDPA


@dataclass
class TeacherConfig:
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30


@dataclass
class OptimConfig:
    epochs: int = 100
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    base_lr: float = 0.004  # learning rate for a global batch size of 1024
    lr: float = 0.0  # derived from base_lr by scaling_rule and the global batch size at start
    warmup_epochs: int = 10
    min_lr: float = 1.0e-06
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1
    scaling_rule: str = "sqrt_wrt_1024"
    patch_embed_lr_mult: float = 0.2
    layerwise_decay: float = 0.9
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999


@dataclass
class CropsConfig:
    global_crops_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_crops_number: int = 8
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    global_crops_size: int = 224
    local_crops_size: int = 96


@dataclass
class EvaluationConfig:
    """In-training k-NN monitor of the teacher; off while the datasets are empty."""

    eval_period_iterations: int = 12500
    knn_train_dataset: str = ""  # class-folder tree used as the k-NN memory bank
    knn_val_dataset: str = ""  # class-folder tree with the same classes
    knn_nb: list[int] = field(default_factory=lambda: [10, 20])
    knn_temperature: float = 0.07


@dataclass
class SSLConfig:
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


def default_config() -> DictConfig:
    """The typed defaults (the DINOv2 recipe) as a struct-mode OmegaConf config."""
    cfg = OmegaConf.structured(SSLConfig)
    OmegaConf.set_struct(cfg, True)
    return cfg


# --- unknown keys
def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf in a nested dict (lists are leaves)."""
    if not isinstance(node, (dict, DictConfig)):
        return [prefix]
    keys: list[str] = []
    for k, v in node.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        keys.extend(_flat_keys(v, path))
    return keys


def _check_known_keys(keys: Iterable[str], valid: Sequence[str], source: str) -> None:
    valid_set = set(valid)
    sections = {k.split(".")[0] for k in valid}
    for key in keys:
        if key in valid_set:
            continue
        parts = key.split(".")
        top = parts[0]
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth])
            if prefix in valid_set:  # a leaf used as a section, e.g. optim.lr.x
                raise ConfigError(f"Config key '{prefix}' is a value, not a section, but {source} sets '{key}'.")
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        if not close and top in sections:
            close = difflib.get_close_matches(key, [v for v in valid if v.startswith(top + ".")], n=1, cutoff=0.0)
        hint = f" Did you mean '{close[0]}'?" if close else f" Valid sections: {', '.join(sorted(sections))}."
        raise ConfigError(f"Unknown config key '{key}' in {source}.{hint}")


def _parse_dotlist(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(
                f"Cannot parse override '{item}': write overrides as key=value, e.g. optim.epochs=10."
            )
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"Cannot parse overrides {list(overrides)}: {exc}") from None


def _load_yaml(config_file: str | os.PathLike) -> DictConfig:
    path = Path(config_file)
    if not path.is_file():
        raise ConfigError(
            f"Config file '{path}' does not exist. Pass an existing YAML file, e.g. configs/vits14_default.yaml."
        )
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends
        raise ConfigError(f"Config file '{path}' is not valid YAML: {exc}") from None
    if isinstance(loaded, ListConfig):
        raise ConfigError(f"Config file '{path}' must hold a mapping of sections (dino:, train:, ...), not a list.")
    return loaded


def _merge(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    _check_known_keys(_flat_keys(other), _flat_keys(base), source)
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"Bad value for config key '{key}' in {source}: {msg}") from None


def load_config(
    config_file: str | os.PathLike | None = None, overrides: Sequence[str] = (), validate: bool = True
) -> DictConfig:
    """Merge defaults -> YAML file -> dotlist overrides (``["optim.epochs=10", ...]``) and validate the result."""
    cfg = default_config()
    if config_file:
        cfg = _merge(cfg, _load_yaml(config_file), f"config file '{config_file}'")
    if overrides:
        cfg = _merge(cfg, _parse_dotlist(overrides), "the command-line overrides")
    if validate:
        validate_config(cfg)
    return cfg


# --- values
def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"Invalid config value for '{key}': {message}")


def _check_pair(cfg: DictConfig, key: str, low: float, high: float) -> None:
    value = OmegaConf.select(cfg, key)
    _require(len(value) == 2, key, f"expected [min, max], got {list(value)}.")
    a, b = value
    _require(low <= a <= b <= high, key, f"expected {low} <= min <= max <= {high}, got {list(value)}.")


def _check_choice(cfg: DictConfig, key: str, choices: Sequence[str]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"Invalid config value for '{key}': '{value}' is not one of {list(choices)}.{hint}")


def _check_range(cfg: DictConfig, key: str, low: float, high: float | None = None, low_open: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    bad_low = value <= low if low_open else value < low
    bad_high = high is not None and value > high
    if bad_low or bad_high:
        lo = f"> {low}" if low_open else f">= {low}"
        hi = f" and <= {high}" if high is not None else ""
        raise ConfigError(f"Invalid config value for '{key}': {value} (must be {lo}{hi}).")


def validate_config(cfg: DictConfig) -> None:
    """Reject impossible values with a message that names the key and the fix."""
    _check_choice(cfg, "student.arch", ARCHS)
    _check_choice(cfg, "student.ffn_layer", FFN_LAYERS)
    _check_choice(cfg, "student.attn_impl", ATTN_IMPLS)
    _check_choice(cfg, "train.centering", CENTERINGS)
    _check_choice(cfg, "optim.scaling_rule", SCALING_RULES)
    _check_choice(cfg, "train.bad_image_policy", BAD_IMAGE_POLICIES)
    _check_choice(cfg, "train.sharding", SHARDINGS)
    _check_choice(cfg, "train.device", DEVICES)
    _check_choice(cfg, "train.precision", PRECISIONS)
    for key in ("student.patch_size", "train.batch_size_per_gpu", "train.iters_per_epoch", "optim.epochs",
                "train.checkpoint_period", "train.log_period",
                "crops.global_crops_size", "crops.local_crops_size", "dino.head_n_prototypes",
                "dino.head_bottleneck_dim", "dino.head_nlayers", "dino.head_hidden_dim",
                "ibot.head_n_prototypes", "ibot.head_bottleneck_dim", "ibot.head_nlayers", "ibot.head_hidden_dim"):
        _check_range(cfg, key, 1)
    for key in ("train.num_workers", "train.keep_last_checkpoints", "crops.local_crops_number",
                "student.num_register_tokens",
                "optim.warmup_epochs", "optim.freeze_last_layer_epochs", "teacher.warmup_teacher_temp_epochs",
                "student.depth",
                "optim.weight_decay", "optim.weight_decay_end", "optim.clip_grad", "optim.min_lr",
                "dino.loss_weight", "dino.koleo_loss_weight", "ibot.loss_weight", "student.layerscale"):
        _check_range(cfg, key, 0)
    _check_range(cfg, "evaluation.eval_period_iterations", 1)
    _check_range(cfg, "evaluation.knn_temperature", 0, low_open=True)
    _require(
        bool(cfg.evaluation.knn_train_dataset) == bool(cfg.evaluation.knn_val_dataset), "evaluation.knn_val_dataset",
        "set both evaluation.knn_train_dataset and evaluation.knn_val_dataset (or neither) for the k-NN monitor.",
    )
    _require(len(cfg.evaluation.knn_nb) > 0 and min(cfg.evaluation.knn_nb) >= 1, "evaluation.knn_nb",
             f"expected a non-empty list of k >= 1, got {list(cfg.evaluation.knn_nb)}.")
    _check_range(cfg, "optim.base_lr", 0, low_open=True)
    _require(cfg.optim.lr >= 0, "optim.lr", f"{cfg.optim.lr} is negative; leave it at 0 to derive it from base_lr.")
    for key in ("teacher.momentum_teacher", "teacher.final_momentum_teacher", "student.drop_path_rate",
                "ibot.mask_sample_probability", "optim.adamw_beta1", "optim.adamw_beta2"):
        _check_range(cfg, key, 0, 1)
    _check_range(cfg, "optim.layerwise_decay", 0, 1, low_open=True)
    _check_range(cfg, "optim.patch_embed_lr_mult", 0)
    _check_range(cfg, "teacher.warmup_teacher_temp", 0, low_open=True)
    _check_range(cfg, "teacher.teacher_temp", 0, low_open=True)
    _check_range(cfg, "student.interpolate_offset", 0)
    _check_pair(cfg, "ibot.mask_ratio_min_max", 0.0, 1.0)
    _check_pair(cfg, "crops.global_crops_scale", 0.0, 1.0)
    _check_pair(cfg, "crops.local_crops_scale", 0.0, 1.0)
    _require(cfg.crops.global_crops_scale[0] > 0, "crops.global_crops_scale", "the minimum scale must be > 0.")
    _require(cfg.crops.local_crops_scale[0] > 0, "crops.local_crops_scale", "the minimum scale must be > 0.")
    _require(
        cfg.optim.warmup_epochs <= cfg.optim.epochs, "optim.warmup_epochs",
        f"{cfg.optim.warmup_epochs} warm-up epochs exceed optim.epochs={cfg.optim.epochs}; lower it.",
    )
    _check_crop_sizes(cfg)


def _check_crop_sizes(cfg: DictConfig) -> None:
    patch = cfg.student.patch_size
    g, loc = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    for key, size in (("crops.global_crops_size", g), ("crops.local_crops_size", loc)):
        if size % patch:
            lower, upper = (size // patch) * patch, (size // patch + 1) * patch
            raise ConfigError(
                f"Invalid config value for '{key}': {size} is not a multiple of student.patch_size={patch}; "
                f"use {lower if lower else upper} or {upper}."
            )
    if cfg.crops.local_crops_number > 0 and loc > g:
        raise ConfigError(
            f"Invalid config value for 'crops.local_crops_size': local crops ({loc}px) must not be larger than "
            f"global crops (crops.global_crops_size={g}px)."
        )


# --- output
def config_to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, path: str | os.PathLike) -> Path:
    """Write the merged config as YAML atomically (temp file, fsync, rename)."""
    return atomic_write_text(path, config_to_yaml(cfg))

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
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssl_distill.fileio import atomic_write_text
from ssl_distill.models.names import (
    ARCHS,
    ATTN_IMPLS,
    DROP_PATH_MODES,
    FFN_LAYERS,
    OWN_VIT_KEYS,
    WEIGHT_INITS,
    arch_problem,
    timm_model_name,
    timm_problem,
)

logger = logging.getLogger(__name__)

CENTERINGS = ("centering", "sinkhorn_knopp")
SCALING_RULES = ("sqrt_wrt_1024", "linear_wrt_256", "none")
BAD_IMAGE_POLICIES = ("skip", "error")
SHARDINGS = ("ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MODES = ("pretrain", "distill")
DISTILL_RECIPES = ("auto", "heads", "features")
DISTILL_STUDENT_INITS = ("auto", "random", "teacher_selection")


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the key and the fix."""


def opt(default: Any, help: str) -> Any:
    """A config field with a one-line description that advises (``ssl-distill config`` prints it beside the
    value). List defaults are copied per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def field_descriptions(schema: type | None = None, prefix: str = "") -> dict[str, str]:
    """Dotted key -> the one-line description of every field of ``schema`` (default: the whole config)."""
    out: dict[str, str] = {}
    for f in fields(schema or SSLConfig):
        if is_dataclass(f.default_factory):  # a section
            out.update(field_descriptions(f.default_factory, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = str(f.metadata.get("help", ""))
    return out


@dataclass
class DinoConfig:
    """The DINO loss on the CLS token and its projection head."""

    loss_weight: float = opt(1.0, "weight of the DINO (CLS-token) terms in the total loss")
    head_n_prototypes: int = opt(65536, "prototypes K (head output size); the recipe uses 65536, 131072 for "
                                 "ViT-g; a few thousand suit small data sets and models")
    head_bottleneck_dim: int = opt(256, "width of the L2-normalised bottleneck before the prototypes (384 for ViT-g)")
    head_nlayers: int = opt(3, "Linear layers of the head's MLP, GELU between them")
    head_hidden_dim: int = opt(2048, "hidden width of the head's MLP")
    koleo_loss_weight: float = opt(0.1, "weight of KoLeo, which spreads the student's CLS tokens of a batch "
                                   "apart; 0 turns it off")


@dataclass
class IbotConfig:
    """The iBOT masked-patch loss, its masks and (optionally) its own head."""

    loss_weight: float = opt(1.0, "weight of the iBOT masked-patch loss; 0 turns it off (the student still sees "
                             "masked crops unless mask_sample_probability=0)")
    mask_sample_probability: float = opt(0.5, "fraction of the global crops that get a mask")
    mask_ratio_min_max: list[float] = opt([0.1, 0.5], "[min, max] fraction of patches masked in a masked crop; "
                                          "ratios are stratified over the global batch")
    separate_head: bool = opt(False, "give iBOT a head of its own (ibot.head_*); false: patch tokens share the DINO "
                              "head, as in the recipe")
    head_n_prototypes: int = opt(65536, "with separate_head: prototypes of the iBOT head")
    head_bottleneck_dim: int = opt(256, "with separate_head: bottleneck width of the iBOT head")
    head_nlayers: int = opt(3, "with separate_head: Linear layers of the iBOT head's MLP")
    head_hidden_dim: int = opt(2048, "with separate_head: hidden width of the iBOT head's MLP")


@dataclass
class TrainConfig:
    """Data, run length unit, teacher targets, hardware and checkpointing."""

    batch_size_per_gpu: int = opt(64, "images per process and step; the global batch (times the number of "
                                  "processes) sets the derived optim.lr")
    dataset_path: str = opt("", "training images (required): a class-folder tree, a folder of images, a text "
                            "file listing image paths, or tar shards (`ssl-distill shards` OUT folder, index.json, "
                            "brace pattern train-{000000..000099}.tar, http(s) URL)")
    output_dir: str = opt(".", "recorded from --output-dir when a run starts (the run's config.yaml shows where it "
                          "ran); set --output-dir instead")
    seed: int = opt(0, "seeds the initial weights and every random draw (data order, crops, masks, drop path): "
                    "the same seed gives the same run on any number of processes")
    num_workers: int = opt(10, "DataLoader processes per rank decoding and augmenting images; 0 = in the main "
                           "process (debugging)")
    iters_per_epoch: int = opt(1250, "iterations per 'epoch' of every schedule (DINOv2's OFFICIAL_EPOCH_LENGTH), "
                               "whatever the data set size")
    centering: str = opt("centering", "teacher targets: 'centering' (EMA centre, then sharpening) or "
                         "'sinkhorn_knopp' (3 Sinkhorn-Knopp iterations)")
    bad_image_policy: str = opt("skip", "an unreadable image: 'skip' (log once, use the next readable one, count it) "
                                "or 'error' (stop)")
    sharding: str = opt("ddp", "'ddp' (a model copy per process) or 'fsdp' (FSDP2, parameters sharded per block, "
                        "for models that do not fit)")
    device: str = opt("auto", "'auto' (CUDA when available), 'cpu' or 'cuda'")
    precision: str = opt("auto", "'auto' (bf16 on CUDA, fp32 on CPU), 'fp32', 'bf16' or 'fp16' (with a gradient "
                         "scaler)")
    checkpoint_period: int = opt(1000, "iterations between checkpoints; one is also written at the end and on a "
                                 "stop signal")
    keep_last_checkpoints: int = opt(3, "checkpoints kept in --output-dir (older ones are deleted); 0 keeps all")
    log_period: int = opt(10, "iterations between metric lines (console, training_metrics.jsonl, TensorBoard)")
    mode: str = opt("pretrain", "pretrain: self-distillation from an EMA teacher (the DINOv2 recipe); distill: learn "
                                "from a frozen pretrained teacher (distill.*), e.g. to make a small fast model")


@dataclass
class StudentConfig:
    """The backbone architecture (student and teacher share it)."""

    arch: str = opt("vit_large", f"backbone: {', '.join(ARCHS)}, or timm/<model name> for a timm ViT (e.g. "
                    "timm/vit_small_patch16_224; README 'Backbones')")
    depth: int = opt(0, "number of transformer blocks; 0 keeps the architecture's (12 for vit_tiny/small/base); "
                     "a shallower ViT (e.g. 4) learns faster on tiny data sets")
    patch_size: int = opt(16, "patch side in pixels (14 in the DINOv2 models); crop sizes must be multiples of it")
    drop_path_rate: float = opt(0.3, "stochastic-depth rate of the student (the teacher has none); about 0.1 suits "
                                "small models")
    layerscale: float = opt(1.0e-05, "initial LayerScale of the residual branches; 0 = no LayerScale")
    weight_init: str = opt("trunc_normal", f"initial weights: {', '.join(WEIGHT_INITS)}; trunc_normal is DINOv2's "
                           "(std 0.02), xavier MAE's and lightly's (2-4x larger; learns faster in short runs on "
                           "small data, README 'Small data'); pretrained weights replace either")
    drop_path_uniform: bool = opt(True, "the same drop rate in every block; false: rising linearly from 0 to "
                                  "drop_path_rate")
    drop_path_mode: str = opt("auto", f"how a dropped branch is skipped: {', '.join(DROP_PATH_MODES)}; subset runs "
                              "it on the kept samples only, mask on all of them times 0 or B/K (the same numbers); "
                              "auto: subset on CPU, and on CUDA above rate 0.1")
    pretrained_weights: str = opt("", "start the student (and its EMA teacher) from these weights: a zoo name "
                                      "(dinov2_vits14), a URL, an official/timm/HF file, an exported backbone or a "
                                      "training checkpoint; the student.* architecture must match them")
    pretrained_heads: bool = opt(False, "with student.pretrained_weights = one of our training checkpoints, also take "
                                        "its DINO/iBOT heads and loss centres (else the heads start fresh)")
    ffn_layer: str = opt("mlp", f"feed-forward layer: {', '.join(FFN_LAYERS)} (ViT-g uses swiglufused)")
    qkv_bias: bool = opt(True, "bias in the attention's qkv projection")
    proj_bias: bool = opt(True, "bias in the attention's output projection")
    ffn_bias: bool = opt(True, "biases in the feed-forward layer")
    num_register_tokens: int = opt(0, "register tokens (Darcet et al. 2024); the DINOv2 *_reg models use 4")
    interpolate_antialias: bool = opt(False, "antialias when resizing the position embedding to another image size "
                                      "(true in the *_reg models)")
    interpolate_offset: float = opt(0.1, "offset in the position-embedding resize factor (DINO's; 0 in the *_reg "
                                    "models)")
    attn_impl: str = opt("auto", "attention kernel: 'auto' (xFormers on CUDA when installed, else PyTorch SDPA), "
                         "'sdpa', 'xformers' or 'math'")


@dataclass
class TeacherConfig:
    """The EMA teacher: momentum and temperature schedules."""

    momentum_teacher: float = opt(0.992, "EMA momentum of the teacher at the start, rising by a cosine to "
                                  "final_momentum_teacher")
    final_momentum_teacher: float = opt(1.0, "EMA momentum at the end of training")
    warmup_teacher_temp: float = opt(0.04, "teacher temperature at the start of its warm-up")
    teacher_temp: float = opt(0.07, "teacher temperature after the warm-up; lower = sharper targets (above 0.07 "
                              "training can become unstable)")
    warmup_teacher_temp_epochs: int = opt(30, "epochs of linear warm-up from warmup_teacher_temp to teacher_temp")


@dataclass
class OptimConfig:
    """AdamW, its parameter groups and the learning-rate and weight-decay schedules."""

    epochs: int = opt(100, "training length, in epochs of train.iters_per_epoch iterations")
    weight_decay: float = opt(0.04, "weight decay at the start (cosine schedule to weight_decay_end)")
    weight_decay_end: float = opt(0.4, "weight decay at the end of training")
    base_lr: float = opt(0.004, "peak learning rate for a global batch of 1024; scaling_rule adapts it to the real "
                         "global batch")
    lr: float = opt(0.0, "peak learning rate; 0 = derived from base_lr by scaling_rule (the recipe); a value > 0 is "
                    "used as is, ignoring base_lr and scaling_rule")
    warmup_epochs: int = opt(10, "epochs of linear learning-rate warm-up from 0")
    min_lr: float = opt(1.0e-06, "learning rate at the end of the cosine decay")
    clip_grad: float = opt(3.0, "maximum gradient norm of each student part (backbone, heads); 0 = no clipping")
    freeze_last_layer_epochs: int = opt(1, "epochs with the heads' last layer frozen (steadies the start)")
    freeze_backbone_epochs: int = opt(0, "keep the student backbone fixed (lr 0) for this many epochs while fresh "
                                         "heads warm up on pretrained features; 1-2 epochs when heads start fresh")
    scaling_rule: str = opt("sqrt_wrt_1024", "how base_lr follows the global batch: 'sqrt_wrt_1024', "
                            "'linear_wrt_256' or 'none'")
    patch_embed_lr_mult: float = opt(0.2, "learning-rate multiplier of the patch embedding")
    layerwise_decay: float = opt(0.9, "layer-wise lr decay: block i of L learns at decay^(L - i) of the lr; 1 = off")
    adamw_beta1: float = opt(0.9, "AdamW beta1")
    adamw_beta2: float = opt(0.999, "AdamW beta2")


@dataclass
class CropsConfig:
    """Multi-crop augmentation: two global crops (teacher and student) and local crops (student only)."""

    global_crops_scale: list[float] = opt([0.32, 1.0], "[min, max] area of a global crop, as a fraction of the "
                                          "image")
    local_crops_number: int = opt(8, "local crops per image (student only); 0 = none")
    local_crops_scale: list[float] = opt([0.05, 0.32], "[min, max] area of a local crop, as a fraction of the image")
    global_crops_size: int = opt(224, "side of a global crop in pixels (a multiple of student.patch_size)")
    local_crops_size: int = opt(96, "side of a local crop in pixels (a multiple of student.patch_size)")
    horizontal_flip_p: float = opt(0.5, "probability of a horizontal flip of each crop; 0 for images whose left "
                                   "and right differ in meaning (digits, text)")
    color_jitter_p: float = opt(0.8, "probability of colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, "
                                "hue 0.1) per crop")
    grayscale_p: float = opt(0.2, "probability of converting a crop to greyscale")
    blur_p: list[float] = opt([1.0, 0.1, 0.5], "probability of Gaussian blur for [global crop 1, global crop 2, "
                              "local crops]; [0, 0, 0] for small clean images (digits), where blur erases the shape")
    solarize_p: float = opt(0.2, "probability of solarisation of global crop 2 (the other crops never)")
    rotation_degrees: float = opt(0.0, "rotate each crop by a random angle in [-d, d] degrees (corners filled black); "
                                       "0 = off (the recipe); for images without an upright (cells, aerial)")


@dataclass
class DistillConfig:
    """Distillation from a frozen teacher (``train.mode=distill``)."""

    teacher_weights: str = opt("", "the frozen teacher: a zoo name (dinov2_vitb14), a URL, an official/timm/HF file, "
                                   "an exported backbone or one of our training checkpoints (then its heads come too)")
    teacher_config: str = opt("", "YAML whose student.* section describes the teacher's architecture, for a plain "
                                  "state dict (zoo names and our checkpoints carry their own)")
    teacher_overrides: list[str] = opt([], "dotlist overrides of the teacher's architecture, e.g. "
                                           "['student.arch=vit_base', 'student.patch_size=14']")
    recipe: str = opt("auto", "heads: the DINOv2-paper recipe (needs a teacher checkpoint with its DINO/iBOT heads); "
                              "features: match the teacher's normalised CLS and patch tokens; auto: heads when "
                              "the teacher has them")
    cls_loss_weight: float = opt(1.0, "features recipe: weight of the CLS-token cosine loss")
    patch_loss_weight: float = opt(1.0, "features recipe: weight of the patch-token cosine loss")
    student_init: str = opt("auto", "teacher_selection: the student starts from evenly spaced channels, whole heads "
                                    "and the first blocks of the teacher's weights (weight selection, Xu et al. "
                                    "2024; needs the teacher's head width, patch size and feed-forward); random; "
                                    "auto: teacher_selection when the student fits, else random (logged)")
    ema_warmup: bool = opt(True, "cap the EMA student's momentum (teacher.momentum_teacher schedule) by "
                                 "(1 + it) / (10 + it), so that a short distillation's exported EMA model does not "
                                 "keep the random initial weights")
    resize_patch_tokens: bool = opt(True, "when teacher and student patch sizes differ, resample the teacher's patch "
                                          "tokens onto the student's grid (false: a patch-size mismatch is an error)")


@dataclass
class EvaluationConfig:
    """In-training k-NN monitor of the teacher; off while the datasets are empty."""

    eval_period_iterations: int = opt(12500, "iterations between k-NN evaluations of the teacher (one also runs "
                                      "at the end)")
    knn_train_dataset: str = opt("", "class-folder tree (or its shards) used as the k-NN memory bank; empty = "
                                  "no monitor")
    knn_val_dataset: str = opt("", "class-folder tree (or its shards) with the same classes, to score on")
    knn_nb: list[int] = opt([10, 20], "numbers of neighbours k to report")
    knn_temperature: float = opt(0.07, "k-NN vote weight exp(similarity / T)")


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
    distill: DistillConfig = field(default_factory=DistillConfig)


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
    if path.is_dir():
        raise ConfigError(f"Config file '{path}' is a directory; pass a YAML file, e.g. configs/vits14_default.yaml "
                          "(or a run's config.yaml).")
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


def validate_architecture(cfg: DictConfig) -> None:
    """The checks of :func:`validate_config` that concern the backbone's architecture (``student.*``) alone: enough
    for a config that only describes a model, e.g. a distillation teacher."""
    _check_arch(cfg)
    _check_choice(cfg, "student.ffn_layer", FFN_LAYERS)
    _check_choice(cfg, "student.attn_impl", ATTN_IMPLS)
    _check_choice(cfg, "student.drop_path_mode", DROP_PATH_MODES)
    _check_choice(cfg, "student.weight_init", WEIGHT_INITS)
    _check_range(cfg, "student.patch_size", 1)
    _check_range(cfg, "student.num_register_tokens", 0)
    _check_range(cfg, "student.layerscale", 0)
    _check_range(cfg, "student.interpolate_offset", 0)
    _check_range(cfg, "crops.global_crops_size", 1)


def _check_arch(cfg: DictConfig) -> None:
    """``student.arch``: one of ours, or a timm ViT that timm knows (checked with timm, which imports torch, only
    for a ``timm/`` name); for a timm ViT, our ViT's architecture keys that differ from the defaults are logged as
    ignored (its name decides them)."""
    arch = cfg.student.arch
    problem = arch_problem(arch)
    if problem is not None:
        close = difflib.get_close_matches(str(arch), ARCHS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"Invalid config value for 'student.arch': {problem}.{hint}")
    name = timm_model_name(arch)
    if name is None:
        return
    problem = timm_problem(name)
    if problem is not None:
        raise ConfigError(f"Invalid config value for 'student.arch': {problem}.")
    defaults = StudentConfig()
    ignored = [f"student.{k}={cfg.student[k]}" for k in OWN_VIT_KEYS if cfg.student[k] != getattr(defaults, k)]
    if ignored:
        logger.info("%s decides its own architecture; ignored (our ViT's keys): %s", arch, ", ".join(ignored))


def validate_config(cfg: DictConfig) -> None:
    """Reject impossible values with a message that names the key and the fix."""
    validate_architecture(cfg)
    _check_choice(cfg, "train.centering", CENTERINGS)
    _check_choice(cfg, "optim.scaling_rule", SCALING_RULES)
    _check_choice(cfg, "train.bad_image_policy", BAD_IMAGE_POLICIES)
    _check_choice(cfg, "train.sharding", SHARDINGS)
    _check_choice(cfg, "train.device", DEVICES)
    _check_choice(cfg, "train.precision", PRECISIONS)
    _check_choice(cfg, "train.mode", MODES)
    _check_choice(cfg, "distill.recipe", DISTILL_RECIPES)
    _check_choice(cfg, "distill.student_init", DISTILL_STUDENT_INITS)
    for key in ("student.patch_size", "train.batch_size_per_gpu", "train.iters_per_epoch", "optim.epochs",
                "train.checkpoint_period", "train.log_period",
                "crops.global_crops_size", "crops.local_crops_size", "dino.head_n_prototypes",
                "dino.head_bottleneck_dim", "dino.head_nlayers", "dino.head_hidden_dim",
                "ibot.head_n_prototypes", "ibot.head_bottleneck_dim", "ibot.head_nlayers", "ibot.head_hidden_dim"):
        _check_range(cfg, key, 1)
    for key in ("train.num_workers", "train.keep_last_checkpoints", "crops.local_crops_number",
                "student.num_register_tokens",
                "optim.warmup_epochs", "optim.freeze_last_layer_epochs", "teacher.warmup_teacher_temp_epochs",
                "optim.freeze_backbone_epochs", "student.depth", "distill.cls_loss_weight", "distill.patch_loss_weight",
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
                "ibot.mask_sample_probability", "crops.horizontal_flip_p", "crops.color_jitter_p", "crops.grayscale_p",
                "crops.solarize_p", "optim.adamw_beta1", "optim.adamw_beta2"):
        _check_range(cfg, key, 0, 1)
    _check_range(cfg, "optim.layerwise_decay", 0, 1, low_open=True)
    _check_range(cfg, "optim.patch_embed_lr_mult", 0)
    _check_range(cfg, "teacher.warmup_teacher_temp", 0, low_open=True)
    _check_range(cfg, "teacher.teacher_temp", 0, low_open=True)
    _check_range(cfg, "student.interpolate_offset", 0)
    _check_pair(cfg, "ibot.mask_ratio_min_max", 0.0, 1.0)
    _check_pair(cfg, "crops.global_crops_scale", 0.0, 1.0)
    _check_pair(cfg, "crops.local_crops_scale", 0.0, 1.0)
    _check_range(cfg, "crops.rotation_degrees", 0, 180)
    blur = list(cfg.crops.blur_p)
    _require(len(blur) == 3 and all(isinstance(p, (int, float)) and 0 <= p <= 1 for p in blur), "crops.blur_p",
             f"expected three probabilities [global crop 1, global crop 2, local crops] in [0, 1], got {blur}.")
    _require(cfg.crops.global_crops_scale[0] > 0, "crops.global_crops_scale", "the minimum scale must be > 0.")
    _require(cfg.crops.local_crops_scale[0] > 0, "crops.local_crops_scale", "the minimum scale must be > 0.")
    _require(
        cfg.optim.warmup_epochs <= cfg.optim.epochs, "optim.warmup_epochs",
        f"{cfg.optim.warmup_epochs} warm-up epochs exceed optim.epochs={cfg.optim.epochs}; lower it.",
    )
    _check_crop_sizes(cfg)
    _check_modes(cfg)


def _check_modes(cfg: DictConfig) -> None:
    _require(
        cfg.optim.freeze_backbone_epochs <= cfg.optim.epochs, "optim.freeze_backbone_epochs",
        f"{cfg.optim.freeze_backbone_epochs} epochs exceed optim.epochs={cfg.optim.epochs}; lower it.",
    )
    _require(not cfg.student.pretrained_heads or bool(cfg.student.pretrained_weights), "student.pretrained_heads",
             "it takes the heads of student.pretrained_weights, which is empty; set both or neither.")
    if cfg.train.mode == "distill":
        _require(bool(cfg.distill.teacher_weights), "distill.teacher_weights",
                 "train.mode=distill needs a teacher: a zoo name (dinov2_vitb14), a weights file or a checkpoint.")
        _require(cfg.distill.student_init != "teacher_selection" or not cfg.student.pretrained_weights,
                 "distill.student_init", "teacher_selection and student.pretrained_weights both say where the "
                 "student starts; keep one.")
    elif cfg.distill.teacher_weights:
        raise ConfigError("Invalid config value for 'distill.teacher_weights': it is set but train.mode=pretrain "
                          "ignores it; add train.mode=distill, or leave distill.teacher_weights empty.")


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

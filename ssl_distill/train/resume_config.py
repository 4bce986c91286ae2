"""Resuming a run whose config changed: what may change, what may not, and every config the run has used.

A checkpoint records the config it was trained with. On resume the new config is compared with it key by key:

* keys that shape the weights or the state (the backbone and head architecture, the global crop size that sizes the
  position embedding, the training mode) cannot change: one :class:`~ssl_distill.config.ConfigError` names the keys
  that differ (old -> new) and the choices, instead of a long ``load_state_dict`` traceback;
* any other change (learning rate, batch size, seed, dataset, schedule length, ...) is applied, with one warning
  listing old -> new, and the config used so far is kept beside the new ``config.yaml`` as
  ``config_until_<iteration>.yaml``, so the directory still says what trained each stretch of the run.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ssl_distill.config import ConfigError

logger = logging.getLogger(__name__)

# Keys whose change makes the checkpoint's weights or state unusable (prefix match on the dotted key).
FIXED_KEYS = (
    "train.mode", "crops.global_crops_size",
    "student.arch", "student.patch_size", "student.depth", "student.ffn_layer", "student.qkv_bias",
    "student.proj_bias", "student.ffn_bias", "student.num_register_tokens", "student.layerscale",
    "dino.head_n_prototypes", "dino.head_bottleneck_dim", "dino.head_hidden_dim", "dino.head_nlayers",
    "ibot.head_n_prototypes", "ibot.head_bottleneck_dim", "ibot.head_hidden_dim", "ibot.head_nlayers",
    "ibot.separate_head",
)
# Keys that record where or how a run was started, not what it trains: never reported.
IGNORED_KEYS = ("train.output_dir",)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_changes(saved_yaml: str, cfg: DictConfig) -> list[tuple[str, Any, Any]]:
    """``(key, old, new)`` for every leaf that differs between a checkpoint's config and ``cfg`` (sorted by key;
    keys only one side has count as changed, with ``None`` on the other)."""
    old = _flat(OmegaConf.to_container(OmegaConf.create(saved_yaml), resolve=True))
    new = _flat(OmegaConf.to_container(cfg, resolve=True))
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not k.startswith(IGNORED_KEYS)]


def _fmt(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)


def check_resumed_config(saved_yaml: str | None, cfg: DictConfig, checkpoint: Path, iteration: int) -> bool:
    """Refuse changed architecture keys (:data:`FIXED_KEYS`); warn about the other changes. Returns whether the
    config changed (the caller then keeps the old ``config.yaml``: :func:`keep_previous_config`). A checkpoint
    without a recorded config (older versions) is not compared."""
    if not saved_yaml:
        return False
    changes = config_changes(saved_yaml, cfg)
    fixed = [c for c in changes if c[0].startswith(FIXED_KEYS)]
    if fixed:
        raise ConfigError(
            f"{checkpoint} was trained with another architecture ({_fmt(fixed)}); it cannot continue with these "
            "settings. Put the old values back to resume it, or start a new run: --no-resume (the old run moves to "
            "previous_runs/) or another --output-dir.")
    if changes:
        logger.warning("resuming %s at iteration %d with a changed config, applied from now on: %s", checkpoint,
                       iteration, _fmt(changes))
    return bool(changes)


def keep_previous_config(output_dir: Path, iteration: int) -> Path | None:
    """Keep the run's current ``config.yaml`` as ``config_until_<iteration>.yaml`` (before a changed config
    replaces it); returns the kept copy, or None when there is no ``config.yaml``."""
    current = output_dir / "config.yaml"
    if not current.exists():
        return None
    kept = output_dir / f"config_until_{iteration:07d}.yaml"
    shutil.copy2(current, kept)
    logger.info("kept the config used until iteration %d as %s", iteration, kept)
    return kept


"""``ssl-distill config``: the merged config, every key with its description, changes from the defaults marked.

The output is valid YAML (descriptions are comments), so it can be saved and used as ``--config-file``::

    # '*' marks a value that differs from its default (shown after it)
    optim:
      epochs: 10  # * default 100 | training length, in epochs of train.iters_per_epoch iterations
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from ssl_distill.config import default_config, field_descriptions, load_config


def _yaml_value(value: Any) -> str:
    """``value`` as a one-line YAML flow scalar or list (``1.0e-05``, ``''``, ``[0.1, 0.5]``)."""
    text = yaml.safe_dump({"v": value}, default_flow_style=True, width=1 << 30).strip()
    return text[len("{v: "):-1]


def _leaves(cfg: DictConfig) -> dict[str, Any]:
    """Dotted key -> plain value of every leaf (sections are nested dicts; lists are leaves)."""
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def describe_config(cfg: DictConfig, changed_only: bool = False) -> str:
    """The YAML text of ``cfg`` with each key's description; values that differ from the defaults are marked."""
    defaults, values, helps = _leaves(default_config()), _leaves(cfg), field_descriptions()
    rows: list[tuple[str, str, str]] = []  # (section, "key: value", comment)
    for key, value in values.items():
        section, name = key.rsplit(".", 1)
        differs = key not in defaults or value != defaults[key]
        if changed_only and not differs:
            continue
        mark = f"* default {_yaml_value(defaults[key])} | " if differs and key in defaults else ""
        rows.append((section, f"{name}: {_yaml_value(value)}", mark + helps.get(key, "")))
    width = max((len(entry) for _, entry, _ in rows), default=0) + 2
    lines = ["# ssl-distill config: typed defaults <- --config-file <- key=value overrides.",
             "# '*' marks a value that differs from its default (shown after it)."]
    current = None
    for section, entry, comment in rows:
        if section != current:
            lines.append(f"{section}:")
            current = section
        lines.append(f"  {entry.ljust(width)}# {comment}".rstrip())
    if changed_only and not rows:
        lines.append("# every value is the default")
    return "\n".join(lines)


def run_config(args: argparse.Namespace) -> int:
    """Print the merged, validated config (``--changed``: only what differs from the defaults)."""
    print(describe_config(load_config(args.config_file, args.opts), changed_only=args.changed))
    return 0

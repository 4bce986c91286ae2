"""Arguments of the ``ssl-distill`` commands (argparse only: the CLI builds its parser without importing torch).

The evaluation commands' own arguments live in :mod:`ssl_distill.eval.args`, ``submit``'s in
:mod:`ssl_distill.launch.args`; the functions here add the config arguments they share.
"""

from __future__ import annotations

import argparse

from ssl_distill.eval.args import add_knn_args, add_linear_args


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config-file F`` and ``key=value`` overrides: defaults -> experiment file -> dotlist."""
    p.add_argument("--config-file", default=None, help="experiment YAML overriding the typed defaults (configs/*.yaml)")
    p.add_argument(
        "opts", nargs="*", default=[], metavar="key=value",
        help="dotlist overrides applied last, e.g. optim.epochs=10 train.batch_size_per_gpu=32",
    )


def add_train_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--output-dir", required=True, help="checkpoints, metrics, config.yaml and logs go here")
    p.add_argument("--no-resume", action="store_true", help="start over even if --output-dir has checkpoints")


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (model_XXXXXXX.pth)")
    p.add_argument("--output", required=True, help="output .pth file")
    p.add_argument("--which", choices=("teacher", "student"), default="teacher", help="which backbone")


def add_eval_knn_args(p: argparse.ArgumentParser) -> None:
    add_knn_args(p)
    add_config_args(p)


def add_eval_linear_args(p: argparse.ArgumentParser) -> None:
    add_linear_args(p)
    add_config_args(p)


def add_models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output with URLs and sha256")
    p.add_argument("--flops", nargs="+", default=None, metavar="NAME",
                   help="instead of the list: the per-module FLOP table (fvcore) of these zoo models' backbones, "
                   "one image; builds each model with random weights (nothing is downloaded)")
    p.add_argument("--image-size", type=int, default=224,
                   help="with --flops: the square input size in pixels (a multiple of the patch size)")
    p.add_argument("--depth", type=int, default=2, help="with --flops: module levels shown in the table")


def add_download_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="+", metavar="NAME", help="model names (see `ssl-distill models`)")
    p.add_argument("--dest", default=None, help="directory to download into instead of the cache")
    p.add_argument("--sha256", action="store_true", help="print each file's sha256 (for registering checkpoints)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="src", default="auto", choices=("auto", "dinov2", "ssl_distill", "timm", "hf"),
                   help="layout of IN (default: detect)")
    p.add_argument("--to", dest="dst", default="ssl_distill", choices=("ssl_distill", "dinov2", "timm", "hf"),
                   help="layout of OUT (ssl_distill = official DINOv2 layout)")
    p.add_argument("--hf-keys", default="disk", choices=("disk", "memory"),
                   help="with --to hf: 'disk' = the names save_pretrained writes and from_pretrained reads "
                   "(transformers 4 and 5 files); 'memory' = transformers 5 model.state_dict() names, for "
                   "load_state_dict(strict=True) into a live model (default: disk)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="with --to hf: attention heads written to config.json (default: width / 64, as in "
                   "every DINOv2 model)")
    p.add_argument("input", metavar="IN", help="input weights file")
    p.add_argument("output", metavar="OUT",
                   help="output weights file; with --to hf a directory (no .pth/.safetensors suffix) gets "
                   "model.safetensors + config.json, ready for Dinov2Model.from_pretrained(OUT)")


def add_visualize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pretrained-weights", required=True,
                   help="a training checkpoint (teacher backbone), an exported backbone / official DINOv2 state "
                        "dict (architecture from --config-file and key=value overrides), a model-zoo name, or "
                        "'random'")
    p.add_argument("--images", nargs="+", required=True, metavar="IMG",
                   help="image files and/or folders of images (not recursive)")
    p.add_argument("--output-dir", required=True, help="where the PNGs are written")
    p.add_argument("--image-size", type=int, default=480,
                   help="resize the shorter side to this (aspect kept), then crop to multiples of the patch size; "
                        "larger sizes give finer maps")
    p.add_argument("--threshold", type=float, default=0.6,
                   help="also show the fewest patches holding this fraction of each map's attention mass "
                        "(DINO's masks; 0 = off)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add_config_args(p)


def add_demo_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--output-dir", default="demo_output", help="where the demo writes its outputs")


def add_config_command_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--changed", action="store_true", help="print only the keys whose value differs from the default")


def add_shards_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="a class-folder tree, a folder of images or a text file listing images")
    p.add_argument("out", metavar="OUT", help="the folder to write the shards, their member tables and index.json to "
                   "(an interrupted run into the same OUT continues where it stopped)")
    p.add_argument("--shard-size", default="256MB", help="bytes per shard, e.g. 256MB, 1GB (default 256MB)")
    p.add_argument("--workers", type=int, default=4, help="processes that read and decode-check the images")
    p.add_argument("--bad-image-policy", choices=("error", "skip"), default="error",
                   help="an image that does not decode: stop (error) or leave it out and list it (skip)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

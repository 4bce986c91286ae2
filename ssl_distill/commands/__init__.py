"""The commands of ``ssl-distill``: one registry that the CLI and the Slurm job both run through.

Each :class:`Command` names, as ``"module:function"`` strings, the function that adds its arguments to a parser
(argparse only, so ``ssl-distill --help`` imports no torch) and the function that runs it; both are imported only
when needed. :func:`execute` runs a parsed command and turns a mistake the user can fix into one line and exit
status 2; :func:`run_command` parses and runs one command from its argument list, which is how a Slurm job runs
``ssl-distill <command> ...`` without importing the CLI module.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["COMMANDS", "Command", "UserError", "add_command_parser", "describe_file_error", "execute",
           "parse_command", "parse_with_overrides", "run_command"]


class UserError(Exception):
    """A mistake the user can fix; printed as one line without a traceback."""


@dataclass(frozen=True)
class Command:
    """One ``ssl-distill`` command: its help, where its arguments and its run live (``"module:function"``)."""

    name: str
    help: str
    arguments: str
    run: str
    description: str = ""


_HERE = "ssl_distill.commands"
COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("train", "pretrain a ViT (resumes automatically from the latest checkpoint in --output-dir)",
            f"{_HERE}.args:add_train_args", f"{_HERE}.train:run_train",
            description="Pretrain with the DINOv2 recipe. Launch with torchrun for several processes; "
            "`ssl-distill submit ... train` for Slurm."),
    Command("submit", "run train / eval-knn / eval-linear on Slurm (submitit; requeues on preemption)",
            "ssl_distill.launch.args:add_submit_args", f"{_HERE}.submit:run_submit"),  # its own description
    Command("export", "write a checkpoint's teacher backbone as an official-layout state dict",
            f"{_HERE}.args:add_export_args", f"{_HERE}.train:run_export"),
    Command("eval-knn", "weighted k-NN accuracy of a frozen backbone on a labelled image folder",
            f"{_HERE}.args:add_eval_knn_args", f"{_HERE}.evaluate:run_knn",
            description="L2-normalised CLS features, cosine similarity, votes weighted by exp(sim / T); "
            "writes OUTPUT_DIR/results_eval_knn.json."),
    Command("eval-linear", "linear-probe accuracy of a frozen backbone (a grid of heads, best on val)",
            f"{_HERE}.args:add_eval_linear_args", f"{_HERE}.evaluate:run_linear",
            description="Trains lr x last-1/4-blocks x avgpool linear heads from one backbone forward; writes "
            "OUTPUT_DIR/results_eval_linear.json and OUTPUT_DIR/best_linear_head.pth."),
    Command("shards", "pack an image folder into indexed tar shards (resumable; checks every image decodes)",
            f"{_HERE}.args:add_shards_args", f"{_HERE}.shards:run_shards",
            description="Writes OUT/shard-NNNNNN.tar (WebDataset layout: <key>.<ext> + <key>.cls), a member table "
            "per shard and OUT/index.json. train.dataset_path, evaluation.knn_* and the eval commands' datasets "
            "accept OUT, a brace pattern, index.json or an http(s) URL of any of them."),
    Command("models", "list the model zoo (architecture, params, published accuracy, licence); --flops: FLOP table",
            f"{_HERE}.args:add_models_args", f"{_HERE}.hub:run_models"),
    Command("download", "download zoo weights into the cache (resumable, verified)",
            f"{_HERE}.args:add_download_args", f"{_HERE}.hub:run_download",
            description="Downloads into $SSL_DISTILL_HOME/checkpoints (default ~/.cache/ssl_distill/checkpoints). "
            "Interrupted downloads resume. SSL_DISTILL_BASE_URL points the zoo at a mirror; SSL_DISTILL_OFFLINE=1 "
            "never touches the network."),
    Command("convert", "convert backbone weights between DINOv2 (ssl_distill), timm and Hugging Face layouts",
            f"{_HERE}.args:add_convert_args", f"{_HERE}.hub:run_convert",
            description="Reads .pth/.safetensors (or one of our training checkpoints: its teacher backbone) and "
            "writes the requested layout atomically; OUT ending in .safetensors writes safetensors. Hugging Face "
            "input may use either key spelling (save_pretrained files or a transformers 5 model.state_dict()); it "
            "is detected."),
    Command("visualize", "save the last block's CLS-attention maps (per head + mean) as PNGs, as in DINO",
            f"{_HERE}.args:add_visualize_args", f"{_HERE}.evaluate:run_visualize",
            description="Writes OUTPUT_DIR/<image stem>_attention.png per image: the input, one heat map per head, "
            "the head mean and (with --threshold) the patches holding that fraction of each map's attention mass."),
    Command("demo", "run the built-in demo on bundled data and print the result",
            f"{_HERE}.args:add_demo_args", "ssl_distill.demo:run_demo"),
    Command("config", "print the merged config with each key's description, marking what differs from the defaults",
            f"{_HERE}.args:add_config_command_args", f"{_HERE}.config:run_config",
            description="Merges the typed defaults, --config-file and key=value overrides exactly as `train` does "
            "and prints every key with its value and a one-line description; '*' marks a value that differs "
            "from the default."),
)}


def _load(ref: str) -> Any:
    """The object a ``"module:attribute"`` reference names (imported now)."""
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


def add_command_parser(sub: argparse._SubParsersAction, command: Command) -> argparse.ArgumentParser:
    """Add ``command``'s sub-parser (help, description, arguments) to the CLI's sub-parsers."""
    parser = sub.add_parser(command.name, help=command.help, description=command.description or None)
    _load(command.arguments)(parser)
    parser.set_defaults(command_name=command.name)
    return parser


def parse_command(name: str, argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` parsed as the arguments of command ``name`` alone (argparse errors exit with usage)."""
    command = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"ssl-distill {name}", description=command.description or None)
    _load(command.arguments)(parser)
    parser.set_defaults(command_name=name, verbose=False)
    return parse_with_overrides(parser, list(argv))


def _is_override(arg: str) -> bool:
    """Whether ``arg`` has the shape of a ``key=value`` config override (not a flag, a key before the ``=``)."""
    key, eq, _ = arg.partition("=")
    return bool(eq) and bool(key.strip()) and not arg.startswith("-") and " " not in key


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that ``key=value`` overrides split around flags (``train a=1
    --output-dir X b=2``, which argparse rejects as "unrecognized arguments") are all applied, in the order given.

    Other unrecognised arguments are argparse's usual error (status 2), with a hint when the command takes no
    overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extras = parser.parse_known_args(argv)
    if not extras:
        return args
    if hasattr(args, "opts") and all(_is_override(a) for a in extras):
        pending = [*args.opts, *extras]
        ordered = []
        for arg in argv:  # the overrides in command-line order: a later value of a key wins, as the user expects
            if arg in pending:
                pending.remove(arg)
                ordered.append(arg)
        args.opts = ordered + pending
        return args
    hint = ""
    if any(_is_override(a) for a in extras) and not hasattr(args, "opts"):
        hint = " (this command takes no key=value config overrides)"
    parser.error(f"unrecognized arguments: {' '.join(extras)}{hint}")


def execute(args: argparse.Namespace) -> int:
    """Run the parsed command ``args.command_name``; a mistake the user can fix becomes one line and status 2."""
    from ssl_distill.config import ConfigError

    name = args.command_name
    try:
        return int(_load(COMMANDS[name].run)(args) or 0)
    except (ConfigError, UserError) as exc:
        print(f"ssl-distill {name}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in _USER_FILE_ERRNOS or getattr(args, "verbose", False):
            raise  # a bug, or asked for the details (-v): the traceback
        print(f"ssl-distill {name}: error: {describe_file_error(exc, getattr(args, 'output_dir', None))}",
              file=sys.stderr)
        return 2


def run_command(name: str, argv: Sequence[str], on_trainer: Callable[[Any], None] | None = None) -> int:
    """Parse and run ``ssl-distill <name> <argv>``; returns the exit status (the Slurm job's entry).

    ``on_trainer`` is called with the Trainer before ``train`` runs (the Slurm job installs its stop-on-preemption
    hook there).
    """
    args = parse_command(name, argv)
    args.on_trainer = on_trainer
    return execute(args)


_USER_FILE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                     errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}
_WRITABLE = "check the permissions of that path or choose one you can write to (e.g. another --output-dir)"
_FILE_ADVICE = {
    errno.EACCES: _WRITABLE,
    errno.EPERM: _WRITABLE,
    errno.EROFS: "that file system is read-only; choose a writable location (e.g. another --output-dir)",
    errno.ENOSPC: "the disk is full; free space or choose another location (finished files were kept)",
    errno.EDQUOT: "the disk quota is exhausted; free space or choose another location",
    errno.ENOTDIR: "a part of that path is a file, not a directory; choose another path",
    errno.EISDIR: "that path is a directory where a file was expected; give a file path",
}


def describe_file_error(exc: OSError, output_dir: str | None = None) -> str:
    """One line for a file-system error a user can fix: what, where, and what to do.

    A :class:`ssl_distill.fileio.DiskFullError` brings its own line (the file, the space it needs and the space
    free). An error raised by a write (``f.write``, ``torch.save``) carries no file name; then the command's
    ``output_dir`` (where it writes) is named instead, so the line never ends in an empty ``:;``."""
    line = getattr(exc, "line", None)
    if isinstance(line, str):
        return line
    what = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename:
        where = f": '{exc.filename}'"
    elif output_dir:
        where = f" while writing under '{output_dir}'"
    else:
        where = ""
    return f"{what}{where}; {_FILE_ADVICE.get(exc.errno, 'check the path')}."

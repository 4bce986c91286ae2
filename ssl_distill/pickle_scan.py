"""Which Python globals a weights file would import: found by reading its pickle opcodes, never by unpickling.

``torch.load(weights_only=True)`` refuses a file whose pickle names a function or class outside its allowlist
(``os.system``, ``subprocess.Popen``, ``builtins.eval`` via ``__reduce__``, or merely ``argparse.Namespace``), but the
wording of that refusal differs between torch versions and between its code paths (an "unsupported global", a
"blocked" module, an "unsupported operand" for protocol 4+ pickles). To name the refused objects whatever torch says,
:func:`unsafe_globals` disassembles the pickle itself with :mod:`pickletools`: the ``data.pkl`` record of a zip
``torch.save`` file, or the successive pickles at the start of a legacy (non-zip) file. Nothing is executed.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickletools
import zipfile
from collections.abc import Iterable

# Globals a ``torch.save`` of tensors, containers and numbers writes (what weights_only loading accepts besides
# tensor, storage and dtype objects from ``torch``): anything else is an object the file wants imported.
_SAFE_GLOBALS = frozenset({"collections.OrderedDict", "collections.Counter", "_codecs.encode", "builtins.set",
                           "builtins.bytearray", "builtins.complex"})
# Parts of torch that load or run code: never part of a file of tensors.
_TORCH_CODE = ("torch.hub", "torch.jit", "torch.package", "torch.ops", "torch._C", "torch.load", "torch.compile",
               "torch.utils", "torch._dynamo", "torch._inductor", "torch.distributed", "torch.multiprocessing")
_LEGACY_SCAN_BYTES = 64 << 20  # a legacy file's pickles come first, its (possibly huge) tensor data after them
_MAX_PICKLES = 8
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
                         "SHORT_BINSTRING"})


def _globals_in_pickle(stream: io.BytesIO, found: set[str]) -> None:
    """Add to ``found`` the ``module.name`` of every GLOBAL / STACK_GLOBAL / INST opcode of the pickle at
    ``stream``'s position (read up to its STOP; a damaged pickle keeps what came before the damage). STACK_GLOBAL
    takes its two names from the strings pushed, or fetched from the memo, just before it."""
    memo: dict[int, object] = {}
    recent: list[object] = []  # the last values pushed, enough to resolve STACK_GLOBAL's two operands
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name in ("GLOBAL", "INST"):
            module, _, attribute = str(arg).partition(" ")
            found.add(_python3_name(module, attribute))
        elif name == "STACK_GLOBAL" and len(recent) >= 2:
            found.add(f"{recent[-2]}.{recent[-1]}")
        if name in _STRING_OPS:
            recent.append(arg)
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            recent.append(memo.get(int(arg)))
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = recent[-1] if recent else None
        elif name not in ("FRAME", "PROTO"):
            recent.append(None)  # any other push (or a pop) breaks a pair of names
        del recent[:-2]
        if name == "STOP":
            break


def _python3_name(module: str, name: str) -> str:
    """``module.name`` as Python 3 spells it (protocol 0-2 pickles may use Python 2 names: ``__builtin__.eval``)."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _pickles(path: str | os.PathLike) -> Iterable[io.BytesIO]:
    """The pickle streams of a weights file: a zip archive's ``*/data.pkl``, else the file's first bytes."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if member.endswith("data.pkl"):
                    yield io.BytesIO(archive.read(member))
        return
    with open(path, "rb") as f:
        yield io.BytesIO(f.read(_LEGACY_SCAN_BYTES))


def pickle_globals(path: str | os.PathLike) -> set[str]:
    """Every global the pickles in ``path`` name (a legacy file holds several pickles in a row: all are read)."""
    found: set[str] = set()
    try:
        for stream in _pickles(path):
            for _ in range(_MAX_PICKLES):
                if stream.tell() >= len(stream.getbuffer()):
                    break
                _globals_in_pickle(stream, found)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, UnicodeDecodeError, KeyError):
        pass  # not (or no longer) a pickle: what was read so far is what the file names
    return found


def unsafe_globals(path: str | os.PathLike) -> list[str]:
    """The globals in ``path``'s pickles that are not part of a plain file of tensors (sorted; empty for a file of
    tensors, for garbage and for safetensors). ``posix.system`` is how ``os.system`` is pickled on Linux."""
    return sorted(g for g in pickle_globals(path) if not _is_tensor_global(g))


def _is_tensor_global(name: str) -> bool:
    if name in _SAFE_GLOBALS:
        return True
    return name.startswith("torch.") and not any(name == p or name.startswith(p + ".") for p in _TORCH_CODE)

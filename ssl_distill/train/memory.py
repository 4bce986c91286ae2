"""Out of memory, said in one line: what failed, what was free, and which config keys to lower.

PyTorch reports an exhausted allocator as ``torch.OutOfMemoryError`` (CUDA: "CUDA out of memory. Tried to allocate
X GiB ...") or, on the CPU, as a ``RuntimeError`` from ``DefaultCPUAllocator`` ("can't allocate memory: you tried to
allocate N bytes"). Both come from deep inside a forward or backward pass; the user's lever is the config.
"""

from __future__ import annotations

import os
import re

import torch
from omegaconf import DictConfig

_CPU_OOM = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes")
_CUDA_OOM = re.compile(r"Tried to allocate ([\d.]+) (B|KiB|MiB|GiB|TiB)")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator failure (CUDA or CPU)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and _CPU_OOM.search(str(exc)) is not None)


def _requested_bytes(exc: BaseException) -> int | None:
    text = str(exc)
    if m := _CPU_OOM.search(text):
        return int(m.group(1))
    if m := _CUDA_OOM.search(text):
        return int(float(m.group(1)) * _UNITS[m.group(2)])
    return None


def _free_bytes(cuda: bool) -> int | None:
    try:
        if cuda:
            return int(torch.cuda.mem_get_info()[0])
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, RuntimeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**27 else f"{n / 2**20:.0f} MiB"


def out_of_memory_line(exc: BaseException, cfg: DictConfig) -> str:
    """One line for an allocator failure in a run of ``cfg``: the failed allocation, the memory free, the sizes
    that drive memory and the keys to lower."""
    cuda = isinstance(exc, torch.OutOfMemoryError)
    where = "GPU" if cuda else "CPU (host RAM)"
    asked, free = _requested_bytes(exc), _free_bytes(cuda)
    need = f"an allocation of {_gib(asked)} failed" if asked else "an allocation failed"
    have = f" with {_gib(free)} free" if free is not None else ""
    c, s = cfg.crops, cfg.student
    sizes = (f"{s.arch}/{s.patch_size}, train.batch_size_per_gpu={cfg.train.batch_size_per_gpu}, 2 x "
             f"{c.global_crops_size} px + {c.local_crops_number} x {c.local_crops_size} px crops, "
             f"{cfg.dino.head_n_prototypes} prototypes")
    fixes = "lower train.batch_size_per_gpu (first), crops.local_crops_number or the crop sizes, " \
            "dino.head_n_prototypes / ibot.head_n_prototypes, or take a smaller student.arch"
    if cuda:
        fixes += "; train.precision=bf16 halves the activations"
    return f"out of memory on the {where}: {need}{have} ({sizes}). To fit, {fixes}."

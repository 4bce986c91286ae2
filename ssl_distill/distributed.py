"""Where am I? Single process, torchrun (``env://``) or Slurm, and collectives that also work alone.

This is the only module that reads launcher environment variables. Every helper here degrades to the
single-process answer when ``torch.distributed`` is not initialised, so library code (losses, k-NN,
feature extraction) can call them unconditionally.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """The process's place in the job, as read from the launcher's environment."""

    launcher: str  # "single" | "torchrun" | "slurm"
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int


def resolve_device(want: str | None = "auto", local_rank: int | None = None, what: str = "train.device"
                   ) -> torch.device:
    """The device a process should use: ``want`` is ``auto`` (this rank's CUDA device when CUDA is available, else
    the CPU), ``cpu``, ``cuda`` or ``cuda:N``; ``what`` names the setting in the error when CUDA is asked for but
    absent. ``local_rank`` defaults to the launcher's."""
    want = want or "auto"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{what}={want} but no CUDA device is visible; use {what}=cpu (or auto).")
    if ":" in want:
        return torch.device(want)
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        rank = detect_environment().local_rank if local_rank is None else local_rank
        return torch.device("cuda", rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def is_enabled() -> bool:
    """True when ``torch.distributed`` is available and initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (alone: ``obj``)."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def _all_reduce(tensor: torch.Tensor, op: Any, group: Any = None) -> torch.Tensor:
    """In-place ``op`` over the ranks of ``group`` (default: the world); a no-op alone. Returns ``tensor``."""
    if is_enabled() and get_world_size() > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_reduce_sum(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """In-place sum over ranks (no-op alone). Returns ``tensor`` for chaining. ``group``: a process group (default:
    the world)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM, group)


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """In-place minimum over ranks (no-op alone). Returns ``tensor``."""
    return _all_reduce(tensor, dist.ReduceOp.MIN)


def new_host_group() -> Any:
    """A process group for small CPU tensors (gloo), so ranks can agree on host-side flags without a device
    synchronisation; None (the default group) when the world's backend is gloo already or when alone. A collective:
    every rank calls it at the same point."""
    if get_world_size() == 1 or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (no-op alone)."""
    world = get_world_size()
    if world > 1:
        all_reduce_sum(tensor)
        tensor.div_(world)
    return tensor


def all_gather_cat(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along ``dim`` in rank order.

    Sizes along ``dim`` may differ between ranks; other dimensions must match. Alone: returns ``tensor``.
    """
    world = get_world_size()
    if world == 1:
        return tensor
    tensor = tensor.contiguous()
    local_n = torch.tensor([tensor.shape[dim]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(local_n) for _ in range(world)]
    dist.all_gather(sizes, local_n)
    sizes_int = [int(s.item()) for s in sizes]
    max_n = max(sizes_int)
    if tensor.shape[dim] < max_n:
        pad_shape = list(tensor.shape)
        pad_shape[dim] = max_n - tensor.shape[dim]
        tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
    buffers = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(buffers, tensor)
    parts = [buf.narrow(dim, 0, n) for buf, n in zip(buffers, sizes_int)]
    return torch.cat(parts, dim=dim)


def all_gather_with_grad(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Concatenate equal-sized ``tensor`` from every rank along dim 0, keeping the autograd graph.

    Backward sums each rank's gradient for every slice back to its owner (``torch.distributed.nn``), so a loss
    computed on the gathered tensor by every rank gets, after DDP's gradient averaging, the gradient of the same
    loss computed in one process over the whole batch. ``group``: a process group (default: the world).
    Alone: returns ``tensor``.
    """
    if get_world_size() == 1:
        return tensor
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private module; the public one is still exact
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(tensor, group=group or dist.group.WORLD), dim=0)


def _first_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``node[003-005,7],gpu1`` -> ``node003``."""
    m = re.match(r"^([^\[,]+)(\[([^\]]+)\])?", nodelist.strip())
    if m is None:
        raise ValueError(f"Cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


def detect_environment(environ: dict[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables: torchrun (``RANK``/``WORLD_SIZE``...) wins, then Slurm, else single."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            launcher="torchrun",
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 0:
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        return DistEnv(
            launcher="slurm",
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(env["SLURM_NTASKS"]),
            local_world_size=int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]),
            master_addr=_first_host(nodelist),
            # A port derived from the job id, so concurrent jobs on one node do not collide.
            master_port=int(env.get("MASTER_PORT", 20000 + job_id % 20000)),
        )
    return DistEnv("single", 0, 0, 1, 1, "127.0.0.1", 29500)


def init_distributed(backend: str | None = None, timeout_minutes: int = 30) -> DistEnv:
    """Initialise ``torch.distributed`` from the launcher's environment; a no-op for a single process.

    ``backend`` defaults to NCCL when CUDA is available and gloo otherwise.
    """
    env = detect_environment()
    if env.world_size == 1 or is_enabled():
        return env
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    logger.info("distributed: %s rank %d/%d via %s", env.launcher, env.rank, env.world_size, backend)
    return env

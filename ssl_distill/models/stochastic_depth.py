"""Stochastic depth (Huang et al., 2016) whose draws are a function of the sample, not of an RNG state.

Each sample of a training batch carries a 63-bit *key* (:func:`sample_keys`: a hash of the run's seed, the
sample's global position in the data stream and its crop index). Whether that sample keeps the residual branch of
block ``i`` is decided by a hash of ``(key, stream)`` with ``stream = 2 * i + branch`` (:func:`uniform_from_keys`),
so the draws are the same on any number of ranks, in any DataLoader worker layout, after a resume from a checkpoint
and when activation checkpointing recomputes a block — without saving any RNG state. Without keys (a model used
outside the trainer) the draws come from torch's global generator, as in timm.

:class:`DropPath` decides which samples keep their branch (:meth:`DropPath.subset`); :class:`KeptSamples` gathers
those samples' tokens so the branch runs on them only and adds its output back. Calling the module
(:meth:`DropPath.forward`) multiplies a computed branch by the keep mask instead (the timm-style call; the
same draws).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ssl_distill.models.packing import Layout

_M32 = 0xFFFFFFFF


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in ``[0, 2**32)`` (the products wrap
    modulo ``2**64``; only their low 32 bits are kept, so the result is exact)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _mix(key: Tensor, salt: int) -> Tensor:
    """A 32-bit hash of the 63-bit ``key`` (int64 ``(S,)``) and a small integer ``salt``."""
    lo, hi = key & _M32, (key >> 32) & _M32
    h = _fmix32(lo ^ _fmix32(torch.full_like(key, salt & _M32)))
    return _fmix32(h ^ hi)


def sample_keys(seed: int, positions: Tensor, crops: Sequence[int]) -> Tensor:
    """Keys of the crops of a batch, crop-major as the collated crops: row ``c * B + b`` is crop ``crops[c]`` of the
    sample at global stream position ``positions[b]``. ``positions`` long ``(B,)`` -> int64 ``(len(crops) * B,)``."""
    positions = positions.to("cpu", torch.int64)
    seed_h = _mix(torch.tensor([int(seed) & (2**63 - 1)]), 0x5D)
    rows = []
    for c in crops:
        h = _mix(positions, int(c)) ^ seed_h  # 32 bits from (position, crop, seed) ...
        rows.append((h << 31) ^ (positions & 0x7FFFFFFF))  # ... plus the position's low bits: distinct keys
    return torch.cat(rows) if rows else torch.empty(0, dtype=torch.int64)


def uniform_from_keys(keys: Tensor, stream: int) -> Tensor:
    """One uniform draw in ``[0, 1)`` per key for ``stream``: float64 ``(S,)``."""
    return _mix(keys.to("cpu", torch.int64), stream).double() / 2.0**32


class DropPath(nn.Module):
    """Per-sample stochastic depth (timm's interface), with keyed draws (see the module docstring).

    ``stream`` distinguishes the draws of different branches of one model (:class:`~ssl_distill.models.layers.Block`
    uses ``2 * block_index + branch``). :class:`~ssl_distill.models.layers.Block` asks :meth:`subset` which samples
    keep their branch and runs the branch on those only (the DINOv2 reference does the same for rates above 0.1,
    with a fixed-size random subset instead of independent per-sample draws; equal in expectation).
    """

    def __init__(self, drop_prob: float = 0.0, stream: int = 0) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.stream = stream

    @property
    def active(self) -> bool:
        """Whether a call drops anything (training mode and a positive rate)."""
        return self.training and self.drop_prob > 0.0

    def keep_mask(self, n_samples: int, keys: Tensor | None = None) -> Tensor:
        """Bool ``(n_samples,)`` on the CPU: True where the sample keeps its branch (probability ``1 - p``)."""
        if keys is not None:
            if keys.shape != (n_samples,):
                raise ValueError(f"drop-path keys have shape {tuple(keys.shape)}, expected ({n_samples},): one key "
                                 "per sample, in the order of the (packed) batch")
            u = uniform_from_keys(keys, self.stream)
        else:
            u = torch.rand(n_samples, dtype=torch.float64)
        return u < 1.0 - self.drop_prob

    def forward(self, x: Tensor, layout: Layout | None = None, keys: Tensor | None = None) -> Tensor:
        """``x * mask / (1 - p)`` per sample: ``x`` ``(B, ...)``, or packed tokens ``(T, D)`` with ``layout``."""
        if not self.active:
            return x
        keep = 1.0 - self.drop_prob
        counts = [n for b, n in layout for _ in range(b)] if layout is not None else [1] * x.shape[0]
        scale = self.keep_mask(len(counts), keys).to(x.dtype) / keep if keep > 0.0 else torch.zeros(len(counts))
        scale = scale.to(x.device, x.dtype)
        if layout is not None:
            scale = scale.repeat_interleave(torch.tensor(counts, device=x.device), output_size=x.shape[0])
        return x * scale.view(-1, *([1] * (x.ndim - 1)))

    def subset(self, x: Tensor, layout: Layout | None = None, keys: Tensor | None = None) -> KeptSamples:
        """Draw which samples of ``x`` keep their branch (see :class:`KeptSamples`).

        ``x`` is ``(B, N, D)`` or packed ``(T, D)`` with ``layout``; ``keys`` int64 ``(samples,)`` or None. Kept
        branches are added back with weight ``alpha = 1 / (1 - p)``. When every sample is dropped, one sample still
        runs with ``alpha = 0``: the output is unchanged but every parameter gets a (zero) gradient, as DDP
        expects. The draw happens on the CPU, so the number of kept samples is known without a device sync.
        """
        keep = 1.0 - self.drop_prob
        n_samples = sum(b for b, _ in layout) if layout is not None else int(x.shape[0])
        rows_per_sample = [n for b, n in layout for _ in range(b)] if layout is not None else None
        kept = self.keep_mask(n_samples, keys).tolist()
        alpha = 1.0 / keep if keep > 0.0 else 0.0
        if not any(kept):
            kept[0], alpha = True, 0.0
        sub_layout = None
        if layout is not None:  # per batch of the layout: how many of its samples are kept (empty batches go)
            sub_layout, start = [], 0
            for b, n in layout:
                if k := sum(kept[start:start + b]):
                    sub_layout.append((k, n))
                start += b
        return KeptSamples(kept, rows_per_sample, sub_layout, alpha, x.device)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}, stream={self.stream}"


def is_dropping(drop: nn.Module) -> bool:
    """Whether ``drop`` (a block's ``drop_path1/2``: DropPath or Identity) drops anything in this call."""
    return isinstance(drop, DropPath) and drop.active


def row_samples(layout: Layout, rows: Tensor) -> Tensor:
    """Sample index (samples numbered in layout order) of each packed token row in ``rows``."""
    tokens_per_sample = torch.tensor([n for b, n in layout for _ in range(b)], device=rows.device)
    token_sample = torch.arange(len(tokens_per_sample), device=rows.device).repeat_interleave(
        tokens_per_sample, output_size=sum(b * n for b, n in layout))
    return token_sample[rows]


class KeptSamples:
    """The samples whose residual branch runs in one stochastic-depth draw (:meth:`DropPath.subset`).

    :meth:`gather` takes their rows out of ``x`` (one ``split`` + one ``cat``: the backward is one ``cat``
    too, far cheaper on CPU than ``index_select``'s scatter-add backward); :meth:`add` adds the branch output
    back with ``index_add``. ``layout`` is the packed layout of the gathered rows (None for ``(B, N, D)``).
    """

    def __init__(self, kept: list[bool], rows_per_sample: list[int] | None, layout: list[tuple[int, int]] | None,
                 alpha: float, device: torch.device) -> None:
        self.layout = layout
        self.alpha = alpha
        rows = rows_per_sample or [1] * len(kept)
        # Runs of consecutive samples with the same flag: fewer, larger pieces to split and concatenate.
        self.run_rows: list[int] = []
        self.run_kept: list[bool] = []
        for flag, n in zip(kept, rows):
            if self.run_kept and self.run_kept[-1] == flag:
                self.run_rows[-1] += n
            else:
                self.run_rows.append(n)
                self.run_kept.append(flag)
        pieces, start = [], 0
        for n, flag in zip(self.run_rows, self.run_kept):
            if flag:
                pieces.append(torch.arange(start, start + n))
            start += n
        index = torch.cat(pieces)
        if device.type == "cuda":
            index = index.pin_memory()
        self.index = index.to(device, non_blocking=True)

    def gather(self, x: Tensor) -> Tensor:
        """The kept samples' rows of ``x`` (dim 0), in order."""
        if len(self.run_rows) == 1:
            return x
        parts = x.split(self.run_rows)
        return torch.cat([p for p, k in zip(parts, self.run_kept) if k])

    def add(self, x: Tensor, h: Tensor) -> Tensor:
        """``x`` with ``alpha * h`` added to the kept samples' rows."""
        return x.index_add(0, self.index, h.to(x.dtype), alpha=self.alpha)

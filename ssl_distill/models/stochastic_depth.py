"""Stochastic depth (Huang et al., 2016) with static shapes and draws that are a function of the samples.

Each sample of a training batch carries a 63-bit *key* (:func:`sample_keys`: a hash of the run's seed, the
sample's global position in the data stream and its crop index). Block ``i``'s branch ``b`` draws one uniform per
sample from a hash of ``(key, stream)`` with ``stream = 2 * i + b`` (:func:`uniform_from_keys`), and in every batch
of the (packed) layout the ``K = max(1, floor(B * (1 - p)))`` samples with the smallest draws keep the branch,
which is added back with weight ``B / K`` (the DINOv2 reference's fixed-size random subset and its scale; unbiased).
So:

* **shapes are static**: a batch of ``B`` samples always runs each branch on ``K`` of them, so a GPU sees the same
  kernel shapes every step (a fresh binomial count per block and step made cuDNN plan new attention shapes and
  cost 4x on a ViT-S/14 step);
* **the draws need no saved RNG state**: they are a function of the batch's keys, so a resume from a checkpoint,
  any DataLoader worker layout and activation checkpointing's recomputation replay them exactly. They depend on
  which samples share a rank's batch: on another world size the same sample may keep a branch it dropped before
  (README "Reproducibility");
* **everything is decided once per forward pass** (:class:`DropPlan`), on the CPU, and reaches the device in one
  pinned, non-blocking copy: no host-device synchronisation and no per-block host work on the GPU.

Without keys (a model used outside the trainer) the uniforms come from torch's global generator, as in timm.

Two ways to run a branch, the same numbers up to float rounding (``student.drop_path_mode``):
``"subset"`` gathers the kept samples, runs the branch on them only and adds it back with ``index_add`` (a fraction
``p`` of the branch's work saved, forward and backward); ``"mask"`` runs the branch on every sample and adds it
times a per-sample scale that is 0 for the dropped ones (no gather or scatter). ``"auto"``
(:func:`resolve_drop_path_mode`) picks per device and rate.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import cached_property

import torch
from torch import Tensor, nn

from ssl_distill.models.names import DROP_PATH_MODES  # the one list of allowed values
from ssl_distill.models.packing import Layout

_M32 = 0xFFFFFFFF
# Below this rate a GPU runs the whole branch and multiplies (the gather/scatter costs more than the p of work it
# saves); the DINOv2 reference switches at the same rate. benchmarks/drop_path.py measures both modes per device.
CUDA_SUBSET_MIN_RATE = 0.1


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in ``[0, 2**32)`` (the products wrap
    modulo ``2**64``; only their low 32 bits are kept, so the result is exact)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _mix(key: Tensor, salt: int | Tensor) -> Tensor:
    """A 32-bit hash of the 63-bit ``key`` (int64 ``(S,)``) and a small integer ``salt``: ``(S,)``; or of every
    salt of an int64 ``(n, 1)`` tensor: ``(n, S)``."""
    lo, hi = key & _M32, (key >> 32) & _M32
    salt = torch.full_like(key, salt & _M32) if isinstance(salt, int) else salt & _M32
    h = _fmix32(lo ^ _fmix32(salt))
    return _fmix32(h ^ hi)


def sample_keys(seed: int, positions: Tensor, crops: Sequence[int]) -> Tensor:
    """Keys of the crops of a batch, crop-major as the collated crops: row ``c * B + b`` is crop ``crops[c]`` of the
    sample at global stream position ``positions[b]``. ``positions`` long ``(B,)`` -> int64 ``(len(crops) * B,)``."""
    positions = positions.to("cpu", torch.int64)
    crops = [int(c) for c in crops]
    if not crops:
        return torch.empty(0, dtype=torch.int64)
    seed_h = _mix(torch.tensor([int(seed) & (2**63 - 1)]), 0x5D)
    h = _mix(positions, torch.tensor(crops, dtype=torch.int64).view(-1, 1)) ^ seed_h  # 32 bits from (pos, crop, seed)
    return ((h << 31) ^ (positions & 0x7FFFFFFF)).flatten()  # ... plus the position's low bits: distinct keys


def uniform_from_keys(keys: Tensor, stream: int | Sequence[int]) -> Tensor:
    """One uniform draw in ``[0, 1)`` per key for ``stream``: float64 ``(S,)``; for a list of streams, one row per
    stream, ``(n, S)``, computed at once (the same values)."""
    salt = stream if isinstance(stream, int) else torch.tensor(list(stream), dtype=torch.int64).view(-1, 1)
    return _mix(keys.to("cpu", torch.int64), salt).double() / 2.0**32


def kept_count(n_samples: int, drop_prob: float) -> int:
    """How many of ``n_samples`` keep a branch dropped with probability ``drop_prob``: ``floor(n * (1 - p))``, at
    least 1 (the reference's ``max(int(b * (1 - p)), 1)``; the ``1e-9`` absorbs float error such as
    ``10 * (1 - 0.3) = 6.9999...``)."""
    return max(int(n_samples * (1.0 - drop_prob) + 1e-9), 1)


def resolve_drop_path_mode(mode: str, drop_prob: float, device: torch.device | str) -> str:
    """``"subset"`` or ``"mask"`` for ``mode`` (one of :data:`DROP_PATH_MODES`). ``"auto"``: ``"subset"`` on the
    CPU (skipping work pays on every rate there); on CUDA ``"subset"`` above :data:`CUDA_SUBSET_MIN_RATE` and
    ``"mask"`` at or below it."""
    if mode not in DROP_PATH_MODES:
        raise ValueError(f"unknown drop_path_mode {mode!r}; choose one of {', '.join(DROP_PATH_MODES)}")
    if mode != "auto":
        return mode
    if torch.device(device).type == "cpu":
        return "subset"
    return "subset" if drop_prob > CUDA_SUBSET_MIN_RATE else "mask"


class DropPlan:
    """The stochastic-depth draws of one forward pass: for every dropping branch (``stream``) and every batch of the
    ``layout`` ``[(B_i, N_i)]``, which :func:`kept_count` samples keep the branch and their scale ``B_i / K_i``.

    Args:
        rates: ``{stream: drop probability}`` of the branches that drop (rate > 0).
        layout: the batches of the (packed) token matrix, ``[(B_i, N_i)]``: ``N_i`` rows per sample. For unpacked
            ``(B, N, D)`` input use ``[(B, 1)]`` (one row = one sample along dim 0).
        keys: int64 ``(sum B_i,)`` sample keys in layout order (:func:`sample_keys`), or None for torch's generator.
        device: where the branches run; the index and scale tables are copied there once, in one pinned
            non-blocking copy (:attr:`tables`).
        mode: ``"auto"``, ``"subset"`` or ``"mask"`` (:func:`resolve_drop_path_mode`, per stream).

    Streams with the same kept counts (the same rate) share one table, so a uniform rate gives one
    ``(streams, sum K_i)`` index table. A rate of 1 keeps no sample: one still runs with scale 0, so every parameter
    gets a (zero) gradient, as DDP expects.
    """

    def __init__(self, rates: dict[int, float], layout: Layout, keys: Tensor | None,
                 device: torch.device | str, mode: str = "auto") -> None:
        self.layout = [(int(b), int(n)) for b, n in layout]
        self.device = torch.device(device)
        self.n_samples = sum(b for b, _ in self.layout)
        if keys is not None and keys.shape != (self.n_samples,):
            raise ValueError(f"drop-path keys have shape {tuple(keys.shape)}, expected ({self.n_samples},): one key "
                             "per sample, in the order of the (packed) batch")
        self.rates = dict(rates)
        self.modes = {s: resolve_drop_path_mode(mode, p, self.device) for s, p in rates.items()}
        self.scale_row = {s: i for i, s in enumerate(sorted(rates))}  # stream -> row of the scale table
        counts = {s: tuple(kept_count(b, p) for b, _ in self.layout) for s, p in rates.items()}
        self.signatures = sorted(set(counts.values()))  # one kept table per distinct (K_1, K_2, ...)
        self.where = {s: (self.signatures.index(c), sorted(t for t in rates if counts[t] == c).index(s))
                      for s, c in counts.items()}  # stream -> (table, row)
        # The layout of a subset branch's gathered rows: K_i samples of every batch (static, whatever the draw).
        self.sub_layouts = {s: [(k, n) for k, (_, n) in zip(c, self.layout)] for s, c in counts.items()}
        # One scale for every batch (B_i / K_i all equal): the kept rows are added with a scalar, no per-row scale.
        alphas = {s: {b / k if rates[s] < 1.0 else 0.0 for (b, _), k in zip(self.layout, c)} for s, c in counts.items()}
        self.scalar_alpha = {s: a.pop() if len(a) == 1 else None for s, a in alphas.items()}
        self.kept_tables, self.scale = self._draw(keys)

    def _draw(self, keys: Tensor | None) -> tuple[list[Tensor], Tensor]:
        """Host tables: per signature, the kept sample numbers int64 ``(streams, sum K_i)`` (ascending within each
        batch), and the per-sample scale float32 ``(streams, S)`` (``B_i / K_i`` where kept, 0 where dropped).
        A few tensor operations per signature and batch, whatever the number of blocks."""
        streams = sorted(self.rates)
        if keys is not None:
            u = uniform_from_keys(keys, streams)  # (streams, S)
        else:
            u = torch.rand(len(streams), self.n_samples, dtype=torch.float64)
        tables, scale = [], torch.zeros(len(streams), self.n_samples)
        for t, sig in enumerate(self.signatures):
            members = [s for s in streams if self.where[s][0] == t]  # in table-row order
            rows = torch.tensor([self.scale_row[s] for s in members])
            alive = torch.tensor([1.0 if self.rates[s] < 1.0 else 0.0 for s in members]).unsqueeze(1)
            table, col, start = torch.empty(len(members), sum(sig), dtype=torch.int64), 0, 0
            for (b, _), k in zip(self.layout, sig):
                # the k smallest draws of the batch (ties: batch order), ascending so gathered rows keep batch order
                order = u[rows, start:start + b].sort(dim=1, stable=True).indices
                chosen = order[:, :k].sort(dim=1).values + start
                table[:, col:col + k] = chosen
                scale[rows.unsqueeze(1), chosen] = (alive * (b / k)).expand(-1, k)
                col, start = col + k, start + b
            tables.append(table)
        return tables, scale

    def for_layout(self, layout: Layout) -> DropPlan:
        """The same draws for another row layout of the same batches (``[(B, N)]`` packed rows instead of
        ``[(B, 1)]`` samples, for a last block that computes selected rows only): shares the device tables."""
        layout = [(int(b), int(n)) for b, n in layout]
        if layout == self.layout:
            return self
        if [b for b, _ in layout] != [b for b, _ in self.layout]:
            raise ValueError(f"the stochastic-depth plan was drawn for batches {[b for b, _ in self.layout]}, not "
                             f"{[b for b, _ in layout]}")
        views = self.__dict__.setdefault("_views", {})
        key = tuple(layout)
        if key not in views:
            self.tables  # noqa: B018 - copy to the device once, before the view shares it
            view = copy.copy(self)
            for name in ("_row_sample", "_subset_rows", "_views"):
                view.__dict__.pop(name, None)
            view.layout = layout
            view.sub_layouts = {s: [(k, n) for (k, _), (_, n) in zip(sub, layout)]
                                for s, sub in self.sub_layouts.items()}
            views[key] = view
        return views[key]

    def mode(self, stream: int) -> str:
        """``"subset"`` or ``"mask"``: how ``stream``'s branch runs."""
        return self.modes[stream]

    def kept_samples(self, stream: int) -> list[int]:
        """The sample numbers (layout order) that keep ``stream``'s branch, ascending within each batch."""
        t, row = self.where[stream]
        return self.kept_tables[t][row].tolist()

    @cached_property
    def tables(self) -> tuple[list[Tensor], Tensor]:
        """``(kept tables, scale)`` on :attr:`device`: one pinned, non-blocking host-to-device copy for all blocks."""
        if self.device.type == "cpu":
            return self.kept_tables, self.scale
        host = [t.double().flatten() for t in self.kept_tables] + [self.scale.double().flatten()]
        buf = torch.cat(host)  # integers < 2**53 are exact in float64: one buffer, one copy
        if self.device.type == "cuda":
            buf = buf.pin_memory()  # a non-blocking copy from pinned memory never waits for the device
        parts = buf.to(self.device, non_blocking=True).split([h.numel() for h in host])
        kept = [p.view(t.shape).long() for p, t in zip(parts, self.kept_tables)]
        return kept, parts[-1].view(self.scale.shape).float()

    @cached_property
    def _row_sample(self) -> Tensor:
        """Sample number of every row of the (packed) input, ``(T,)`` on the device (built there: no copy)."""
        parts, start = [], 0
        for b, n in self.layout:
            parts.append(torch.arange(start, start + b, device=self.device).repeat_interleave(n))
            start += b
        return torch.cat(parts)

    @cached_property
    def _subset_rows(self) -> list[tuple[Tensor, Tensor]]:
        """Per kept table: the input rows of the kept samples ``(streams, sum K_i * N_i)``, and the sample of each
        row (same shape), built on the device from the kept table (a few kernels per forward pass)."""
        out = []
        for kept, sig in zip(self.tables[0], self.signatures):
            rows, samples, col, row_start, sample_start = [], [], 0, 0, 0
            for (b, n), k in zip(self.layout, sig):
                kg = kept[:, col:col + k]
                within = torch.arange(n, device=self.device)
                rows.append((row_start + (kg - sample_start).unsqueeze(-1) * n + within).flatten(1))
                samples.append(kg.unsqueeze(-1).expand(-1, -1, n).flatten(1))
                col, row_start, sample_start = col + k, row_start + b * n, sample_start + b
            out.append((torch.cat(rows, 1), torch.cat(samples, 1)))
        return out

    def _scale(self, stream: int) -> Tensor:
        return self.tables[1][self.scale_row[stream]]

    def add_masked(self, stream: int, x: Tensor, h: Tensor) -> Tensor:
        """``x + scale * h`` per sample: ``h`` is ``stream``'s branch output on every row of ``x``."""
        scale = self._scale(stream)
        if self.layout != [(x.shape[0], 1)]:
            scale = scale[self._row_sample]
        return torch.addcmul(x, h.to(x.dtype), scale.to(x.dtype).view(-1, *([1] * (x.ndim - 1))))

    def gather(self, stream: int, x: Tensor) -> Tensor:
        """The kept samples' rows of ``x`` (dim 0), in layout order: ``(sum K_i * N_i, ...)``."""
        if self.device.type == "cpu":  # one split + one cat: its backward is a cat too (no scatter-add on the CPU)
            runs, kept = self._cpu_runs(stream)
            parts = x.split(runs)
            return torch.cat([p for p, k in zip(parts, kept) if k])
        t, row = self.where[stream]
        return x.index_select(0, self._subset_rows[t][0][row])

    def add(self, stream: int, x: Tensor, h: Tensor) -> Tensor:
        """``x`` with ``scale * h`` added to the kept samples' rows (``h``: the branch output of :meth:`gather`)."""
        t, row = self.where[stream]
        rows, samples = self._subset_rows[t]
        alpha = self.scalar_alpha[stream]
        if alpha is not None:
            return x.index_add(0, rows[row], h.to(x.dtype), alpha=alpha)
        scale = self._scale(stream)[samples[row]].to(x.dtype)
        return x.index_add(0, rows[row], h.to(x.dtype) * scale.view(-1, *([1] * (x.ndim - 1))))

    def row_scale(self, stream: int, rows: Tensor) -> Tensor:
        """The scale of each of the (packed) input's ``rows``: ``(len(rows),)`` on the device."""
        return self._scale(stream)[self._row_sample[rows]]

    def _cpu_runs(self, stream: int) -> tuple[list[int], list[bool]]:
        """Runs of consecutive rows whose samples all keep or all drop ``stream``'s branch (fewer, larger pieces)."""
        keep = [False] * self.n_samples
        for i in self.kept_samples(stream):
            keep[i] = True
        runs: list[int] = []
        flags: list[bool] = []
        for flag, n in zip(keep, (n for b, n in self.layout for _ in range(b))):
            if flags and flags[-1] == flag:
                runs[-1] += n
            else:
                runs.append(n)
                flags.append(flag)
        return runs, flags


class DropPath(nn.Module):
    """Per-sample stochastic depth (timm's interface; the draws of :class:`DropPlan`).

    ``stream`` distinguishes the draws of different branches of one model (:class:`~ssl_distill.models.layers.Block`
    uses ``2 * block_index + branch``). Our blocks do not call this module: they run their branches through the
    forward pass's :class:`DropPlan`. Calling it (:meth:`forward`, the timm-style call that timm's blocks make in
    :class:`~ssl_distill.models.timm_vit.TimmViT`) multiplies a computed branch by each sample's scale: from
    ``step_plan`` when the caller set one for this call (the forward pass's draws), else from its own draws.
    """

    def __init__(self, drop_prob: float = 0.0, stream: int = 0) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.stream = stream
        self.step_plan: DropPlan | None = None  # set around one block call by a model that drew the plan

    @property
    def active(self) -> bool:
        """Whether a call drops anything (training mode and a positive rate)."""
        return self.training and self.drop_prob > 0.0

    def plan(self, layout: Layout, keys: Tensor | None, device: torch.device | str, mode: str = "auto") -> DropPlan:
        """This branch's draws alone (a block or module used outside a ViT's forward pass)."""
        return DropPlan({self.stream: self.drop_prob}, layout, keys, device, mode)

    def keep_mask(self, n_samples: int, keys: Tensor | None = None) -> Tensor:
        """Bool ``(n_samples,)`` on the CPU: True for the :func:`kept_count` samples that keep the branch."""
        mask = torch.zeros(n_samples, dtype=torch.bool)
        mask[self.plan([(n_samples, 1)], keys, "cpu").kept_samples(self.stream)] = True
        return mask

    def forward(self, x: Tensor, layout: Layout | None = None, keys: Tensor | None = None) -> Tensor:
        """``x * scale`` per sample (``B / K`` where kept, 0 where dropped): ``x`` ``(B, ...)``, or packed tokens
        ``(T, D)`` with ``layout``."""
        if not self.active:
            return x
        plan = self.step_plan
        if plan is None or keys is not None:
            plan = self.plan(layout if layout is not None else [(x.shape[0], 1)], keys, x.device, "mask")
        elif layout is not None:
            plan = plan.for_layout(layout)
        return plan.add_masked(self.stream, torch.zeros_like(x), x)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}, stream={self.stream}"


def is_dropping(drop: nn.Module) -> bool:
    """Whether ``drop`` (a block's ``drop_path1/2``: DropPath or Identity) drops anything in this call."""
    return isinstance(drop, DropPath) and drop.active

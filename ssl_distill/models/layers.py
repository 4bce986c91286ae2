"""ViT building blocks with the DINOv2 parameter layout.

PatchEmbed and the pre-norm Block follow ViT (Dosovitskiy et al., 2021); LayerScale follows CaiT (Touvron et al.,
2021); stochastic depth follows Huang et al. (2016); the SwiGLU feed-forward follows Shazeer (2020) as used by
DINOv2 (Oquab et al., 2023).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_distill.models.attention import Attention, scaled_linear

FFN_LAYERS = ("mlp", "swiglu", "swiglufused")


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """Per-sample stochastic depth: zero whole samples with prob ``drop_prob``, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if keep > 0.0:
        mask.div_(keep)
    return x * mask


def drop_path_packed(x: Tensor, layout: Sequence[tuple[int, int]], drop_prob: float = 0.0,
                     training: bool = False) -> Tensor:
    """:func:`drop_path` for packed tokens ``(T, D)`` laid out as ``[(B_i, N_i)]``: each of the ``sum B_i``
    samples keeps or drops all of its ``N_i`` tokens together."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((sum(b for b, _ in layout), 1)).bernoulli_(keep)
    if keep > 0.0:
        mask.div_(keep)
    tokens_per_sample = torch.tensor([n for b, n in layout for _ in range(b)], device=x.device)
    return x * mask.repeat_interleave(tokens_per_sample, dim=0, output_size=x.shape[0])


def pack_tokens(xs: Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
    """Token batches ``[(B_i, N_i, D)]`` -> packed ``(sum B_i * N_i, D)`` and the layout ``[(B_i, N_i)]``."""
    layout = [(int(x.shape[0]), int(x.shape[1])) for x in xs]
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]), layout


def unpack_tokens(x: Tensor, layout: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Inverse of :func:`pack_tokens` (views, no copy)."""
    return [t.view(b, n, -1) for t, (b, n) in zip(x.split([b * n for b, n in layout]), layout)]


def selected_token_rows(xs: Sequence[Tensor], select_patches: Sequence[Tensor | None],
                        num_register_tokens: int = 0) -> tuple[Tensor, list[int]]:
    """Rows of the packed tokens of ``xs`` (``[(B_i, N_i, D)]``, each ``[CLS, registers, patches]``) to compute
    in a last block: per batch, all of them (entry None) or the CLS tokens followed by the selected patches (indices
    into the batch's flattened ``(B_i * patches)`` grid). Also returns the number of rows per batch."""
    rows, counts, start = [], [], 0
    r = num_register_tokens
    for x, sel in zip(xs, select_patches):
        b, n = x.shape[:2]
        if sel is None:
            rows.append(torch.arange(start, start + b * n, device=x.device))
        else:
            if sel.dtype not in (torch.int64, torch.int32) or sel.ndim != 1:
                raise TypeError(f"select_patches entries must be 1-D integer index tensors, got {sel.dtype} "
                                f"{tuple(sel.shape)}")
            n_patch = n - 1 - r
            sel = sel.to(x.device, torch.int64)
            rows.append(start + torch.arange(b, device=x.device) * n)
            rows.append(start + sel.div(n_patch, rounding_mode="floor") * n + 1 + r + sel.remainder(n_patch))
        counts.append(b * n if sel is None else b + int(sel.shape[0]))
        start += b * n
    return torch.cat(rows), counts


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016), timm style: each sample's residual branch is dropped independently.

    Called as a module it multiplies a computed branch by the keep mask (:func:`drop_path`). :class:`Block` does
    better: it asks :meth:`subset` which samples keep their branch and computes the branch for those only (the
    DINOv2 reference does the same for rates above 0.1, with a fixed-size random subset instead of independent
    per-sample draws; both are equal in expectation).
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor, layout: Sequence[tuple[int, int]] | None = None) -> Tensor:
        if layout is not None:
            return drop_path_packed(x, layout, self.drop_prob, self.training)
        return drop_path(x, self.drop_prob, self.training)

    def subset(self, x: Tensor, layout: Sequence[tuple[int, int]] | None = None) -> KeptSamples:
        """Draw which samples of ``x`` keep their branch (see :class:`KeptSamples`).

        ``x`` is ``(B, N, D)`` or packed ``(T, D)`` with ``layout``. Each sample is kept with probability
        ``1 - drop_prob``; kept branches are added back with weight ``alpha = 1 / (1 - drop_prob)``. When every
        sample is dropped, one sample still runs with ``alpha = 0``: the output is unchanged but every parameter
        gets a (zero) gradient, as DDP expects. The draw happens on the CPU generator, so the number of kept
        samples is known without a device sync.
        """
        keep = 1.0 - self.drop_prob
        counts = [b for b, _ in layout] if layout is not None else [int(x.shape[0])]
        rows_per_sample = [n for b, n in layout for _ in range(b)] if layout is not None else None
        kept = (torch.rand(sum(counts)) < keep).tolist()
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
        return f"drop_prob={self.drop_prob}"


def _dropping(drop: nn.Module) -> bool:
    """Whether ``drop`` (a block's ``drop_path1/2``: DropPath or Identity) drops anything in this call."""
    return isinstance(drop, DropPath) and drop.training and drop.drop_prob > 0.0


def _row_samples(layout: Sequence[tuple[int, int]], rows: Tensor) -> Tensor:
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

    def __init__(self, kept: list[bool], rows_per_sample: list[int] | None,
                 layout: list[tuple[int, int]] | None, alpha: float, device: torch.device) -> None:
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


class LayerScale(nn.Module):
    """Per-channel residual scaling ``x * gamma`` (CaiT); ``gamma`` ``(D,)`` starts at ``init_values``."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class PatchEmbed(nn.Module):
    """Image ``(B, C, H, W)`` -> patch tokens ``(B, H/p * W/p, D)`` through a stride-``p`` Conv2d ``proj``.

    ``H`` and ``W`` must be multiples of the patch size ``p``; ``img_size`` only sets ``num_patches`` (the size of
    the learned position grid), other sizes are handled by position-embedding interpolation.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p != 0 or W % p != 0:
            raise ValueError(
                f"input size {H}x{W} is not a multiple of the patch size {p}; "
                f"resize or crop the images to multiples of {p}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Two-layer feed-forward ``fc2(GELU(fc1(x)))``: ``(..., D)`` -> ``(..., out_features or D)``."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, out_scale: Tensor | None = None) -> Tensor:
        """``out_scale`` ``(out,)`` multiplies the output, folded into ``fc2`` (see :func:`scaled_linear`)."""
        return self.drop(scaled_linear(self.fc2, self.drop(self.act(self.fc1(x))), out_scale))


class SwiGLUFFNFused(nn.Module):
    """SwiGLU feed-forward ``w3(silu(x1) * x2)`` with ``x1, x2 = w12(x).chunk(2)`` (Shazeer, 2020; DINOv2).

    The hidden size is shrunk to ``(int(hidden * 2 / 3) + 7) // 8 * 8`` to keep the parameter count of an MLP,
    exactly as the DINOv2 ``SwiGLUFFNFused``; parameters are ``w12`` ``(2*hidden', D)`` and ``w3`` ``(D, hidden')``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        hidden_features = (int(hidden_features * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: Tensor, out_scale: Tensor | None = None) -> Tensor:
        """``out_scale`` ``(out,)`` multiplies the output, folded into ``w3`` (see :func:`scaled_linear`)."""
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return scaled_linear(self.w3, F.silu(x1) * x2, out_scale)


def make_ffn(name: str, dim: int, hidden: int, bias: bool = True) -> nn.Module:
    """Feed-forward by name: ``"mlp"`` -> :class:`Mlp`; ``"swiglu"``/``"swiglufused"`` -> :class:`SwiGLUFFNFused`
    (both names map to the fused module, as in the official DINOv2 code)."""
    if name == "mlp":
        return Mlp(dim, hidden, bias=bias)
    if name in ("swiglu", "swiglufused"):
        return SwiGLUFFNFused(dim, hidden, bias=bias)
    raise ValueError(f"unknown ffn_layer {name!r}; choose one of {', '.join(FFN_LAYERS)}")


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``.

    Tokens ``(B, N, D)`` -> ``(B, N, D)``. ``init_values`` None or 0 disables LayerScale (``ls1``/``ls2`` are
    Identity, so there are no ``gamma`` parameters). LayerNorm eps is 1e-6 as in DINOv2.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path: float = 0.0,
        init_values: float | None = None,
        ffn_layer: str = "mlp",
        attn_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, impl=attn_impl)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = make_ffn(ffn_layer, dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self, x: Tensor | list[Tensor], layout: Sequence[tuple[int, int]] | None = None, rows: Tensor | None = None
    ) -> Tensor | list[Tensor]:
        """``(B, N, D)`` tokens, or a list of token batches of different resolutions (same shapes back), or
        packed tokens ``(T, D)`` with their ``layout`` ``[(B_i, N_i)]`` (see :func:`pack_tokens`).

        ``rows`` (packed input): compute the output of those token rows only, ``(len(rows), D)`` — for a last
        block whose other outputs nobody reads. All tokens still feed the attention as keys and values; the
        attention projection, both residuals, ``norm2`` and the MLP run on the selected rows alone.

        Lists and packed tokens go through this one entry point (not a side method) so wrappers that hook
        ``__call__``, such as FSDP2's unshard/reshard, see every use of the block.
        """
        if isinstance(x, (list, tuple)):
            return self.forward_list(list(x))
        if rows is not None:
            if layout is None:
                raise ValueError("rows= needs packed tokens and their layout")
            return self._forward_rows(x, layout, rows)
        x = self._residual(x, self._attn_branch, self.drop_path1, layout)
        return self._residual(x, self._ffn_branch, self.drop_path2, layout)

    def _attn_branch(self, x: Tensor, layout: Sequence[tuple[int, int]] | None) -> Tensor:
        """``ls1(attn(norm1(x)))``, LayerScale folded into ``proj``; packed tokens attend per resolution."""
        return self.attn(self.norm1(x), layout=layout, out_scale=self._gamma(self.ls1))

    def _ffn_branch(self, x: Tensor, layout: Sequence[tuple[int, int]] | None) -> Tensor:
        """``ls2(mlp(norm2(x)))``, LayerScale folded into the output linear (token-wise: no layout needed)."""
        return self.mlp(self.norm2(x), out_scale=self._gamma(self.ls2))

    def _residual(self, x: Tensor, branch: Any, drop: nn.Module, layout: Sequence[tuple[int, int]] | None) -> Tensor:
        """``x + drop_path(branch(x))`` where the branch only runs on the samples that keep it
        (:meth:`DropPath.subset`): with drop rate ``p`` it skips a fraction ``p`` of the branch's work, forward
        and backward, instead of computing everything and multiplying part of it by zero."""
        if not _dropping(drop):
            return x + branch(x, layout)
        kept = drop.subset(x, layout)
        return kept.add(x, branch(kept.gather(x), kept.layout))

    def _forward_rows(self, x: Tensor, layout: Sequence[tuple[int, int]], rows: Tensor) -> Tensor:
        """See :meth:`forward` (``rows``). Stochastic depth multiplies each row's branch by its sample's mask."""
        samples = _row_samples(layout, rows) if _dropping(self.drop_path1) or _dropping(self.drop_path2) else None
        h = self.attn(self.norm1(x), layout=layout, out_scale=self._gamma(self.ls1), rows=rows)
        x = x.index_select(0, rows) + self._row_drop(self.drop_path1, h, layout, samples)
        return x + self._row_drop(self.drop_path2, self._ffn_branch(x, None), layout, samples)

    @staticmethod
    def _row_drop(drop: nn.Module, h: Tensor, layout: Sequence[tuple[int, int]], samples: Tensor | None) -> Tensor:
        """``drop_path`` for a branch output ``h`` of packed token rows whose samples are ``samples``
        (:func:`_row_samples`): whole samples keep or drop, drawn like :meth:`DropPath.subset`."""
        if not _dropping(drop):
            return h
        keep = 1.0 - drop.drop_prob
        n_samples = sum(b for b, _ in layout)
        scale = (torch.rand(n_samples) < keep).to(h.dtype) / keep if keep > 0.0 else torch.zeros(n_samples)
        return h * scale.to(h.device, h.dtype)[samples].unsqueeze(-1)

    @staticmethod
    def _gamma(ls: nn.Module) -> Tensor | None:
        """LayerScale's gamma, which the attention / FFN fold into their output linear (``ls1``/``ls2`` keep the
        parameters and the state-dict keys; folding saves two token-sized multiplies per residual branch)."""
        return ls.gamma if isinstance(ls, LayerScale) else None

    def forward_list(self, xs: list[Tensor]) -> list[Tensor]:
        """Run the block over crops of different resolutions: ``[(B_i, N_i, D)]`` -> same shapes.

        Several batches are packed (:func:`pack_tokens`) for one pass; attention stays per resolution.
        Call the block itself (``block(xs)``), not this method, from outside.
        """
        if len(xs) == 1:
            return [self.forward(xs[0])]
        packed, layout = pack_tokens(xs)
        return unpack_tokens(self.forward(packed, layout), layout)

"""ViT building blocks with the DINOv2 parameter layout.

PatchEmbed and the pre-norm Block follow ViT (Dosovitskiy et al., 2021); LayerScale follows CaiT (Touvron et al.,
2021); stochastic depth follows Huang et al. (2016); the SwiGLU feed-forward follows Shazeer (2020) as used by
DINOv2 (Oquab et al., 2023).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_distill.models.attention import Attention, scaled_linear
from ssl_distill.models.names import FFN_LAYERS  # the one list of allowed values
from ssl_distill.models.packing import Layout, concat_keys, pack_tokens, unpack_tokens
from ssl_distill.models.stochastic_depth import DropPath, DropPlan, is_dropping


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
    Identity, so there are no ``gamma`` parameters). LayerNorm eps is 1e-6 as in DINOv2. ``index`` (the block's
    depth) selects the stream of its stochastic-depth draws and ``drop_path_mode`` how a dropped branch is skipped
    (:mod:`~ssl_distill.models.stochastic_depth`).
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
        index: int = 0,
        drop_path_mode: str = "auto",
    ) -> None:
        super().__init__()
        self.drop_path_mode = drop_path_mode  # see DropPlan: how dropped branches are skipped
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, impl=attn_impl)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path, stream=2 * index) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = make_ffn(ffn_layer, dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path, stream=2 * index + 1) if drop_path > 0.0 else nn.Identity()

    def forward(
        self, x: Tensor | list[Tensor], layout: Layout | None = None, rows: Tensor | None = None,
        keys: Tensor | list[Tensor | None] | None = None, plan: DropPlan | None = None,
    ) -> Tensor | list[Tensor]:
        """``(B, N, D)`` tokens, or a list of token batches of different resolutions (same shapes back), or
        packed tokens ``(T, D)`` with their ``layout`` ``[(B_i, N_i)]`` (see :func:`pack_tokens`).

        ``rows`` (packed input): compute the output of those token rows only, ``(len(rows), D)`` — for a last
        block whose other outputs nobody reads. All tokens still feed the attention as keys and values; the
        attention projection, both residuals, ``norm2`` and the MLP run on the selected rows alone.

        Stochastic depth: ``plan``, the forward pass's draws for every block
        (:class:`~ssl_distill.models.stochastic_depth.DropPlan`, made once by the ViT); or ``keys``, the samples'
        keys, int64 ``(samples,)`` in batch (or layout) order, one tensor per batch for list input
        (:func:`~ssl_distill.models.stochastic_depth.sample_keys`), from which this block draws alone; neither draws
        from torch's generator.

        Lists and packed tokens go through this one entry point (not a side method) so wrappers that hook
        ``__call__``, such as FSDP2's unshard/reshard, see every use of the block.
        """
        if keys is not None and plan is not None:
            raise ValueError("pass the stochastic-depth plan or the keys, not both (the plan holds the draws)")
        if isinstance(x, (list, tuple)):
            return self.forward_list(list(x), keys, plan)
        if isinstance(keys, (list, tuple)):
            raise TypeError("a list of keys needs a list of token batches; pass one (samples,) tensor")
        if rows is not None and layout is None:
            raise ValueError("rows= needs packed tokens and their layout")
        plan = self._plan(x, layout, keys, plan)
        if rows is not None:
            return self._forward_rows(x, layout, rows, plan)
        x = self._residual(x, self._attn_branch, self.drop_path1, layout, plan)
        return self._residual(x, self._ffn_branch, self.drop_path2, layout, plan)

    def _plan(self, x: Tensor, layout: Layout | None, keys: Tensor | None, plan: DropPlan | None) -> DropPlan | None:
        """The draws of this call, for the rows of ``x`` (``layout``, or one row per sample: ``[(B, 1)]``)."""
        drops = [d for d in (self.drop_path1, self.drop_path2) if is_dropping(d)]
        if not drops:
            return None
        rows_layout = layout if layout is not None else [(x.shape[0], 1)]
        if plan is None:
            plan = DropPlan({d.stream: d.drop_prob for d in drops}, rows_layout, keys, x.device, self.drop_path_mode)
        return plan.for_layout(rows_layout)

    def _attn_branch(self, x: Tensor, layout: Layout | None) -> Tensor:
        """``ls1(attn(norm1(x)))``, LayerScale folded into ``proj``; packed tokens attend per resolution."""
        return self.attn(self.norm1(x), layout=layout, out_scale=self._gamma(self.ls1))

    def _ffn_branch(self, x: Tensor, layout: Layout | None) -> Tensor:
        """``ls2(mlp(norm2(x)))``, LayerScale folded into the output linear (token-wise: no layout needed)."""
        return self.mlp(self.norm2(x), out_scale=self._gamma(self.ls2))

    def _residual(self, x: Tensor, branch: Any, drop: nn.Module, layout: Layout | None,
                  plan: DropPlan | None) -> Tensor:
        """``x + drop_path(branch(x))``. Mode ``"subset"``: the branch runs on the samples that keep it only (with
        drop rate ``p`` it skips a fraction ``p`` of the branch's work, forward and backward); ``"mask"``: on every
        sample, times a per-sample scale that is 0 for the dropped ones (see :class:`DropPlan`)."""
        if not is_dropping(drop):
            return x + branch(x, layout)
        s = drop.stream
        if plan.mode(s) == "mask":
            return plan.add_masked(s, x, branch(x, layout))
        return plan.add(s, x, branch(plan.gather(s, x), plan.sub_layouts[s] if layout is not None else None))

    def _forward_rows(self, x: Tensor, layout: Layout, rows: Tensor, plan: DropPlan | None) -> Tensor:
        """See :meth:`forward` (``rows``). Stochastic depth multiplies each row's branch by its sample's scale."""
        h = self.attn(self.norm1(x), layout=layout, out_scale=self._gamma(self.ls1), rows=rows)
        x = x.index_select(0, rows) + self._row_drop(self.drop_path1, h, plan, rows)
        return x + self._row_drop(self.drop_path2, self._ffn_branch(x, None), plan, rows)

    @staticmethod
    def _row_drop(drop: nn.Module, h: Tensor, plan: DropPlan | None, rows: Tensor) -> Tensor:
        """``drop_path`` for a branch output ``h`` of the packed token ``rows``: whole samples keep or drop, with
        the plan's draws."""
        if not is_dropping(drop):
            return h
        return h * plan.row_scale(drop.stream, rows).to(h.dtype).unsqueeze(-1)

    @staticmethod
    def _gamma(ls: nn.Module) -> Tensor | None:
        """LayerScale's gamma, which the attention / FFN fold into their output linear (``ls1``/``ls2`` keep the
        parameters and the state-dict keys; folding saves two token-sized multiplies per residual branch)."""
        return ls.gamma if isinstance(ls, LayerScale) else None

    def forward_list(self, xs: list[Tensor], keys: list[Tensor | None] | None = None,
                     plan: DropPlan | None = None) -> list[Tensor]:
        """Run the block over crops of different resolutions: ``[(B_i, N_i, D)]`` -> same shapes (``keys``: one
        entry per batch, or the forward pass's ``plan``; see :meth:`forward`).

        Several batches are packed (:func:`pack_tokens`) for one pass; attention stays per resolution.
        Call the block itself (``block(xs)``), not this method, from outside.
        """
        keys = concat_keys(keys, len(xs))
        if len(xs) == 1:
            return [self.forward(xs[0], keys=keys, plan=plan)]
        packed, layout = pack_tokens(xs)
        return unpack_tokens(self.forward(packed, layout, keys=keys, plan=plan), layout)

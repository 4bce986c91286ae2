"""One attention entry point with interchangeable kernels.

Multi-head self-attention as in "Attention Is All You Need" (Vaswani et al., 2017) and the ViT of Dosovitskiy et
al. (2021). Kernels, all computing ``softmax(Q K^T * scale) V``:

- ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention` (the default; runs everywhere).
- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (optional; CUDA tensors only).
- ``"math"``: the explicit reference computation; the only kernel that can return the attention weights.
- ``"auto"``: ``"xformers"`` when the package imports and the tensor is on CUDA, else ``"sdpa"``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_distill.models.names import ATTN_IMPLS  # the one list of allowed values


@functools.lru_cache(maxsize=1)
def _xformers_ops() -> ModuleType | None:
    """``xformers.ops`` when installed, else None (imported lazily, once)."""
    try:
        import xformers.ops as xops
    except ImportError:
        return None
    return xops


def check_attn_impl(impl: str) -> str:
    """Validate an attention kernel name; returns it unchanged."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {', '.join(ATTN_IMPLS)}")
    return impl


def resolve_attn_impl(impl: str, x: Tensor) -> str:
    """Map ``impl`` (possibly ``"auto"``) to the concrete kernel used for tensor ``x``."""
    check_attn_impl(impl)
    if impl == "auto":
        return "xformers" if x.is_cuda and _xformers_ops() is not None else "sdpa"
    if impl == "xformers":
        if not x.is_cuda:
            raise ValueError(
                f"attention impl 'xformers' needs CUDA tensors but got a tensor on {x.device}; "
                "use attn_impl='sdpa' (or 'auto')"
            )
        if _xformers_ops() is None:
            raise ImportError("attention impl 'xformers' needs the xformers package; "
                              "install it (pip install xformers) or use attn_impl='sdpa'")
    return impl


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    impl: str = "auto",
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product attention.

    Args:
        q, k, v: ``(B, H, N, Dh)`` queries, keys, values.
        impl: kernel name, one of :data:`ATTN_IMPLS`. ``return_weights=True`` forces ``"math"``.
        dropout_p: dropout on the attention weights (pass 0 in eval mode).
        scale: logit scale; default ``Dh ** -0.5``.
        return_weights: also return the ``(B, H, N, N)`` attention weights.

    Returns:
        ``(B, H, N, Dh)`` output, or ``(output, weights)`` when ``return_weights``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kernel = "math" if return_weights else resolve_attn_impl(impl, q)
    if kernel == "math":
        attn = (q * scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        weights = attn
        if dropout_p > 0.0:
            attn = F.dropout(attn, p=dropout_p)
        out = attn @ v
        return (out, weights) if return_weights else out
    if kernel == "xformers":
        xops = _xformers_ops()
        # xFormers wants (B, N, H, Dh).
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), p=dropout_p, scale=scale
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


def scaled_linear(linear: nn.Linear, x: Tensor, scale: Tensor | None = None) -> Tensor:
    """``linear(x) * scale`` (``scale`` ``(out,)``, e.g. a LayerScale gamma) as one linear whose weight and bias
    are scaled instead of its output: ``(out, in)`` multiplies instead of ``(tokens, out)`` ones, forward and
    backward. ``scale=None`` is ``linear(x)``."""
    if scale is None:
        return linear(x)
    bias = linear.bias * scale if linear.bias is not None else None
    return F.linear(x, linear.weight * scale.unsqueeze(1), bias)


class Attention(nn.Module):
    """Multi-head self-attention with the DINOv2 parameter layout (``qkv``, ``proj``).

    Args:
        dim: token width ``D``; must be divisible by ``num_heads``.
        num_heads: number of heads ``H``.
        qkv_bias, proj_bias: biases of the ``qkv`` / ``proj`` linears.
        attn_drop, proj_drop: dropout on attention weights / on the output projection.
        impl: attention kernel (see :data:`ATTN_IMPLS`); change later with :meth:`set_impl`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.impl = check_attn_impl(impl)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def set_impl(self, impl: str) -> None:
        """Switch the attention kernel."""
        self.impl = check_attn_impl(impl)

    def forward(
        self, x: Tensor, return_attention: bool = False, layout: Sequence[tuple[int, int]] | None = None,
        out_scale: Tensor | None = None, rows: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``x``: ``(B, N, D)`` -> ``(B, N, D)``; with ``return_attention`` also ``(B, H, N, N)`` weights
        (computed with the ``"math"`` kernel).

        Packed input: with ``layout = [(B_1, N_1), (B_2, N_2), ...]``, ``x`` is ``(T, D)`` with
        ``T = sum B_i * N_i`` (batch ``i``'s tokens, row-major, after batch ``i - 1``'s). ``qkv`` and ``proj`` run
        once over all ``T`` tokens; attention runs per batch, so tokens only attend within their own image.

        ``out_scale`` ``(D,)``: multiply the output by it, folded into ``proj`` (see :func:`scaled_linear`); the
        block passes its LayerScale gamma here.

        ``rows`` (packed input only): return the output of those token rows only, ``(len(rows), D)``; every token
        still serves as key and value, but ``proj`` runs on the selected rows alone.
        """
        if layout is not None:
            if return_attention:
                raise ValueError("return_attention is not supported for packed (layout=...) input")
            return self._forward_packed(x, layout, out_scale, rows)
        if rows is not None:
            raise ValueError("rows= needs packed (layout=...) input")
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        p = self.attn_drop if self.training else 0.0
        res = attention(q, k, v, impl=self.impl, dropout_p=p, scale=self.scale, return_weights=return_attention)
        out, weights = res if return_attention else (res, None)
        out = self.proj_drop(scaled_linear(self.proj, out.transpose(1, 2).reshape(B, N, C), out_scale))
        return (out, weights) if return_attention else out

    def _forward_packed(self, x: Tensor, layout: Sequence[tuple[int, int]], out_scale: Tensor | None,
                        rows: Tensor | None = None) -> Tensor:
        """Packed tokens ``(T, D)`` -> ``(T, D)``; see :meth:`forward`."""
        T, C = x.shape
        sizes = [b * n for b, n in layout]
        if sum(sizes) != T:
            raise ValueError(f"layout {list(layout)} covers {sum(sizes)} tokens but the input has {T}")
        p = self.attn_drop if self.training else 0.0
        outs = []
        for chunk, (b, n) in zip(self.qkv(x).split(sizes), layout):
            q, k, v = chunk.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            out = attention(q, k, v, impl=self.impl, dropout_p=p, scale=self.scale)
            outs.append(out.transpose(1, 2).reshape(b * n, C))
        out = torch.cat(outs)
        if rows is not None:
            out = out.index_select(0, rows)
        return self.proj_drop(scaled_linear(self.proj, out, out_scale))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, impl={self.impl!r}"

"""Token packing: several token batches of different resolutions as one ``(T, D)`` matrix.

A ViT's norms, linear layers and MLPs are token-wise, so the tokens of the global and local crops can go through
them in one call (fewer, larger matrix products); attention alone runs per resolution, from the ``layout``
``[(B_i, N_i)]`` that :func:`pack_tokens` returns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Layout = Sequence[tuple[int, int]]


def concat_keys(keys: Sequence[Tensor | None] | None, n_batches: int) -> Tensor | None:
    """One key tensor for ``n_batches`` packed batches from their per-batch keys (all None -> None)."""
    if keys is None or all(k is None for k in keys):
        return None
    if len(keys) != n_batches or any(k is None for k in keys):
        raise ValueError(f"give drop-path keys for all {n_batches} batches or for none")
    return torch.cat(list(keys))


def pack_tokens(xs: Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
    """Token batches ``[(B_i, N_i, D)]`` -> packed ``(sum B_i * N_i, D)`` and the layout ``[(B_i, N_i)]``."""
    layout = [(int(x.shape[0]), int(x.shape[1])) for x in xs]
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]), layout


def unpack_tokens(x: Tensor, layout: Layout) -> list[Tensor]:
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

"""Per-module FLOP table of a backbone, counted by fvcore (``ssl-distill models --flops NAME``).

fvcore's ``FlopCountAnalysis`` traces one forward pass and attributes every operator to the module that ran it, so
the table shows parameters and FLOPs per block, patch embedding and norm; ``flop_count_table`` formats it. fvcore
counts one fused multiply-add as one FLOP (half of what ``torch.utils.flop_counter`` reports). It has no counter for
``scaled_dot_product_attention``; :func:`sdpa_flop_handle` adds one (the two matrix products, ``Q K^T`` and
``A V``), so attention is counted whichever kernel runs it. Element-wise operators (GELU, additions, softmax) are
not counted, as in fvcore's and torch's counters.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def sdpa_flop_handle(inputs: Sequence[Any], outputs: Sequence[Any]) -> int:
    """Multiply-adds of ``scaled_dot_product_attention(q (B, H, N, d), k (B, H, M, d), v (B, H, M, dv))``:
    ``B H N M d`` for the scores plus ``B H N M dv`` for the weighted sum (fvcore op-handle signature)."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = 1
    for size in q[:-2]:
        batch *= size
    n, m, d, dv = q[-2], k[-2], q[-1], v[-1]
    return batch * n * m * (d + dv)


def flop_analysis(model: nn.Module, image_size: int) -> Any:
    """fvcore's ``FlopCountAnalysis`` of ``model`` on one ``(1, 3, image_size, image_size)`` image (no grad)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore's modules call the deprecated torch.jit.script
        from fvcore.nn import FlopCountAnalysis
    image = torch.zeros(1, 3, image_size, image_size)
    analysis = FlopCountAnalysis(model.eval(), image)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_handle)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's notices (fvcore traces the forward)
        analysis.total()  # runs the trace once; the table reuses it
    return analysis


def flop_table(model: nn.Module, image_size: int, max_depth: int = 2) -> tuple[str, int]:
    """``(markdown table of parameters and FLOPs per module down to max_depth, total FLOPs)`` for one image."""
    from fvcore.nn import flop_count_table

    analysis = flop_analysis(model, image_size)
    return flop_count_table(analysis, max_depth=max_depth), int(analysis.total())

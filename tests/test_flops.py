"""``ssl-distill models --flops``: fvcore's per-module table, checked against torch's own FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ssl_distill.cli import main
from ssl_distill.models import vit_tiny
from ssl_distill.models.flops import flop_analysis, flop_table


def _torch_multiply_adds(model: torch.nn.Module, image_size: int) -> dict[str, float]:
    """torch's own counts per operator, in multiply-adds (torch counts one as 2 FLOPs, fvcore as 1)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, image_size, image_size))
    return {str(op): flops / 2 for op, flops in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("image_size", [32, 64])
def test_fvcore_counts_match_torch_counter_and_include_attention(image_size):
    model = vit_tiny(patch_size=8, img_size=32, depth=3, init_values=1e-5, num_register_tokens=2)
    analysis = flop_analysis(model, image_size)
    by_operator = analysis.by_operator()
    torch_counts = _torch_multiply_adds(model, image_size)
    assert by_operator["linear"] == torch_counts["aten.addmm"]
    assert by_operator["conv"] == torch_counts["aten.convolution"]
    # attention: Q K^T and A V, tokens x tokens x width multiply-adds each, in each of the 3 blocks (torch's counter
    # has no entry for the CPU attention kernel; our handle gives fvcore one)
    tokens, width = 1 + 2 + (image_size // 8) ** 2, 192
    assert by_operator["scaled_dot_product_attention"] == 3 * 2 * tokens * tokens * width
    others = set(by_operator) - {"linear", "conv", "scaled_dot_product_attention"}
    assert others <= {"layer_norm", "upsample_bicubic2d"}
    assert analysis.total() == sum(by_operator.values())


def test_table_lists_modules_and_the_blocks_sum_to_their_total():
    model = vit_tiny(patch_size=8, img_size=32, depth=3)
    table, total = flop_table(model, 32, max_depth=2)
    analysis = flop_analysis(model, 32)
    per_module = analysis.by_module()
    assert total == per_module[""]
    assert sum(per_module[f"blocks.{i}"] for i in range(3)) == per_module["blocks"]
    for row in ("patch_embed.proj", "blocks.0", "blocks.2", "norm"):
        assert f"| {row} " in table


def test_models_flops_command(capsys):
    assert main(["models", "--flops", "dinov2_vits14", "--image-size", "56", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dinov2_vits14 at 56x56 px, one image: ")
    assert "| blocks " in out
    assert "blocks.0" not in out  # --depth 1
    assert main(["models", "--flops", "dinov2_vits14", "--image-size", "50"]) == 2
    assert "not a multiple of dinov2_vits14's patch size 14; use 42 or 56" in capsys.readouterr().err
    assert main(["models", "--flops", "dinov2_vit_s14"]) == 2
    assert "unknown model 'dinov2_vit_s14'" in capsys.readouterr().err

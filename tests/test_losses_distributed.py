"""Two gloo ranks holding halves of a batch give the same centres and Sinkhorn targets as one process."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed

from ssl_distill.losses import DINOLoss, iBOTPatchLoss

TEACHER_TEMP = 0.07
N_MASKED = (7, 3)  # masked tokens per rank differ


def _make_data() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "dino_1": torch.randn(8, 16) * 2,
        "dino_2": torch.randn(8, 16) * 2 + 1,
        "ibot_patches": torch.randn(4, 6, 12),
        "ibot_masked": torch.randn(sum(N_MASKED), 12) * 3,
    }


def _compute(data: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This rank's share of every check: rows [rank * half, (rank + 1) * half), masked tokens by N_MASKED."""

    def shard(x: torch.Tensor) -> torch.Tensor:
        return x.chunk(world_size)[rank]

    if world_size == 1:
        masked = data["ibot_masked"]
        masked_solo = data["ibot_masked"][: N_MASKED[0]]
    else:
        masked = data["ibot_masked"].split(N_MASKED)[rank]
        masked_solo = masked if rank == 0 else masked[:0]  # rank 1 holds no masked token at all
    dino, ibot = DINOLoss(16), iBOTPatchLoss(12)
    dino.update_center(shard(data["dino_1"]))
    dino.softmax_center_teacher(shard(data["dino_2"]), TEACHER_TEMP)
    dino.update_center(shard(data["dino_2"]))
    dino.apply_center_update()
    ibot.update_center_masked(shard(data["ibot_patches"]).flatten(0, 1))  # even token counts per rank
    ibot.apply_center_update()
    ibot_masked_center = iBOTPatchLoss(12)
    ibot_masked_center.update_center_masked(masked)  # uneven token counts per rank (7 vs 3)
    ibot_masked_center.apply_center_update()
    return {
        "ibot_masked_center": ibot_masked_center.center.clone(),
        "dino_center": dino.center.clone(),
        "ibot_center": ibot.center.clone(),
        "dino_sk": dino.sinkhorn_knopp_teacher(shard(data["dino_1"]), TEACHER_TEMP),
        "ibot_sk": ibot.sinkhorn_knopp_teacher(masked, TEACHER_TEMP),
        "ibot_sk_solo": ibot.sinkhorn_knopp_teacher(masked_solo, TEACHER_TEMP),
    }


def _rank_main(rank: int, world_size: int, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _compute(data, rank, world_size)


@pytest.mark.distributed
def test_two_ranks_match_one_process(tmp_path):
    data = _make_data()
    single = _compute(data, rank=0, world_size=1)
    ranks = run_distributed(_rank_main, world_size=2, args=(data,), tmp_path=tmp_path, timeout_s=120)
    for r in ranks:
        torch.testing.assert_close(r["dino_center"], single["dino_center"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r["ibot_center"], single["ibot_center"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r["ibot_masked_center"], single["ibot_masked_center"], atol=1e-6, rtol=1e-6)
    for key in ("dino_sk", "ibot_sk", "ibot_sk_solo"):
        merged = torch.cat([ranks[0][key], ranks[1][key]])
        torch.testing.assert_close(merged, single[key], atol=1e-6, rtol=1e-5, msg=key)
    assert ranks[1]["ibot_sk"].shape == (N_MASKED[1], 12)
    assert ranks[1]["ibot_sk_solo"].shape == (0, 12)


def _fail_on_rank_1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise RuntimeError("boom from rank 1")
    return rank


@pytest.mark.distributed
def test_run_distributed_reports_child_traceback(tmp_path):
    with pytest.raises(Exception, match="boom from rank 1") as info:
        run_distributed(_fail_on_rank_1, world_size=2, tmp_path=tmp_path, timeout_s=60)
    assert "_fail_on_rank_1" in str(info.value)  # the child's traceback, not just its message

"""Schedules against the reference's array construction, and the lr scaling rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ssl_distill.config import load_config
from ssl_distill.train.schedules import CosineSchedule, apply_scaling_rules, build_schedules, scaled_lr


def reference_array(base, final, total, warmup=0, start_warmup=0.0, freeze=0):
    """DINOv2's CosineScheduler.schedule, rebuilt with numpy."""
    iters = np.arange(total - warmup - freeze)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((np.zeros(freeze), np.linspace(start_warmup, base, warmup), cosine))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(base_value=1e-3, final_value=1e-6, total_iters=100, warmup_iters=10),
        dict(base_value=0.04, final_value=0.4, total_iters=50),
        dict(base_value=0.992, final_value=1.0, total_iters=37),
        dict(base_value=2.0, final_value=0.5, total_iters=40, warmup_iters=1, start_warmup_value=0.1),
        dict(base_value=2.0, final_value=0.5, total_iters=40, warmup_iters=5, freeze_iters=7),
    ],
)
def test_cosine_schedule_matches_reference_arrays(kwargs):
    sched = CosineSchedule(**kwargs)
    ref = reference_array(
        kwargs["base_value"], kwargs["final_value"], kwargs["total_iters"], kwargs.get("warmup_iters", 0),
        kwargs.get("start_warmup_value", 0.0), kwargs.get("freeze_iters", 0),
    )
    got = np.array([sched(i) for i in range(kwargs["total_iters"])])
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)
    assert sched(kwargs["total_iters"]) == kwargs["final_value"]
    assert sched(10 * kwargs["total_iters"]) == kwargs["final_value"]


def test_schedule_rejects_warmup_longer_than_training():
    with pytest.raises(ValueError, match="exceed"):
        CosineSchedule(1.0, 0.0, total_iters=5, warmup_iters=6)


def test_recipe_schedules_from_config():
    cfg = load_config(None, [
        "train.iters_per_epoch=10", "optim.epochs=5", "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=2",
        "teacher.warmup_teacher_temp_epochs=3", "train.batch_size_per_gpu=64",
    ])
    lr = apply_scaling_rules(cfg, world_size=4)
    assert lr == pytest.approx(0.004 * math.sqrt(256 / 1024))
    s = build_schedules(cfg)
    total = 50
    # lr: linear warm-up over 10 iterations then cosine to min_lr
    assert s.at(0)["lr"] == 0.0
    assert s.at(9)["lr"] == pytest.approx(lr)
    mid = 10 + 20
    assert s.at(mid)["lr"] == pytest.approx(1e-6 + 0.5 * (lr - 1e-6) * (1 + math.cos(math.pi * 20 / 40)))
    assert s.at(total)["lr"] == 1e-6
    # last layer frozen (lr 0) for 2 epochs, then the lr schedule
    assert all(s.at(i)["last_layer_lr"] == 0.0 for i in range(20))
    assert s.at(20)["last_layer_lr"] == s.at(20)["lr"] > 0
    # wd cosine 0.04 -> 0.4; momentum cosine 0.992 -> 1
    assert s.at(0)["wd"] == pytest.approx(0.04)
    assert s.at(total)["wd"] == 0.4
    assert s.at(25)["wd"] == pytest.approx(0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * 25 / 50)))
    assert s.at(0)["momentum"] == pytest.approx(0.992)
    assert s.at(total)["momentum"] == 1.0
    # teacher temperature: linear 0.04 -> 0.07 over 30 iterations (np.linspace end point included), then constant
    temps = [s.at(i)["teacher_temp"] for i in range(30)]
    np.testing.assert_allclose(temps, np.linspace(0.04, 0.07, 30))
    assert s.at(30)["teacher_temp"] == 0.07
    assert s.at(45)["teacher_temp"] == 0.07


def test_scaling_rules():
    assert scaled_lr(0.004, 1024, "sqrt_wrt_1024") == pytest.approx(0.004)
    assert scaled_lr(0.004, 256, "sqrt_wrt_1024") == pytest.approx(0.002)
    assert scaled_lr(0.001, 512, "linear_wrt_256") == pytest.approx(0.002)
    assert scaled_lr(0.001, 512, "none") == 0.001
    with pytest.raises(ValueError, match="scaling_rule"):
        scaled_lr(0.001, 512, "cubic")


def test_scaling_uses_global_batch():
    cfg = load_config(None, ["train.batch_size_per_gpu=32", "optim.scaling_rule=linear_wrt_256"])
    assert apply_scaling_rules(cfg, world_size=8) == pytest.approx(0.004)
    assert cfg.optim.lr == pytest.approx(0.004)


def test_a_set_lr_wins_over_the_scaling_rule_and_zero_derives_it(caplog):
    cfg = load_config(None, ["train.batch_size_per_gpu=32", "optim.lr=0.0123"])
    with caplog.at_level("INFO"):
        assert apply_scaling_rules(cfg, world_size=8) == 0.0123
    assert "optim.lr=0.0123 is set" in caplog.text
    assert cfg.optim.lr == 0.0123
    assert build_schedules(cfg).lr.base_value == 0.0123  # the peak of the cosine schedule
    derived = load_config(None, ["train.batch_size_per_gpu=32"])  # optim.lr=0: sqrt rule, global batch 256
    assert apply_scaling_rules(derived, world_size=8) == pytest.approx(0.004 * 0.5)
    assert apply_scaling_rules(derived, world_size=2) == pytest.approx(0.002)  # now set: it stays


def test_distillation_ema_forgets_the_initial_weights_within_tens_of_iterations():
    """Distillation's EMA student: momentum capped by (1 + it) / (10 + it); pretraining keeps the recipe's schedule,
    and distill.ema_warmup=false restores it."""
    base = ["train.iters_per_epoch=100", "optim.epochs=10", "teacher.momentum_teacher=0.99",
            "teacher.final_momentum_teacher=0.999"]
    pretrain = build_schedules(load_config(None, base))
    base_d = [*base, "train.mode=distill", "distill.teacher_weights=dinov2_vits14"]
    distill = build_schedules(load_config(None, base_d))
    plain = build_schedules(load_config(None, [*base_d, "distill.ema_warmup=false"]))
    for it in (0, 5, 50, 80, 990, 1000, 10**5):
        assert pretrain.at(it)["momentum"] == plain.at(it)["momentum"]
        assert distill.at(it)["momentum"] == min(pretrain.at(it)["momentum"], (1 + it) / (10 + it))
    assert distill.at(0)["momentum"] == pytest.approx(0.1)
    assert distill.at(80)["momentum"] == pytest.approx(0.9)
    assert distill.at(10**5)["momentum"] == pytest.approx(0.999, abs=1e-4)  # long runs: the recipe's momentum
    # what is left of the initial weights after 80 updates: 0.99^80 = 45 % without the cap, < 1 % with it
    left = lambda s: math.prod(s.at(i)["momentum"] for i in range(80))  # noqa: E731
    assert left(pretrain) > 0.4 and left(distill) < 0.01

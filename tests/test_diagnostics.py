"""Collapse diagnostics: the statistics against an independent NumPy computation, over ranks, and the rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dist_utils import run_distributed
from omegaconf import OmegaConf

from ssl_distill.losses.collapse import collapse_statistics, dino_ce_ratio
from ssl_distill.train.diagnostics import INFO_MIN, PATIENCE, CollapseMonitor, collapse_signs

K, K_IBOT, D = 32, 24, 16


def _data(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "dino": torch.softmax(torch.randn(12, K, generator=g) * 3, -1),
        "cls": torch.randn(12, D, generator=g) + 2.0,  # not centred: the std must be across the batch
        "ibot": torch.softmax(torch.randn(10, K_IBOT, generator=g) * 3, -1),
        "student": torch.randn(10, K_IBOT, generator=g) * 2,
    }


def _entropy(p: np.ndarray) -> np.ndarray:
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def _reference(d: dict[str, torch.Tensor]) -> dict[str, float]:
    """The same statistics written out directly in float64 NumPy."""
    out = {}
    for name, p, k in (("dino", d["dino"].double().numpy(), K), ("ibot", d["ibot"].double().numpy(), K_IBOT)):
        mean_h, batch_h = _entropy(p).mean(), _entropy(p.mean(0))
        out[f"diag_{name}_teacher_entropy"] = mean_h / math.log(k)
        out[f"diag_{name}_teacher_batch_entropy"] = batch_h / math.log(k)
        out[f"diag_{name}_teacher_info"] = (batch_h - mean_h) / math.log(k)
        out[f"diag_{name}_prototypes_used"] = float(len(np.unique(p.argmax(-1))))
    x = d["cls"].double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    out["diag_cls_std"] = float(x.std(axis=0).mean() * math.sqrt(D))
    s = d["student"].double().numpy() / 0.1
    log_softmax = s - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True)) - s.max(1, keepdims=True)
    out["diag_ibot_ce_ratio"] = float(-(d["ibot"].double().numpy() * log_softmax).sum(1).mean() / math.log(K_IBOT))
    return out


def test_statistics_match_an_independent_computation():
    d = _data()
    stats = collapse_statistics(d["dino"], d["cls"], d["ibot"], d["student"], student_temp=0.1)
    ref = _reference(d)
    assert set(stats) == set(ref)
    for key, value in ref.items():
        assert stats[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_statistics_of_the_two_collapse_modes_and_of_a_healthy_teacher():
    n = 16
    uniform = collapse_statistics(torch.full((n, K), 1.0 / K), torch.ones(n, D))
    assert uniform["diag_dino_teacher_entropy"] == pytest.approx(1.0)
    assert uniform["diag_dino_teacher_info"] == pytest.approx(0.0, abs=1e-6)
    assert uniform["diag_cls_std"] == pytest.approx(0.0, abs=1e-6)
    dominant = collapse_statistics(torch.eye(K)[[3] * n], torch.randn(n, D))
    assert dominant["diag_dino_teacher_batch_entropy"] == pytest.approx(0.0, abs=1e-9)
    assert dominant["diag_dino_prototypes_used"] == 1
    healthy = collapse_statistics(torch.eye(K)[:n], torch.randn(n, D))  # one prototype per image
    assert healthy["diag_dino_teacher_info"] == pytest.approx(math.log(n) / math.log(K))
    assert healthy["diag_dino_prototypes_used"] == n
    assert dino_ce_ratio(math.log(K), K) == pytest.approx(1.0)


def _on_rank(rank: int, world_size: int, d: dict[str, torch.Tensor]) -> dict[str, float]:
    ibot_split = (7, 3)  # ranks hold different numbers of masked tokens
    return collapse_statistics(d["dino"].chunk(world_size)[rank], d["cls"].chunk(world_size)[rank],
                               d["ibot"].split(ibot_split)[rank], d["student"].split(ibot_split)[rank])


@pytest.mark.slow
def test_statistics_are_those_of_the_global_batch_on_two_ranks(tmp_path):
    d = _data(1)
    alone = collapse_statistics(d["dino"], d["cls"], d["ibot"], d["student"])
    for result in run_distributed(_on_rank, world_size=2, args=(d,), tmp_path=tmp_path):
        assert set(result) == set(alone)
        for key, value in alone.items():
            assert result[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def _record(info: float, entropy: float = 0.99, std: float = 0.5) -> dict[str, float]:
    return {"diag_dino_teacher_info": info, "diag_dino_teacher_entropy": entropy,
            "diag_dino_teacher_batch_entropy": entropy + info, "diag_dino_prototypes_used": 3.0, "diag_cls_std": std}


def test_signs_name_the_mode():
    assert collapse_signs(_record(0.3, entropy=0.4)) == []
    assert "uniform collapse" in collapse_signs(_record(0.001))[0]
    assert "dominant collapse" in collapse_signs(_record(0.001, entropy=0.01))[0]
    assert "CLS features" in collapse_signs(_record(0.3, entropy=0.4, std=0.001))[0]
    assert collapse_signs({"total_loss": 1.0}) == []  # a record without statistics


def test_monitor_warns_once_after_warmup_and_patience(caplog):
    cfg = OmegaConf.create({"optim": {"warmup_epochs": 1}, "train": {"iters_per_epoch": 20}})
    monitor = CollapseMonitor(cfg)
    bad, good = _record(INFO_MIN / 10), _record(0.3, entropy=0.4)
    assert all(monitor.update(it, bad) is None for it in (10, 20))  # inside the warm-up: not counted
    assert monitor.update(30, bad) is None and monitor.update(40, good) is None  # the streak is broken
    warnings = [monitor.update(it, bad) for it in range(50, 50 + 10 * (PATIENCE + 3), 10)]
    assert [w is not None for w in warnings] == [False] * (PATIENCE - 1) + [True] + [False] * 3
    message = warnings[PATIENCE - 1]
    for key in ("teacher.teacher_temp", "student.layerscale", "optim.base_lr", "dino.head_n_prototypes",
                "configs/small_data.yaml"):
        assert key in message
    assert sum("looks collapsed" in r.getMessage() for r in caplog.records) == 1


def _train(tmp_path, photo_folder, config: str, **overrides: object) -> list[dict]:
    from train_utils import tiny_overrides

    from ssl_distill.config import load_config
    from ssl_distill.train.metrics import read_metrics
    from ssl_distill.train.trainer import Trainer

    cfg = load_config(config, tiny_overrides(photo_folder, **{"optim.epochs": 3, **overrides}))
    Trainer(cfg, tmp_path).run()
    return read_metrics(tmp_path)


@pytest.mark.slow
def test_a_run_made_to_collapse_gets_one_warning(tmp_path, photo_folder, caplog, monkeypatch):
    from train_utils import TINY

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # A teacher at temperature 1 over cosine logits in [-1, 1] is uniform by construction: uniform collapse.
    records = _train(tmp_path, photo_folder, TINY, **{"teacher.teacher_temp": 1.0, "teacher.warmup_teacher_temp": 1.0})
    assert all(r["diag_dino_teacher_info"] < INFO_MIN for r in records)
    warnings = [r.getMessage() for r in caplog.records if "looks collapsed" in r.getMessage()]
    assert len(warnings) == 1 and "uniform collapse" in warnings[0] and "teacher.teacher_temp" in warnings[0]


@pytest.mark.slow
def test_a_healthy_run_does_not_warn(tmp_path, photo_folder, caplog, monkeypatch):
    from train_utils import REPO

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    small = str(REPO / "configs" / "small_data.yaml")
    records = _train(tmp_path, photo_folder, small, **{"train.num_workers": 0})
    assert len(records) == 12 and all(not collapse_signs(r) for r in records)
    assert min(r["diag_dino_teacher_info"] for r in records) > 2 * INFO_MIN
    assert not [r for r in caplog.records if "looks collapsed" in r.getMessage()]

"""Smoke test: every benchmark script runs end to end with tiny sizes and writes its JSON (not a timing test)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_LOADER = ["--batch", "4", "--patch-size", "8", "--global-size", "32", "--local-size", "16", "--local-crops", "2",
               "--images", "8", "--image-size", "64", "48"]


def test_data_loader_benchmark_is_bounded_in_time(tmp_path):
    """With workers: the measurements stay within --budget-s, every worker count gets a row (written as it is
    measured) and its workers are gone before the next count starts; a stalled batch is one clear error."""
    import multiprocessing
    import time

    bench = _load("data_loader")
    t0 = time.perf_counter()
    payload = bench.main(["--device", "cpu", "--workers", "2", "1", "--warmup-s", "5", "--seconds", "20",
                          "--budget-s", "3", "--out-dir", str(tmp_path), *TINY_LOADER])
    rows = payload["rows"]
    assert [r["workers"] for r in rows] == [2, 1]
    assert sum(r["seconds"] for r in rows) < 3.0  # 25 s per count asked, the budget shrinks them
    assert time.perf_counter() - t0 < 60
    assert not multiprocessing.active_children()
    assert json.loads((tmp_path / "data_loader.json").read_text())["rows"] == rows
    with pytest.raises(SystemExit, match="no batch within --batch-timeout-s 0.001 s with 2 workers"):
        bench.main(["--device", "cpu", "--workers", "2", "--batch-timeout-s", "0.001", "--out-dir", str(tmp_path),
                    *TINY_LOADER])


@pytest.mark.slow
def test_benchmark_scripts_run_with_tiny_sizes(tmp_path):
    pytest.importorskip("lightly")
    pytest.importorskip("skimage")
    out = str(tmp_path)
    rows = _load("train_step").main([
        "--arch", "vit_tiny", "--patch-size", "8", "--global-size", "32", "--local-size", "16", "--local-crops", "2",
        "--prototypes", "64", "--batch", "2", "--repeats", "1", "--warmup", "0", "--drop-path", "0",
        "--out-dir", out,
    ])
    assert {r["impl"] for r in rows} == {"lightly+timm", "ours/default"}
    assert all(r["gflop_per_step"] > 0 and r["step_s"] > 0 for r in rows)
    # Same recipe, same work, except what ours skips without stochastic depth: the last block's projection and MLP
    # for the tokens no loss reads (select_patches), a few percent of the step.
    base, ours = rows[0]["gflop_per_step"], rows[1]["gflop_per_step"]
    assert 0.85 * base < ours < base
    _load("data_pipeline").main(["--images", "2", "--repeats", "1", "--local-crops", "2", "--out-dir", out])
    knn_rows = _load("knn").main(["--train", "2000", "--queries", "50", "--repeats", "1", "--out-dir", out])
    assert all(r["top1_agree"] for r in knn_rows)
    tiny = str(BENCH.parent / "configs" / "tiny_cpu.yaml")
    learn_rows = _load("learning").main(["--config", tiny, "--out-dir", out, "--threads", "1", "optim.epochs=1",
                                         "train.iters_per_epoch=2", "optim.warmup_epochs=0",
                                         "train.batch_size_per_gpu=8", "train.log_period=1"])
    names = [r["pipeline"] for r in learn_rows]
    assert names == ["ours", "lightly+timm (same hyper-parameters)", "lightly+timm (example settings)",
                     "random init (ours, same seed)", "raw pixels"]
    assert all(0 <= r["knn20_top1"] <= 100 for r in learn_rows) and learn_rows[-1]["knn20_top1"] > 90
    assert all(r["iterations"] == 2 and r["train_s"] > 0 for r in learn_rows[:3])
    # the shipped small-data recipes have no local crops: the lightly pipeline must run without them too
    no_locals = _load("learning").main(["--config", tiny, "--out-dir", out, "--threads", "1", "--lightly", "same",
                                        "same_our_vit", "--tag", "no_locals", "--seeds", "0,1",
                                        "optim.epochs=1", "train.iters_per_epoch=2", "optim.warmup_epochs=0",
                                        "train.batch_size_per_gpu=8", "crops.local_crops_number=0"])
    assert [r["pipeline"] for r in no_locals][:3] == ["ours", "lightly+timm (same hyper-parameters)",
                                                     "lightly losses + our ViT (same hyper-parameters)"]
    per_seed = json.loads((tmp_path / "learning_no_locals.json").read_text())["rows"]
    assert [r["seed"] for r in per_seed] == [0] * 5 + [1] * 5  # --seeds: every pipeline once per seed ...
    assert all(r["iterations"] == 2 and math.isfinite(r["final_loss"]) for r in per_seed[:3] + per_seed[5:8])
    assert per_seed[0]["final_loss"] != per_seed[5]["final_loss"]  # (another seed, another run)
    for mean, a, b in zip(no_locals, per_seed[:5], per_seed[5:]):  # ... and the mean row of each
        assert mean["seeds"] == "0 1" and mean["pipeline"] == a["pipeline"] == b["pipeline"]
        assert mean["knn20_top1"] == pytest.approx((a["knn20_top1"] + b["knn20_top1"]) / 2)
        assert mean["knn20_min"] == min(a["knn20_top1"], b["knn20_top1"])
    for name in ("train_step_cpu", "data_pipeline", "knn", "learning"):
        payload = json.loads((tmp_path / f"{name}.json").read_text())
        assert payload["rows"]
        assert "environment" in payload


def test_shards_benchmark_counts_file_operations(tmp_path):
    """benchmarks/shards.py with tiny sizes: one open per image for the folder, O(shards) for the shards (counts,
    not times)."""
    rows = _load("shards").main(["--images", "300", "--shard-size", "64KB", "--workers", "2", "--pack-workers", "0",
                                 "--batch", "32", "--no-wids", "--work-dir", str(tmp_path), "--out-dir", str(tmp_path)])
    folder, shards = rows
    assert folder["images"] == shards["images"] == 300
    assert folder["fs_ops_epoch"] >= 300
    assert shards["fs_ops_epoch"] <= 8 * shards["shards"] * 2 < 300
    assert json.loads((tmp_path / "shards.json").read_text())["rows"][1]["data"] == "shards"

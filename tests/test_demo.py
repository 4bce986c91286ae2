"""`ssl-distill demo` end to end (shortened): real digits, real training, k-NN table, outputs on disk."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from train_utils import cli_env


@pytest.mark.slow
def test_demo_pretrained_teacher_beats_random_init(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "ssl_distill.cli", "demo", "--output-dir", str(out), "optim.epochs=4",
           "train.num_workers=0"]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pretrained teacher" in proc.stdout
    assert "random init" in proc.stdout
    results = json.loads((out / "demo_results.json").read_text())
    rows = {r["backbone"]: r for r in results["rows"]}
    random_acc = rows["random init"]["k=20 top-1 (%)"]
    teacher_acc = rows["pretrained teacher"]["k=20 top-1 (%)"]
    # 80 iterations already give a clear gain over the random network (here 72.8 vs 63.0 % at k=20: the Xavier init
    # of the demo's recipe makes the random network's features better than a truncated-normal one's 53 %); a
    # collapsed teacher (uniform or one prototype) stays near the random network, and the demo's own collapse
    # monitor must stay silent.
    assert teacher_acc >= random_acc + 6, rows
    assert results["collapse_warning"] is None
    assert rows["raw pixels (reference)"]["k=20 top-1 (%)"] > 90
    assert (out / "loss_curve.png").stat().st_size > 10_000
    assert (out / "run" / "teacher_backbone.pth").exists()
    assert (out / "run" / "training_metrics.jsonl").exists()
    # a second run in the same directory reuses the finished run instead of training again
    again = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert json.loads((out / "demo_results.json").read_text())["rows"] == results["rows"]

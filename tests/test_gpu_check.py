"""The GPU check's dry run: every step of ``benchmarks/gpu_check.sh`` on the CPU with tiny sizes, end to end.

It proves the one command that the first GPU session will run: the wheel install, the environment report, the CUDA
tests (on the CPU), every train-step benchmark (torch.compile included), the data-loader comparison and the report.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["wheels", "env", "cuda_tests", "step_vits14", "step_vitb14", "step_vitl14", "data_loader", "drop_path",
         "train_e2e", "step_vitl14_compile"]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2")
    env.pop("OUT", None)
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1800)
    log = (tmp_path / "gpu_check.log").read_text() if (tmp_path / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + log[-6000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    assert [s["name"] for s in report["steps"]] == STEPS
    assert all(s["status"] == "ok" for s in report["steps"]), report["steps"]
    tests = report["cuda_tests"]
    assert tests["failed"] == 0, tests
    assert tests["error"] == 0, tests
    assert tests["passed"] >= 10, tests
    assert {t["name"].split("::")[-1].split("[")[0] for t in tests["tests"]} >= {
        "test_attention_kernel_matches_math_on_packed_crops", "test_backbone_kernel_matches_math_with_packed_crops_"
        "and_masks", "test_training_step_bf16_autocast_matches_fp32", "test_fsdp2_matches_ddp_on_one_device",
        "test_train_sigkill_and_resume_is_bit_identical", "test_eval_knn_on_device_matches_cpu"}
    # lightly comes from the carried wheels (make gpu-wheels) or the environment; without it the baseline is skipped
    has_lightly = importlib.util.find_spec("lightly") is not None or any((REPO / ".gpu-wheels").glob("lightly-*"))
    steps = report["train_step"]
    assert set(steps) == {"cpu_vits14", "cpu_vitb14", "cpu_vitl14", "cpu_vitl14_compile"}
    impls = {tag: {r["impl"] for r in payload["rows"]} for tag, payload in steps.items()}
    assert impls["cpu_vitl14"] >= {"ours/default", "ours/math", "ours/no_packed", "ours/checkpointing"}
    assert impls["cpu_vitl14_compile"] == {"ours/default", "ours/compile"}
    assert ("lightly+timm" in impls["cpu_vits14"]) == has_lightly
    for payload in steps.values():
        assert payload["precision"] == "bf16"
        assert all(r["step_s"] > 0 and r["gflop_per_step"] > 0 and 0 < r["mfu"] for r in payload["rows"])
    loader = report["data_loader"]
    assert [r["workers"] for r in loader["rows"]] == [0, 2]
    assert all(r["images_per_s"] > 0 for r in loader["rows"])
    assert {f["arch"] for f in loader["feed"]} == {"vit_tiny"}
    assert [r["rate"] for r in report["drop_path"]["rows"]] == [0.1, 0.3, 0.4]
    assert all(r["subset_s"] > 0 and r["mask_s"] > 0 and r["auto"] == "subset" for r in report["drop_path"]["rows"])
    e2e = report["train_e2e"]["rows"][0]
    assert e2e["arch"] == "vit_tiny"
    assert e2e["images_per_s"] > 0
    assert e2e["step_img_per_s"] > 0
    assert any(t["target"].startswith("vit_tiny: ssl-distill train") for t in report["targets"])
    assert report["profiles"]  # the profiled step's traces are in the output
    assert all((tmp_path / name).read_text().count("Self CPU") >= 1 for name in report["profiles"])
    assert [t["target"] for t in report["targets"]][:2] == ["every CUDA test passes", "ViT-L/14 bf16 MFU >= 45%"]
    assert report["targets"][0]["met"] is True
    assert "## Targets" in (tmp_path / "gpu_check.md").read_text()

"""Fold the GPU check's step records and result files into one JSON and one markdown summary.

gpu_check.sh runs this after every step, so an interrupted check still leaves everything finished so far. Reads from
``--work``: ``steps.jsonl`` (one record per step: name, status, seconds, limit, exit code, note), ``env.json``,
``pytest.xml`` (JUnit), ``train_step_*.json`` and ``data_loader.json``; writes ``gpu_check.json`` and
``gpu_check.md`` to ``--out``. It checks the issue's targets: every CUDA test passes, ViT-L/14 bf16 MFU >= 45 %
(ours, default variant), ours >= 1.3x lightly + timm per architecture. Standard library only (no torch).
"""

from __future__ import annotations

import argparse
import json
import os
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MFU_TARGET, SPEEDUP_TARGET, E2E_TARGET = 0.45, 1.3, 0.9  # issue 25: MFU, ours vs lightly + timm, train vs step


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_steps(work: Path) -> list[dict[str, Any]]:
    try:
        lines = (work / "steps.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def read_junit(path: Path) -> dict[str, Any] | None:
    """Per-test outcome, time and (truncated) message of a pytest JUnit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    tests, counts = [], {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or "") + ("\n" + node.text if node.text and tag != "skipped" else "")
                break
        counts[outcome] += 1
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        tests.append({"name": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                      "time_s": float(case.get("time", 0.0)), "message": message[-1500:], "properties": props})
    return {**counts, "tests": tests}


def targets(tests: dict[str, Any] | None, train_step: dict[str, Any], e2e: dict[str, Any] | None = None
            ) -> list[dict[str, Any]]:
    """The acceptance targets with the measured value and whether each is met (None: not measured)."""
    rows = []
    ok = None if tests is None else tests["failed"] == 0 and tests["error"] == 0 and tests["passed"] > 0
    rows.append({"target": "every CUDA test passes", "value": None if tests is None else
                 f"{tests['passed']} passed, {tests['failed']} failed, {tests['error']} errors, "
                 f"{tests['skipped']} skipped", "met": ok})
    default = {r["arch"]: r for payload in train_step.values() for r in payload.get("rows", [])
               if r["impl"] == "ours/default" and "--no-baseline" not in str(r.get("baseline_missing"))}
    large = default.get("vit_large")
    rows.append({"target": f"ViT-L/14 bf16 MFU >= {MFU_TARGET:.0%}", "value": None if large is None else
                 f"{large['mfu']:.1%}", "met": None if large is None else large["mfu"] >= MFU_TARGET})
    for arch, row in sorted(default.items()):
        speedup = row.get("speedup")
        rows.append({"target": f"{arch}: ours >= {SPEEDUP_TARGET}x lightly + timm",
                     "value": None if speedup is None else f"{speedup:.2f}x", "met": None if speedup is None
                     else speedup >= SPEEDUP_TARGET})
    for row in (e2e or {}).get("rows", []):
        ratio = row.get("e2e_vs_step")
        rows.append({"target": f"{row['arch']}: ssl-distill train >= {E2E_TARGET:.0%} of the step benchmark",
                     "value": None if ratio is None else f"{ratio:.0%}", "met": None if ratio is None
                     else ratio >= E2E_TARGET})
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return lines + ["| " + " | ".join(_fmt(r.get(c)).replace("|", "/").replace("\n", " ") for c in columns) + " |"
                    for r in rows]


def markdown(report: dict[str, Any]) -> str:
    env = report.get("env") or {}
    lines = [f"# GPU check{' (dry run on the CPU)' if report['dry_run'] else ''}", "",
             f"{report['utc']}, {env.get('gpu', 'no GPU')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
             f"Python {env.get('python')}; {report['elapsed_s']} s of a {report['budget_s']} s budget.", "",
             "## Steps", ""]
    lines += _table(report["steps"], ["name", "status", "seconds", "limit_s", "rc", "note"])
    tests = report.get("cuda_tests")
    if tests:
        lines += ["", "## CUDA tests", "", f"{tests['passed']} passed, {tests['failed']} failed, "
                  f"{tests['error']} errors, {tests['skipped']} skipped.", ""]
        lines += _table([t for t in tests["tests"] if t["outcome"] != "passed"], ["name", "outcome", "message"])
        notes = [f"- `{t['name']}`: {k} = {v}" for t in tests["tests"] for k, v in t["properties"].items()]
        lines += ["", "Recorded by the tests:", "", *notes] if notes else []
    for tag, payload in report["train_step"].items():
        lines += ["", f"## Train step `{tag}`", "", f"matmul peak {payload.get('matmul_peak_flops', 0) / 1e12:.1f} "
                  f"TFLOP/s ({payload.get('precision')}), batch {payload.get('args', {}).get('batch')}", ""]
        lines += _table(payload.get("rows", []), ["arch", "impl", "step_s", "img_per_s", "speedup", "mfu",
                                                  "peak_mem_gib", "auto_attention"])
    loader = report.get("data_loader")
    if loader:
        lines += ["", "## Data loader", ""] + _table(loader["rows"], ["workers", "images_per_s",
                                                                     "images_per_s_per_worker", "first_batch_s"])
        if loader.get("feed"):
            lines += [""] + _table(loader["feed"], ["arch", "step_img_per_s", "loader_workers", "loader_img_per_s",
                                                    "feed_ratio", "workers_needed"])
    drop = report.get("drop_path")
    if drop:
        lines += ["", "## Stochastic depth: subset vs mask", ""] + _table(drop["rows"], [
            "rate", "no_drop_s", "subset_s", "mask_s", "subset_vs_mask", "faster", "auto"])
    e2e = report.get("train_e2e")
    if e2e:
        lines += ["", "## End to end: ssl-distill train", ""] + _table(e2e["rows"], [
            "arch", "batch", "workers", "iterations", "images_per_s", "data_time_ms", "step_img_per_s",
            "e2e_vs_step", "peak_memory_gib"])
    profiles = sorted(report.get("profiles", []))
    if profiles:
        lines += ["", "Profiles (top operations per step): " + ", ".join(f"`{p}`" for p in profiles)]
    lines += ["", "## Targets", ""] + _table(report["targets"], ["target", "value", "met"])
    return "\n".join(lines) + "\n"


def build(work: Path, dry_run: bool, budget_s: int, elapsed_s: int) -> dict[str, Any]:
    train_step = {p.stem.removeprefix("train_step_"): _read_json(p) for p in sorted(work.glob("train_step_*.json"))}
    train_step = {k: v for k, v in train_step.items() if v}
    tests = read_junit(work / "pytest.xml")
    e2e = _read_json(work / "train_e2e.json")
    return {"dry_run": dry_run, "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "budget_s": budget_s, "elapsed_s": elapsed_s, "steps": read_steps(work), "env": _read_json(work /
            "env.json"), "cuda_tests": tests, "train_step": train_step,
            "data_loader": _read_json(work / "data_loader.json"), "drop_path": _read_json(work / "drop_path_cuda.json")
            or _read_json(work / "drop_path_cpu.json"), "train_e2e": e2e,
            "profiles": [p.name for p in work.glob("profile_*.txt")], "targets": targets(tests, train_step, e2e)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--budget-s", type=int, default=0)
    p.add_argument("--elapsed-s", type=int, default=0)
    args = p.parse_args(argv)
    report = build(Path(args.work), args.dry_run, args.budget_s, args.elapsed_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps(report, indent=2) + "\n"), ("gpu_check.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return report


if __name__ == "__main__":
    main()

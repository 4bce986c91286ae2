"""Does it learn? ssl_distill vs a lightly + timm pipeline: same data, architecture, crops, batch and iterations.

Pretrains on the bundled handwritten digits (scikit-learn's real 8x8 scans upsampled to 32 px: 1,200 train
images used without labels, 500 held out) with a config of ours (default ``configs/small_data.yaml``), then
scores every teacher with weighted k-NN (k = 10 and 20, T = 0.07; the 1,200 labelled train digits are the memory
bank, the 500 held-out digits the queries) on the last block's normalised CLS token. Rows:

* ``ours``: :class:`ssl_distill.train.trainer.Trainer` (its ``step``, with the collapse diagnostics and monitor);
* ``lightly+timm (same hyper-parameters)``: :class:`lightly_baseline.LightlyDINOv2` (lightly's DINOv2 example:
  timm ViT, lightly heads and losses) fed our per-iteration lr / weight decay / momentum / teacher temperature,
  our LayerScale init, head sizes and loss weights. What lightly does not expose stays lightly's: centring (no
  Sinkhorn-Knopp), no layer-wise lr decay, no last-layer freeze, a 3-layer head;
* ``lightly+timm (example settings)``: the example's own schedule: AdamW lr 1e-3 constant, weight decay 0.04 ->
  0.4 and momentum 0.992 -> 1 (cosine), teacher temperature 0.04 -> 0.07 over the first 60 % of the steps,
  LayerScale 1e-5, KoLeo 0.1, iBOT 1;
* ``lightly losses + our ViT (same hyper-parameters)`` (``--lightly same_our_vit``, not run by default): the
  ``same`` row with our backbone (same initial weights as ``ours``) in place of timm's, which tells whether a gap
  between the first two rows comes from the backbone or from the losses, EMA and optimiser code;
* ``random init``: our backbone as it starts (same seed); ``raw pixels``: the k-NN on centred pixels.

Both pipelines see **the same batches** (crops and iBOT masks from our loader) and run interleaved in one process
(ours, lightly, ours, ...), so a drift in machine load hits both; the wall-clock of each is the sum of its own
steps (data loading, shared, is reported apart).

    .venv/bin/python benchmarks/learning.py                                    # the comparison (~15 min, 2 cores)
    .venv/bin/python benchmarks/learning.py --skip-lightly optim.epochs=5      # ours only, shorter
    .venv/bin/python benchmarks/learning.py --seeds 0,1,2                      # 3 runs each, mean and spread

Extra ``key=value`` arguments override the config. Writes ``benchmarks/results/learning[_TAG].json``.
Needs ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import print_table, write_json  # noqa: E402

from ssl_distill.config import load_config  # noqa: E402
from ssl_distill.data.pipeline import build_train_loader  # noqa: E402
from ssl_distill.demo import TRAIN_PER_CLASS, VAL_PER_CLASS, pixel_knn  # noqa: E402
from ssl_distill.eval.data import load_labelled_datasets  # noqa: E402
from ssl_distill.eval.knn import knn_accuracy  # noqa: E402
from ssl_distill.eval.transforms import make_eval_transform  # noqa: E402
from ssl_distill.models import backbone_from_config  # noqa: E402
from ssl_distill.train.trainer import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KS = (10, 20)
LIGHTLY_RECIPES = ("same", "example", "same_our_vit")
LIGHTLY_LABELS = {"same": "lightly+timm (same hyper-parameters)", "example": "lightly+timm (example settings)",
                  "same_our_vit": "lightly losses + our ViT (same hyper-parameters)"}


def _cosine(start: float, end: float, it: int, total: int) -> float:
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * it / total))


class LightlyRun:
    """The lightly + timm pipeline with one of :data:`LIGHTLY_RECIPES` (see the module docstring)."""

    def __init__(self, cfg: Any, recipe: str, total_iters: int) -> None:
        from lightly_baseline import LightlyDINOv2

        same = recipe in ("same", "same_our_vit")
        backbone = None
        if recipe == "same_our_vit":
            torch.manual_seed(cfg.train.seed)  # the initial weights of ``ours``
            backbone = backbone_from_config(cfg)
        torch.manual_seed(cfg.train.seed)
        self.model = LightlyDINOv2(
            cfg.student.arch, cfg.student.patch_size, cfg.crops.global_crops_size, cfg.dino.head_n_prototypes,
            cfg.dino.head_hidden_dim, cfg.dino.head_bottleneck_dim, cfg.student.drop_path_rate,
            depth=cfg.student.depth or None, init_values=cfg.student.layerscale if same else 1e-5,
            ibot_weight=cfg.ibot.loss_weight if same else 1.0,
            koleo_weight=cfg.dino.koleo_loss_weight if same else 0.1, backbone=backbone,
        )
        self.optimizer = self.model.build_optimizer()
        self.recipe, self.total = recipe, total_iters
        self.clip = cfg.optim.clip_grad

    def step(self, batch: dict[str, Any], it: int, ours: dict[str, float]) -> float:
        """One step at iteration ``it``; ``ours`` holds our schedule values at ``it`` (used by ``same``)."""
        if self.recipe != "example":
            lr, wd, momentum, temp = ours["lr"], ours["wd"], ours["momentum"], ours["teacher_temp"]
        else:
            lr, wd = 1e-3, _cosine(0.04, 0.4, it, self.total)
            momentum = _cosine(0.992, 1.0, it, self.total)
            warm = max(1, int(0.6 * self.total))
            temp = 0.04 + (0.07 - 0.04) * min(it, warm) / warm
        decay, no_decay = self.optimizer.param_groups
        decay["lr"] = no_decay["lr"] = lr
        decay["weight_decay"] = wd
        return self.model.step(batch, self.optimizer, teacher_temp=temp, momentum=momentum, clip_grad=self.clip)

    def teacher_features(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> the teacher's normalised CLS tokens ``(B, D)``."""
        return self.model.teacher_backbone(images)


def train_both(cfg: Any, out_dir: Path, lightly_recipes: list[str]) -> tuple[Trainer, dict[str, LightlyRun], dict]:
    """Train ours and every lightly recipe on the same batches, interleaved; returns the runs and the timings."""
    trainer = Trainer(cfg, out_dir / "ours", resume=False)
    total = trainer.total_iters
    others = {r: LightlyRun(cfg, r, total) for r in lightly_recipes}
    # batches are made in this process (num_workers 0) and timed apart: with loader workers, the workers refill
    # their prefetch queue while the first pipeline of each iteration runs and take its cores (2 here), so the
    # pipeline stepped first would pay for the data loading of all of them
    cfg.train.num_workers = 0
    loader = iter(build_train_loader(cfg, trainer.dataset, 0, pin_memory=False))
    seconds = {"data": 0.0, "ours": 0.0, **{f"lightly_{r}": 0.0 for r in others}}
    final_loss: dict[str, float] = {}
    trainer.meta.train()
    for it in range(total):
        t0 = time.perf_counter()
        batch = next(loader)
        seconds["data"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        record = trainer.step(batch, it)
        if trainer._logs_after(it + 1):  # losses are read on log steps only (the step never waits for them)
            trainer.collapse.update(it + 1, record)
            final_loss["ours"] = record["total_loss"]
        seconds["ours"] += time.perf_counter() - t0
        for name, run in others.items():
            t0 = time.perf_counter()
            final_loss[f"lightly_{name}"] = run.step(batch, it, record)
            seconds[f"lightly_{name}"] += time.perf_counter() - t0
        if (it + 1) % 50 == 0 or it + 1 == total:
            print(f"[it {it + 1}/{total}] " + " ".join(f"{k} {v:.0f}s" for k, v in seconds.items()), flush=True)
    return trainer, others, {"seconds": seconds, "final_loss": final_loss, "iterations": total}


@torch.no_grad()
def knn_of(features: Callable[[Tensor], Tensor], data: tuple[Path, Path], size: int) -> dict[int, float]:
    """Weighted k-NN top-1 (%) of ``features`` (images -> ``(B, D)``) on the digits, per k in :data:`KS`."""
    transform = make_eval_transform(size)
    train, val = load_labelled_datasets(str(data[0]), str(data[1]), transform, transform)
    feats = []
    for ds in (train, val):
        loader = torch.utils.data.DataLoader(ds, batch_size=256, shuffle=False)
        xs, ys = zip(*((features(x).float(), y) for x, y in loader))
        feats.append((torch.cat(xs), torch.cat(ys)))
    acc = knn_accuracy(feats[0][0], feats[0][1], feats[1][0], feats[1][1], ks=KS, temperature=0.07,
                       num_classes=len(train.classes))
    return {k: acc[k]["top1"] for k in KS}


def _eval_features(module: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    module.eval()
    return lambda x: module.forward_features(x)["x_norm_clstoken"]


def evaluate(cfg: Any, trainer: Trainer, others: dict[str, LightlyRun], timing: dict, data: tuple[Path, Path],
             random_backbone: torch.nn.Module) -> list[dict[str, Any]]:
    """The result table: one row per teacher, then random init and raw pixels."""
    size, iters = cfg.crops.global_crops_size, timing["iterations"]
    rows = []

    def row(name: str, acc: dict[int, float], key: str | None = None) -> dict[str, Any]:
        r = {"pipeline": name, **{f"knn{k}_top1": acc[k] for k in KS}}
        if key is not None:
            t = timing["seconds"][key]
            r.update(iterations=iters, train_s=t, s_per_iteration=t / iters, final_loss=timing["final_loss"][key])
        return r

    rows.append(row("ours", knn_of(_eval_features(trainer.meta.teacher.backbone), data, size), "ours"))
    rows[-1]["collapse_warning"] = trainer.collapse.warning or ""
    for name, run in others.items():
        run.model.eval()
        rows.append(row(LIGHTLY_LABELS[name], knn_of(run.teacher_features, data, size), f"lightly_{name}"))
    rows.append(row("random init (ours, same seed)", knn_of(_eval_features(random_backbone), data, size)))
    rows.append(row("raw pixels", pixel_knn(data, KS)))
    ours_t = timing["seconds"]["ours"]
    for r in rows:
        if "train_s" in r:
            r["time_vs_ours"] = r["train_s"] / ours_t
    return rows


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "small_data.yaml"), help="our config file")
    p.add_argument("--lightly", nargs="*", default=["same", "example"], choices=LIGHTLY_RECIPES,
                   help="lightly+timm recipes to run next to ours")
    p.add_argument("--skip-lightly", action="store_true", help="train ours only")
    p.add_argument("--work-dir", default=None, help="where the digits and our run go (default: a temp dir)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    p.add_argument("--tag", default="", help="suffix of the JSON file name")
    p.add_argument("--seeds", type=_int_list, default=None,
                   help="comma-separated train.seed values, e.g. 0,1,2 (default: the config's); with several, "
                        "every pipeline is trained once per seed and the table adds its mean and spread (on the "
                        "digits a 500-iteration run of ours moved by up to 6 points with the seed)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from ssl_distill.data.digits import write_digits_folders

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    rows, data_time = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        data = write_digits_folders(work / "digits", TRAIN_PER_CLASS, VAL_PER_CLASS)
        for seed in args.seeds or [None]:
            seed_args = [] if seed is None else [f"train.seed={seed}"]
            cfg = load_config(args.config, [f"train.dataset_path={data[0]}", "train.checkpoint_period=1000000",
                                            *args.overrides, *seed_args])
            torch.manual_seed(cfg.train.seed)  # the Trainer draws the student's initial weights the same way
            random_backbone = backbone_from_config(cfg)
            run_dir = work if seed is None else work / f"seed{seed}"
            trainer, others, timing = train_both(cfg, run_dir, [] if args.skip_lightly else args.lightly)
            seed_rows = evaluate(cfg, trainer, others, timing, data, random_backbone)
            rows += [{**r, "seed": cfg.train.seed} for r in seed_rows]
            data_time += timing["seconds"]["data"]
            if seed_rows[0]["collapse_warning"]:
                print(f"ours (seed {cfg.train.seed}): {seed_rows[0]['collapse_warning']}")
    columns = ["pipeline", "seed", "knn10_top1", "knn20_top1", "iterations", "train_s", "s_per_iteration",
               "time_vs_ours"]
    print_table(rows, columns)
    means = mean_rows(rows) if len(args.seeds or []) > 1 else []
    if means:
        print_table(means, ["pipeline", "seeds", "knn10_top1", "knn20_top1", "knn20_min", "knn20_max",
                            "s_per_iteration", "time_vs_ours"])
    name = "learning" + (f"_{args.tag}" if args.tag else "")
    write_json(name, {"args": vars(args), "config": args.config, "overrides": args.overrides,
                      "load_average_at_start": load, "data_time_s": data_time, "rows": rows, "means": means},
               args.out_dir)
    return means or rows


def mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per pipeline (in first-seen order): the mean over seeds of its k-NN and timing columns, with the
    smallest and largest k-NN@20 and the seeds."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_name.setdefault(r["pipeline"], []).append(r)
    out = []
    for name, group in by_name.items():
        m: dict[str, Any] = {"pipeline": name, "seeds": " ".join(str(r["seed"]) for r in group)}
        for key in ("knn10_top1", "knn20_top1", "train_s", "s_per_iteration", "time_vs_ours"):
            if key in group[0]:
                m[key] = sum(r[key] for r in group) / len(group)
        m["knn20_min"] = min(r["knn20_top1"] for r in group)
        m["knn20_max"] = max(r["knn20_top1"] for r in group)
        out.append(m)
    return out


if __name__ == "__main__":
    main()

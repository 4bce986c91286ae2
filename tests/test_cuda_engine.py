"""The training engine and evaluation on CUDA: FSDP2 against DDP on one GPU, SIGKILL + resume, eval-knn vs CPU.

Marked ``cuda`` (see ``cuda_utils.py``): skipped without a GPU; ``SSL_DISTILL_CUDA_TESTS_ON_CPU=1`` runs them on the
CPU for the GPU check's dry run (DDP/FSDP2 then use gloo, and eval-knn compares the CPU with itself).
"""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from cuda_utils import cuda_test_device, nondeterminism_warnings, run_cli_deterministic
from dist_utils import free_port
from train_utils import TINY, tiny_overrides

from ssl_distill.cli import main
from ssl_distill.config import load_config
from ssl_distill.data.digits import write_digits_folders
from ssl_distill.data.pipeline import build_train_loader
from ssl_distill.eval.args import KNN_RESULTS
from ssl_distill.eval.knn import knn_few_shot
from ssl_distill.train.checkpoint import find_latest_checkpoint, load_checkpoint
from ssl_distill.train.metrics import read_metrics
from ssl_distill.train.trainer import Trainer

pytestmark = pytest.mark.cuda

LOSS_KEYS = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "total_loss")


@pytest.fixture
def device() -> torch.device:
    return cuda_test_device()


def _losses(out: Path) -> list[tuple[int, tuple[float, ...]]]:
    return [(r["iteration"], tuple(r[k] for k in LOSS_KEYS)) for r in read_metrics(out)]


def _three_iterations(photo_folder: str, device: torch.device, **extra: object) -> list[str]:
    return tiny_overrides(photo_folder, **{"train.device": device.type, "train.iters_per_epoch": 3,
                                           "optim.epochs": 1, "train.checkpoint_period": 1, **extra})


@pytest.fixture
def single_process_group(device: torch.device):
    """A one-process ``torch.distributed`` group (NCCL on CUDA, gloo on the CPU)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp2_matches_ddp_on_one_device(tmp_path, photo_folder, device, single_process_group) -> None:
    """Three training iterations wrapped in DDP and in FSDP2 (``fully_shard`` per block, one-device mesh), in the
    same process, from the same seed and data, with the trainer's own precision (bf16 autocast on CUDA).

    Both run the same kernels on the same tensors; they differ in where parameters live (DTensor shards gathered
    into a flat buffer) and in the order of the gradient-norm reduction (FSDP2 combines per-shard norms). Those
    orders change the last bits of the clip factor only, so losses and weights must agree to fp32 rounding over
    three steps: rtol 1e-5, and atol 1e-6 on the weights (1 % of one AdamW update at the tiny config's lr).
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    runs = {}
    for sharding in ("ddp", "fsdp"):
        cfg = load_config(TINY, _three_iterations(photo_folder, device, **{
            "train.sharding": sharding, "student.layerscale": 1.0, "train.checkpoint_period": 100}))
        trainer = Trainer(cfg, tmp_path / sharding)
        if sharding == "ddp":
            assert isinstance(trainer.meta._student_fwd["backbone"], DistributedDataParallel)
        else:
            assert isinstance(trainer.meta.student.backbone.blocks[0], FSDPModule)
        trainer.run()
        runs[sharding] = (_losses(tmp_path / sharding), load_checkpoint(find_latest_checkpoint(tmp_path / sharding)))
    (ddp_losses, ddp_state), (fsdp_losses, fsdp_state) = runs["ddp"], runs["fsdp"]
    assert [i for i, _ in fsdp_losses] == [i for i, _ in ddp_losses] == [1, 2, 3]
    for (_, a), (_, b) in zip(fsdp_losses, ddp_losses):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert fsdp_state["model"].keys() == ddp_state["model"].keys()
    for key, value in ddp_state["model"].items():
        torch.testing.assert_close(fsdp_state["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_train_sigkill_and_resume_is_bit_identical(tmp_path, photo_folder, device, record_property) -> None:
    """``ssl-distill train`` for 3 iterations, and the same run SIGKILLed right after its iteration-2 checkpoint
    lands, then resumed: every loss of every iteration and every final weight equal bit for bit.

    Deterministic settings (``cuda_utils.RUNNER``): ``torch.use_deterministic_algorithms(True, warn_only=True)``,
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, ``cudnn.benchmark=False``; the data order and every random draw of a step
    are seeded by position, and the checkpoint holds the CUDA RNG states.

    Where CUDA determinism does not reach, the equality cannot be bitwise: PyTorch warns for each op that has no
    deterministic CUDA kernel (the bicubic resampling of the position embedding for the local crops is one: its
    backward accumulates with atomic adds). Those ops are recorded (the junit property ``nondeterministic_ops``, shown
    in the GPU check's report) and the runs must then agree to fp32 rounding: summation order changes the affected
    gradients by ~1e-7 relative, which three AdamW steps (sign-like updates early on) keep far below rtol 1e-5.
    """
    overrides = _three_iterations(photo_folder, device)
    ref_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"

    def train(out: Path, kill_after: str | None = None):
        return run_cli_deterministic(["train", "--config-file", TINY, "--output-dir", str(out), *overrides],
                                     kill_after=kill_after)

    ref = train(ref_dir)
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = train(killed_dir, kill_after="model_0000002.pth")
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    assert (killed_dir / "model_0000002.pth").exists()
    assert not (killed_dir / "teacher_backbone.pth").exists()
    resumed = train(killed_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    warnings = nondeterminism_warnings(ref, killed, resumed)
    record_property("nondeterministic_ops", "; ".join(warnings) or "none")
    got, want = _losses(killed_dir), _losses(ref_dir)
    assert [i for i, _ in got] == [i for i, _ in want] == [1, 2, 3]
    a = load_checkpoint(find_latest_checkpoint(ref_dir))["model"]
    b = load_checkpoint(find_latest_checkpoint(killed_dir))["model"]
    assert a.keys() == b.keys()
    if not warnings:  # everything ran deterministically: bit for bit
        assert got == want
        differing = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differing, f"weights differ after resume: {differing[:5]}"
        return
    for (_, x), (_, y) in zip(got, want):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6), warnings
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"{key}; {warnings}")


def _knn(tmp_path: Path, name: str, device: str, autocast: str, train_dir: Path, val_dir: Path) -> tuple[dict, dict]:
    """``ssl-distill eval-knn`` of a seeded random tiny ViT; returns the results and the cached features."""
    out, cache = tmp_path / name, tmp_path / f"{name}_cache"
    assert main(["eval-knn", "--config-file", TINY, "--pretrained-weights", "random", "--train-dataset",
                 str(train_dir), "--val-dataset", str(val_dir), "--output-dir", str(out), "--image-size", "32",
                 "--num-workers", "0", "--batch-size", "64", "--device", device, "--autocast", autocast,
                 "--nb-knn", "1", "5", "20", "--cache-dir", str(cache)]) == 0
    results = json.loads((out / KNN_RESULTS).read_text())["results"]
    feats = {p.name: torch.load(p, weights_only=True) for p in sorted(cache.glob("features_*.pt"))}
    return results, dict(zip(("train", "val"), sorted(feats.values(), key=lambda f: -len(f["labels"]))))


def _top1(results: dict) -> dict[str, float]:
    return {f"{shots}/{k}": v["top1"] for shots, per_k in results.items() for k, v in per_k.items()}


def test_eval_knn_on_device_matches_cpu(tmp_path, device) -> None:
    """eval-knn of the same (seeded random) backbone on the device and on the CPU.

    The k-NN itself is device-independent: on the features the device extracted, the device's k-NN (float64
    similarities on the device) equals the CPU's exactly. Across devices only the features are compared: in fp32
    they agree to rounding (rtol 1e-4), under bf16 autocast to cosine >= 0.999. The accuracies are *not* compared
    across devices: this random ViT's CLS features are collinear to ~1e-9 (the nearest and second-nearest train
    image of every val image differ in similarity by 1e-13 ... 1e-11, measured on the CPU), so a ~1e-6 feature
    difference may reorder the neighbours of any of the 50 val images (on an H200, 2 of 50 k=1 decisions flipped).
    """
    train_dir, val_dir = write_digits_folders(tmp_path / "digits", 12, 5)
    cpu_results, cpu_feats = _knn(tmp_path, "cpu", "cpu", "none", train_dir, val_dir)
    dev_results, dev_feats = _knn(tmp_path, "fp32", str(device), "none", train_dir, val_dir)
    bf16_results, bf16_feats = _knn(tmp_path, "bf16", str(device), "bf16", train_dir, val_dir)
    n_val = len(cpu_feats["val"]["labels"])
    assert n_val == 50
    for split in ("train", "val"):
        torch.testing.assert_close(dev_feats[split]["cls"], cpu_feats[split]["cls"], rtol=1e-4, atol=1e-5)
        cos = torch.nn.functional.cosine_similarity(bf16_feats[split]["cls"].float().flatten(1),
                                                    cpu_feats[split]["cls"].flatten(1))
        assert float(cos.min()) >= 0.999, (split, float(cos.min()))
    for results, feats in ((dev_results, dev_feats), (bf16_results, bf16_feats), (cpu_results, cpu_feats)):
        on_cpu = knn_few_shot(feats["train"]["cls"][:, -1], feats["train"]["labels"], feats["val"]["cls"][:, -1],
                              feats["val"]["labels"], [1, 5, 20], 0.07, [-1], 1, device="cpu")
        assert results == on_cpu
    assert _top1(cpu_results).keys() == _top1(dev_results).keys() == _top1(bf16_results).keys()


@pytest.mark.parametrize("mode", ["subset", "mask"])
def test_training_steps_never_wait_for_the_device(tmp_path, photo_folder, device, mode) -> None:
    """Steps that end no log period run under ``torch.cuda.set_sync_debug_mode("error")``: any host-device
    synchronisation in them (a value read, a blocking copy, ``nonzero``) raises. Stochastic depth 0.3 in both
    execution modes; bf16 autocast as in the recipe. On the CPU (dry run) the mode does not exist: the steps just
    run, and ``tests/test_static_step.py`` checks the same on the meta device."""
    cfg = load_config(TINY, tiny_overrides(photo_folder, **{
        "train.device": device.type, "train.log_period": 100, "train.iters_per_epoch": 100,
        "student.drop_path_rate": 0.3, "student.drop_path_mode": mode, "train.num_workers": 2}))
    trainer = Trainer(cfg, tmp_path)
    try:
        trainer.meta.train()
        loader = build_train_loader(cfg, trainer.dataset, 0, pin_memory=device.type == "cuda")
        batches = iter(loader)
        trainer.step(next(batches), 0)  # first step: lazy initialisation (cuBLAS handles, optimizer state)
        for it in range(1, 4):
            batch = next(batches)
            guard = contextlib.nullcontext()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                guard = _sync_debug_error()
            with guard:
                record = trainer.step(batch, it)
            assert "total_loss" not in record  # a non-log step reads no loss
        trainer._check_finite()
    finally:
        trainer.close()


@contextlib.contextmanager
def _sync_debug_error():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")

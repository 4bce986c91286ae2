"""The training loop, top to bottom: data -> step -> EMA -> log -> checkpoint.

    trainer = Trainer(cfg, output_dir)        # builds everything, resumes from output_dir when it holds a checkpoint
    summary = trainer.run()                   # trains to cfg.optim.epochs * cfg.train.iters_per_epoch iterations

Determinism: every random draw of a step — a sample's crops and masks, the student's stochastic depth — is a
function of (seed, the sample's global position in the stream, crop, block), and the sampler restarts at the exact
sample, so no RNG state is saved: on CPU a run that is killed and resumed continues with bit-identical losses
(any ``train.num_workers``), and runs on 1 or N processes see the same global batches and the same draws.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ssl_distill import distributed
from ssl_distill.config import config_to_yaml, save_config
from ssl_distill.data.pipeline import build_train_dataset, build_train_loader
from ssl_distill.train import checkpoint as ckpt
from ssl_distill.train.arch_base import StudentTeacherArch
from ssl_distill.train.diagnostics import CollapseMonitor, DivergenceWatch
from ssl_distill.train.loader_watch import ChildWatch, LoaderFailed
from ssl_distill.train.meta_arch import SSLMetaArch
from ssl_distill.train.metrics import MetricsWriter
from ssl_distill.train.monitor import KnnMonitor
from ssl_distill.train.optim import apply_optim_schedule, build_optimizer, param_groups
from ssl_distill.train.resume_config import check_resumed_config, keep_previous_config
from ssl_distill.train.run_dir import check_room_for_a_checkpoint, prepare_output_dir, take_run_lock
from ssl_distill.train.schedules import apply_scaling_rules, build_schedules
from ssl_distill.train.setup import resolve_precision, wrap_for_distributed
from ssl_distill.train.state import gather_state, restore_state, resume_position

logger = logging.getLogger(__name__)
TEACHER_EXPORT = "teacher_backbone.pth"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(Exception):
    """A stop was requested (a signal: preemption, time limit, SIGTERM, Ctrl-C); a checkpoint of the current
    iteration was saved. ``reason``: what asked for the stop first (e.g. ``"SIGTERM"``)."""

    def __init__(self, iteration: int, checkpoint: Path | None, reason: str = "") -> None:
        super().__init__(f"stopped at iteration {iteration} ({reason or 'stop requested'}); checkpoint {checkpoint}")
        self.iteration, self.checkpoint, self.reason = iteration, checkpoint, reason


def build_arch(cfg: DictConfig, load_pretrained: bool = True) -> StudentTeacherArch:
    """The training architecture of ``train.mode``: self-distillation (pretrain) or a frozen teacher (distill).
    ``load_pretrained``: start the student from ``student.pretrained_weights`` (False when a checkpoint follows)."""
    if cfg.train.mode == "distill":
        from ssl_distill.train.distill_arch import DistillMetaArch

        return DistillMetaArch(cfg, load_pretrained=load_pretrained)
    return SSLMetaArch(cfg, load_pretrained=load_pretrained)


class Trainer:
    """One pretraining run in ``output_dir`` (see the module docstring)."""

    def __init__(self, cfg: DictConfig, output_dir: str | os.PathLike, resume: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.env = distributed.init_distributed()
        self.world = distributed.get_world_size()
        self._lock = take_run_lock(self.output_dir)
        try:
            self._build(cfg, resume)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: DictConfig, resume: bool) -> None:
        self.dataset = build_train_dataset(cfg)
        self.device = distributed.resolve_device(cfg.train.device, self.env.local_rank)
        apply_scaling_rules(cfg, self.world)
        cfg.train.output_dir = str(self.output_dir)
        self.cfg = cfg
        self.total_iters = cfg.optim.epochs * cfg.train.iters_per_epoch
        self.global_batch = cfg.train.batch_size_per_gpu * self.world
        self.stop_requested = False  # set by request_stop() (signal handlers: train.signals.StopOnSignals)
        self.stop_reason = ""
        self._host_group = distributed.new_host_group()  # stop agreement on the CPU: no device sync per step
        self.divergence = DivergenceWatch()
        resume_from = self._find_resume(resume)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.meta = build_arch(cfg, load_pretrained=resume_from is None).to(self.device)
        self.meta.autocast_dtype = resolve_precision(cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.meta.autocast_dtype == torch.float16 else None
        wrap_for_distributed(self.meta, cfg, self.device)  # before the optimizer: FSDP2 swaps in DTensor params
        groups = []
        for name, module in self.meta.student.items():
            groups += param_groups(module, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult, name == "backbone")
        self.optimizer = build_optimizer(groups, (cfg.optim.adamw_beta1, cfg.optim.adamw_beta2), self.device)
        self.schedules = build_schedules(cfg)
        self.monitor = KnnMonitor(cfg) if KnnMonitor.enabled(cfg) else None
        self.collapse = CollapseMonitor(cfg)
        self.last_checkpoint: Path | None = None
        self._config_changed = False  # set by _restore: resumed with another config than the checkpoint's
        self.start_iter = self._restore(resume_from)
        self._check_room_for_a_checkpoint()
        if distributed.is_main_process():
            logger.info("config:\n%s", config_to_yaml(cfg))
            if self._config_changed:
                keep_previous_config(self.output_dir, self.start_iter)
            save_config(cfg, self.output_dir / "config.yaml")

    def _check_room_for_a_checkpoint(self) -> None:
        """Fail now, not at the first checkpoint hours later, when the disk cannot hold one (rank 0 writes)."""
        if distributed.is_main_process():
            check_room_for_a_checkpoint(self.meta, ckpt.checkpoint_path(self.output_dir, self.total_iters))

    def request_stop(self, reason: str = "") -> None:
        """Ask the loop to checkpoint the current iteration and raise :class:`TrainingInterrupted` (``reason``, e.g.
        the signal's name, is passed on; the first request's reason wins).

        Safe to call from a signal handler. Ranks may receive their signals at different iterations; they agree
        (all-reduce) at the next iteration boundary, so every rank stops at the same iteration.
        """
        if not self.stop_requested:
            self.stop_reason = reason
        self.stop_requested = True

    def _stop_agreed(self) -> bool:
        """Whether any rank asked to stop (a CPU all-reduce on the host group: no device synchronisation)."""
        flag = torch.tensor([1.0 if self.stop_requested else 0.0])
        return bool(distributed.all_reduce_sum(flag, group=self._host_group).item() > 0)

    def close(self) -> None:
        """Release the output directory's run lock (done by :meth:`run` on any exit)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _find_resume(self, resume: bool) -> Path | None:
        """The newest intact checkpoint of this run in the output directory (rank 0 chooses and keeps its state;
        every rank learns the choice), or None to start fresh. Rank 0 also removes temp files of interrupted writes,
        settles the run's identity (:mod:`~ssl_distill.train.run_identity`: another run's checkpoint is refused)
        and, when starting over, moves an earlier run's files aside."""
        self._resume_state, self.run_id = None, None
        choice: tuple[str, str | None] = ("ok", None)
        if distributed.is_main_process():
            try:
                found, self.run_id = prepare_output_dir(self.output_dir, resume)
                self._resume_state = found[1] if found else None
                choice = ("ok", found[0].name if found else None)
            except ckpt.CheckpointError as exc:
                choice = ("error", str(exc))
        status, value = distributed.broadcast_object(choice)
        if status == "error":
            raise ckpt.CheckpointError(value)
        return self.output_dir / value if value is not None else None

    def _restore(self, path: Path | None) -> int:
        """Load the full training state of ``path`` into model, optimizer and scaler on every rank; the iteration
        to start from (0 without a checkpoint)."""
        self.start_position = 0  # the data stream's next sample (resume_position: from the checkpoint)
        if path is None:
            return 0
        state = self._resume_state if self._resume_state is not None else ckpt.load_checkpoint(path)
        self._resume_state = None
        self._config_changed = check_resumed_config(state.get("config"), self.cfg, path, int(state["iteration"]))
        restore_state(self.meta, self.optimizer, self.scaler, state)
        self.start_position = resume_position(state, self.global_batch)
        self.last_checkpoint = path
        logger.info("resumed from %s at iteration %d", path, state["iteration"])
        return int(state["iteration"])

    def _check_finite(self) -> None:
        """Raise :class:`TrainingDiverged` if a loss since the start was NaN or infinite (a collective sync)."""
        bad = self.divergence.first_bad()
        if bad is not None:
            raise TrainingDiverged(
                f"loss is not finite (NaN or inf) at iteration {bad} (the first such step); the last good "
                f"checkpoint is {self.last_checkpoint or 'none (no checkpoint written yet)'} and was left untouched. "
                "Lower "
                "optim.base_lr or optim.clip_grad, or use train.precision=bf16 instead of fp16."
            )

    def save(self, iteration: int) -> Path | None:
        """Checkpoint of the state *before* ``iteration`` runs (collective; rank 0 writes); never the state after a
        non-finite loss (:class:`TrainingDiverged` instead)."""
        self._check_finite()
        position = self.start_position + (iteration - self.start_iter) * self.global_batch
        state = gather_state(self.meta, self.optimizer, self.scaler, iteration, position, config_to_yaml(self.cfg))
        path = None
        if state is not None:
            state["run_id"] = self.run_id
            path = ckpt.save_checkpoint(self.output_dir, state, keep_last=self.cfg.train.keep_last_checkpoints)
            self.last_checkpoint = path
        distributed.barrier()
        return path

    def step(self, batch: dict[str, Any], it: int) -> dict[str, float]:
        """One optimisation step at iteration ``it``; returns the schedule values and, when the step ends a log
        period, the rank-averaged losses. Only then does the host wait for the device (fp32/bf16; fp16's loss
        scaler checks its gradients every step): the other steps queue their work and return."""
        values = self.schedules.at(it)
        apply_optim_schedule(self.optimizer, values["lr"], values["wd"], values["last_layer_lr"],
                             values["backbone_lr_factor"])
        self.optimizer.zero_grad(set_to_none=True)
        logs = self._logs_after(it + 1)
        losses = self.meta.forward_backward(batch, values["teacher_temp"], self.scaler, diagnostics=logs)
        self.divergence.watch(losses["total_loss"], it)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.clip_grad > 0:
            self.meta.clip_gradients(self.cfg.optim.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.meta.update_teacher(values["momentum"])
        if not logs:
            return dict(values)
        self._check_finite()
        stacked = distributed.all_reduce_mean(torch.stack(list(losses.values())).float())
        return {**dict(zip(losses, stacked.tolist())), **values}

    def run(self) -> dict[str, Any]:
        """Train from ``start_iter`` to the end; returns a summary. Raises TrainingInterrupted on a stop request.
        The output directory's run lock is released on any exit."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        loader = build_train_loader(cfg, self.dataset, self.start_position, self.device.type == "cuda")
        metrics = MetricsWriter(self.output_dir, self.start_iter, enabled=distributed.is_main_process())
        data_iter = iter(loader)
        children = ChildWatch()  # after iter(): replaces the handler PyTorch installs there
        it, broken, window_start, data_time = self.start_iter, 0, time.perf_counter(), 0.0
        self.meta.train()
        try:
            while it < self.total_iters:
                if self._stop_agreed():
                    path = self.save(it)
                    logger.warning("stop requested: saved iteration %d to %s", it, path)
                    raise TrainingInterrupted(it, path, self.stop_reason)
                t0 = time.perf_counter()
                failure = None
                try:
                    batch = next(data_iter)
                except RuntimeError as exc:
                    if not children.explains(exc):
                        raise
                    failure = children.describe(str(exc))
                if failure is not None:  # outside the except: its traceback would keep the loader's workers alive
                    self._stop_after_loader_failure(it, failure)
                data_time += time.perf_counter() - t0
                broken += int(batch["n_broken"])  # this rank's (a CPU tensor); summed over ranks when logged
                record = self.step(batch, it)
                it += 1
                if self.monitor is not None and (
                    it % cfg.evaluation.eval_period_iterations == 0 or it == self.total_iters
                ):
                    record.update(self._evaluate())
                if self._logs_after(it):
                    n = it % cfg.train.log_period or cfg.train.log_period
                    elapsed = time.perf_counter() - window_start
                    metrics.write(self._record(it, record, n, elapsed, data_time, broken))
                    self.collapse.update(it, record)
                    window_start, data_time = time.perf_counter(), 0.0
                if it % cfg.train.checkpoint_period == 0 and it < self.total_iters:
                    self.save(it)
        finally:
            metrics.close()
            data_iter = loader = None  # shut the workers down now, not when the (possibly raised) frame is freed
            children.restore()
        if self.start_iter < self.total_iters or self.last_checkpoint is None:
            self.save(self.total_iters)
        return self._finish()

    def _stop_after_loader_failure(self, it: int, detail: str) -> None:
        """The loader broke before iteration ``it`` (a worker died): the model holds the state after ``it``
        completed iterations, intact, so save it and stop — as a signal's stop when one arrived (the whole process
        group got it: workers die first), else :class:`LoaderFailed` naming the worker and its signal."""
        path = self.save(it)
        logger.warning("the data loader failed (%s): saved iteration %d to %s", detail, it, path)
        if self.stop_requested:
            raise TrainingInterrupted(it, path, self.stop_reason) from None
        raise LoaderFailed(it, path, detail) from None

    def _logs_after(self, completed: int) -> bool:
        """Whether a metric line is written after ``completed`` iterations (collapse statistics are computed then)."""
        return completed % self.cfg.train.log_period == 0 or completed == self.total_iters

    def _evaluate(self) -> dict[str, float]:
        t0 = time.perf_counter()
        result = self.monitor(self.meta.teacher.backbone, self.device, sharded=self.cfg.train.sharding == "fsdp"
                              and self.world > 1)
        logger.info("k-NN monitor: %s (%.1f s)", result, time.perf_counter() - t0)
        return result

    def _record(self, it: int, rec: dict[str, float], n: int, elapsed: float, data_time: float, broken: int) -> dict:
        broken = int(distributed.all_reduce_sum(torch.tensor([broken], device=self._reduce_device())).item())
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else _peak_rss_bytes()
        return {
            "iteration": it, "total_iterations": self.total_iters, "epoch": (it - 1) // self.cfg.train.iters_per_epoch,
            **{k: float(v) for k, v in rec.items()},
            "images_per_s": n * self.global_batch / max(elapsed, 1e-9), "data_time_s": data_time / n,
            "peak_memory_mb": peak / 2**20, "broken_images": broken,
        }

    def _reduce_device(self) -> torch.device:
        """Where a tensor must be for a world all-reduce: the GPU under NCCL, else the CPU."""
        return self.device if self.world > 1 and self.device.type == "cuda" else torch.device("cpu")

    def _finish(self) -> dict[str, Any]:
        export = self.output_dir / TEACHER_EXPORT
        if distributed.is_main_process() and self.last_checkpoint is not None:
            ckpt.export_backbone(self.last_checkpoint, export)
        distributed.barrier()
        return {"iterations": self.total_iters, "checkpoint": self.last_checkpoint, "teacher_backbone": export}


def _peak_rss_bytes() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux reports KiB
    except Exception:
        return float("nan")


def train(cfg: DictConfig, output_dir: str | os.PathLike, resume: bool = True) -> dict[str, Any]:
    """Train (or resume) a run in ``output_dir``; see :class:`Trainer`."""
    return Trainer(cfg, output_dir, resume=resume).run()

"""``ssl-distill submit``: run train / eval-knn / eval-linear on Slurm through submitit, surviving preemption.

One Slurm task per GPU (``--gpus-per-node N`` -> N tasks per node; CPU jobs take ``--tasks-per-node``). Every task
runs :class:`SlurmCommand`, which initialises ``torch.distributed`` from the Slurm variables
(:func:`ssl_distill.distributed.init_distributed`: rank, local rank, world size, master address from the node list,
a port derived from the job id) and then the ``ssl-distill`` command with the pass-through arguments.

Preemption and time limits: submitit asks Slurm for ``USR2`` 90 s before the time limit, and clusters with
``preempt_send_user_signal`` send it on preemption. A training task turns the signal into
:meth:`Trainer.request_stop`: the ranks agree at the next iteration boundary, checkpoint *that* iteration and stop;
then submitit's own handler calls :meth:`SlurmCommand.checkpoint` (the same command with one more requeue counted),
pickles it and requeues the job, which resumes from the checkpoint with the same data order. At most one iteration is
lost. After ``--max-requeues`` requeues the job ends instead (``UncompletedJobError`` in the log). Evaluation jobs are
simply requeued and run again.

This module holds only what is Slurm's and submitit's: the launcher-neutral parts (the output-directory checks, the
finished marker, starting a task, the preemption hand-off) are :mod:`ssl_distill.launch.common`, which a Kubernetes
or Ray launcher beside this module would reuse.

Output directory layout (``DIR``)::

    config.yaml                    the full resolved config (train)
    model_XXXXXXX.pth, last_checkpoint, training_metrics.jsonl, teacher_backbone.pth   (train)
    results_eval_knn.json, results_eval_linear.json, best_linear_head.pth              (eval)
    logs/rank{r}.log               every rank's log
    slurm/                         submitit: <job>_submission.sh, <job>_submitted.pkl, <job>_<task>_log.out/.err
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ssl_distill.launch.args import ENV_DEFAULTS
from ssl_distill.launch.common import RunCommand, SubmitError, check_output_dir, run_task, start_task, train_preemptibly

logger = logging.getLogger(__name__)
SLURM_SUBDIR = "slurm"
_RUN_LOCALLY = ("To run without Slurm: `ssl-distill train --output-dir DIR ...` (one process) or "
                "`torchrun --nproc_per_node=N -m ssl_distill.cli train --output-dir DIR ...` (N processes).")


def check_slurm_available(which: Callable[[str], str | None] | None = None) -> None:
    """Raise :class:`SubmitError` unless ``sbatch``, ``squeue`` and ``srun`` (which submitit's executor requires)
    are on ``PATH`` (looked up at call time)."""
    which = which or shutil.which
    missing = [tool for tool in ("sbatch", "squeue", "srun") if which(tool) is None]
    if missing:
        names = " and ".join(missing) if len(missing) < 3 else "sbatch, squeue and srun"
        raise SubmitError(f"Slurm is not available on this machine ({names} not found on PATH). " + _RUN_LOCALLY)


def active_jobs(output_dir: str | os.PathLike, timeout_s: float = 60) -> dict[str, str]:
    """Jobs submitted into ``output_dir`` that Slurm still lists (job id -> state), from ``squeue --me``."""
    folder = Path(output_dir) / SLURM_SUBDIR
    ours = {p.name.split("_")[0] for p in folder.glob("*_submission.sh")}
    if not ours:
        return {}
    try:
        proc = subprocess.run(["squeue", "--me", "--noheader", "--format=%i %T"], capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SubmitError(f"squeue did not answer within {timeout_s:.0f} s: is slurmctld reachable?") from None
    if proc.returncode != 0:
        raise SubmitError(f"squeue failed: {proc.stderr.strip()}")
    listed = dict(line.split(maxsplit=1) for line in proc.stdout.splitlines() if line.strip())
    return {job: state for job, state in listed.items() if job.split("_")[0] in ours}


def _package_root() -> Path:
    import ssl_distill

    return Path(ssl_distill.__file__).resolve().parents[1]


def job_setup(cpus_per_task: int) -> list[str]:
    """Shell lines run by the batch script before ``srun``: threads per task, and the source tree on PYTHONPATH.

    The job runs ``python -m submitit.core._submit`` with this interpreter; when ``ssl_distill`` comes from a source
    checkout (not site-packages) the checkout goes on ``PYTHONPATH`` so the job imports the code that submitted it.
    """
    lines = [f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{cpus_per_task}}}"]
    root = _package_root()
    if not {"site-packages", "dist-packages"} & set(root.parts):
        lines.append(f'export PYTHONPATH="{root}${{PYTHONPATH:+:$PYTHONPATH}}"')
    return lines


def executor_parameters(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``AutoExecutor.update_parameters`` keywords for the submit flags; placement defaults from ``environ``."""
    env = os.environ if environ is None else environ
    gpus = args.gpus_per_node
    if gpus > 0 and args.tasks_per_node not in (None, gpus):
        raise SubmitError(f"--tasks-per-node {args.tasks_per_node} with --gpus-per-node {gpus}: GPU jobs run one "
                          "task per GPU; leave --tasks-per-node out (it is for CPU jobs, --gpus-per-node 0)")
    params: dict[str, Any] = {
        "name": args.job_name or f"ssl-distill-{args.command}",
        "nodes": args.nodes,
        "tasks_per_node": gpus if gpus > 0 else (args.tasks_per_node or 1),
        "cpus_per_task": args.cpus_per_task,
        "timeout_min": args.timeout,
        "gpus_per_node": gpus if gpus > 0 else None,
        "mem_gb": args.mem_gb,
        "slurm_exclude": args.exclude,
        "slurm_comment": args.comment,
        "slurm_setup": job_setup(args.cpus_per_task),
    }
    for key, var in ENV_DEFAULTS.items():
        params[f"slurm_{key}"] = getattr(args, key) or env.get(var) or None
    return {k: v for k, v in params.items() if v is not None}


@dataclass
class SlurmCommand:
    """What submitit pickles and every task runs: ``ssl-distill <command> <args>``, requeueable.

    ``requeues`` counts the requeues so far; :meth:`checkpoint` refuses once it reaches ``max_requeues``.
    ``backend``: the ``torch.distributed`` backend (``gloo`` for CPU jobs; None picks NCCL when CUDA is present).
    ``run``: how a task runs a command, the registry's ``ssl_distill.commands.run_command`` (handed over by the
    ``submit`` command, pickled by reference: this module never imports the registry).
    """

    command: str
    args: list[str] = field(default_factory=list)
    max_requeues: int = 30
    backend: str | None = None
    requeues: int = 0
    run: RunCommand = field(kw_only=True)

    def __call__(self) -> int:
        start_task(self.command, self.backend, self.requeues, self.max_requeues)
        return run_task(self.command, self.args, self.run, self._train)

    def _train(self) -> int:
        import submitit

        # submitit's handler for its preemption / time-limit signal checkpoints and requeues *immediately*; the
        # hand-off defers it until the trainer has saved the current iteration, then calls _requeue.
        signum = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        return train_preemptibly(self.run, self.args, (signum,), self._requeue)

    def _requeue(self, launcher_handlers: dict[int, Any]) -> bool:
        """submitit's own signal handler: on rank 0 it calls :meth:`checkpoint`, requeues the job and exits."""
        signum, handler = next(iter(launcher_handlers.items()), (None, None))
        if not callable(handler) or self.requeues >= self.max_requeues:
            return False
        handler(signum, None)
        return True

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue hook: the same command with one more requeue counted, or None when out of requeues."""
        import submitit

        if self.requeues >= self.max_requeues:
            logger.error("not requeuing: --max-requeues %d reached", self.max_requeues)
            return None
        resumed = [a for a in self.args if a != "--no-resume"]  # a requeued training run must resume
        return submitit.helpers.DelayedSubmission(replace(self, args=resumed, requeues=self.requeues + 1))


def submit(args: argparse.Namespace, command_args: list[str], run: RunCommand) -> Any:
    """Submit ``args.command`` with ``command_args`` into ``args.output_dir``; returns the submitit Job. Its tasks run
    the command with ``run`` (the registry's ``run_command``)."""
    import submitit
    from submitit.core.utils import FailedJobError

    check_slurm_available()
    check_output_dir(args.command, args.output_dir, args.continue_run)
    running = active_jobs(args.output_dir)
    if running:
        listing = ", ".join(f"{job} ({state})" for job, state in sorted(running.items()))
        raise SubmitError(f"{args.output_dir} is in use by job {listing}; wait for it, `scancel` it, or choose "
                          "another --output-dir")
    folder = Path(args.output_dir) / SLURM_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    # submitit counts time-outs only; SlurmCommand.checkpoint counts every requeue against the same bound
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=args.max_requeues)
    except RuntimeError as exc:  # submitit's own environment checks (e.g. no srun), raised as bare RuntimeErrors
        raise SubmitError(f"submitit cannot use Slurm here: {exc}. " + _RUN_LOCALLY) from None
    executor.update_parameters(**executor_parameters(args))
    job_fn = SlurmCommand(args.command, list(command_args), args.max_requeues,
                          backend="gloo" if args.gpus_per_node == 0 else None, run=run)
    echoed = io.StringIO()  # submitit prints sbatch's stderr itself before raising; the message below has it once
    try:
        with contextlib.redirect_stderr(echoed):
            return executor.submit(job_fn)
    except FailedJobError as exc:  # sbatch's stderr, e.g. an unknown partition or too long a time limit
        reason = " ".join(str(exc).split()) or echoed.getvalue().strip() or "no message"
        raise SubmitError(f"sbatch refused the job: {reason}. Check the partition / account / time limit flags, "
                          "and that this machine can reach the Slurm controller (`sinfo` works). "
                          + _RUN_LOCALLY) from None


def describe_submission(job: Any, args: argparse.Namespace) -> str:
    """What ``ssl-distill submit`` prints: job id, output directory, how to follow the logs."""
    folder = Path(args.output_dir) / SLURM_SUBDIR
    tasks = args.gpus_per_node or args.tasks_per_node or 1
    return "\n".join([
        f"submitted job {job.job_id}: ssl-distill {args.command} on {args.nodes} node(s) x {tasks} task(s)",
        f"output dir: {args.output_dir}",
        f"logs:       {folder / f'{job.job_id}_0_log.out'} (and .err; task t: {job.job_id}_<t>_log.*)",
        f"follow:     tail -f {folder / f'{job.job_id}_0_log.err'}",
        f"status:     squeue -j {job.job_id}   |   sacct -j {job.job_id}   |   cancel: scancel {job.job_id}",
    ])

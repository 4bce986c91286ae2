"""What every launcher does the same way (Slurm today; a Kubernetes or Ray launcher would reuse it unchanged).

* **Output directory**: :func:`with_output_dir` passes the launcher's ``--output-dir`` on to the command;
  :func:`finished_marker` / :func:`check_output_dir` refuse a directory that holds a finished run.
* **Starting a task**: :func:`start_task` sets up logging and ``torch.distributed`` from whatever launcher started the
  process (:func:`ssl_distill.distributed.detect_environment` is the one reader of the launcher's variables).
* **Running it**: :func:`run_task` runs ``ssl-distill <command>`` through the ``run`` callable the command registry
  hands the launcher (``ssl_distill.commands.run_command``): the launcher never imports the registry, the registry
  imports the launcher (docs/ARCHITECTURE.md, "Floors").
* **Preemption hand-off** (:func:`train_preemptibly`): the launcher's stop signal becomes
  :meth:`Trainer.request_stop`; the ranks checkpoint the iteration in progress and stop; then the launcher's own
  requeue call (a :data:`Requeue`, the only launcher-specific part) runs on every rank. Rank 0 requeues the job;
  the other ranks wait for the launcher to end this run of it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# ``run_command(name, argv, on_trainer=None) -> exit status``: how a task runs ``ssl-distill <name> <argv>``.
RunCommand = Callable[..., int]
# The launcher's requeue call, given the signal handlers that were installed before ours (the launcher's own):
# True when the job was handed over to be requeued, False when it will not be (not started by that launcher, or out
# of requeues); on rank 0 a launcher may also end the process from inside it.
Requeue = Callable[[dict[int, Any]], bool]
REQUEUE_WAIT_S = 300.0


class SubmitError(Exception):
    """A submission the user can fix (no launcher here, a finished run in DIR, conflicting flags)."""


def with_output_dir(command_args: list[str], output_dir: str) -> list[str]:
    """``command_args`` with ``--output-dir output_dir`` appended; a different ``--output-dir`` in them is an error."""
    for i, arg in enumerate(command_args):
        value = None
        if arg == "--output-dir" and i + 1 < len(command_args):
            value = command_args[i + 1]
        elif arg.startswith("--output-dir="):
            value = arg.split("=", 1)[1]
        if value is not None:
            if Path(value).resolve() != Path(output_dir).resolve():
                raise SubmitError(f"the command's --output-dir {value} differs from submit's --output-dir "
                                  f"{output_dir}; give it once, before the command")
            return list(command_args)
    return [*command_args, "--output-dir", str(output_dir)]


def finished_marker(command: str, output_dir: str | os.PathLike) -> Path:
    """The file whose presence means ``command`` already finished in ``output_dir``."""
    if command == "train":
        from ssl_distill.train.trainer import TEACHER_EXPORT

        return Path(output_dir) / TEACHER_EXPORT
    from ssl_distill.eval.args import KNN_RESULTS, LINEAR_RESULTS

    return Path(output_dir) / (KNN_RESULTS if command == "eval-knn" else LINEAR_RESULTS)


def check_output_dir(command: str, output_dir: str | os.PathLike, continue_run: bool) -> None:
    """Refuse a directory that holds a finished ``command`` run (unless ``continue_run``)."""
    marker = finished_marker(command, output_dir)
    if marker.exists() and not continue_run:
        what = ("a finished training run" if command == "train" else f"finished {command} results")
        raise SubmitError(f"{output_dir} already holds {what} ({marker.name}). Choose another --output-dir, or pass "
                          "--continue to run again there (train resumes from its last checkpoint, e.g. with a "
                          "larger optim.epochs).")


def start_task(command: str, backend: str | None, requeues: int, max_requeues: int) -> Any:
    """Log as the CLI does and initialise ``torch.distributed`` from the launcher's environment; the
    :class:`~ssl_distill.distributed.DistEnv` (which launcher, rank, world size)."""
    from ssl_distill import distributed

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")  # as the CLI's
    env = distributed.init_distributed(backend=backend)
    logger.info("ssl-distill %s under %s: rank %d/%d (local %d), requeue %d/%d", command, env.launcher, env.rank,
                env.world_size, env.local_rank, requeues, max_requeues)
    return env


def run_task(command: str, args: Sequence[str], run: RunCommand, train: Callable[[], int]) -> int:
    """One task's run: ``train()`` (the launcher's preemptible training) for ``train``, else ``run(command, args)``;
    a non-zero status is raised so that the launcher marks the task failed."""
    code = train() if command == "train" else run(command, list(args))
    if code != 0:
        raise RuntimeError(f"ssl-distill {command} exited with status {code} (see the messages above)")
    return code


def train_preemptibly(run: RunCommand, args: Sequence[str], signums: Iterable[int], requeue: Requeue,
                      wait_s: float = REQUEUE_WAIT_S) -> int:
    """``ssl-distill train args``, stopped by ``signums`` at an iteration boundary with a checkpoint, then handed to
    ``requeue`` (see the module docstring). Raises ``TrainingInterrupted`` when the job is not requeued, and on
    every rank once it is (the requeued job resumes from the checkpoint)."""
    from ssl_distill import distributed
    from ssl_distill.train.signals import StopOnSignals
    from ssl_distill.train.trainer import TrainingInterrupted

    stop = StopOnSignals(tuple(signums))
    launcher_handlers = dict(stop.previous)  # ours replace them until the checkpoint is written
    try:
        return run("train", list(args), on_trainer=stop.attach)
    except TrainingInterrupted as exc:
        logger.warning("%s; handing over to the launcher to requeue", exc)
        stop.restore()
        if not requeue(launcher_handlers):
            raise  # not started by this launcher, or out of requeues: every rank ends with the same error
        if distributed.detect_environment().rank == 0:
            raise  # the launcher declined to requeue without ending the process: end as interrupted
        wait_to_be_requeued(wait_s)
        raise


def wait_to_be_requeued(limit_s: float = REQUEUE_WAIT_S) -> None:
    """Ranks other than 0 wait for the launcher to end this run of the job (rank 0 requeued it; exiting first could
    end the job step before the requeue lands). ``limit_s`` bounds the wait should the requeue never come."""
    time.sleep(limit_s)

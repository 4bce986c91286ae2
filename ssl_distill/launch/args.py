"""Arguments of ``ssl-distill submit`` (argparse only: the CLI builds its parser without importing torch)."""

from __future__ import annotations

import argparse

COMMANDS = ("train", "eval-knn", "eval-linear")
# Site defaults, so scripts need not repeat them; a flag on the command line wins.
ENV_DEFAULTS = {
    "partition": "SSL_DISTILL_SLURM_PARTITION",
    "account": "SSL_DISTILL_SLURM_ACCOUNT",
    "qos": "SSL_DISTILL_SLURM_QOS",
    "constraint": "SSL_DISTILL_SLURM_CONSTRAINT",
}

SUBMIT_DESCRIPTION = f"""\
Submit `ssl-distill <command> [args]` (train, eval-knn, eval-linear) to Slurm through submitit.
One task per GPU; torch.distributed is initialised from the Slurm variables. On the time-limit or
preemption signal (USR2) a training job checkpoints the current iteration and requeues itself; the
requeued job resumes from that checkpoint (at most --max-requeues times).

DIR layout: config.yaml, model_*.pth + last_checkpoint, training_metrics.jsonl, teacher_backbone.pth,
results_eval_*.json, logs/rank*.log, and slurm/ (submitit: <job>_submission.sh, <job>_<task>_log.out/.err).

Defaults from the environment: {", ".join(f"--{k} ${v}" for k, v in ENV_DEFAULTS.items())}."""
SUBMIT_EPILOG = (
    "examples:\n"
    "  ssl-distill submit --nodes 4 --gpus-per-node 8 --partition P --output-dir runs/vitl train \\\n"
    "      --config-file configs/vitl16_short.yaml train.dataset_path=/data/imagenet/train\n"
    "  ssl-distill submit --gpus-per-node 1 --output-dir runs/vitl/eval eval-knn \\\n"
    "      --pretrained-weights runs/vitl/teacher_backbone.pth --train-dataset ... --val-dataset ...\n"
    "Without Slurm: `ssl-distill train ...` (one process) or\n"
    "  `torchrun --nproc_per_node=N -m ssl_distill.cli train ...`."
)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_submit_args(p: argparse.ArgumentParser) -> None:
    """Description and examples, resources, placement, requeue policy, the output directory, then ``<command>
    [command args]``."""
    p.description, p.epilog = SUBMIT_DESCRIPTION, SUBMIT_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    res = p.add_argument_group("resources")
    res.add_argument("--nodes", type=_positive, default=1, help="number of nodes")
    res.add_argument("--gpus-per-node", type=_non_negative, default=8,
                     help="GPUs per node, one task each; 0 submits CPU tasks (gloo backend)")
    res.add_argument("--tasks-per-node", type=_positive, default=None,
                     help="processes per node for CPU jobs (--gpus-per-node 0); default 1")
    res.add_argument("--cpus-per-task", type=_positive, default=10,
                     help="CPU cores per task (data-loading workers + main thread); sets OMP_NUM_THREADS when unset")
    res.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB (default: the cluster's)")
    res.add_argument("--timeout", type=_positive, default=1440, metavar="MINUTES",
                     help="time limit of each (re)queued job in minutes; training checkpoints and requeues when "
                     "it is reached")
    place = p.add_argument_group("placement (defaults from the environment, see above)")
    place.add_argument("--partition", default=None, help="Slurm partition")
    place.add_argument("--account", default=None, help="Slurm account to charge")
    place.add_argument("--qos", default=None, help="Slurm quality of service")
    place.add_argument("--constraint", default=None, help="node features, e.g. volta32gb")
    place.add_argument("--exclude", default=None, metavar="NODES", help="nodes to avoid, e.g. node[003-005]")
    place.add_argument("--comment", default=None, help="job comment (shown by squeue/sacct)")
    place.add_argument("--job-name", default=None, help="job name (default: ssl-distill-<command>)")
    p.add_argument("--max-requeues", type=_non_negative, default=30,
                   help="requeue a job at most this many times after preemption or a time limit")
    p.add_argument("--continue", dest="continue_run", action="store_true",
                   help="submit even though DIR holds a finished run (train resumes from its last checkpoint, "
                   "e.g. with a larger optim.epochs; eval runs again)")
    p.add_argument("--output-dir", required=True, metavar="DIR",
                   help="the run's directory; passed to the command as --output-dir; submitit logs go to DIR/slurm")
    p.add_argument("command", choices=COMMANDS, help="what to run in every task")
    p.add_argument("command_args", nargs=argparse.REMAINDER, metavar="...",
                   help="arguments of the command, passed through unchanged (see `ssl-distill <command> --help`)")

"""`ssl-distill submit`: flag mapping and user errors (fast), and jobs on a real single-node Slurm cluster.

The cluster tests (markers ``slurm`` and ``slow``) share one cluster per session (``tests/slurm_cluster.py``) and run
tiny CPU jobs: train to completion, a 2-task gloo DDP job against a local torchrun run, preemption (USR2) ->
checkpoint at the current iteration -> requeue -> resume with the same trajectory, and eval-knn.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from slurm_cluster import ClusterUnavailable, SlurmCluster, start_cluster
from train_utils import TINY, cli_env, run_train, tiny_overrides

from ssl_distill.cli import build_parser, main
from ssl_distill.commands import run_command
from ssl_distill.data.digits import write_digits_folders
from ssl_distill.launch import common, slurm
from ssl_distill.models import vit_tiny
from ssl_distill.train.checkpoint import list_checkpoints
from ssl_distill.train.metrics import read_metrics

ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "PREEMPTED")  # on the way through a requeue
LOSS_KEYS = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "total_loss")


def _submit_args(*argv: str):
    return build_parser().parse_args(["submit", *argv])


# -- fast: no cluster --------------------------------------------------------------------------------------------
@pytest.fixture
def fake_slurm_tools(tmp_path, monkeypatch) -> Path:
    """``sbatch``, ``squeue`` and ``srun`` stand-ins first on PATH that fail if called: the fast tests see "Slurm
    present" whether or not the machine has it (a clean CI machine does not), and never reach a real cluster."""
    bin_dir = tmp_path / "fake_slurm_bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "squeue", "srun"):
        script = bin_dir / tool
        script.write_text(f"#!/bin/sh\necho 'fake {tool}: not a cluster' >&2\nexit 1\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ.get('PATH', '')}")
    return bin_dir


def test_executor_parameters_from_flags_and_environment(tmp_path, fake_slurm_tools):
    import submitit

    env = {"SSL_DISTILL_SLURM_PARTITION": "gpu", "SSL_DISTILL_SLURM_ACCOUNT": "lab", "SSL_DISTILL_SLURM_QOS": "high"}
    args = _submit_args("--nodes", "4", "--mem-gb", "400", "--account", "other", "--exclude", "node[1-2]",
                        "--timeout", "2800", "--output-dir", str(tmp_path), "train", "optim.epochs=1")
    params = slurm.executor_parameters(args, env)
    setup = params.pop("slurm_setup")
    assert params == {
        "name": "ssl-distill-train", "nodes": 4, "tasks_per_node": 8, "gpus_per_node": 8, "cpus_per_task": 10,
        "timeout_min": 2800, "mem_gb": 400.0, "slurm_exclude": "node[1-2]",
        "slurm_partition": "gpu", "slurm_account": "other", "slurm_qos": "high",  # the flag beats the environment
    }
    assert setup[0] == "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-10}"
    cpu = slurm.executor_parameters(_submit_args("--gpus-per-node", "0", "--tasks-per-node", "2", "--job-name", "j",
                                                 "--output-dir", str(tmp_path), "eval-knn"), {})
    assert cpu["tasks_per_node"] == 2
    assert "gpus_per_node" not in cpu
    assert "slurm_partition" not in cpu
    assert cpu["name"] == "j"
    with pytest.raises(slurm.SubmitError, match="one task per GPU"):
        slurm.executor_parameters(_submit_args("--tasks-per-node", "2", "--output-dir", "x", "train"), {})
    # submitit itself accepts every parameter name and value we produce
    submitit.AutoExecutor(folder=tmp_path / "slurm", cluster="slurm").update_parameters(**params, slurm_setup=setup)


def test_missing_slurm_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch / squeue anywhere
    assert main(["submit", "--output-dir", str(tmp_path / "run"), "train", "--config-file", TINY]) == 2
    err = capsys.readouterr().err
    assert "Slurm is not available" in err
    assert "sbatch, squeue and srun not found" in err
    assert "ssl-distill train" in err
    assert "torchrun" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_finished_run_is_refused_unless_continued(tmp_path, photo_folder, fake_slurm_tools, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "teacher_backbone.pth").write_bytes(b"")
    argv = ["submit", "--output-dir", str(out), "train", "--config-file", TINY, f"train.dataset_path={photo_folder}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds a finished training run" in err
    assert "--continue" in err
    common.check_output_dir("train", out, continue_run=True)  # told to continue: accepted
    common.check_output_dir("eval-knn", out, continue_run=False)  # no k-NN results there yet
    (out / "results_eval_knn.json").write_text("{}")
    with pytest.raises(common.SubmitError, match="finished eval-knn results"):
        common.check_output_dir("eval-knn", out, continue_run=False)
    # mistakes in the pass-through arguments surface at submit time, not in the queue
    assert main(["submit", "--output-dir", str(tmp_path / "new"), "train", "--config-file", TINY,
                 "train.dataset_path=/nonexistent/images"]) == 2
    assert "train.dataset_path /nonexistent/images does not exist" in capsys.readouterr().err
    with pytest.raises(common.SubmitError, match="differs from submit's --output-dir"):
        common.with_output_dir(["--output-dir", str(tmp_path / "elsewhere")], str(out))


def test_unconfigured_slurm_is_one_line_with_the_local_alternative(tmp_path, photo_folder, fake_slurm_tools,
                                                                  capsys):
    """sbatch exists but fails (no cluster configured here): its message appears once, in a line labelled with the
    submit command, followed by how to run without Slurm; config mistakes are labelled `submit` too."""
    argv = ["submit", "--output-dir", str(tmp_path / "run"), "train", "--config-file", TINY,
            f"train.dataset_path={photo_folder}"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("ssl-distill submit: error: sbatch refused the job"), captured.err
    assert lines[0].count("fake sbatch: not a cluster") == 1
    assert "To run without Slurm" in lines[0]
    assert main([*argv, "optim.epochs=zero"]) == 2
    assert capsys.readouterr().err.startswith("ssl-distill submit: error: Bad value for config key 'optim.epochs'")


def test_requeue_counts_and_drops_no_resume():
    job = slurm.SlurmCommand("train", ["--no-resume", "optim.epochs=2"], max_requeues=2, run=run_command)
    again = job.checkpoint().function
    assert again.requeues == 1
    assert again.args == ["optim.epochs=2"]
    assert job.requeues == 0
    last = again.checkpoint().function
    assert last.requeues == 2
    assert last.checkpoint() is None  # out of requeues: submitit ends the job
    assert pickle.loads(pickle.dumps(last)) == last


# -- a real cluster -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def cluster() -> SlurmCluster:
    try:
        c = start_cluster()
    except ClusterUnavailable as exc:
        pytest.skip(str(exc))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(c.conf))  # for the CLI subprocesses and the jobs they submit
        yield c
    c.remove()


def _submit(out: Path, *argv: str) -> str:
    cmd = [sys.executable, "-m", "ssl_distill.cli", "submit", "--gpus-per-node", "0", "--cpus-per-task", "1",
           "--output-dir", str(out), *argv]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"output dir: {out}" in proc.stdout
    assert "_0_log.out" in proc.stdout
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


def _wait_ok(cluster: SlurmCluster, out: Path, job: str, timeout: float = 240) -> dict[str, str]:
    info = cluster.wait_for_job(job, timeout)
    logs = "".join(p.read_text()[-3000:] for p in sorted((out / "slurm").glob(f"{job}_*_log.err")))
    assert info["JobState"] == "COMPLETED", f"{info}\n{logs}"
    return info


def _losses(out: Path) -> list[tuple[int, tuple[float, ...]]]:
    return [(r["iteration"], tuple(r[k] for k in LOSS_KEYS)) for r in read_metrics(out)]


def _train(dataset: str, **extra: object) -> list[str]:
    return ["train", "--config-file", TINY, *tiny_overrides(dataset, **extra)]


# 2 tasks x 4 images, 24 iterations, periodic checkpoints off: any other checkpoint is a stop checkpoint.
DDP = {"train.batch_size_per_gpu": 4, "optim.epochs": 6, "train.checkpoint_period": 100, "student.layerscale": 1.0}


@pytest.fixture(scope="module")
def train_job(cluster, photo_folder, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("slurm_train") / "run"
    job = _submit(out, "--job-name", "tiny-train", *_train(photo_folder))
    _wait_ok(cluster, out, job)
    return out, job


@pytest.fixture(scope="module")
def ddp_job(cluster, photo_folder, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("slurm_ddp") / "run"
    job = _submit(out, "--tasks-per-node", "2", "--timeout", "20", *_train(photo_folder, **DDP))
    _wait_ok(cluster, out, job)
    return out, job


@pytest.mark.slow
@pytest.mark.slurm
def test_submit_train_runs_to_completion(train_job):
    out, job = train_job
    assert [r["iteration"] for r in read_metrics(out)] == list(range(1, 9))
    assert list_checkpoints(out)[-1].name == "model_0000008.pth"
    assert (out / "config.yaml").exists()
    vit_tiny(patch_size=8, img_size=32, init_values=1e-5).load_state_dict(
        torch.load(out / "teacher_backbone.pth", weights_only=True), strict=True)
    script = (out / "slurm" / f"{job}_submission.sh").read_text()
    for line in ("--job-name=tiny-train", "--ntasks-per-node=1", "--cpus-per-task=1", "--signal=USR2@90"):
        assert line in script
    assert "--gpus-per-node" not in script
    assert (out / "slurm" / f"{job}_0_log.out").exists()
    # the directory now holds a finished run: a second submission is refused before reaching Slurm
    proc = subprocess.run([sys.executable, "-m", "ssl_distill.cli", "submit", "--output-dir", str(out),
                           *_train(str(out))], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "already holds a finished training run" in proc.stderr


@pytest.mark.slow
@pytest.mark.slurm
def test_two_task_job_matches_local_two_process_run(ddp_job, photo_folder, tmp_path):
    out, job = ddp_job
    assert "distributed: slurm rank 1/2 via gloo" in (out / "slurm" / f"{job}_1_log.err").read_text()
    local = tmp_path / "local"
    proc = run_train(local, tiny_overrides(photo_folder, **DDP), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, ref = _losses(out), _losses(local)
    assert [i for i, _ in got] == [i for i, _ in ref] == list(range(1, 25))
    for (_, a), (_, b) in zip(got, ref):
        assert a == pytest.approx(b, rel=2e-4, abs=2e-5)


@pytest.mark.slow
@pytest.mark.slurm
def test_preemption_and_timeout_signal_checkpoint_requeue_and_resume(cluster, ddp_job, photo_folder, tmp_path,
                                                                      capsys):
    out = tmp_path / "preempted"
    # timeout_min > 10: submitit would otherwise count every signal as a time-out
    job = _submit(out, "--tasks-per-node", "2", "--timeout", "20", "--max-requeues", "3",
                  *_train(photo_folder, **DDP))
    assert main(["submit", "--gpus-per-node", "0", "--output-dir", str(out), *_train(photo_folder, **DDP)]) == 2
    assert f"in use by job {job} (" in capsys.readouterr().err  # a second writer into a live run is refused
    # 1. the time-limit warning: USR2 to the job's tasks, as Slurm sends it 90 s before the limit
    _wait_running(cluster, out, job, restarts=0, iterations=2)
    cluster.client("scancel", "--signal=USR2", job)
    first = _wait_running(cluster, out, job, restarts=1, iterations=1)
    # 2. real preemption: a job in the higher-priority partition needs the node (USR2, then requeue by Slurm)
    _wait_running(cluster, out, job, restarts=1, iterations=first + 2)
    urgent = cluster.client("sbatch", "--parsable", "--partition=urgent", "--output=/dev/null", "--wrap=sleep 1")
    info = _wait_ok(cluster, out, job, timeout=300)
    assert info["Restarts"] == "2"
    assert cluster.job_info(urgent.stdout.strip())["JobState"] == "COMPLETED"
    stops = [int(p.stem.split("_")[1]) for p in list_checkpoints(out)]
    assert len(stops) == 3, stops
    assert stops[0] == first, stops
    assert first + 2 <= stops[1] < stops[2] == 24, stops
    log = (out / "slurm" / f"{job}_0_log.err").read_text()
    for it in stops[:2]:  # each stop saved the iteration in progress (no periodic checkpoints) and resumed there
        assert f"stop requested: saved iteration {it}" in log
        assert f"resumed from {out / f'model_{it:07d}.pth'} at iteration {it}" in log
    assert "requeue 2/3" in log
    assert log.count(f"Requeued job {job}") == 2
    # the twice-requeued job followed the uninterrupted run's trajectory exactly (same 2-task job)
    assert _losses(out) == _losses(ddp_job[0])


def _wait_running(cluster: SlurmCluster, out: Path, job: str, restarts: int, iterations: int) -> int:
    """Wait until the job's ``restarts``-th run is running with ``iterations`` in the metrics; return its first."""
    deadline = time.monotonic() + 180
    while True:
        info = cluster.job_info(job)
        assert time.monotonic() < deadline, info
        assert info["JobState"] in ACTIVE, info
        stops = list_checkpoints(out)
        start = int(stops[-1].stem.split("_")[1]) if restarts and stops else 0
        if info["JobState"] == "RUNNING" and int(info["Restarts"]) == restarts and \
                len(read_metrics(out)) >= iterations and (start or not restarts):
            return start
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.slurm
def test_submit_eval_knn_writes_results(cluster, ddp_job, tmp_path):
    # The DDP job's teacher (LayerScale 1.0): well-spread features, so a 2-rank and a 1-rank extraction give the same
    # neighbours. (With the tiny config's 1e-5 the CLS tokens are near-duplicates and rounding flips neighbours.)
    train_dir, val_dir = write_digits_folders(tmp_path / "digits", 6, 3, size=32)
    args = ["--pretrained-weights", str(ddp_job[0] / "model_0000024.pth"), "--train-dataset", str(train_dir),
            "--val-dataset", str(val_dir), "--config-file", TINY, "--image-size", "32", "--num-workers", "0",
            "--batch-size", "16", "--nb-knn", "1", "5", "--device", "cpu", "--autocast", "none"]
    out = tmp_path / "knn"
    job = _submit(out, "--tasks-per-node", "2", "eval-knn", *args)
    _wait_ok(cluster, out, job)
    got = json.loads((out / "results_eval_knn.json").read_text())
    assert got["n_train"] == 60
    assert got["n_val"] == 30
    assert main(["eval-knn", *args, "--output-dir", str(tmp_path / "local")]) == 0  # one local process
    want = json.loads((tmp_path / "local" / "results_eval_knn.json").read_text())
    assert got["results"] == want["results"]
    assert set(got["results"]["all"]) == {"k=1", "k=5"}

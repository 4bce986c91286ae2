"""A real single-node Slurm cluster on localhost, for the launcher tests (``tests/test_slurm.py``).

Debian's Slurm 22.05 with accounting: munged, a private MariaDB (socket only, networking off), slurmdbd, slurmctld
and slurmd, all in one private temporary directory, on free ports, each started in the foreground in its own session
(``setsid``) with its PID recorded, and stopped by that PID. Accounting matters: submitit polls job states with
``sacct``, and without it a job that dies without a result leaves ``job.result()`` waiting forever.

The packages are installed with apt when they are missing and the process is root (as in CI); otherwise the tests
skip with the reason. Every client call runs under a timeout: ``sinfo`` against a dead controller blocks for minutes.

Run ``python tests/slurm_cluster.py`` to start a cluster by hand; it prints ``export SLURM_CONF=...`` and waits for
Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server")
BINARIES = ("munged", "mungekey", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd", "sbatch",
            "squeue", "sacct", "scontrol", "scancel", "sinfo")
# Slurm terminal job states (``scontrol show job``'s JobState).
FINISHED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                      "DEADLINE"})


class ClusterUnavailable(RuntimeError):
    """Slurm cannot be provided here; the message says why (the tests skip with it)."""


def _path_with_sbin() -> str:
    """``PATH`` plus the daemons' directories (``/usr/sbin``, ``/sbin``), which a non-login PATH may lack."""
    path = os.environ.get("PATH", "")
    return ":".join([path, *(d for d in ("/usr/sbin", "/sbin") if d not in path.split(":"))])


def _missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b, path=_path_with_sbin()) is None]


def ensure_installed(timeout_s: float = 900) -> None:
    """Install the Debian packages with apt when binaries are missing (root only), else raise ClusterUnavailable."""
    missing = _missing_binaries()
    if not missing:
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"Slurm is not installed (missing {', '.join(missing)}) and the tests are not "
                                 f"running as root to install it: apt-get install {' '.join(PACKAGES)}")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"Slurm is not installed (missing {', '.join(missing)}) and apt-get is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:  # stale package lists: refresh once and retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=timeout_s,
                       stdin=subprocess.DEVNULL)
        proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or _missing_binaries():
        raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line() -> str:
    """This machine's layout from ``slurmd -C``, renamed to ``localhost``."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30, check=True,
                         env={**os.environ, "PATH": _path_with_sbin()}).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("NodeName="))
    fields = [f for f in line.split() if not f.startswith("NodeName=")]
    return " ".join(["NodeName=localhost", "NodeAddr=127.0.0.1", *fields, "State=UNKNOWN"])


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    path.chmod(mode)


class SlurmCluster:
    """Daemons of one private cluster; ``env`` holds ``SLURM_CONF`` for clients (``sbatch``, submitit, the CLI)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "etc" / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.db_socket = root / "mysql" / "mysqld.sock"
        self.env = {**os.environ, "PATH": _path_with_sbin(), "SLURM_CONF": str(self.conf)}
        self.procs: list[tuple[str, subprocess.Popen]] = []

    # -- clients -------------------------------------------------------------------------------------------------
    def client(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster, bounded by ``timeout``."""
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ``RunTime``, ...)."""
        out = self.client("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait_for_job(self, job_id: str, timeout: float, states: Sequence[str] = tuple(FINISHED)) -> dict[str, str]:
        """Poll until the job reaches one of ``states``; return its info. Raises TimeoutError with the logs."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: {info}\n{self.logs()}")

    def logs(self, tail: int = 2000) -> str:
        """The end of every daemon log (for failure messages)."""
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # -- daemons -------------------------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.root / "log" / f"{name}.stdout.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env or self.env)
        log.close()
        self.procs.append((name, proc))

    def _wait(self, what: str, ready, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}\n{self.logs()}")
            try:
                if ready():
                    return
            except (subprocess.TimeoutExpired, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}\n{self.logs()}")

    def start(self) -> SlurmCluster:
        """Write the configuration and start munged, mariadbd, slurmdbd, slurmctld and slurmd; wait until idle."""
        r = self.root
        for sub in ("etc", "munge", "mysql", "db", "state", "spool", "log"):
            (r / sub).mkdir(mode=0o755, exist_ok=True)
        r.chmod(0o755)
        try:
            self._start_munge()
            self._start_mariadb()
            self._write_slurm_conf()
            self._spawn("slurmdbd", ["slurmdbd", "-D"], env={**self.env, "MYSQL_UNIX_PORT": str(self.db_socket)})
            self._wait("slurmdbd", lambda: _port_open(self.dbd_port))
            self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
            self._wait("slurmctld", lambda: self.client("scontrol", "ping", timeout=5, check=False).returncode == 0)
            self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost"])
            self._wait("an idle node", lambda: "idle" in self.client("sinfo", "-h", "-o", "%T", timeout=5).stdout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        key = self.root / "etc" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True, timeout=30,
                       env=self.env)
        key.chmod(0o400)
        m = self.root / "munge"
        self._spawn("munged", ["munged", "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}", "--num-threads=2"])
        self._wait("munged", self.munge_socket.exists)

    def _start_mariadb(self) -> None:
        data = self.root / "db"
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
                        "--skip-test-db", "--auth-root-authentication-method=socket"],
                       check=True, capture_output=True, timeout=120, env=self.env)
        self._spawn("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={data}", f"--socket={self.db_socket}",
                                 "--skip-networking", "--user=root", f"--pid-file={self.root / 'mysql' / 'pid'}",
                                 f"--log-error={self.root / 'log' / 'mariadb.log'}",
                                 "--innodb-buffer-pool-size=32M"])
        self._wait("mariadbd", self.db_socket.exists)

    def _write_slurm_conf(self) -> None:
        r = self.root
        self.dbd_port = _free_port()
        auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}"
        _write(r / "etc" / "slurmdbd.conf", "\n".join([
            auth, "DbdHost=localhost", f"DbdPort={self.dbd_port}", "SlurmUser=root",
            "StorageType=accounting_storage/mysql", "StorageHost=localhost", "StorageUser=root",
            "StorageLoc=slurm_acct_db", f"PidFile={r / 'state' / 'slurmdbd.pid'}",
            f"LogFile={r / 'log' / 'slurmdbd.log'}", "",
        ]), mode=0o600)
        _write(self.conf, "\n".join([
            f"ClusterName=ssltest{os.getpid()}", "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}", "SlurmUser=root", "SlurmdUser=root",
            f"{auth},cred_expire=10",  # default 120 s: a requeued job would wait that long to restart
            "CredType=cred/munge", f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'state' / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'state' / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=none", "JobRequeue=1",
            "ReturnToService=2", "MinJobAge=3600", "KillWait=5", "InactiveLimit=0",
            "AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageHost=localhost",
            f"AccountingStoragePort={self.dbd_port}",
            f"AccountingStoragePass={self.munge_socket}",  # slurmctld ignores AuthInfo=socket= towards slurmdbd
            "SchedulerParameters=sched_interval=2,bf_interval=1",
            # Real preemption: jobs in `urgent` requeue those in `debug`; USR2 first (what submitit handles).
            "PreemptType=preempt/partition_prio", "PreemptMode=REQUEUE",
            "SlurmctldParameters=preempt_send_user_signal",
            _node_line(),
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30",
            "PartitionName=urgent Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=10", "",
        ]))

    def stop(self) -> None:
        """Cancel every job, then stop the daemons by PID (newest first): SIGTERM, then SIGKILL after 15 s."""
        if any(name == "slurmctld" and p.poll() is None for name, p in self.procs):
            try:
                self.client("scancel", "--user=root", "--full", timeout=10, check=False)
                time.sleep(1)
            except subprocess.TimeoutExpired:
                pass
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()

    def remove(self) -> None:
        """Stop the daemons and delete the cluster's directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_cluster(parent: str | os.PathLike | None = None) -> SlurmCluster:
    """Install (if needed and allowed) and start a cluster in a fresh directory under ``parent`` (default /tmp).

    A short path: munge's and MariaDB's unix sockets live inside it.
    """
    ensure_installed()
    root = Path(tempfile.mkdtemp(prefix="slurm_", dir=parent))
    return SlurmCluster(root).start()


def _main() -> None:
    cluster = start_cluster()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: sys.exit(0))
    print(f"export SLURM_CONF={cluster.conf}\n(Ctrl-C or SIGTERM stops the cluster)", flush=True)
    try:
        signal.pause()
    finally:
        cluster.remove()


if __name__ == "__main__":
    _main()

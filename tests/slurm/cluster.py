"""A real one-node SLURM cluster on loopback for the tests: munged, slurmctld and slurmd (Debian packages,
installed by tests/slurm/install.sh) run as children of the test process with every file in one temporary
directory, on free ports, so nothing touches /etc or a cluster the machine may already run.

The daemons run in the foreground (-F / -D), so their PIDs are the Popen PIDs that :meth:`stop` ends; they
also get PR_SET_PDEATHSIG, so even a test process killed with SIGKILL takes them with it. Accounting is off
(no slurmdbd), hence MinJobAge is long: finished jobs stay visible to `squeue --states=all` and
`scontrol show job`, which is what Snakemake's status check and the tests read.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
NODE = "localhost"  # slurmd -N: the machine's own hostname need not resolve to loopback
PARTITION = "debug"


class ClusterError(RuntimeError):
    pass


def die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the process that started it dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Where the daemons are looked for after PATH: a non-login PATH may lack the sbin folders.
SBIN = ("/usr/sbin", "/sbin")


def _find(name: str) -> str | None:
    for folder in (None, *SBIN):
        found = shutil.which(name, path=folder) if folder else shutil.which(name)
        if found:
            return found
    return None


def _which(name: str) -> str:
    found = _find(name)
    if not found:
        raise ClusterError(f"{name}: not installed; run tests/slurm/install.sh (as root) first")
    return found


def unavailable() -> str | None:
    """Why this machine cannot run the test cluster (not root, programs missing), or None when it can."""
    reasons = []
    if os.geteuid() != 0:
        reasons.append("the test cluster runs its daemons as root (SlurmUser=root): run the tests as root")
    missing = [name for name in (*DAEMONS, *CLIENTS, "unshare") if not _find(name)]
    if missing:
        reasons.append(
            f"{', '.join(missing)}: not installed (tests/slurm/install.sh installs them; "
            "make test runs it where it can: as root with apt-get)"
        )
    return "; ".join(reasons) or None


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_cluster() -> None:
    """Skip the calling test or fixture when no test cluster can run here, with the reason; under CI=true
    fail instead, so that CI can never pass with the SLURM tests silently skipped."""
    import pytest

    reason = unavailable()
    if reason is None:
        return
    if under_ci():
        pytest.fail(f"SLURM tests cannot run, and CI=true does not allow skipping them: {reason}", pytrace=False)
    pytest.skip(f"SLURM tests cannot run here: {reason}")


def parse_records(text: str) -> list[dict[str, str]]:
    """`scontrol -o show ...` prints one record per line as space-separated Key=Value pairs."""
    records = []
    for line in text.splitlines():
        record = {}
        for token in shlex.split(line):
            key, _, value = token.partition("=")
            record[key] = value
        if record:
            records.append(record)
    return records


class LocalCluster:
    """``with LocalCluster(tmpdir) as cluster:`` gives a started cluster; use ``cluster.env`` for clients."""

    def __init__(self, root: Path, cpus: int = 2, memory_mb: int = 8000, gpus: int = 2):
        self.root = Path(root)
        self.cpus, self.memory_mb, self.gpus = cpus, memory_mb, gpus
        self.conf = self.root / "etc/slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for var in ("SLURM_JOB_ID", "SLURM_JOBID", "SBATCH_PARTITION", "SBATCH_ACCOUNT"):
            self.env.pop(var, None)  # never inherit a surrounding allocation or site defaults

    # ------------------------------------------------------------------------------------ config

    def _write_config(self) -> None:
        r = self.root
        Path("/etc/slurm").mkdir(exist_ok=True)  # the mount point (the Debian packages create it)
        for sub in ("etc", "munge", "state", "spool", "log", "run", "dev"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o700)
        key = r / "munge/munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = r / "munge/munge.socket"
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=dblocks-test",
                    f"SlurmctldHost={NODE}(127.0.0.1)",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    f"StateSaveLocation={r}/state",
                    f"SlurmdSpoolDir={r}/spool",
                    f"SlurmctldPidFile={r}/run/slurmctld.pid",
                    f"SlurmdPidFile={r}/run/slurmd.pid",
                    f"SlurmctldLogFile={r}/log/slurmctld.log",
                    f"SlurmdLogFile={r}/log/slurmd.log",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=info",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core_Memory",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "MinJobAge=3600",
                    "KillWait=5",  # scancel: SIGTERM, then SIGKILL after 5 s  # no accounting: finished jobs stay visible to squeue/scontrol this long
                    "SchedulerParameters=sched_interval=1",
                    "GresTypes=gpu",
                    # Count-only GPUs: SLURM schedules and records GPU requests; the jobs themselves run on the CPU.
                    f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} "
                    f"Gres=gpu:{self.gpus} State=UNKNOWN",
                    f"PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        # SLURM drops GPUs without a device file; placeholder files give it GPUs to schedule (nothing opens them).
        for i in range(self.gpus):
            (r / f"dev/gpu{i}").touch()
        (r / "etc/gres.conf").write_text(f"Name=gpu File={r}/dev/gpu[0-{self.gpus - 1}]\n")

    # ------------------------------------------------------------------------------ lifecycle

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / f"log/{name}.out", "wb")
        self.procs[name] = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            preexec_fn=die_with_parent,
            start_new_session=True,
        )
        out.close()

    def start(self, timeout: float = 60) -> LocalCluster:
        if os.geteuid() != 0:
            raise ClusterError("the test cluster runs its daemons as root (SlurmUser=root); run the tests as root")
        binaries = {name: _which(name) for name in DAEMONS + CLIENTS}
        self._write_config()
        r = self.root
        self._spawn(
            "munged",
            [
                binaries["munged"],
                "-F",
                "--force",
                f"--key-file={r}/munge/munge.key",
                f"--socket={self.munge_socket}",
                f"--pid-file={r}/run/munged.pid",
                f"--log-file={r}/log/munged.log",
                f"--seed-file={r}/munge/seed",
            ],
        )
        self._wait(lambda: self.munge_socket.exists(), 10, "munged did not create its socket")
        self._spawn("slurmctld", [binaries["slurmctld"], "-D", "-i", "-f", str(self.conf)])
        self._wait(
            lambda: self.client("scontrol", "ping", check=False).returncode == 0,
            timeout,
            "slurmctld does not answer 'scontrol ping'",
        )
        # Jobs run under slurmd and see its mount namespace. Snakemake's job step calls `srun` with every
        # SLURM_* variable (SLURM_CONF too) removed, so srun reads the default /etc/slurm/slurm.conf:
        # slurmd gets a private mount namespace in which /etc/slurm is this cluster's etc/ directory.
        # `unshare` and `sh` exec, so the Popen PID is slurmd's own.
        mount = f"mount --bind {shlex.quote(str(self.conf.parent))} /etc/slurm"
        slurmd = shlex.join([binaries["slurmd"], "-D", "-N", NODE, "-f", str(self.conf)])
        self._spawn(
            "slurmd",
            [
                _which("unshare"),
                "--mount",
                "--propagation",
                "private",
                "--",
                "/bin/sh",
                "-c",
                f"{mount} && exec {slurmd}",
            ],
        )
        self._wait(lambda: self.node_state() == "idle", timeout, f"node {NODE} did not become idle")
        return self

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise ClusterError(f"{', '.join(dead)} exited while starting the cluster\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise ClusterError(f"{what} within {timeout:.0f} s\n{self.logs()}")

    def stop(self) -> None:
        """Cancel what is still queued or running, then end the daemons by PID (slurmd first)."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            ids = self.client("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if ids:
                self.client("scancel", *ids, check=False)
                # slurmd must still run to end the jobs' processes (KillWait is short here)
                deadline = time.monotonic() + 30
                while (
                    time.monotonic() < deadline and self.client("squeue", "-h", "-o", "%i", check=False).stdout.strip()
                ):
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -------------------------------------------------------------------------------- queries

    def client(self, name: str, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        proc = subprocess.run([name, *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"{name} {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def node_state(self) -> str:
        proc = self.client("sinfo", "-h", "-N", "-n", NODE, "-o", "%T", check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def jobs(self) -> list[dict[str, str]]:
        """Every job the controller knows (all of them: MinJobAge outlives a test), as scontrol reports it."""
        out = self.client("scontrol", "-o", "show", "job").stdout
        return [] if out.startswith("No jobs") else parse_records(out)

    def logs(self, lines: int = 30) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

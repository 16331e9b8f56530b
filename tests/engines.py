"""Real sweep engines on this machine, for the engine tests: a one-node SLURM cluster (munged,
slurmctld and slurmd on 127.0.0.1, every file under one folder) and a local Ray cluster.

Each is a context manager that starts the daemons in their own process groups and stops them
(SIGTERM, then SIGKILL, of the whole group) when the block ends, also on failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sacct")


def missing_engine(programs: tuple[str, ...] = (), modules: tuple[str, ...] = ()) -> str | None:
    """What of ``programs``/``modules`` is not installed, as a skip reason, or None."""
    import importlib.util

    missing = [p for p in programs if shutil.which(p) is None]
    missing += [m for m in modules if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


def require_engine(reason: str | None, how: str) -> None:
    """Skip when an engine is missing on a developer machine; fail in CI (``CI=true``), which
    installs the engines (``.ci/run``) and must run these tests."""
    if reason is None:
        return
    message = f"{reason} ({how})"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true but the sweep engine is missing: {message}", pytrace=False)
    pytest.skip(message)


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stop_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session``), SIGKILL after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_for(predicate, timeout: float, what: str, logs: list[Path] = ()) -> None:
    """Poll ``predicate`` until true; on timeout fail with the tail of ``logs``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2000:]}" for p in logs if p.exists())
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


@dataclass
class SlurmCluster:
    """A running one-node cluster: ``env`` points the SLURM commands at it."""

    root: Path
    partition: str
    node: str
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *args: str) -> str:
        """Run a SLURM client command against this cluster; its stdout."""
        return subprocess.run(args, env=self.env, capture_output=True, text=True, check=True, timeout=60).stdout

    @property
    def jobcomp(self) -> Path:
        """The job completion log (``jobcomp/filetxt``): one line per finished job."""
        return self.root / "jobcomp.txt"

    def finished_jobs(self) -> list[dict[str, str]]:
        """The job completion log's records (``JobId=1 UserId=... JobState=COMPLETED ...``) as dicts."""
        if not self.jobcomp.exists():
            return []
        return [
            dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in self.jobcomp.read_text().splitlines()
        ]


SLURM_CONF = """\
ClusterName=fusionbench
SlurmctldHost={hostname}(127.0.0.1)
MailProg=/bin/true
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MinJobAge=3600
NodeName={node} NodeAddr=127.0.0.1 NodeHostname={hostname} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


@contextlib.contextmanager
def slurm_cluster(root: Path, *, cpus: int = 2, mem_mb: int = 4096, partition: str = "cpu") -> Iterator[SlurmCluster]:
    """munged + slurmctld + slurmd for one node (this machine, 127.0.0.1), all state under ``root``."""
    node = "fbnode"
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o755)  # munged: the socket's folder must be reachable by all
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    ctld_port, slurmd_port = free_ports(2)
    conf = root / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            node=node,
            hostname=socket.gethostname().split(".")[0],
            root=root,
            ctld_port=ctld_port,
            slurmd_port=slurmd_port,
            user=os.environ.get("USER") or "root",
            cpus=cpus,
            mem_mb=mem_mb,
            partition=partition,
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for var in [v for v in env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and v != "SLURM_CONF"]:
        del env[var]  # a test run inside a SLURM job must not leak that job into this cluster
    cluster = SlurmCluster(root=root, partition=partition, node=node, env=env)
    logs = [root / "log" / "munged.log", root / "log" / "slurmctld.log", root / "log" / "slurmd.log"]

    def start(*cmd: str) -> None:
        out = open(root / "log" / f"{Path(cmd[0]).name}.console", "ab")
        cluster.procs.append(
            subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        )

    try:
        start(
            "munged",
            "-F",
            "-f",
            f"--socket={root}/munge/munge.socket",
            f"--key-file={key}",
            f"--pid-file={root}/munge/munged.pid",
            f"--log-file={root}/log/munged.log",
            f"--seed-file={root}/munge/munged.seed",
        )
        wait_for(lambda: (root / "munge" / "munge.socket").exists(), 30, "munged's socket", logs)
        start("slurmctld", "-D", "-i", "-f", str(conf))
        start("slurmd", "-D", "-N", node, "-f", str(conf))

        def node_idle() -> bool:
            for proc in cluster.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True)
            return out.stdout.strip() == "idle"

        wait_for(node_idle, 60, "the SLURM node to be idle", logs)
        yield cluster
    finally:
        for proc in reversed(cluster.procs):
            stop_group(proc)


@dataclass
class RayCluster:
    """A running local Ray cluster: ``address`` for ``ray.init``, ``env`` for the commands."""

    address: str
    temp_dir: Path
    env: dict[str, str]


@contextlib.contextmanager
def ray_cluster(root: Path, *, num_cpus: int = 2) -> Iterator[RayCluster]:
    """``ray start --head`` on 127.0.0.1 with its files under ``root`` (no dashboard); ``ray stop`` at the end."""
    ray_exe = str(Path(sys.executable).with_name("ray"))
    (port,) = free_ports(1)
    temp_dir = root / "ray"  # Ray's socket paths must stay short (AF_UNIX limit): keep ``root`` short
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [
        ray_exe,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        "--include-dashboard=false",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    root.mkdir(parents=True, exist_ok=True)
    log = root / "ray_start.log"
    proc = None
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            proc.wait(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
        yield RayCluster(address=f"127.0.0.1:{port}", temp_dir=temp_dir, env=env)
    finally:
        subprocess.run([ray_exe, "stop", "--force"], env=env, capture_output=True, timeout=120)
        if proc is not None:
            stop_group(proc)

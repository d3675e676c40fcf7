"""A real single-node Slurm cluster for tests: munged, slurmctld and slurmd from Debian's packages (`slurmctld slurmd
slurm-client munge`), every file under a temporary folder, every daemon on 127.0.0.1, stopped by the pids it started.

    with slurm_cluster(tmp_path) as env:      # env: SLURM_CONF and PATH for sbatch/squeue/scancel
        subprocess.run(["sbatch", ...], env={**os.environ, **env})

Nothing is written to /etc/slurm or /run: munged gets a private socket, Slurm a private config (`SLURM_CONF`).
Needs root (slurmd runs jobs as their submitting user, and the tests submit as root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from services import free_port

PACKAGES = "slurmctld slurmd slurm-client munge"


def missing() -> str | None:
    """What is missing to start a cluster here, in one line (None: everything is here)."""
    for binary in ("munged", "slurmctld", "slurmd", "sbatch"):
        if shutil.which(binary) is None and not Path(f"/usr/sbin/{binary}").exists():
            return f"`{binary}` is not installed: apt-get install {PACKAGES}"
    if os.geteuid() != 0:
        return "the Slurm tests start slurmd, which must run as root"
    return None


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = int(f.readline().split()[1])
    return total_kb // 1024 - 1024  # slurmd refuses a node that claims more than it has


def write_config(root: Path, munge_socket: Path) -> Path:
    cpus = os.cpu_count() or 1
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=athanortest",
        "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "ReturnToService=2",
        "JobRequeue=1",
        "MinJobAge=600",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        "KillWait=5",
        f"NodeName=node0 NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_memory_mb()} State=UNKNOWN",
        "PartitionName=debug Nodes=node0 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
        "",
    ]))
    return conf


@contextlib.contextmanager
def slurm_cluster(root: Path, *, ready_seconds: float = 60.0) -> Iterator[dict[str, str]]:
    """Start munged, slurmctld and slurmd under `root`; yield the environment that points clients at them."""
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)  # munged runs as the munge user and must reach its socket folder
    munge_dir = root / "munge"
    munge_dir.mkdir()
    shutil.chown(munge_dir, "munge", "munge")
    os.chmod(munge_dir, 0o755)  # munged requires every client to be able to reach its socket
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    munge_socket = munge_dir / "munge.socket"
    conf = write_config(root, munge_socket)
    env = {"SLURM_CONF": str(conf), "PATH": f"/usr/sbin:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    daemons: list[subprocess.Popen] = []
    try:
        daemons.append(_start(["runuser", "-u", "munge", "--", "munged", "-F", f"--socket={munge_socket}",
                               f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
                               f"--seed-file={munge_dir / 'munged.seed'}"], root / "munged.out", env))
        _wait(lambda: munge_socket.exists(), 10, "munged did not create its socket", root)
        daemons.append(_start(["slurmctld", "-D", "-i", "-f", str(conf)], root / "slurmctld.out", env))
        daemons.append(_start(["slurmd", "-D", "-N", "node0", "-f", str(conf)], root / "slurmd.out", env))
        _wait(lambda: _node_idle(env), ready_seconds, "node0 did not become idle", root)
        yield env
    finally:
        for proc in reversed(daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(daemons):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _start(argv: list[str], out: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=open(out, "wb"), stderr=subprocess.STDOUT, env={**os.environ, **env},
                            start_new_session=True)


def _node_idle(env: dict[str, str]) -> bool:
    done = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=10)
    return done.returncode == 0 and done.stdout.strip() == "idle"


def _wait(ready, seconds: float, what: str, root: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.3)
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(root.glob("*.out"))
                     + sorted(root.glob("*.log")))
    raise RuntimeError(f"{what} within {seconds:g} s\n{logs}")

"""A real Slurm cluster of one or two nodes for tests: munged, slurmctld and one slurmd per node from Debian's
packages (`slurmctld slurmd slurm-client munge`), every file under a temporary folder, stopped by the pids it started.

Each node is a network namespace of its own (tests/jobs/netns.py: with two, joined by a veth pair, 10.77.0.1 and
10.77.0.2, nothing routed outside; one node has only its loopback). slurmctld and node0's slurmd run in node 0's
namespace, node1's slurmd in node 1's; munged (a unix socket: files cross namespaces) runs here. Clients (sbatch,
squeue, athanor) run in node 0's namespace:

    with slurm_cluster(tmp_path, nodes=2) as cluster:
        cluster.run(["sbatch", ...])      # `nsenter --net=<node 0's namespace> -- sbatch ...`
        cluster.kill_node(1)              # SIGKILL every process in node 1's namespace (its slurmd, steps, ranks)
        cluster.restart_node(1)           # its slurmd again, so the node can come back

Nothing is written to /etc/slurm or /run/munge: munged gets a private socket, Slurm a private config (`SLURM_CONF`).
Needs root (slurmd runs jobs as their submitting user, the tests submit as root; namespaces need it too).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netns import IFACE, Network, node_network

PACKAGES = "slurmctld slurmd slurm-client munge"
SLURMD_PORT = 6818  # every slurmd has a namespace of its own, so one fixed port; slurmctld's is in node 0's


def missing() -> str | None:
    """What is missing to start a cluster here, in one line (None: everything is here)."""
    for binary in ("munged", "slurmctld", "slurmd", "sbatch", "ip"):
        if shutil.which(binary) is None and not Path(f"/usr/sbin/{binary}").exists():
            return f"`{binary}` is not installed: apt-get install {PACKAGES} iproute2"
    if os.geteuid() != 0:
        return "the Slurm tests start slurmd and network namespaces, which must run as root"
    return None


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = int(f.readline().split()[1])
    return total_kb // 1024 - 1024  # slurmd refuses a node that claims more than it has


def write_config(root: Path, munge_socket: Path, addresses: list[str]) -> Path:
    cpus = os.cpu_count() or 1
    names = [f"node{i}" for i in range(len(addresses))]
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=athanortest",
        f"SlurmctldHost=localhost({addresses[0]})",
        "SlurmctldPort=6817",
        f"SlurmdPort={SLURMD_PORT}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool' / '%n'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd-%n.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "ReturnToService=2",  # a lost node that registers again is back in service
        "JobRequeue=1",
        "MinJobAge=600",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=5",  # a lost node is DOWN within seconds (slurmctld pings every third of it)
        "KillWait=5",
        *(f"NodeName={name} NodeAddr={addr} CPUs={cpus} RealMemory={_memory_mb()} State=UNKNOWN"
          for name, addr in zip(names, addresses)),
        f"PartitionName=debug Nodes={','.join(names)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
        "",
    ]))
    return conf


@dataclass
class Cluster:
    """A started cluster: node i runs in `net.namespaces[i]`, at `net.addresses[i]`."""

    root: Path
    conf: Path
    net: Network
    env: dict[str, str]
    """SLURM_CONF and PATH for the clients (and GLOO_SOCKET_IFNAME with two nodes)."""
    daemons: list[subprocess.Popen] = field(default_factory=list)

    @property
    def prefix(self) -> list[str]:
        """What runs a command in node 0's namespace (where slurmctld is)."""
        return self.net.enter(0)

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", {**os.environ, **self.env})
        kwargs.setdefault("timeout", 60)
        return subprocess.run([*self.prefix, *argv], capture_output=True, text=True, **kwargs)

    def kill_node(self, index: int) -> list[int]:
        """SIGKILL every process in node `index`'s namespace, as a machine that loses power; the pids killed."""
        pids = self.net.kill(index)
        for proc in self.daemons:
            if proc.pid in pids:
                proc.wait(timeout=10)
        return pids

    def restart_node(self, index: int) -> None:
        self.daemons.append(self._slurmd(index))

    def _slurmd(self, index: int) -> subprocess.Popen:
        return _start([*self.net.enter(index), "slurmd", "-D", "-N", f"node{index}", "-f", str(self.conf)],
                      self.root / f"slurmd-node{index}.out", self.env)

    def node_states(self) -> dict[str, str]:
        done = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=15)
        return dict(line.split() for line in done.stdout.splitlines() if len(line.split()) == 2)


@contextlib.contextmanager
def slurm_cluster(root: Path, *, nodes: int = 1, ready_seconds: float = 60.0) -> Iterator[Cluster]:
    """Start munged, slurmctld and `nodes` slurmd under `root`, each node in a network namespace of its own."""
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)  # munged runs as the munge user and must reach its socket folder
    munge_dir = root / "munge"
    munge_dir.mkdir()
    shutil.chown(munge_dir, "munge", "munge")
    os.chmod(munge_dir, 0o755)  # munged requires every client to be able to reach its socket
    for sub in ("state", *(f"spool/node{i}" for i in range(nodes))):
        (root / sub).mkdir(parents=True)
    munge_socket = munge_dir / "munge.socket"
    with node_network(nodes) as net:
        conf = write_config(root, munge_socket, net.addresses)
        env = {"SLURM_CONF": str(conf), "PATH": f"/usr/sbin:{os.environ.get('PATH', '/usr/bin:/bin')}",
               **({"GLOO_SOCKET_IFNAME": IFACE} if nodes > 1 else {})}
        cluster = Cluster(root, conf, net, env)
        try:
            cluster.daemons.append(_start(
                ["runuser", "-u", "munge", "--", "munged", "-F", f"--socket={munge_socket}",
                 f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
                 f"--seed-file={munge_dir / 'munged.seed'}"], root / "munged.out", env))
            _wait(lambda: munge_socket.exists(), 10, "munged did not create its socket", root)
            cluster.daemons.append(_start([*cluster.prefix, "slurmctld", "-D", "-i", "-f", str(conf)],
                                          root / "slurmctld.out", env))
            cluster.daemons += [cluster._slurmd(i) for i in range(nodes)]
            _wait(lambda: len(states := cluster.node_states()) == nodes and set(states.values()) == {"idle"},
                  ready_seconds, "the nodes did not become idle", root)
            yield cluster
        finally:
            _stop(cluster)  # then node_network kills what they left in the namespaces (job steps, ranks)


def _stop(cluster: Cluster) -> None:
    """SIGTERM the daemons this started, SIGKILL those that do not stop."""
    for proc in reversed(cluster.daemons):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(cluster.daemons):
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start(argv: list[str], out: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=open(out, "ab"), stderr=subprocess.STDOUT, env={**os.environ, **env},
                            start_new_session=True)


def _wait(ready: Any, seconds: float, what: str, root: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.3)
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(root.glob("*.out"))
                     + sorted(root.glob("*.log")))
    raise RuntimeError(f"{what} within {seconds:g} s\n{logs}")

"""Machines for multi-node tests: each node a named network namespace (`athanor-<pid>-<tag><i>`, `lo` up); two are
joined by a veth pair, both ends named IFACE inside their namespaces, SUBNET.1/24 and SUBNET.2/24, nothing routed
outside. One node has only its loopback (127.0.0.1). Processes share this machine's files (unix sockets included).

    with node_network(2, tag="n") as net:
        subprocess.run([*net.enter(1), "slurmd", ...])   # in node 1's namespace (network only)
        net.kill(1)                                      # SIGKILL every process in it: the node is lost

On the way out every process still in a namespace is killed (`ip netns pids`) and the namespaces are deleted.
Needs root.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

IFACE = "athveth"
"""The veth end's name in each namespace: what GLOO_SOCKET_IFNAME names (with two interfaces, gloo needs one)."""


@dataclass(frozen=True)
class Network:
    namespaces: list[str]
    addresses: list[str]

    def enter(self, index: int) -> list[str]:
        """The argv prefix that runs a command in node `index`'s namespace, network only: `ip netns exec` would
        also remount /sys, hiding the cgroup filesystem slurmd needs."""
        return ["nsenter", f"--net=/run/netns/{self.namespaces[index]}", "--"]

    def pids(self, index: int) -> list[int]:
        return _pids(self.namespaces[index])

    def kill(self, index: int) -> list[int]:
        """SIGKILL every process in node `index`'s namespace, as a machine that loses power; the pids killed."""
        pids = self.pids(index)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids


@contextlib.contextmanager
def node_network(nodes: int, *, tag: str = "n", subnet: str = "10.77.0") -> Iterator[Network]:
    """`nodes` (one or two) namespaces; everything left in them is killed and they are deleted on the way out."""
    if nodes not in (1, 2):
        raise ValueError("one or two nodes (more would need a bridge between the namespaces)")
    net = Network([f"athanor-{os.getpid()}-{tag}{i}" for i in range(nodes)],
                  [f"{subnet}.{i + 1}" for i in range(nodes)] if nodes > 1 else ["127.0.0.1"])
    try:
        for ns in net.namespaces:
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        if nodes == 2:
            _ip("-n", net.namespaces[0], "link", "add", IFACE, "type", "veth", "peer", "name", IFACE, "netns",
                net.namespaces[1])
            for ns, addr in zip(net.namespaces, net.addresses):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", IFACE)
                _ip("-n", ns, "link", "set", IFACE, "up")
        yield net
    finally:
        listed = _ip("netns", "list", check=False).stdout.split()
        for index, ns in enumerate(net.namespaces):
            if ns in listed:
                net.kill(index)  # whatever the test's daemons left behind (job steps, ranks)
                _ip("netns", "del", ns, check=False)


def _pids(ns: str) -> list[int]:
    return [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)

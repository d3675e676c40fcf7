"""The driver of one athanor Ray job: the entrypoint RayLauncher submits, run by the Ray job on the cluster.

    python -m athanor.jobs.launchers.ray_driver --job ID --nodes N --devices D --cpus-per-rank C --gpus-per-rank G

It reserves one placement-group bundle per node, {CPU: C×D, GPU: G×D}, then starts D Ray tasks in each bundle, one
per rank, each running the common entry point `python -m athanor.jobs.worker --job ID --engine-task` with a
torchrun-style environment (RANK, LOCAL_RANK, NODE_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT). A bundle
per node, not per rank: Lightning numbers a node's ranks LOCAL_RANK 0..D-1 and drives `cuda:LOCAL_RANK`, so a node's
ranks must share one machine and see the same GPUs (the bundle's, in CUDA_VISIBLE_DEVICES), which per-rank bundles
and Ray's one-GPU-per-task CUDA_VISIBLE_DEVICES do not give. Several nodes are spread over machines where Ray can.

The ranks' output is their Ray task's, so Ray's job logs carry it. A rank dies with its Ray worker (parent-death
signal): when a rank fails, or Ray stops the job (SIGTERM here), every other rank is killed. The driver exits
non-zero when any rank failed. A rank lost with its node (its task failed), or one whose peer was (exit 143: a broken
collective, jobs/leases.py), makes the driver wait, bounded, for Ray to declare the node dead and name it
("ray_driver: node 1 (10.0.0.6) was lost"): RayLauncher puts that line in the job's end.

Tests: `.venv/bin/python -m pytest tests/jobs/test_ray.py -q`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from typing import Any

from athanor.jobs.launchers import ENGINE_ID_ENV, RANKS_LAUNCHED_ENV

WAIT_NOTE_SECONDS = 60.0
"""How often the driver says it still waits for the cluster's resources (a busy cluster is normal, like Slurm's
PENDING; `athanor cancel --force` stops the wait)."""
LOST_NODE_SECONDS = 60.0
"""How long a driver whose rank was lost, or lost its peer, waits for Ray to declare a node dead (Ray's health checks
take about 30 s by default) before it ends the job without naming one."""
PEER_LOST_EXIT = 143
"""The exit code of a rank whose attempt the engine ended: SIGTERM, or a collective broken by a lost peer."""
# Runs in the rank's own Python before the athanor entry point: die with the Ray worker that started it
# (prctl PR_SET_PDEATHSIG = 1, SIGKILL = 9). A wrapper, not preexec_fn: the Ray worker has threads, and code run
# between fork and exec in a threaded process can deadlock.
_DIE_WITH_PARENT = ("import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 9); "
                    "os.getppid() == int(sys.argv[1]) or os._exit(137); os.execv(sys.argv[2], sys.argv[2:])")


def rank_envs(nodes: int, devices: int, master_addr: str, master_port: int, engine_id: str,
              node_gpus: list[list[str]] | None = None) -> list[tuple[int, dict[str, str]]]:
    """(bundle index, environment) of every rank, in global rank order (pure: tested without Ray). Node j is
    bundle j; its ranks are j×D … j×D+D-1 with LOCAL_RANK 0 … D-1; `node_gpus[j]` are bundle j's GPU ids."""
    ranks = []
    for rank in range(nodes * devices):
        node, local = divmod(rank, devices)
        env = {"RANK": str(rank), "LOCAL_RANK": str(local), "NODE_RANK": str(node),
               "WORLD_SIZE": str(nodes * devices), "LOCAL_WORLD_SIZE": str(devices),
               "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
               RANKS_LAUNCHED_ENV: "1", ENGINE_ID_ENV: engine_id}
        if node_gpus and node_gpus[node]:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(node_gpus[node])
        ranks.append((node, env))
    return ranks


def _probe(want_port: bool) -> tuple[str, list[str], int | None]:
    """In a bundle: (this node's IP, the bundle's GPU ids, a free port on that IP when `want_port`)."""
    # why: runs inside a Ray task, which imports what it needs itself
    import socket

    # why: optional dependency (the `ray` extra)
    import ray
    from ray.util import get_node_ip_address

    ip = get_node_ip_address()
    port = None
    if want_port:
        with socket.socket() as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
    return ip, [str(g) for g in ray.get_gpu_ids()], port


def _run_rank(argv: list[str], env: dict[str, str], cwd: str) -> int:
    """In a bundle: one rank, to its end; its exit code."""
    # why: runs inside a Ray task, which imports what it needs itself
    import os
    import subprocess

    wrapped = [argv[0], "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]
    return subprocess.run(wrapped, env={**os.environ, **env}, cwd=cwd).returncode


def lost_nodes(ips: list[str], nodes: list[dict[str, Any]]) -> list[int]:
    """Indexes of the job's nodes (by IP) that Ray lists dead and not alive again (pure: `ray.nodes()` as given)."""
    dead = {n["NodeManagerAddress"] for n in nodes if not n["Alive"]}
    alive = {n["NodeManagerAddress"] for n in nodes if n["Alive"]}
    return [j for j, ip in enumerate(ips) if ip in dead and ip not in alive]


def _name_lost_nodes(ips: list[str], seconds: float = LOST_NODE_SECONDS) -> None:
    """Wait for Ray to declare one of the job's nodes dead, and say which."""
    # why: optional dependency (the `ray` extra)
    import ray

    deadline = time.monotonic() + seconds
    while not (lost := lost_nodes(ips, ray.nodes())) and time.monotonic() < deadline:
        time.sleep(1.0)
    for j in lost:
        print(f"ray_driver: node {j} ({ips[j]}) was lost", flush=True)


def _rank_failed(rank: int, code: int, ips: list[str]) -> None:
    """Say so; a rank lost, or one that lost its peer, on a job spread over several nodes: name the node lost."""
    print(f"ray_driver: rank {rank} exited with code {code}; stopping the others", flush=True)
    if code in (-1, PEER_LOST_EXIT) and len(set(ips)) > 1:
        _name_lost_nodes(ips)


def _stop(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m athanor.jobs.launchers.ray_driver")
    parser.add_argument("--job", required=True)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--cpus-per-rank", type=float, default=1.0)
    parser.add_argument("--gpus-per-rank", type=float, default=0.0)
    args = parser.parse_args(argv)
    engine_id = os.environ.get(ENGINE_ID_ENV)
    if not engine_id:
        print(f"ray_driver: {ENGINE_ID_ENV} is not set; only RayLauncher submits this driver", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop)  # Ray's stop: the `finally` below kills every rank

    # why: optional dependency (the `ray` extra)
    import ray

    # why: optional dependency (the `ray` extra)
    from ray.util.placement_group import placement_group, remove_placement_group

    # why: optional dependency (the `ray` extra)
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.init(address="auto")  # this job's cluster (RAY_ADDRESS, set by Ray's job supervisor); never a new one
    nodes, devices, cpus, gpus = args.nodes, args.devices, args.cpus_per_rank, args.gpus_per_rank
    bundle = {"CPU": cpus * devices, **({"GPU": gpus * devices} if gpus else {})}
    pg = placement_group([bundle] * nodes, strategy="PACK" if nodes == 1 else "SPREAD", name=engine_id)
    refs: list[Any] = []
    pending: list[Any] = []  # the ranks still running: the only ones the `finally` below may cancel
    try:
        started = noted = time.monotonic()
        while not pg.wait(timeout_seconds=1):  # 1 s: SIGTERM is handled between Python bytecodes, not inside Ray
            if time.monotonic() - noted >= WAIT_NOTE_SECONDS:
                noted = time.monotonic()
                print(f"ray_driver: still waiting for {nodes} × {bundle} after {noted - started:.0f} s", flush=True)

        def in_bundle(j: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=j)

        probe = ray.remote(_probe)
        where = ray.get([probe.options(num_cpus=cpus, num_gpus=gpus * devices, max_retries=0,
                                       scheduling_strategy=in_bundle(j)).remote(j == 0) for j in range(nodes)])
        master_addr, _, master_port = where[0]
        ranks = rank_envs(nodes, devices, master_addr, master_port, engine_id,
                          [gpu_ids for _, gpu_ids, _ in where] if gpus else None)
        rank_task = ray.remote(_run_rank)
        entry = [sys.executable, "-m", "athanor.jobs.worker", "--job", args.job, "--engine-task"]
        for rank, (j, env) in enumerate(ranks):
            print(f"ray_driver: rank {rank}/{len(ranks)} on node {j} ({where[j][0]}), master "
                  f"{master_addr}:{master_port}", flush=True)
            # max_retries=0: a rank that died must never be started again behind the job's back.
            refs.append(rank_task.options(num_cpus=cpus, num_gpus=gpus, max_retries=0,
                                          scheduling_strategy=in_bundle(j)).remote(entry, env, os.getcwd()))
            pending.append(refs[-1])
        while pending:
            # A timeout, so that SIGTERM is seen within a second.
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in done:
                rank = refs.index(ref)
                try:
                    code = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 — the worker or node died: the rank failed
                    print(f"ray_driver: rank {rank} was lost: {exc}", flush=True)
                    code = -1
                if code != 0:
                    _rank_failed(rank, code, [ip for ip, _, _ in where])
                    return 1
        print(f"ray_driver: all {len(refs)} ranks exited 0", flush=True)
        return 0
    finally:
        # Ray also ends all of this at the job's end; done here at once, and never to change the exit code. Only
        # ranks still running are cancelled: a forced cancel of a task that already returned can crash this driver
        # in Ray's core worker ("Tried to complete task that was not pending", exit code 1), and Ray would then
        # record FAILED for a job whose every rank exited 0.
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)  # kills the rank's worker; the rank dies with it
        with contextlib.suppress(Exception):
            remove_placement_group(pg)


if __name__ == "__main__":
    sys.exit(main())

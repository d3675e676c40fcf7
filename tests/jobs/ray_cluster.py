"""A real two-node Ray cluster for tests: each node a network namespace of its own (tests/jobs/netns.py: joined by
a veth pair, 10.77.1.1 and 10.77.1.2, nothing routed outside), so that nothing of Ray (which listens on every
interface it can) ever reaches another address: in the namespaces there is no other address.

    python tests/jobs/ray_cluster.py run-scenario --root DIR --worker-ns NS   # in node 0's namespace; JSON, last line
    with ray_head(root, ip) as address: ...                                   # a head (call it in node 0's namespace)

The scenario starts a head here (`ray start --head --block`) and a worker node in the other namespace (`ray start
--address --block`), each stopped by its pid; both get GLOO_SOCKET_IFNAME (the ranks' environment is their node's).
Then, through the `athanor` CLI: a job stopped through Ray and one by `athanor cancel --force`, and two 2-node × 1-rank
CPU DDP jobs of the tiny MiniLM recipe (`submit --wait`) whose worker node is lost mid-training (every process of its
namespace killed): the one with an attempt left is re-queued and resumes from its checkpoint (on the head alone:
SPREAD is a preference) to success, the other FAILS naming the node. Every process still in node 0's
namespace at the end is one this scenario started: it is listed, then killed by pid (the test deletes both).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # Ray's minimum is 75 MiB; the jobs put nothing in it
TINY = TESTS.parent / "recipes" / "minilm_tiny.yaml"
SCENARIO_SECONDS = 780
"""The scenario's own limit (it takes about 4 minutes on 2 busy cores), below pytest's 900 s timeout."""
IFACE = "athveth"  # tests/jobs/netns.py names the veth ends so
HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
          "RAY_health_check_timeout_ms": "1000"}
"""A lost node is declared dead within seconds (Ray's defaults take about 30 s)."""


def missing() -> str | None:
    """What is missing to run the scenario here, in one line (None: everything is here)."""
    for tool, package in (("nsenter", "util-linux"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed: apt-get install {package}"
    if not RAY.exists():
        return f"{RAY} is missing: pip install 'ray[default]' (the [ray] extra)"
    if os.geteuid() != 0:
        return "the Ray test creates network namespaces, which needs root"
    return None


def interfaces() -> list[str]:
    """Every address of this namespace, as `ifname address` (`ip -o addr`)."""
    out = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    return [f"{f[1]} {f[3]}" for f in (line.split() for line in out.splitlines()) if len(f) > 3]


def listening() -> list[str]:
    """The local address of every listening TCP socket in this namespace (from /proc/net/tcp, tcp6)."""
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state != "0A":  # LISTEN
                continue
            hexaddr, port = local.split(":")
            raw = bytes.fromhex(hexaddr)
            # /proc prints each 32-bit word of the address in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
            found.add(f"{socket.inet_ntop(family, raw)}:{int(port, 16)}")
    return sorted(found)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _ray_env(extra: dict[str, str]) -> dict[str, str]:
    """A node's environment: a job's `python` is the one on its PATH; RAY_ADDRESS of the caller must not leak."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PATH=f"{RAY.parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}", RAY_USAGE_STATS_ENABLED="0",
               GLOO_SOCKET_IFNAME=IFACE, **extra)
    return env


@contextlib.contextmanager
def _node(argv: list[str], out: Path, env: dict[str, str], ready: Any, seconds: float, what: str) -> Iterator[None]:
    """`ray start ... --block` to its end: ready within `seconds`, then stopped by its pid."""
    proc = subprocess.Popen(argv, stdout=open(out, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + seconds
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not come up (exit {proc.poll()}):\n"
                                   f"{out.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # `ray start --block` stops every Ray process it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def ray_head(root: Path, ip: str, *, cpus: int = 2, ready_seconds: float = 180.0) -> Iterator[tuple[str, str]]:
    """A Ray head at `ip` with its files under `root`; yields (Jobs API address, GCS address)."""
    root.mkdir(parents=True, exist_ok=True)
    from services import free_port  # tests/ is on the path: pytest's, or the scenario's

    dashboard, gcs = free_port(), free_port()
    # The dashboard serves the Jobs API; Ray's default worker ports are 10002-19999, free ports here are higher.
    argv = [str(RAY), "start", "--head", "--block", f"--node-ip-address={ip}", f"--port={gcs}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--num-cpus={cpus}", "--num-gpus=0", f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--temp-dir={root / 'ray'}", "--disable-usage-stats"]
    address = f"http://127.0.0.1:{dashboard}"
    with _node(argv, root / "head.out", _ray_env(HEALTH), lambda: _ready(f"{address}/api/version")
               and _ready(f"{address}/api/jobs/"), ready_seconds, "the Ray head"):
        yield address, f"{ip}:{gcs}"


@contextlib.contextmanager
def ray_worker(root: Path, enter: list[str], ip: str, gcs: str, address: str, *, cpus: int = 2,
               ready_seconds: float = 180.0) -> Iterator[None]:
    """A worker node at `ip` (its namespace entered by `enter`) joining the head at `gcs`."""
    root.mkdir(parents=True, exist_ok=True)
    argv = [*enter, str(RAY), "start", "--block", f"--address={gcs}", f"--node-ip-address={ip}",
            f"--num-cpus={cpus}", "--num-gpus=0", f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--temp-dir={root / 'ray'}", "--disable-usage-stats"]
    with _node(argv, root / "worker.out", _ray_env({}), lambda: ip in alive_nodes(address), ready_seconds,
               "the Ray worker node"):
        yield


def alive_nodes(address: str) -> list[str]:
    """The IP of every node the cluster counts alive (the dashboard's state API)."""
    try:
        with urllib.request.urlopen(f"{address}/api/v0/nodes?limit=100", timeout=5) as response:
            body = json.load(response)
    except OSError:
        return []
    rows = body.get("data", {}).get("result", {}).get("result", [])
    return [row.get("node_ip") for row in rows if row.get("state") == "ALIVE"]


def leftovers() -> list[tuple[int, str]]:
    """(pid, command line) of every other process in this network namespace: in the scenario's private namespace,
    each one was started by it."""
    mine = os.readlink("/proc/self/ns/net")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if os.readlink(entry / "ns/net") != mine:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if cmdline:  # zombies have none: nothing left to stop
            found.append((int(entry.name), cmdline[:200]))
    return found


def _wait_for(predicate: Any, seconds: float) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (found := predicate()):
            return found
        time.sleep(0.5)
    return None


def _ray_final(client: Any, engine_id: str, seconds: float = 60) -> str:
    """Ray's state of a job once it ended (the driver exits a little after rank 0 recorded the job's end)."""
    state = lambda: str(client.get_job_status(engine_id).value)  # noqa: E731
    return _wait_for(lambda: state() in ("SUCCEEDED", "FAILED", "STOPPED") and state(), seconds) or state()


def _ray_message(client: Any, engine_id: str) -> str:
    """Ray's own words on how a job ended (a failed entrypoint's exit code and last logs)."""
    return str(client.get_job_info(engine_id).message or "")[-1500:]


def scenario(root: Path, worker_ns: str, ips: list[str]) -> dict[str, Any]:
    """Everything the tests assert on, measured in node 0's namespace."""
    sys.path.insert(0, str(TESTS))
    from ray.job_submission import JobSubmissionClient

    result: dict[str, Any] = {"interfaces": interfaces()}
    started = time.monotonic()
    enter = ["nsenter", f"--net=/run/netns/{worker_ns}", "--"]
    with ray_head(root / "head", ips[0]) as (address, gcs), ray_worker(root / "worker", enter, ips[1], gcs, address):
        result["nodes_seconds"] = round(time.monotonic() - started, 1)
        client = JobSubmissionClient(address)
        ray_opts = ["-o", "train.launcher=ray", "-o", "train.accelerator=cpu", "-o", f"train.ray.address={address}"]
        result["cancel"] = _cancel(root / "cancel", ray_opts, client)
        result["listening"] = listening()
        result["lost"] = _lose_node(root, ray_opts, worker_ns, client)
    result["leftovers"] = leftovers()
    for pid, _ in result["leftovers"]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


TWO_NODES = ["-o", "train.strategy=ddp", "-o", "train.num_nodes=2", "-o", "train.devices=1"]


def _ray_run(client: Any, engine_id: str) -> dict[str, Any]:
    """One Ray job (one attempt of an athanor job): Ray's verdict, its words, and its logs' driver lines."""
    logs = str(client.get_job_logs(engine_id) or "")
    return {"engine_id": engine_id, "ray_status": _ray_final(client, engine_id),
            "ray_message": _ray_message(client, engine_id), "rank1_in_ray_logs": "GLOBAL_RANK: 1, MEMBER: 2/2" in logs,
            "driver_lines": [line for line in logs.splitlines() if line.startswith("ray_driver:")],
            "logs_tail": logs[-2000:]}


def _cancel(home: Path, ray_opts: list[str], client: Any) -> dict[str, Any]:
    """Two 1-rank jobs at once: one stopped through Ray itself (like `ray job stop`), one by `athanor cancel
    --force`, which sets the job's cancel flag and then stops the Ray job."""
    from harness import athanor

    from athanor.jobs.store import JobStore

    t0 = time.monotonic()
    submitted = [athanor("submit", str(TINY), *ray_opts, "-o", "train.max_steps=100000", home=home).returncode
                 for _ in range(2)]
    worker = athanor("worker", "--once", home=home, timeout=300)
    by_ray, by_athanor = sorted(JobStore(home).list(), key=lambda j: j.created_at)
    logs = [Path(j.log_path) for j in (by_ray, by_athanor)]
    training = _wait_for(lambda: all(p.exists() and "training for" in p.read_text(errors="replace")
                                     for p in logs), 300)
    client.stop_job(by_ray.engine_id)
    cancel = athanor("cancel", by_athanor.id, "--force", home=home)
    stopped = _wait_for(lambda: athanor("status", by_ray.id, home=home) and
                        all(j.status == "STOPPED" for j in JobStore(home).list()), 90)
    ranks_gone = _wait_for(lambda: not [p for p in leftovers() if "--engine-task" in p[1]], 30)
    result: dict[str, Any] = {
        "seconds": round(time.monotonic() - t0, 1), "submitted": submitted,
        "worker": worker.stdout[-1000:] + worker.stderr[-1500:], "training_started": bool(training),
        "cancel": cancel.returncode, "cancel_output": cancel.stdout[-500:] + cancel.stderr[-1500:],
        "stopped": bool(stopped), "ranks_gone": bool(ranks_gone)}
    for key, job in (("by_ray", by_ray), ("by_athanor", by_athanor)):
        job = JobStore(home).get(job.id)
        result[key] = {"status": job.status, "error": job.error, "engine_id": job.engine_id,
                       "ray_status": _ray_final(client, job.engine_id) if job.engine_id else None,
                       "log_tail": Path(job.log_path).read_text(errors="replace")[-1200:]}
    return result


def _lose_node(root: Path, ray_opts: list[str], worker_ns: str, client: Any) -> dict[str, Any]:
    """Two 2-node jobs (one with an attempt left) training when the worker node is lost: every process of its
    namespace killed, as a machine that loses power. The retried job's two attempts are also the scenario's 2-node
    training: its first Ray job placed one rank per node and checkpointed, its second trained to success.

    No race decides the outcome: the job without attempts left has no reachable end (it can only fail with the
    node) and checkpoints before the retried one is submitted, so when the retried one has checkpointed both are
    training. (Submitted together, a slow start of one let the other train its 150 steps to SUCCEEDED first.)"""
    from harness import CLI, REPO, mlflow_client

    from athanor.jobs.store import JobStore

    t0 = time.monotonic()
    opts = [*ray_opts, *TWO_NODES, "-o", "train.checkpoint_every_n_steps=5"]
    steps = {"last": ["-o", "train.max_steps=100000"], "retried": ["-o", "train.max_steps=150",
                                                                      "-o", "train.max_attempts=2"]}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    homes = {"last": root / "last", "retried": root / "retried"}
    procs: dict[str, subprocess.Popen[str]] = {}
    result: dict[str, Any] = {}
    try:
        checkpointed = []
        for key, home in homes.items():
            procs[key] = subprocess.Popen(
                [*CLI, "submit", str(TINY), "--wait", "--no-progress", *opts, *steps[key]], cwd=REPO,
                env={**env, "ATHANOR_HOME": str(home)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            log = _wait_for(lambda h=home: next(iter((h / "jobs").glob("*/job.log")), None), 300)
            checkpointed.append(bool(log and _wait_for(lambda log=log: list(
                (log.parent / "checkpoints").glob("step=*.ckpt")), 300)))
        result["checkpointed"] = all(checkpointed)
        pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", worker_ns], capture_output=True, text=True,
                                               timeout=30).stdout.split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        result["killed"] = len(pids)
        result["outputs"] = {k: p.communicate(timeout=420)[0][-2000:] for k, p in procs.items()}
        result["returncodes"] = {k: p.returncode for k, p in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for key, home in homes.items():
        job = JobStore(home).list()[0]
        text = Path(job.log_path).read_text(errors="replace")
        resumed = text.split("attempt 2: resuming from ")[1].split()[0] if "attempt 2: resuming from " in text else ""
        tracking = mlflow_client(home)
        parents = [r.info.run_id for r in tracking.search_runs([tracking.get_run(job.mlflow_run_id).info.experiment_id])
                   if "mlflow.parentRunId" not in r.data.tags] if job.mlflow_run_id else []
        result[key] = {"status": job.status, "attempts": job.attempts, "error": job.error, "resumed": resumed,
                       "parents": parents, "run": job.mlflow_run_id, "engine": job.engine,
                       "log_tail": text[-1500:]}
        if key == "retried" and job.engine_id:  # Ray's job ids are per attempt: athanor-<job>-a<attempt>
            result[key]["ray_runs"] = [_ray_run(client, job.engine_id.rsplit("-a", 1)[0] + f"-a{attempt}")
                                       for attempt in range(1, job.attempts + 1)]
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result


def _past_deadline(signum: int, frame: Any) -> None:
    raise TimeoutError("the scenario ran past its --seconds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/jobs/ray_cluster.py")
    parser.add_argument("command", choices=["run-scenario"])
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--worker-ns", required=True, help="the worker node's network namespace (`ip netns`)")
    parser.add_argument("--ips", nargs=2, required=True, help="the head's and the worker node's addresses")
    parser.add_argument("--seconds", type=int, default=SCENARIO_SECONDS, help="stop, clean up and report by then")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(TESTS.parent))  # the repo: jobs.store
    # Its own deadline, under the test's: a scenario killed from outside would leave the head running.
    signal.signal(signal.SIGALRM, _past_deadline)
    signal.alarm(args.seconds)
    try:
        result = scenario(args.root, args.worker_ns, args.ips)
    except Exception as exc:  # noqa: BLE001 — the test prints it; the namespace is cleaned up either way
        result = {"error": f"{type(exc).__name__}: {exc}", "leftovers": leftovers()}
        for pid, _ in result["leftovers"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

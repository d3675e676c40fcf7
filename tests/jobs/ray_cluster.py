"""A real single-node Ray head for tests, run inside a network namespace that has only the loopback interface, so
that nothing of Ray (which swaps `--node-ip-address=127.0.0.1` for the machine's own address and listens on every
interface when it can) ever reaches another address: in the namespace there is no other address.

    python tests/jobs/ray_cluster.py run-scenario --root DIR   # (inside the namespace) a JSON result, last line
    in_loopback_namespace([...])                               # run a command in a fresh namespace with only lo up
    with ray_head(root) as address: ...                        # a head (call it inside the namespace)

The scenario starts one head (`ray start --head --block`, stopped by its pid), then through the `athanor` CLI: a
2-rank CPU DDP job of the tiny MiniLM recipe (`submit --wait`), and a job stopped by `athanor cancel --force`.
Every process still in the namespace at the end is one this scenario started: it is listed, then killed by pid.
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
SCENARIO_SECONDS = 720
"""The scenario's own limit (it takes about 90 s on 2 busy cores), below pytest's 900 s timeout."""


def missing() -> str | None:
    """What is missing to run the scenario here, in one line (None: everything is here)."""
    for tool, package in (("unshare", "util-linux"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed: apt-get install {package}"
    if not RAY.exists():
        return f"{RAY} is missing: pip install 'ray[default]' (the [ray] extra)"
    probe = subprocess.run(["unshare", "--net", *([] if os.geteuid() == 0 else ["--map-root-user"]), "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace (`unshare --net`): {probe.stderr.strip()}"
    return None


def in_loopback_namespace(argv: list[str], *, timeout: float, env: dict[str, str] | None = None
                          ) -> subprocess.CompletedProcess:
    """`argv` in a new network namespace whose only interface is `lo`, brought up first."""
    userns = [] if os.geteuid() == 0 else ["--map-root-user"]
    return subprocess.run(["unshare", "--net", *userns, "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
                           *argv], capture_output=True, text=True, timeout=timeout, env=env)


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


@contextlib.contextmanager
def ray_head(root: Path, *, cpus: int = 2, ready_seconds: float = 180.0) -> Iterator[str]:
    """A Ray head on 127.0.0.1 with its files under `root`; yields the Jobs API address. Stopped by its pid."""
    root.mkdir(parents=True, exist_ok=True)
    from services import free_port  # tests/ is on the path: pytest's, or the scenario's

    dashboard = free_port()
    # The dashboard serves the Jobs API; Ray's default worker ports are 10002-19999, free ports here are higher.
    argv = [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--num-cpus={cpus}", "--num-gpus=0", f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--temp-dir={root / 'ray'}", "--disable-usage-stats"]
    # A job's `python` is the one on the head's PATH; RAY_ADDRESS of the caller must not leak into the head.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PATH=f"{RAY.parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}", RAY_USAGE_STATS_ENABLED="0")
    out = root / "head.out"
    head = subprocess.Popen(argv, stdout=open(out, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + ready_seconds
        while not (_ready(f"{address}/api/version") and _ready(f"{address}/api/jobs/")):
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not come up (exit {head.poll()}):\n"
                                   f"{out.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield address
    finally:
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)  # `ray start --block` stops every Ray process it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()


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


def scenario(root: Path) -> dict[str, Any]:
    """Everything the tests assert on, measured inside the namespace."""
    sys.path.insert(0, str(TESTS))
    from harness import athanor
    from ray.job_submission import JobSubmissionClient

    from athanor.jobs.store import JobStore

    result: dict[str, Any] = {"interfaces": interfaces()}
    started = time.monotonic()
    with ray_head(root / "head") as address:
        result["head_seconds"] = round(time.monotonic() - started, 1)
        client = JobSubmissionClient(address)
        ray_opts = ["-o", "train.launcher=ray", "-o", "train.accelerator=cpu", "-o", f"train.ray.address={address}"]

        # A 2-rank DDP job, followed to its end by `submit --wait`.
        t0 = time.monotonic()
        home = root / "train"
        done = athanor("submit", str(TINY), "--wait", "--no-progress", *ray_opts, "-o", "train.strategy=ddp",
                       "-o", "train.devices=2", "-o", "train.max_steps=12", home=home, timeout=900)
        job = JobStore(home).list()[0]
        shown = athanor("logs", job.id, "--engine", home=home)  # Ray's job logs, through the launcher
        logs = shown.stdout if shown.returncode == 0 else shown.stderr
        result["train"] = {
            "seconds": round(time.monotonic() - t0, 1), "returncode": done.returncode,
            "output": (done.stdout[-1500:] + done.stderr[-2500:]), "status": job.status, "engine": job.engine,
            "engine_id": job.engine_id, "attempts": job.attempts, "error": job.error,
            "ray_status": _ray_final(client, job.engine_id) if job.engine_id else None,
            "ray_message": _ray_message(client, job.engine_id) if job.engine_id else None,
            "rank1_in_ray_logs": "GLOBAL_RANK: 1, MEMBER: 2/2" in logs,
            "driver_lines": [line for line in logs.splitlines() if line.startswith("ray_driver:")],
            "logs_tail": logs[-2000:]}
        result["listening"] = listening()

        # Two 1-rank jobs at once: one stopped through Ray itself (like `ray job stop`), one by `athanor cancel
        # --force`, which sets the job's cancel flag and then stops the Ray job.
        t0 = time.monotonic()
        home = root / "cancel"
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
        result["cancel"] = {
            "seconds": round(time.monotonic() - t0, 1), "submitted": submitted,
            "worker": worker.stdout[-1000:] + worker.stderr[-1500:], "training_started": bool(training),
            "cancel": cancel.returncode, "cancel_output": cancel.stdout[-500:] + cancel.stderr[-1500:],
            "stopped": bool(stopped), "ranks_gone": bool(ranks_gone)}
        for key, job in (("by_ray", by_ray), ("by_athanor", by_athanor)):
            job = JobStore(home).get(job.id)
            result["cancel"][key] = {
                "status": job.status, "error": job.error, "engine_id": job.engine_id,
                "ray_status": _ray_final(client, job.engine_id) if job.engine_id else None,
                "log_tail": Path(job.log_path).read_text(errors="replace")[-1200:]}
    result["leftovers"] = leftovers()
    for pid, _ in result["leftovers"]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _past_deadline(signum: int, frame: Any) -> None:
    raise TimeoutError("the scenario ran past its --seconds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/jobs/ray_cluster.py")
    parser.add_argument("command", choices=["run-scenario"])
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--seconds", type=int, default=SCENARIO_SECONDS, help="stop, clean up and report by then")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(TESTS.parent))  # the repo: jobs.store
    # Its own deadline, under the test's: a scenario killed from outside would leave the head running.
    signal.signal(signal.SIGALRM, _past_deadline)
    signal.alarm(args.seconds)
    try:
        result = scenario(args.root)
    except Exception as exc:  # noqa: BLE001 — the test prints it; the namespace is cleaned up either way
        result = {"error": f"{type(exc).__name__}: {exc}", "leftovers": leftovers()}
        for pid, _ in result["leftovers"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

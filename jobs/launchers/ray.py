"""Ray launcher: one Ray job (Jobs API) per attempt, whose driver (jobs/launchers/ray_driver.py) places
`num_nodes × devices` ranks in a placement group, one Ray task each, every one running the common entry point.

The cluster is the recipe's `train.ray.address` (the dashboard's Jobs API, e.g. `http://head:8265`), else
`RAY_ADDRESS`. Nothing is uploaded (no `working_dir`: Ray caps it at 100 MB and the venv must never travel): like
Slurm, every node must see this checkout, this Python and the athanor home at the same paths. The submission id is
chosen here (`athanor-<job>-a<attempt>`), so it is known before anything of the job can start; Ray's own job state
(PENDING / RUNNING / SUCCEEDED / FAILED / STOPPED) settles the job, and `athanor cancel --force` is Ray's stop.

Tests (a real two-node Ray cluster in network namespaces): `.venv/bin/python -m pytest tests/jobs/test_ray.py -q`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from athanor.jobs.launchers import ENGINE_ID_ENV, EngineState, LaunchError
from athanor.jobs.recipe_yaml import parse
from athanor.jobs.store import Job, JobStore

ENDED = {"SUCCEEDED", "FAILED", "STOPPED"}
"""Ray job states after which nothing of the job runs again under its submission id."""
ADDRESS_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
"""Ray's client lets these override any address it is given; the recipe's address must win, so they are hidden
while a client is made."""
FORWARDED_PREFIXES = ("ATHANOR_", "HF_", "TRANSFORMERS_", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
"""The submitter's variables a job needs on the cluster (sbatch exports the whole environment; a Ray job only
gets the head's). Secrets are never forwarded: Ray shows a job's runtime_env to anyone who can reach it."""
SECRET_WORDS = ("TOKEN", "PASSWORD", "SECRET", "KEY", "CREDENTIAL")
_ENV_LOCK = threading.Lock()


def address_of(configured: str | None) -> str:
    """The Jobs API address: the recipe's, else RAY_ADDRESS; LaunchError naming both when neither is set."""
    address = configured or os.environ.get("RAY_ADDRESS")
    if not address:
        raise LaunchError("no Ray cluster to submit to: set train.ray.address (e.g. http://head:8265, the "
                          "dashboard's Jobs API) or RAY_ADDRESS")
    return address


def submission_id(job: Job) -> str:
    return f"athanor-{job.id}-a{job.attempts}"


def rank_layout(train: Any) -> tuple[float, float]:
    """(CPUs, GPUs) reserved for each rank."""
    gpus = train.ray.gpus_per_rank
    if gpus is None:
        gpus = 1.0 if train.accelerator == "gpu" else 0.0
    return float(train.ray.cpus_per_rank), float(gpus)


def entrypoint(job: Job, train: Any, workdir: Path, python: str = sys.executable) -> str:
    """The Ray job's shell command (pure: tested without a cluster): this checkout's driver, run by this Python."""
    cpus, gpus = rank_layout(train)
    driver = [python, "-m", "athanor.jobs.launchers.ray_driver", "--job", job.id, "--nodes", str(train.num_nodes),
              "--devices", str(train.devices), "--cpus-per-rank", f"{cpus:g}", "--gpus-per-rank", f"{gpus:g}"]
    return f"cd {shlex.quote(str(workdir))} && exec {shlex.join(driver)}"


def job_env(engine_id: str, home: Path, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The runtime_env variables of the Ray job (the driver and every rank inherit them)."""
    environ = dict(os.environ if environ is None else environ)
    forwarded = {k: v for k, v in environ.items()
                 if k.startswith(FORWARDED_PREFIXES) and not any(w in k for w in SECRET_WORDS)}
    # RAY_DEDUP_LOGS=0: Ray folds lines that differ only in numbers ("GLOBAL_RANK: 1") across workers; every
    # rank's own line must reach the job's log.
    return {**forwarded, "ATHANOR_HOME": str(home), "PYTHONUNBUFFERED": "1", ENGINE_ID_ENV: engine_id,
            "RAY_DEDUP_LOGS": "0"}


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


@contextlib.contextmanager
def _hidden(names: tuple[str, ...]) -> Iterator[None]:
    with _ENV_LOCK:
        saved = {n: os.environ.pop(n) for n in names if n in os.environ}
        try:
            yield
        finally:
            os.environ.update(saved)


def _client(address: str) -> Any:
    try:
        # why: optional dependency (the `ray` extra)
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:
        raise LaunchError(f"the Ray client is not installed ({exc.name}): pip install -e '.[ray]', or pick another "
                          "train.launcher") from None
    try:
        with _hidden(ADDRESS_ENV):
            return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 — connection refused, wrong version, bad address: all one line
        raise LaunchError(f"Ray Jobs API at {address}: {_one_line(exc)}") from None


def _address_of_job(job: Job) -> str:
    """The address a job was submitted to, from its recipe (parsed, not validated: it was validated at submission;
    validation imports the method, seconds per call, and reconcile asks on every loop)."""
    try:
        data = parse(job.recipe_text, list(job.overrides), "recipe")
        address = (((data.get("train") or {}).get("ray") or {}).get("address"))
    except Exception:  # noqa: BLE001 — fall back to RAY_ADDRESS
        address = None
    return address_of(address if isinstance(address, str) else None)


class RayLauncher:
    name = "ray"

    def submit(self, job: Job, train: Any, store: JobStore) -> str:
        address = address_of(train.ray.address)
        engine_id = submission_id(job)
        client = _client(address)
        try:
            client.submit_job(entrypoint=entrypoint(job, train, Path.cwd()), submission_id=engine_id,
                              runtime_env={"env_vars": job_env(engine_id, store.home)},
                              metadata={"athanor_job": job.id, "attempt": str(job.attempts)})
        except Exception as exc:  # noqa: BLE001
            raise LaunchError(f"Ray refused job {engine_id} at {address}: {_one_line(exc)}") from None
        return engine_id

    def state(self, job: Job) -> EngineState:
        address = _address_of_job(job)
        client = _client(address)
        try:
            info = client.get_job_info(str(job.engine_id))
        except Exception as exc:  # noqa: BLE001
            if "does not exist" in str(exc):  # a head restarted without its job table: nothing of it runs
                return EngineState("GONE", finished=True, detail=f"no longer known to the Ray cluster at {address}")
            raise LaunchError(f"Ray Jobs API at {address}: {_one_line(exc)}") from None
        state = str(getattr(info.status, "value", info.status))
        detail = ""
        if state in ("FAILED", "STOPPED") and info.message:
            lost = re.findall(r"ray_driver: (node \d+ \(\S+\)) was lost", info.message)  # ray_driver.py names it
            detail = _one_line(RuntimeError(info.message))
            if lost:  # "…, last available logs:" then the node (the logs are not kept in one line)
                detail = "; ".join([detail.rstrip(":"), *(f"{n} lost" for n in dict.fromkeys(lost))])
        return EngineState(state, finished=state in ENDED, cancelled=state == "STOPPED", detail=detail)

    def cancel(self, job: Job) -> None:
        address = _address_of_job(job)
        client = _client(address)
        try:
            client.stop_job(str(job.engine_id))  # SIGTERM to the driver, which kills every rank (ray_driver.py)
        except Exception as exc:  # noqa: BLE001
            raise LaunchError(f"Ray could not stop {job.engine_id} at {address}: {_one_line(exc)}") from None

    def logs(self, job: Job) -> str:
        address = _address_of_job(job)
        try:
            return _client(address).get_job_logs(str(job.engine_id))
        except Exception as exc:  # noqa: BLE001
            raise LaunchError(f"Ray could not give the logs of {job.engine_id} at {address}: "
                              f"{_one_line(exc)}") from None

"""Launchers: where a claimed job's training ranks run (`train.launcher: local | slurm | ray`).

`local` is the worker's own process tree (jobs/worker.py spawns rank 0, which starts the other ranks). A cluster
engine (`slurm`, `ray`) is handed the whole job instead: the worker claims the job, `submit`s it and goes on to the
next one; the engine starts `num_nodes × devices` ranks, each running the same entry point

    python -m athanor.jobs.worker --job ID --engine-task

(rank from SLURM_PROCID, or the torchrun-style RANK the Ray driver sets). Rank 0 runs the job's stages
(evaluation, tracking, registration), every rank trains. From then on the engine's own job state is the source of
truth: `reconcile` (called by every worker loop and CLI listing) settles a RUNNING job whose engine job ended
without the job reporting — re-queued for its next attempt while attempts remain, else FAILED, or STOPPED when the
engine job was cancelled. Stale heartbeats never re-queue an engine job (a job waiting in Slurm's queue sends
none), so it never runs twice at once. A lost node ends the engine job (Slurm: NODE_FAIL): reconcile re-queues
it, and the next attempt is a new engine job resuming from the last checkpoint. Slurm's own requeue (only after the
time-limit warning, jobs/launchers/slurm.py) starts the next attempt under the same engine id (`JobStore.take_over`).

Each engine is one module with one class registered in `LAUNCHERS`; its client library is an optional extra
(`pip install -e '.[slurm]'`, `'.[ray]'`), imported only when a job uses it.

Tests: `.venv/bin/python -m pytest tests/jobs/test_slurm.py tests/jobs/test_ray.py -q` (they start real services).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from athanor.jobs.leases import clean_up
from athanor.jobs.store import FINAL, Job, JobStore, StoreError

log = logging.getLogger("athanor.launchers")

LAUNCHERS = {
    "slurm": "athanor.jobs.launchers.slurm:SlurmLauncher",
    "ray": "athanor.jobs.launchers.ray:RayLauncher",
}
"""Engine name (a `train.launcher` value) -> its launcher class. 'local' is the worker itself."""

RANKS_LAUNCHED_ENV = "ATHANOR_RANKS_LAUNCHED"
"""Set in every engine task: the engine started all ranks, so rank 0 must not start any (jobs/trainer.py)."""
ENGINE_ID_ENV = "ATHANOR_ENGINE_ID"
"""The engine's id of this job, for engines that do not export one themselves (Ray)."""


class LaunchError(RuntimeError):
    """The engine refused or could not be reached: the job fails with this one line."""


@dataclass(frozen=True)
class EngineState:
    """An engine job's state in the engine's own words, and what it means for athanor."""

    state: str
    """e.g. Slurm's PENDING / RUNNING / COMPLETED / PREEMPTED, Ray's PENDING / RUNNING / SUCCEEDED / STOPPED."""
    finished: bool
    """The engine job ended: nothing of it runs or will run again under this id."""
    cancelled: bool = False
    """It ended because somebody cancelled it through the engine (scancel, Ray's stop)."""
    detail: str = ""
    """The engine's reason or message, when it gives one."""


class Launcher(Protocol):
    """One cluster engine. Every call raises LaunchError with one line naming what to fix."""

    name: ClassVar[str]

    def submit(self, job: Job, train: Any, store: JobStore) -> str:
        """Hand the claimed attempt of `job` to the engine; return the engine's id for it (recorded by the caller
        before the ranks can look for it)."""

    def state(self, job: Job) -> EngineState:
        """The engine's state of the job's current engine id."""

    def cancel(self, job: Job) -> None:
        """Kill the engine job now (the forced cancel; a plain cancel is the flag the job checks every step)."""

    def logs(self, job: Job) -> str:
        """The engine's log of the job's current engine id (every rank's output), as the engine keeps it."""


def launcher_for(name: str) -> Launcher:
    """The launcher registered as `name` (its client library imported now)."""
    if name not in LAUNCHERS:
        raise LaunchError(f"unknown launcher {name!r}; train.launcher is one of local, {', '.join(LAUNCHERS)}")
    module, cls = LAUNCHERS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def submit(store: JobStore, job: Job, train: Any) -> None:
    """Submit a claimed job to its engine and record the engine's id; a refusal fails the job with one line."""
    try:
        launcher = launcher_for(train.launcher)
        store.update(job.id, engine=train.launcher)
        engine_id = launcher.submit(job, train, store)
    except LaunchError as exc:
        store.finish(job.id, "FAILED", error=f"{train.launcher}: {exc}", attempt=job.attempts)
        return
    store.update(job.id, engine_id=engine_id)
    log.info("job %s: attempt %d submitted to %s as %s", job.id, job.attempts, train.launcher, engine_id)


def submit_and_follow(store: JobStore, job: Job, train: Any) -> Job:
    """`submit --wait` with a cluster launcher: submit the claimed job to its engine and follow it to a final
    status (a retried attempt is submitted again), printing each change."""
    submit(store, job, train)
    said = None
    while (now := store.get(job.id)).status not in FINAL:
        if now.status == "PENDING" and store.claim(job.id) is not None:
            submit(store, store.get(job.id), train)
        if (now.status, now.attempts, now.engine_id, now.engine_state) != said:
            said = (now.status, now.attempts, now.engine_id, now.engine_state)
            print(f"job {job.id}: {now.status}, attempt {now.attempts}, {train.launcher} job {now.engine_id} "
                  f"({now.engine_state or 'submitted'}); log: {now.log_path}", flush=True)
        time.sleep(1.0)
        safe_reconcile(store)
    return now


def reconcile(store: JobStore) -> list[Job]:
    """Settle every RUNNING engine job whose engine job ended without reporting; return the settled jobs. An engine
    that cannot be asked now (controller restarting) is asked again on the next call."""
    settled = []
    for job in store.list(limit=10_000, status="RUNNING"):
        if not job.engine or not job.engine_id:
            continue
        try:
            state = launcher_for(job.engine).state(job)
        except LaunchError as exc:
            log.warning("job %s: could not ask %s about %s: %s", job.id, job.engine, job.engine_id, exc)
            continue
        if state.state != job.engine_state:
            store.update(job.id, engine_state=state.state)
        if not state.finished:
            continue
        said = f"{job.engine} job {job.engine_id} ended {state.state}" + (f": {state.detail}" if state.detail else "")
        if state.cancelled:
            done = store.finish(job.id, "STOPPED", error=f"cancelled through {job.engine} ({said})",
                                attempt=job.attempts)
            now = store.get(job.id) if done else None
        else:
            now = store.retry_or_finish(job.id, job.attempts, said)
        if now is not None:
            clean_up(store, now)
            settled.append(now)
    return settled


def engine_identity() -> tuple[str, int]:
    """(engine id, run) of the engine task this process is: Slurm's job id and restart count, or the id a driver
    exported (ENGINE_ID_ENV, run 0)."""
    if ENGINE_ID_ENV in os.environ:
        return os.environ[ENGINE_ID_ENV], 0
    if "SLURM_JOB_ID" in os.environ:
        return os.environ["SLURM_JOB_ID"], int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    raise LaunchError(f"--engine-task outside an engine: neither {ENGINE_ID_ENV} nor SLURM_JOB_ID is set")


def engine_rank() -> int:
    """This task's global rank: Slurm's SLURM_PROCID, else the torchrun-style RANK."""
    return int(os.environ.get("SLURM_PROCID") or os.environ.get("RANK") or 0)


_INTERRUPTED = threading.Event()


def install_interrupt_handler() -> None:
    """SIGUSR1 (Slurm's warning before a time limit or pre-emption, `--signal=USR1@N`) marks this task interrupted;
    the trainer's guard reads `interrupted()` after every step."""
    signal.signal(signal.SIGUSR1, lambda signum, frame: _INTERRUPTED.set())


def interrupted() -> bool:
    return _INTERRUPTED.is_set()


def slurm_task() -> bool:
    """This process is a rank Slurm started for athanor (jobs/launchers/slurm.py)."""
    return bool(os.environ.get(RANKS_LAUNCHED_ENV)) and "SLURM_JOB_ID" in os.environ


def interrupt_hooks() -> dict[str, Any]:
    """The guard's interrupt hooks in a Slurm task: after SIGUSR1 (the time-limit or pre-emption warning) every rank
    writes a step checkpoint and rank 0 requeues the job; elsewhere none."""
    if not slurm_task():
        return {}

    def requeue() -> None:
        # why: slurm.py imports this package at its top (a cycle)
        from athanor.jobs.launchers.slurm import requeue_self

        log.warning("Slurm warned that the job will be stopped: checkpoint written; requeueing")
        if not requeue_self():
            log.error("scontrol requeue failed: the job goes on until Slurm stops it; its next attempt resumes")

    return {"interrupted": interrupted, "on_interrupt": requeue}


def safe_reconcile(store: JobStore) -> None:
    """`reconcile` for loops and listings: a store problem is reported, never raised."""
    try:
        reconcile(store)
    except StoreError as exc:
        log.warning("could not reconcile engine jobs: %s", exc)

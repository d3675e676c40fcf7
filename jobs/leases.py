"""A running job's lease and cancel flag, seen from the job process, and the reaping of stale leases.

The job process renews its heartbeat from a background thread and, on the same beat, reads the cancel
flag: `JobLease.cancelled` is what the spine checks between stages and the trainer checks every step.
Any worker or CLI call reaps leases that went stale and cleans up after them: the MLflow run is closed
(KILLED) and an export of a job that did not succeed is removed.

Tests: `.venv/bin/python -m pytest tests/jobs/test_faults.py -q`.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from jobs.store import LEASE_SECONDS, Job, JobStore, StoreError, lease_owner

log = logging.getLogger("athanor.lease")


class JobStopped(BaseException):
    """Raised by the job itself at a stage boundary once its cancel flag is set (never by a signal handler)."""


class JobLease:
    """Heartbeat + cancel flag of one RUNNING job, in the process that runs it."""

    def __init__(self, store: JobStore, job_id: str, *, interval: float | None = None) -> None:
        self.store, self.job_id = store, job_id
        self.interval = interval or max(0.5, LEASE_SECONDS / 6)
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id}", daemon=True)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def request_cancel(self) -> None:
        """Cancel from inside the process (SIGTERM, tests): recorded in the store, seen at the next check."""
        self._cancel.set()
        try:
            self.store.request_cancel(self.job_id)
        except StoreError as exc:
            log.warning("%s", exc)

    def check(self, stage: str) -> None:
        """Stop here if a cancel was requested: called between stages, never inside registration."""
        if self._cancel.is_set() or self.store.cancel_requested(self.job_id):
            self._cancel.set()
            log.warning("cancel requested: stopping before %s", stage)
            raise JobStopped(stage)

    def _beat(self) -> None:
        while not self._done.wait(self.interval):
            try:
                alive = self.store.heartbeat(self.job_id)
                if self.store.cancel_requested(self.job_id):
                    self._cancel.set()
            except StoreError as exc:  # a full disk must not kill the job; the lease may lapse
                log.warning("could not renew the lease: %s", exc)
                continue
            if not alive:
                log.error("this job's lease was taken away (reaped as stale); stopping")
                self._cancel.set()

    def __enter__(self) -> JobLease:
        self.store.update(self.job_id, lease_owner=lease_owner())
        self.store.heartbeat(self.job_id)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join(timeout=5)


@contextmanager
def sigterm_cancels(lease: JobLease) -> Iterator[None]:
    """SIGTERM (a plain `kill`, the worker stopping) requests a cancel instead of raising mid-write."""

    def handler(signum: int, frame: Any) -> None:
        lease.request_cancel()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Block SIGINT/SIGTERM for a critical section (registration, the final status); delivered after."""
    blocked = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def reap_stale(store: JobStore, lease_seconds: float | None = None) -> list[Job]:
    """Reap stale leases and clean up after each reaped job; never raises for cleanup problems."""
    reaped = store.reap(lease_seconds)
    for job in reaped:
        log.warning("job %s: %s (%s)", job.id, job.status, job.error)
        clean_up(store, job)
    return reaped


def clean_up(store: JobStore, job: Job) -> None:
    """After a job that ended without reporting: remove its export, close its MLflow run (KILLED)."""
    shutil.rmtree(store.home / "jobs" / job.id / "export.partial", ignore_errors=True)
    shutil.rmtree(store.home / "jobs" / job.id / "export", ignore_errors=True)
    if job.mlflow_run_id:
        _close_run(store, job)


def _close_run(store: JobStore, job: Job) -> None:
    try:
        from jobs.recipe import load_recipe
        from jobs.tracking import Tracker

        recipe = load_recipe(None, text=job.recipe_text, overrides=job.overrides).recipe
        tracker = Tracker(store.home, recipe.tracking.uri, recipe.tracking.experiment or recipe.name)
        tracker.parent_id = job.mlflow_run_id
        tracker.close_open_runs("KILLED")
    except Exception as exc:  # noqa: BLE001 — the job row is final either way; say what was left open
        log.warning("job %s: could not close MLflow run %s: %s", job.id, job.mlflow_run_id, exc)

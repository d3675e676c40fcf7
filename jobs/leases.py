"""A running job's lease and cancel flag, seen from the job process, and the reaping of stale leases.

The job process renews its heartbeat from a background thread and, on the same beat, reads the cancel
flag: `JobLease.cancelled` is what the spine checks between stages and the trainer checks every step.
Any worker or CLI call reaps leases that went stale and cleans up after them: the MLflow run is closed
(KILLED; a re-queued job's next attempt reopens it) and an export of a job that did not succeed is removed
(a re-queued job keeps its checkpoints). A lease is held by one attempt: once its job was re-queued (this
process was frozen past the lease, then woke up), `lost` is set and the job stops without writing anything.

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

from athanor.jobs.store import LEASE_SECONDS, Job, JobStore, StoreError, lease_owner
from athanor.jobs.tracking import Tracker

log = logging.getLogger("athanor.lease")


class JobStopped(BaseException):
    """Raised by the job itself at a stage boundary once its cancel flag is set (never by a signal handler)."""


class JobLease:
    """Heartbeat + cancel flag of one RUNNING job, in the process that runs it."""

    def __init__(self, store: JobStore, job_id: str, *, attempt: int | None = None,
                 interval: float | None = None) -> None:
        self.store, self.job_id, self.attempt = store, job_id, attempt
        self.interval = interval or max(0.5, LEASE_SECONDS / 6)
        self._cancel = threading.Event()
        self._lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id}", daemon=True)

    @property
    def cancelled(self) -> bool:
        """A cancel was requested, or the lease was lost: the job stops at its next step or stage boundary."""
        return self._cancel.is_set()

    @property
    def lost(self) -> bool:
        """The job is no longer this attempt's (reaped, re-queued, perhaps running again elsewhere)."""
        return self._lost.is_set()

    def renew(self) -> bool:
        """Heartbeat now; False (and `lost`, `cancelled` set) when this attempt no longer holds the job."""
        return self._held(lambda: self.store.heartbeat(self.job_id, self.attempt))

    def holds(self) -> bool:
        """Whether this attempt still holds the job (a read, no write lock), checked before anything another
        attempt could see is written (a checkpoint); False also sets `lost` and `cancelled`."""
        if self.attempt is None:
            return not self.lost
        return self._held(lambda: self.store.held_by(self.job_id, self.attempt))

    def _held(self, check: Any) -> bool:
        try:
            held = check()
        except StoreError as exc:  # a full disk must not kill the job; the lease may lapse
            log.warning("could not renew the lease: %s", exc)
            return not self.lost
        if not held and not self.lost:
            log.error("this job's lease was taken away (reaped as stale, perhaps re-queued); stopping")
            self._lost.set()
            self._cancel.set()
        return held

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
            log.warning("%s: stopping before %s", "lease lost" if self.lost else "cancel requested", stage)
            raise JobStopped(stage)

    def _beat(self) -> None:
        while not self._done.wait(self.interval):
            if not self.renew():
                continue
            try:
                if self.store.cancel_requested(self.job_id):
                    self._cancel.set()
            except StoreError as exc:
                log.warning("could not read the cancel flag: %s", exc)

    def __enter__(self) -> JobLease:
        self.store.update(self.job_id, lease_owner=lease_owner())
        self.renew()
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


class SigtermNoted:
    """Under a cluster engine, SIGTERM is the engine's (pre-emption, requeue, scancel): it only notes the signal.
    Lightning's own handler then broadcasts it to the ranks; when that lands inside another collective, gloo fails
    with 'connection reset', an error that must still count as the engine stopping the attempt, not as a failure."""

    def __init__(self) -> None:
        self.seen = False

    @contextmanager
    def installed(self) -> Iterator[SigtermNoted]:
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum: int, frame: Any) -> None:
            self.seen = True
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)

    def callback(self) -> Any:
        """A Lightning callback that puts the note ahead of Lightning's own SIGTERM handlers once training starts
        (Lightning runs its broadcast first, and a failed broadcast would skip every handler after it)."""
        # why: `athanor list`/`status` and the worker loop import this module; lightning costs seconds
        from lightning.pytorch.callbacks import Callback

        noted = self

        class NoteSigtermFirst(Callback):
            def on_train_start(self, trainer: Any, pl_module: Any) -> None:
                lightning_handler = signal.getsignal(signal.SIGTERM)

                def handler(signum: int, frame: Any) -> None:
                    noted.seen = True
                    if callable(lightning_handler):
                        lightning_handler(signum, frame)

                signal.signal(signal.SIGTERM, handler)

        return NoteSigtermFirst()


SIGTERM_NOTED = SigtermNoted()
"""This process's note of a SIGTERM (one job per process)."""

PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote process exited",
             "communicator was aborted")
"""How gloo and NCCL say that the other end of a collective went away (its rank, or its whole node, was killed).
Not a timeout or a refused connection: those are more often a network set up wrong, the job's own error to show."""


def engine_stopped(exc: BaseException, sigterm_seen: bool) -> str | None:
    """Why an exception in an engine task ends the attempt as the engine's, None when it is the job's own failure.

    A SIGTERM is the engine's (pre-emption, requeue, scancel). A collective that failed because a peer went away
    is too: its rank was killed (its node lost, or the engine stopping the job), and only the engine knows which
    and what comes next (Slurm ends the job NODE_FAIL, and `reconcile` re-queues it or fails it naming the node);
    written here as the job's error it would be a bare 'connection reset' failing the job while attempts remain."""
    # why: `athanor list`/`status` and the worker loop import this module; lightning costs seconds
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if sigterm_seen or isinstance(exc, SIGTERMException):
        return "the engine stopped this attempt (SIGTERM)"
    said = _peer_lost(exc)
    return f"a peer rank was lost ({said})" if said else None


def _peer_lost(exc: BaseException) -> str | None:
    """What a distributed-collective error in `exc`'s chain says, up to its words that a peer went away."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        text = str(cause)
        lowered = text.lower()
        distributed = type(cause).__name__.startswith("Dist") or "gloo" in lowered or "nccl" in lowered
        if distributed and (marker := next((m for m in PEER_LOST if m in lowered), None)):
            said = text[:lowered.index(marker) + len(marker)].strip().splitlines()[-1]
            return said.split("] ", 1)[-1] if said.startswith("[") else said  # gloo's source location first
        cause = cause.__cause__ or cause.__context__
    return None


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
    """Reap stale leases (re-queueing jobs with attempts left) and clean up after each; never raises for cleanup
    problems."""
    reaped = store.reap(lease_seconds)
    for job in reaped:
        log.warning("job %s: %s (%s)", job.id, job.status, job.error)
        clean_up(store, job)
    return reaped


def clean_up(store: JobStore, job: Job) -> None:
    """After an attempt that ended without reporting: remove its export, close its MLflow run (KILLED). A re-queued
    job (PENDING) keeps its checkpoints and its run id: its next attempt resumes both."""
    shutil.rmtree(store.home / "jobs" / job.id / "export.partial", ignore_errors=True)
    shutil.rmtree(store.home / "jobs" / job.id / "export", ignore_errors=True)
    if job.mlflow_run_id:
        _close_run(store, job)


def _close_run(store: JobStore, job: Job) -> None:
    try:
        # why: a cycle (recipe -> lm_eval_stage -> results -> leases)
        from athanor.jobs.recipe import load_recipe

        recipe = load_recipe(None, text=job.recipe_text, overrides=job.overrides).recipe
        tracker = Tracker(store.home, recipe.tracking.uri, recipe.tracking.experiment or recipe.name)
        tracker.parent_id = job.mlflow_run_id
        tracker.close_open_runs("KILLED")
    except Exception as exc:  # noqa: BLE001 — the job row is final either way; say what was left open
        log.warning("job %s: could not close MLflow run %s: %s", job.id, job.mlflow_run_id, exc)

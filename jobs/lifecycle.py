"""A job's lifecycle: its statuses, the transitions allowed between them, and `transition`, the one function that
writes a job's status (tests/test_layout.py checks that no other code does).

    PENDING ──claim──▶ RUNNING ──finish──▶ SUCCEEDED | FAILED | STOPPED
       │                 │ ▲
       │ cancel          │ └── take_over: a cluster engine's next run becomes the next attempt (RUNNING → RUNNING)
       ▼                 └──── requeue: the attempt died with attempts left (RUNNING → PENDING)
    STOPPED

A final status is never left. The attempt number fences every move out of RUNNING: an attempt that was frozen past
its lease and woke up after its job was re-queued cannot finish, re-queue or take over the job. A re-queue (or a
take-over) needs attempts left and no cancel requested; otherwise the job is finished instead (jobs/store.py).

    .venv/bin/python -m pytest tests/jobs/test_lifecycle.py -q
"""

from __future__ import annotations

import enum
import sqlite3
import time
from typing import Any


class JobStatus(enum.StrEnum):
    """A job row's status. A str: the SQLite column, JSON output and the HTTP API keep the plain names."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"


PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED = JobStatus
STATUSES: tuple[JobStatus, ...] = tuple(JobStatus)
FINAL: tuple[JobStatus, ...] = (SUCCEEDED, FAILED, STOPPED)

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    PENDING: frozenset({RUNNING, STOPPED}),  # a worker claims it; a cancel before it started
    RUNNING: frozenset({RUNNING, PENDING, SUCCEEDED, FAILED, STOPPED}),  # take-over, re-queue, the final outcome
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    STOPPED: frozenset(),
}
"""from → the statuses a job may move to; anything else is refused (`TransitionRefused`)."""

_NEXT_ATTEMPT = {(PENDING, RUNNING), (RUNNING, RUNNING)}
"""Moves that start the job's next attempt: they count it (the attempt number is the lease's fencing token)."""
_NEEDS_ATTEMPTS_LEFT = {(RUNNING, PENDING), (RUNNING, RUNNING)}
"""Moves that retry the job: only while attempts remain and nobody asked to cancel it."""


class TransitionRefused(ValueError):
    """A status change the lifecycle does not allow now (one line: the job, the move and why). The store's
    wrappers turn it into a False / None result where losing a race is an expected outcome."""


def transition(db: sqlite3.Connection, job_id: str, to: JobStatus | str, *, attempt: int | None = None,
               **fields: Any) -> None:
    """Move job `job_id` to status `to`, with `fields` written in the same UPDATE. Call it inside the caller's
    write transaction (`BEGIN IMMEDIATE`): the row is read, checked and written atomically.

    Refused (TransitionRefused, nothing written) when the job is missing, the move is not in TRANSITIONS, `attempt`
    (the caller's own attempt number) no longer holds the RUNNING job, or a retry finds no attempts left or a
    cancel requested. A move that starts an attempt counts it; a final status records `finished_at`."""
    to = JobStatus(to)
    row = db.execute("SELECT status, attempts, max_attempts, cancel_requested FROM jobs WHERE id = ?",
                     (job_id,)).fetchone()
    if row is None:
        raise TransitionRefused(f"job {job_id}: no such job")
    now_status = JobStatus(row["status"])
    move = f"job {job_id}: {now_status} → {to}"
    if to not in TRANSITIONS[now_status]:
        allowed = ", ".join(sorted(TRANSITIONS[now_status])) or "nothing: it is final"
        raise TransitionRefused(f"{move} is not a job transition (from {now_status}: {allowed})")
    if attempt is not None and (now_status is not RUNNING or row["attempts"] != attempt):
        raise TransitionRefused(f"{move} refused: attempt {attempt} no longer holds the job "
                                f"({now_status}, attempt {row['attempts']})")
    if (now_status, to) in _NEEDS_ATTEMPTS_LEFT:
        if row["cancel_requested"]:
            raise TransitionRefused(f"{move} refused: a cancel was requested")
        if row["attempts"] >= row["max_attempts"]:
            raise TransitionRefused(f"{move} refused: attempts exhausted ({row['attempts']} of {row['max_attempts']})")
    now = time.time()
    fields = {**fields, "status": to.value, "updated_at": now}
    if (now_status, to) in _NEXT_ATTEMPT:
        fields["attempts"] = row["attempts"] + 1
    if to in FINAL:
        fields.setdefault("finished_at", now)
    sets = ", ".join(f"{column} = ?" for column in fields)
    # Compare-and-set on what was read: the transaction already excludes other writers; this says what was checked.
    db.execute(f"UPDATE jobs SET {sets} WHERE id = ? AND status = ? AND attempts = ?",
               (*fields.values(), job_id, now_status.value, row["attempts"]))

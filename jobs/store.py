"""Job store: one SQLite database (WAL) under the athanor home.

A running job holds a lease: the claim records its owner and a heartbeat in the same transaction, the
job process renews the heartbeat, and any worker or CLI call reaps a lease that went stale (the job
process was killed, its machine lost). A reaped job with attempts left (`max_attempts`, from the recipe's
`train.max_attempts`) is re-queued for its next attempt instead of failed. The attempt number is the lease's
fencing token: a heartbeat or a final status from an earlier attempt (a process that was frozen, not dead, and
woke up after its job was re-queued) is refused, so one job never runs twice at once. Cancellation is a flag
the job reads between stages and steps, never a signal that interrupts it mid-write. A final status is
written once: a SUCCEEDED job is never overwritten. Every status change is one `transition` of jobs/lifecycle.py
(its table of allowed moves, the attempt fence), called from the methods below. Store write failures (read-only
home, full disk) raise `StoreError`: one line for the user. A job also carries the client's submission id
(unique: a resubmission finds the job, jobs/submission.py), its labels, and the stage and training step its attempt
reached (`report_progress`); workers' own heartbeats live beside the jobs (jobs/workers.py).

Home: `--home`, else `$ATHANOR_HOME`, else `./.athanor`. Layout:
    <home>/jobs.db            job rows
    <home>/jobs/<id>/         log, checkpoints, export of one job
    <home>/mlflow.db, <home>/mlartifacts/   the embedded MLflow store
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from athanor.jobs.job_row import INDEXES, MIGRATIONS, SCHEMA, Job, SubmissionExists
from athanor.jobs.lifecycle import FINAL, PENDING, RUNNING, STATUSES, STOPPED, JobStatus, TransitionRefused, transition
from athanor.jobs.store_errors import StoreCorrupt, StoreError, athanor_home, corrupt_message, store_error

__all__ = ["FINAL", "STATUSES", "Job", "JobStatus", "JobStore", "StoreCorrupt", "StoreError", "TransitionRefused",
           "athanor_home", "lease_owner"]

PROGRESS = ("stage", "progress_step", "progress_total")

LOCK_PROBE_SECONDS = 2.0
"""How long the reaper waits for the store's write lock before deciding a silent job process holds it (writes
last milliseconds)."""
LEASE_SECONDS = float(os.environ.get("ATHANOR_LEASE_SECONDS", "60"))
"""A RUNNING job whose heartbeat is older than this is reaped (its process renews it every LEASE_SECONDS / 6)."""


class JobStore:
    """All reads and writes of job rows. Safe across processes (WAL + immediate transactions)."""

    def __init__(self, home: str | os.PathLike | None = None) -> None:
        self.home = athanor_home(home)
        self.path = self.home / "jobs.db"
        with self._connect() as db:
            # Every command opens the store here, so a damaged file is refused before anything reads or adds a
            # row (quick_check reads the whole file: milliseconds for a job store).
            verdict = db.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                raise StoreCorrupt(corrupt_message(self.path, verdict))
            if not db.execute("SELECT name FROM sqlite_master WHERE name='jobs'").fetchone():
                db.executescript(SCHEMA)
            present = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for column, kind in MIGRATIONS.items():
                if column not in present:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
            if not db.execute("SELECT name FROM sqlite_master WHERE name='jobs_submission'").fetchone():
                for index in INDEXES:  # only when missing: a read-only home must still open for reading
                    db.execute(index)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection whose failures (read-only, full disk, unreadable file) surface as StoreError."""
        db = None
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout=30000")
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            yield db
        except sqlite3.Error as exc:
            if db is not None and db.in_transaction:
                db.rollback()
            raise store_error(exc, self.path) from None
        finally:
            if db is not None:
                db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE: other writers wait), committed when the block ends without raising,
        rolled back otherwise (a refused transition writes nothing)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.rollback()
                raise
            db.execute("COMMIT")

    def job_dir(self, job_id: str) -> Path:
        path = self.home / "jobs" / job_id
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise store_error(exc, path) from None
        return path

    def create(self, *, name: str, method: str, recipe_text: str, recipe_path: str | None,
               overrides: list[str], recipe_hash: str, max_attempts: int = 1, submission_id: str | None = None,
               labels: dict[str, str] | None = None) -> Job:
        """A PENDING job; `max_attempts` is the recipe's `train.max_attempts` (runs in all, retries included).
        SubmissionExists (holding that job) when a job with `submission_id` exists: the unique index decides a race."""
        for attempt in range(3):  # an id is a second plus 24 random bits: two equal ones are drawn again
            self._refuse_reused(submission_id)
            now = time.time()
            job_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(3)
            log_path = str((self.job_dir(job_id) / "job.log").relative_to(self.home))
            try:
                with self._connect() as db:
                    db.execute(
                        "INSERT INTO jobs (id, name, method, status, recipe_path, recipe_text, overrides, recipe_hash,"
                        " log_path, created_at, updated_at, max_attempts, submission_id, labels)"
                        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (job_id, name, method, PENDING.value, recipe_path, recipe_text, json.dumps(overrides),
                         recipe_hash, log_path, now, now, max(1, int(max_attempts)), submission_id,
                         json.dumps(labels or {}, sort_keys=True)),
                    )
            except StoreError as exc:
                if "UNIQUE" not in str(exc) or attempt == 2:
                    raise
                continue
            return self.get(job_id)
        raise AssertionError("unreachable")

    def _refuse_reused(self, submission_id: str | None) -> None:
        if submission_id is None:
            return
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE submission_id = ?", (submission_id,)).fetchone()
        if row is not None:
            raise SubmissionExists(Job.from_row(row, self.home))

    def report_progress(self, job_id: str, attempt: int, **fields: str | int | None) -> None:
        """Record the stage or training progress (`PROGRESS` columns) of a RUNNING attempt; an attempt that no longer
        holds the job writes nothing. Never raises: progress is a display, the job must not fail over it."""
        sets = ", ".join(f"{k} = ?" for k in fields if k in PROGRESS)
        try:
            with self._connect() as db:
                db.execute(f"UPDATE jobs SET {sets} WHERE id = ? AND status = 'RUNNING' AND attempts = ?",
                           (*(v for k, v in fields.items() if k in PROGRESS), job_id, attempt))
        except StoreError:
            pass

    def connection(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A connection for the store's companion tables (jobs/workers.py); failures raise StoreError."""
        return self._connect()

    def get(self, job_id: str) -> Job:
        """The job with this id, or the only one whose id starts with it (a literal prefix, no wildcards);
        KeyError when there is none or several."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None and job_id:
                rows = db.execute("SELECT * FROM jobs WHERE substr(id, 1, ?) = ? LIMIT 2",
                                  (len(job_id), job_id)).fetchall()
                row = rows[0] if len(rows) == 1 else None
        if row is None:
            raise KeyError(job_id)
        return Job.from_row(row, self.home)

    def list(self, limit: int = 50, status: str | None = None) -> list[Job]:
        query, args = "SELECT * FROM jobs", []
        if status:
            query, args = query + " WHERE status = ?", [status]
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY created_at DESC LIMIT ?", (*args, limit)).fetchall()
        return [Job.from_row(r, self.home) for r in rows]

    def count(self, status: str) -> int:
        with self._connect() as db:
            return db.execute("SELECT count(*) FROM jobs WHERE status = ?", (status,)).fetchone()[0]

    def claim(self, job_id: str | None = None, *, owner: str | None = None) -> Job | None:
        """Atomically move one PENDING job (the oldest, or `job_id`) to RUNNING under a lease held by
        `owner` (default: this process), with its first heartbeat. Each claim starts the next attempt."""
        now = time.time()
        owner = owner or lease_owner()
        with self._transaction() as db:
            if job_id is None:
                row = db.execute("SELECT id FROM jobs WHERE status='PENDING' ORDER BY created_at LIMIT 1").fetchone()
            else:
                row = db.execute("SELECT id FROM jobs WHERE status='PENDING' AND id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            transition(db, row["id"], RUNNING, started_at=now, error=None, pid=None, lease_owner=owner,
                       heartbeat_at=now, engine=None, engine_id=None, engine_run=0, engine_state=None,
                       **dict.fromkeys(PROGRESS))
        return self.get(row["id"])

    def update(self, job_id: str, **fields: Any) -> None:
        """Write columns of a job other than its status (a status changes only through `jobs.lifecycle`)."""
        if "status" in fields:
            raise ValueError("a job's status changes only through its lifecycle (claim, finish, retry_or_finish, "
                             "take_over, request_cancel: jobs/lifecycle.py)")
        if "result" in fields and fields["result"] is not None:
            fields["result"] = json.dumps(fields["result"])
        fields["updated_at"] = time.time()
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._connect() as db:
            db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id))

    def finish(self, job_id: str, status: str, *, error: str | None = None, attempt: int | None = None,
               **fields: Any) -> bool:
        """The one final transition, from PENDING or RUNNING only: a final status (SUCCEEDED above all)
        is never overwritten. With `attempt` (the job process's own), only while that attempt still holds the job
        (RUNNING, same attempt): a stale attempt cannot finish a re-queued job. True when this call made it."""
        if status not in FINAL:
            raise ValueError(f"not a final status: {status}")
        fields = {**fields, "error": error, "pid": None}
        if fields.get("result") is not None:
            fields["result"] = json.dumps(fields["result"])
        return self._moved(job_id, status, attempt=attempt, **fields)

    def _moved(self, job_id: str, to: JobStatus, *, attempt: int | None = None, **fields: Any) -> bool:
        """One transition in its own transaction: True when made, False when the lifecycle refused it (another
        process settled the job first, or this attempt lost it)."""
        try:
            with self._transaction() as db:
                transition(db, job_id, to, attempt=attempt, **fields)
        except TransitionRefused:
            return False
        return True

    def heartbeat(self, job_id: str, attempt: int | None = None) -> bool:
        """Renew a RUNNING job's lease; False when the job is no longer RUNNING (reaped or finished) or, with
        `attempt`, when it runs another attempt now (this one was re-queued while it was frozen)."""
        now = time.time()
        fence, args = ("", ()) if attempt is None else (" AND attempts = ?", (attempt,))
        with self._connect() as db:
            cursor = db.execute("UPDATE jobs SET heartbeat_at = ?, updated_at = ? WHERE id = ? AND status = 'RUNNING'"
                                + fence, (now, now, job_id, *args))
            return cursor.rowcount == 1

    def held_by(self, job_id: str, attempt: int) -> bool:
        """Whether attempt `attempt` still holds the job (RUNNING, that attempt): a read, no write lock taken."""
        with self._connect() as db:
            row = db.execute("SELECT status, attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row) and row["status"] == "RUNNING" and row["attempts"] == attempt

    def retry_or_finish(self, job_id: str, attempt: int, reason: str) -> Job | None:
        """Attempt `attempt` of a RUNNING job died (`reason`): re-queue it (PENDING, keeping its MLflow run id) when
        attempts remain and no cancel was requested; else STOPPED (cancel requested) or FAILED, saying the attempts
        are exhausted. None when the job is no longer running that attempt (someone else decided already)."""
        requeued = self._moved(job_id, PENDING, attempt=attempt, pid=None, lease_owner=None, heartbeat_at=None,
                               error=f"attempt {attempt} died ({reason}); re-queued for attempt {attempt + 1}")
        if not requeued:
            job = self.get(job_id)
            status = STOPPED if job.cancel_requested else JobStatus.FAILED
            error = "cancelled" if job.cancel_requested else reason
            if status is JobStatus.FAILED and job.max_attempts > 1:
                error = f"{reason}; attempts exhausted ({attempt} of train.max_attempts = {job.max_attempts})"
            if not self.finish(job_id, status, error=error, attempt=attempt):
                return None
        return self.get(job_id)

    def take_over(self, job_id: str, engine_id: str, engine_run: int) -> Job | None:
        """The engine started run `engine_run` of its job `engine_id` (Slurm requeued it after a pre-emption or a
        time limit): that run becomes the job's next attempt when attempts remain and no cancel was requested; the
        first run is the attempt the worker claimed. None when this run must not go on (the job finished, was
        cancelled or exhausted its attempts; it is then STOPPED or FAILED), else the job as this run holds it."""
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] != RUNNING or row["engine_id"] != engine_id:
                return None
            exhausted = row["cancel_requested"] or row["attempts"] >= row["max_attempts"]
            if engine_run > row["engine_run"] and not exhausted:
                transition(db, job_id, RUNNING, attempt=row["attempts"], engine_run=engine_run,
                           heartbeat_at=time.time(), error=None)
        if engine_run > row["engine_run"] and exhausted:  # settled outside the transaction: it opens its own
            self.retry_or_finish(job_id, row["attempts"], f"{row['engine']} job {engine_id} was interrupted "
                                 f"(pre-empted or out of time)")
            return None
        return self.get(job_id)

    def request_cancel(self, job_id: str) -> str:
        """PENDING → STOPPED at once; RUNNING → the cancel flag, which the job reads at its next step or
        stage boundary. Returns the status after the call."""
        with self._transaction() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None and row["status"] == PENDING:
                transition(db, job_id, STOPPED, error="cancelled before it started")
            elif row is not None and row["status"] == RUNNING:  # a flag, not a status: the job reads it and stops
                db.execute("UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?", (time.time(), job_id))
        return self.get(job_id).status

    def cancel_requested(self, job_id: str) -> bool:
        with self._connect() as db:
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def _write_locked(self) -> bool:
        return _write_locked_at(self.path, LOCK_PROBE_SECONDS)

    def reap(self, lease_seconds: float | None = None) -> list[Job]:
        """Settle RUNNING jobs whose lease went stale (no heartbeat for `lease_seconds`), or whose process on this
        host is gone (`retry_or_finish`): re-queued (PENDING) while attempts remain, else STOPPED when a cancel was
        requested or FAILED. Returns those jobs (the caller closes their MLflow runs and removes their exports)."""
        limit = LEASE_SECONDS if lease_seconds is None else lease_seconds
        reaped = []
        for job in self.list(limit=10_000, status=RUNNING):
            stale = time.time() - (job.heartbeat_at or job.started_at or job.updated_at) > limit
            local = job.pid is not None and _on_this_host(job.lease_owner)
            dead = local and not process_alive(job.pid)
            if job.engine or not (stale or dead):  # a cluster engine's job state decides (jobs/launchers)
                continue
            if local and not dead and self._write_locked():
                # Alive but silent (frozen, hung) and the store is locked: a process stopped inside a write
                # transaction holds the lock until it dies. Kill it, or no call could settle anything. Otherwise the
                # silent attempt is left alone: woken, it finds its lease gone and stops without writing (leases.py).
                kill_process_group(job.pid)
            settled = self.retry_or_finish(
                job.id, job.attempts, "the job process stopped reporting (killed, crashed or its machine lost); "
                "see its log")
            if settled is not None:
                reaped.append(settled)
        return reaped


def lease_owner() -> str:
    """host:pid of this process: who holds a lease."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _on_this_host(owner: str | None) -> bool:
    return bool(owner) and owner.rsplit(":", 1)[0] == socket.gethostname()


def _write_locked_at(path: Path, wait_seconds: float) -> bool:
    """Whether another connection holds the write lock of the store at `path` for longer than `wait_seconds`."""
    db = sqlite3.connect(path, timeout=wait_seconds, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError as exc:
        return "locked" in str(exc)  # other failures (read-only, full disk) surface where the store writes
    finally:
        db.close()


def kill_process_group(pid: int, wait_seconds: float = 10.0) -> None:
    """SIGKILL process `pid` and, when it leads its own process group (a job's ranks), the whole group; wait up to
    `wait_seconds` for it to die. Gone already, or not ours to kill: nothing to do."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + wait_seconds
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True

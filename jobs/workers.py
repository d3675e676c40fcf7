"""Whether any `athanor worker` is alive: each worker renews its own row in the job store (a `workers` table beside
`jobs`) from a background thread, so one busy with a long job still counts; a worker that stops cleanly removes
its row, one that was killed stops renewing it. `GET /workers` and `athanor workers` read them, and say so when
jobs are PENDING and no worker was seen for `ATHANOR_WORKER_STALE_SECONDS` (default 30): a queued job otherwise
waits silently.

    .venv/bin/python -m pytest tests/jobs/test_api_workers.py -q
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass

from athanor.jobs.store import JobStore, StoreError

BEAT_SECONDS = 5.0
"""How often a worker renews its row."""
STALE_SECONDS = float(os.environ.get("ATHANOR_WORKER_STALE_SECONDS", "30"))
"""A worker not seen for this long counts as gone (six missed beats)."""
FORGET_SECONDS = 86_400.0
"""Rows of workers gone this long are deleted (by the next worker that beats)."""
TABLE = """CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL,
started_at REAL NOT NULL, seen_at REAL NOT NULL)"""


@dataclass
class WorkerSeen:
    id: str
    host: str
    pid: int
    started_at: float
    seen_at: float

    def alive(self, now: float, stale_seconds: float = STALE_SECONDS) -> bool:
        return now - self.seen_at <= stale_seconds


def seen_workers(store: JobStore) -> list[WorkerSeen]:
    """Every worker row, the most recently seen first (none before the first worker ever ran)."""
    try:
        with store.connection() as db:
            rows = db.execute("SELECT * FROM workers ORDER BY seen_at DESC").fetchall()
    except StoreError as exc:
        if "no such table" in str(exc):
            return []
        raise
    return [WorkerSeen(**dict(row)) for row in rows]


def pending_without_worker(store: JobStore, stale_seconds: float = STALE_SECONDS) -> str | None:
    """One line when jobs are PENDING and no worker was seen within `stale_seconds`; None otherwise."""
    pending = store.count("PENDING")
    if not pending:
        return None
    now = time.time()
    workers = seen_workers(store)
    if any(w.alive(now, stale_seconds) for w in workers):
        return None
    last = f"the last one {now - workers[0].seen_at:.0f} s ago" if workers else "none ever ran on this home"
    return (f"{pending} job(s) PENDING and no worker seen for {stale_seconds:g} s ({last}): start one with "
            f"`athanor worker`")


class WorkerBeat:
    """This worker's row, renewed every `interval` seconds from a daemon thread while the context is open."""

    def __init__(self, store: JobStore, interval: float = BEAT_SECONDS) -> None:
        self.store, self.interval = store, interval
        self.id = f"{socket.gethostname()}:{os.getpid()}:{int(time.time())}"
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-beat", daemon=True)

    def beat(self) -> None:
        now = time.time()
        with self.store.connection() as db:
            db.execute(TABLE)
            db.execute("INSERT INTO workers (id, host, pid, started_at, seen_at) VALUES (?,?,?,?,?) "
                       "ON CONFLICT(id) DO UPDATE SET seen_at = excluded.seen_at",
                       (self.id, socket.gethostname(), os.getpid(), now, now))
            db.execute("DELETE FROM workers WHERE seen_at < ?", (now - FORGET_SECONDS,))

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                self.beat()
            except (StoreError, sqlite3.Error):  # a full or read-only home: the worker's own loop reports it
                pass

    def __enter__(self) -> WorkerBeat:
        try:
            self.beat()
        except StoreError:  # the worker loop retries the store and says why; the thread keeps trying to beat
            pass
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        try:
            with self.store.connection() as db:
                db.execute("DELETE FROM workers WHERE id = ?", (self.id,))
        except StoreError:
            pass


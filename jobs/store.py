"""Job store: one SQLite database (WAL) under the athanor home.

Home: `--home`, else `$ATHANOR_HOME`, else `./.athanor`. Layout:
    <home>/jobs.db            job rows
    <home>/jobs/<id>/         log, checkpoints, export of one job
    <home>/mlflow.db, <home>/mlartifacts/   the embedded MLflow store
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATUSES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED")
FINAL = ("SUCCEEDED", "FAILED", "STOPPED")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    method TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('PENDING','RUNNING','SUCCEEDED','FAILED','STOPPED')),
    recipe_path TEXT,
    recipe_text TEXT NOT NULL,
    overrides TEXT NOT NULL DEFAULT '[]',
    recipe_hash TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    log_path TEXT,
    mlflow_run_id TEXT,
    model_version TEXT,
    error TEXT,
    result TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created_at);
"""


def athanor_home(explicit: str | os.PathLike | None = None) -> Path:
    home = Path(explicit or os.environ.get("ATHANOR_HOME") or ".athanor").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


@dataclass
class Job:
    id: str
    name: str
    method: str
    status: str
    recipe_path: str | None
    recipe_text: str
    overrides: list[str]
    recipe_hash: str
    attempts: int
    pid: int | None
    log_path: str | None
    mlflow_run_id: str | None
    model_version: str | None
    error: str | None
    result: dict[str, Any] | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        data = dict(row)
        data["overrides"] = json.loads(data["overrides"] or "[]")
        data["result"] = json.loads(data["result"]) if data["result"] else None
        return cls(**data)


class JobStore:
    """All reads and writes of job rows. Safe across processes (WAL + immediate transactions)."""

    def __init__(self, home: str | os.PathLike | None = None) -> None:
        self.home = athanor_home(home)
        self.path = self.home / "jobs.db"
        with self._connect() as db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    def job_dir(self, job_id: str) -> Path:
        path = self.home / "jobs" / job_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def create(self, *, name: str, method: str, recipe_text: str, recipe_path: str | None,
               overrides: list[str], recipe_hash: str) -> Job:
        now = time.time()
        job_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(3)
        log_path = str(self.job_dir(job_id) / "job.log")
        with self._connect() as db:
            db.execute(
                "INSERT INTO jobs (id, name, method, status, recipe_path, recipe_text, overrides, recipe_hash,"
                " log_path, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (job_id, name, method, "PENDING", recipe_path, recipe_text, json.dumps(overrides),
                 recipe_hash, log_path, now, now),
            )
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                rows = db.execute("SELECT * FROM jobs WHERE id LIKE ?", (f"%{job_id}%",)).fetchall()
                if len(rows) != 1:
                    raise KeyError(job_id)
                row = rows[0]
        return Job.from_row(row)

    def list(self, limit: int = 50, status: str | None = None) -> list[Job]:
        query, args = "SELECT * FROM jobs", []
        if status:
            query, args = query + " WHERE status = ?", [status]
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY created_at DESC LIMIT ?", (*args, limit)).fetchall()
        return [Job.from_row(r) for r in rows]

    def claim(self, job_id: str | None = None) -> Job | None:
        """Atomically move one PENDING job (the oldest, or `job_id`) to RUNNING."""
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            if job_id is None:
                row = db.execute("SELECT id FROM jobs WHERE status='PENDING' ORDER BY created_at LIMIT 1").fetchone()
            else:
                row = db.execute("SELECT id FROM jobs WHERE status='PENDING' AND id = ?", (job_id,)).fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            db.execute(
                "UPDATE jobs SET status='RUNNING', attempts=attempts+1, started_at=?, updated_at=?, error=NULL"
                " WHERE id=?", (now, now, row["id"]),
            )
            db.execute("COMMIT")
        return self.get(row["id"])

    def update(self, job_id: str, **fields: Any) -> None:
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"unknown status {fields['status']}")
        if "result" in fields and fields["result"] is not None:
            fields["result"] = json.dumps(fields["result"])
        if fields.get("status") in FINAL:
            fields.setdefault("finished_at", time.time())
        fields["updated_at"] = time.time()
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._connect() as db:
            db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id))

    def finish(self, job_id: str, status: str, *, error: str | None = None, **fields: Any) -> None:
        """Final transition; a job already STOPPED (cancelled) stays STOPPED."""
        if self.get(job_id).status == "STOPPED" and status != "STOPPED":
            return
        self.update(job_id, status=status, error=error, pid=None, **fields)

    def reap(self) -> list[str]:
        """Mark RUNNING jobs whose process is gone as FAILED, so no job is silently lost."""
        lost = []
        for job in self.list(limit=1000, status="RUNNING"):
            if job.pid and not _alive(job.pid):
                self.finish(job.id, "FAILED", error="the job process exited without reporting (killed or crashed); see its log")
                lost.append(job.id)
        return lost


def _alive(pid: int) -> bool:
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

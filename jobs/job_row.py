"""One job row of the job store (jobs/store.py): its table, and the dataclass the CLI, the API and the spine read.

    .venv/bin/python -m pytest tests/jobs/test_store_sources.py -q
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from athanor.jobs.lifecycle import JobStatus

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
    max_attempts INTEGER NOT NULL DEFAULT 1,
    pid INTEGER,
    log_path TEXT,
    mlflow_run_id TEXT,
    model_version TEXT,
    error TEXT,
    result TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL,
    lease_owner TEXT,
    heartbeat_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    engine TEXT,
    engine_id TEXT,
    engine_run INTEGER NOT NULL DEFAULT 0,
    engine_state TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created_at);
"""


# Columns added after the first release: added to existing stores on open.
MIGRATIONS = {"lease_owner": "TEXT", "heartbeat_at": "REAL", "cancel_requested": "INTEGER NOT NULL DEFAULT 0",
              "max_attempts": "INTEGER NOT NULL DEFAULT 1", "engine": "TEXT", "engine_id": "TEXT",
              "engine_run": "INTEGER NOT NULL DEFAULT 0", "engine_state": "TEXT", "submission_id": "TEXT",
              "labels": "TEXT NOT NULL DEFAULT '{}'", "stage": "TEXT", "progress_step": "INTEGER",
              "progress_total": "INTEGER"}
INDEXES = ("CREATE UNIQUE INDEX IF NOT EXISTS jobs_submission ON jobs(submission_id) WHERE submission_id IS NOT NULL",)


@dataclass
class Job:
    id: str
    name: str
    method: str
    status: JobStatus
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
    lease_owner: str | None = None
    heartbeat_at: float | None = None
    cancel_requested: int = 0
    max_attempts: int = 1
    engine: str | None = None
    """The cluster engine running the current attempt ('slurm', 'ray'; None: a local process of a worker)."""
    engine_id: str | None = None
    """The engine's own id of that attempt (Slurm job id, Ray submission id)."""
    engine_run: int = 0
    """Which run of the engine job the current attempt is (Slurm requeues a job under the same id)."""
    engine_state: str | None = None
    """The engine's state of that job when last asked (e.g. PENDING while it waits in Slurm's queue)."""
    submission_id: str | None = None
    """The client's own id for this submission (jobs/submission.py): resubmitting it returns this job."""
    labels: dict[str, str] = field(default_factory=dict)
    """Small string map the submitter attached (team, ticket, ...); never read by the spine."""
    stage: str | None = None
    """The stage the current (or last) attempt reached: prepare, before, train, after, ... (jobs/run.py)."""
    progress_step: int | None = None
    """Optimizer steps done in the current training run (the main student's, or a comparison arm's)."""
    progress_total: int | None = None
    """That training run's train.max_steps."""

    @classmethod
    def from_row(cls, row: sqlite3.Row, home: Path) -> Job:
        data = dict(row)
        data["status"] = JobStatus(data["status"])
        data["overrides"] = json.loads(data["overrides"] or "[]")
        data["result"] = json.loads(data["result"]) if data["result"] else None
        data["labels"] = json.loads(data.get("labels") or "{}")
        data["log_path"] = _in_home(data["log_path"], home, data["id"])
        return cls(**data)


def _in_home(stored: str | None, home: Path, job_id: str) -> str | None:
    """A job's log path under `home`. Stored relative to the home (so a copied or restored home reads its own
    files, never the original's); rows of older stores hold the absolute path under the home they were made in."""
    if stored is None:
        return None
    path = Path(stored)
    if not path.is_absolute():
        return str(home / path)
    if path.parts[-3:] == ("jobs", job_id, "job.log"):  # an older store's absolute path: re-rooted here
        return str(home / "jobs" / job_id / "job.log")
    return stored


class SubmissionExists(Exception):
    """A job with this submission id exists already (`JobStore.create`): the caller decides whether the resubmission
    is the same (answer with that job) or a conflict."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"submission id {job.submission_id!r} is job {job.id}")
        self.job = job

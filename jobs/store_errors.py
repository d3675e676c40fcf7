"""Errors of the job store and where the athanor home is: one line each (read-only home, full disk, corrupt
file), shared by the store and every command that opens it.

    .venv/bin/python -m pytest tests/jobs/test_faults.py -q -k "corrupt or full or read_only"
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path


class StoreError(RuntimeError):
    """The job store cannot be read or written (read-only home, full disk, corrupt file): one line."""


class StoreCorrupt(StoreError):
    """The job store's file is damaged: no command may read or add rows until it is restored or moved aside."""


def athanor_home(explicit: str | os.PathLike | None = None) -> Path:
    home = Path(explicit or os.environ.get("ATHANOR_HOME") or ".athanor").expanduser().resolve()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the athanor home {home}: {exc.strerror}") from None
    return home


def corrupt_message(path: Path, detail: str) -> str:
    return (f"the job store {path} is corrupt ({detail.splitlines()[0][:200]}); restore it from a backup, or move "
            "it aside (with its -wal and -shm files) and athanor starts an empty store; MLflow's runs are kept apart")


def store_error(exc: BaseException, path: Path) -> StoreError:
    reason = str(exc)
    if isinstance(exc, sqlite3.DatabaseError) and any(w in reason for w in ("malformed", "not a database")):
        return StoreCorrupt(corrupt_message(path, reason))
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    hint = ("free some disk space" if "full" in reason.lower() or "space" in reason.lower() else
            "make it writable or choose another with --home / ATHANOR_HOME")
    return StoreError(f"the job store {path} cannot be written ({reason}); {hint}")

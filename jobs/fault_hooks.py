"""Fault injection for tests, in one place outside the job's stages: `ATHANOR_TEST_HOOK` (unset in normal use)
makes a job cancel, fail or die at a named stage or optimizer step, so the tests can check that every fault
ends in one final state.

    ATHANOR_TEST_HOOK=kill:step:17 athanor worker --once
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

TEST_HOOK = "ATHANOR_TEST_HOOK"
"""'cancel:STAGE', 'fail:STAGE' or 'kill:STAGE' (comma-separated) acts when the job reaches STAGE (prepare,
tracking, before, train, after, arms, timing, track, export, register, registered, finish); 'kill:step:N' kills
the job's processes at optimizer step N (once per job, see jobs/resume.py)."""

log = logging.getLogger("athanor.job")


def fault_hook(stage: str, lease: Any = None) -> None:
    """Act on the hooks set for `stage` (nothing when ATHANOR_TEST_HOOK is unset)."""
    for entry in filter(None, os.environ.get(TEST_HOOK, "").split(",")):
        action, _, where = entry.partition(":")
        if where != stage:
            continue
        log.warning("test hook: %s at %s", action, stage)
        if action == "cancel" and lease is not None:
            lease.request_cancel()
        elif action == "fail":
            raise RuntimeError(f"test hook failure at {stage}")
        elif action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)

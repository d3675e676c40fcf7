"""Fault injection for tests, in one place outside the job's stages: `ATHANOR_TEST_HOOK` (unset in normal use)
makes a job cancel, fail or die at a named stage or optimizer step, so the tests can check that every fault
ends in one final state. The spine calls one function per point, both defined here: `fault_hook(stage)` at each
stage boundary (jobs/run.py, and registration in jobs/registry.py through it), `fault_callbacks(job_dir)` for the
training loop (the `kill:step:N` callback, or none).

    ATHANOR_TEST_HOOK=kill:step:17 athanor worker --once
    .venv/bin/python -m pytest tests/jobs/test_faults.py tests/jobs/test_resume.py -q -n 0
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

TEST_HOOK = "ATHANOR_TEST_HOOK"
"""'cancel:STAGE', 'fail:STAGE' or 'kill:STAGE' (comma-separated) acts when the job reaches STAGE (prepare,
tracking, before, train, after, arms, timing, track, export, register, registered, finish; `rank`: as a training
rank that rank 0 started begins, in that rank only); 'kill:step:N' kills
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


def fault_callbacks(job_dir: Path) -> list[Callback]:
    """The training callbacks of the `kill:step:N` hooks (none when ATHANOR_TEST_HOOK names no step); which steps
    already fired is kept in the job folder, so a resumed attempt passes them."""
    steps = kill_steps(os.environ.get(TEST_HOOK, ""))
    return [KillAtStep(steps, job_dir / "test_hook_kills")] if steps else []


class KillAtStep(Callback):
    """Test fault `kill:step:N`: SIGKILL this job's processes when training reaches optimizer step N, once per job
    (recorded in `marker`, so the resumed attempt passes step N)."""

    def __init__(self, steps: set[int], marker: Path) -> None:
        self.steps, self.marker = steps, marker

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step not in self.steps or not trainer.is_global_zero:
            return
        fired = set(self.marker.read_text().split()) if self.marker.is_file() else set()
        if str(step) in fired:
            return
        with open(self.marker, "a") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        log.warning("test hook: kill at step %d", step)
        logging.shutdown()
        if os.getpgid(0) == os.getpid():  # the job's own process group (started by a worker): its ranks go too
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def kill_steps(hooks: str) -> set[int]:
    """The steps of `kill:step:N` entries in a comma-separated test-hook value."""
    steps = set()
    for entry in filter(None, hooks.split(",")):
        action, _, where = entry.partition(":")
        kind, _, step = where.partition(":")
        if action == "kill" and kind == "step" and step.isdigit():
            steps.add(int(step))
    return steps

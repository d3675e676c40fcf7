"""A running job's training progress in its store row (`progress_step` of `progress_total` optimizer steps), for
`GET /jobs/{id}` and `athanor status`: a Lightning callback on rank 0. The stage itself is written by the spine at
each stage boundary (`JobRun.stage` in jobs/run.py), which also clears the step count of the stage before.

    .venv/bin/python -m pytest tests/jobs/test_api_progress.py -q
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.callbacks import Callback

from athanor.jobs.store import JobStore

WRITE_EVERY_S = 1.0
"""At most one store write per this many seconds (a toy step takes milliseconds; SQLite need not see each one)."""


def progress_callback(store: JobStore, job_id: str, attempt: int, every_s: float = WRITE_EVERY_S) -> Any:
    """Rank 0's callback: the step count when training starts (a resumed attempt starts past 0), at most every
    `every_s` seconds while it runs, and when it ends; only while `attempt` still holds the job."""
    class ReportProgress(Callback):
        last = 0.0

        def write(self, trainer: Any) -> None:
            self.last = time.monotonic()
            store.report_progress(job_id, attempt, progress_step=int(trainer.global_step),
                                  progress_total=int(trainer.max_steps) if trainer.max_steps > 0 else None)

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.write(trainer)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if time.monotonic() - self.last >= every_s:
                self.write(trainer)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.write(trainer)

    return ReportProgress()

"""The entry point every cluster engine starts on each of its slots:
`python -m athanor.jobs.worker --job ID --engine-task`.

Rank 0 takes the engine's run over as the job's attempt (`JobStore.take_over`) and runs every stage of the job
(`jobs.run.execute`); the other ranks wait for that, then train exactly what rank 0 trains, in the same order (the
student, then each comparison arm), and exit.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from athanor.jobs.launchers import LaunchError, engine_identity, engine_rank, install_interrupt_handler
from athanor.jobs.run import _train, comparison_arms, execute, prepare
from athanor.jobs.store import Job, JobStore

log = logging.getLogger("athanor.engine")


def run_engine_task(job_id: str, store: JobStore) -> int:
    """One rank started by a cluster engine (jobs/launchers): rank 0 takes the engine's run over as the job's
    attempt and runs every stage; the other ranks wait for that, then train what rank 0 trains, in its order."""
    install_interrupt_handler()
    engine_id, engine_run = engine_identity()
    rank = engine_rank()
    job = _wait_for(store, job_id, lambda j: j.engine_id == engine_id and (rank == 0 or j.engine_run == engine_run))
    if job is None:
        raise LaunchError(f"job {job_id} is not running as engine job {engine_id} (run {engine_run}); exiting")
    if rank == 0:
        if store.take_over(job_id, engine_id, engine_run) is None:
            log.warning("job %s: engine job %s run %d does not go on (finished, cancelled or out of attempts)",
                        job_id, engine_id, engine_run)
            return 0
        return 0 if execute(job_id, store, progress=False, engine=True).status == "SUCCEEDED" else 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = prepare(job)
    for arm in ["", *comparison_arms(p)]:
        _train(p, job, store, logger=False, progress=False, launch=False, arm=arm)
    return 0


def _wait_for(store: JobStore, job_id: str, ready: Any, seconds: float = 120.0) -> Job | None:
    """The job once `ready(job)` holds (the submitter records the engine id just after submitting), None if the job
    is no longer RUNNING or it never becomes ready."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = store.get(job_id)
        if job.status != "RUNNING":
            return None
        if ready(job):
            return job
        time.sleep(0.5)
    return None

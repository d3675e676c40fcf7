"""The worker: claims PENDING jobs atomically and runs each in its own process (own process group,
so `athanor cancel` can stop the job and every process it started).

    athanor worker                 # poll forever
    athanor worker --once          # run what is pending, then exit
    python -m athanor.jobs.worker --job ID # (internal) run one claimed job in this process
    python -m athanor.jobs.worker --rank ID  # (internal) a non-zero training rank of job ID
    python -m athanor.jobs.worker --job ID --engine-task  # (internal) a rank a cluster engine started (jobs/launchers)

A job whose recipe says `train.launcher: slurm | ray` is not run here: the worker submits it to that engine and
goes on; the engine's job state settles it (`jobs.launchers.reconcile`, on every loop).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

from athanor.jobs.launchers import launcher_for, safe_reconcile, submit
from athanor.jobs.leases import clean_up, reap_stale
from athanor.jobs.prefork import ForkedJob, Prefork, spawn_fresh
from athanor.jobs.recipe import train_section
from athanor.jobs.store import JobStore, StoreCorrupt, StoreError, kill_process_group
from athanor.jobs.workers import WorkerBeat

log = logging.getLogger("athanor.worker")


def spawn(job_id: str, store: JobStore, prefork: Prefork | None = None) -> ForkedJob | subprocess.Popen:
    """Start the claimed job's own process: forked by `prefork` when it can (libraries already imported), else a
    fresh interpreter. Either way its pid is recorded, and it runs in its own session."""
    job = store.get(job_id)
    env = {**os.environ, "ATHANOR_HOME": str(store.home), "PYTHONUNBUFFERED": "1"}
    argv = ["athanor.jobs.worker", "--job", job_id]
    proc = prefork.launch(argv, env, job.log_path) if prefork is not None and prefork.alive else None
    how = "forked from the preloaded server"
    if proc is None:
        proc, how = spawn_fresh(argv, env, job.log_path), "a fresh interpreter"
    store.update(job_id, pid=proc.pid)
    print(f"job {job_id}: process {proc.pid}, {how}", flush=True)
    return proc


BACKOFF_MAX_S = 60.0
"""Longest wait between tries of a store that cannot be written (a full or read-only home)."""


def work(store: JobStore, *, once: bool = False, poll: float = 2.0, max_jobs: int | None = None) -> int:
    """Run pending jobs one after another; return how many ran. Store failures (read-only home, full
    disk) are reported in one line and retried: the worker stays up. Its heartbeat row (jobs/workers.py) is renewed
    from a thread throughout, so `GET /workers` sees it alive inside a long job too."""
    prefork = Prefork.start()  # before the heartbeat thread: a fork copies no thread's held lock
    try:
        with WorkerBeat(store):
            return _work(store, prefork, once=once, poll=poll, max_jobs=max_jobs)
    finally:
        if prefork is not None:
            prefork.close()


def _work(store: JobStore, prefork: Prefork | None, *, once: bool, poll: float, max_jobs: int | None) -> int:
    ran = 0
    stopping = False

    def stop(signum, frame):  # finish the current job, then exit
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    failures = 0
    while not stopping and (max_jobs is None or ran < max_jobs):
        try:
            reap_stale(store)
            safe_reconcile(store)
            job = store.claim()
            failures = 0
        except StoreCorrupt as exc:  # retrying cannot help, and running on a damaged store could lose jobs
            print(f"worker: {exc}; stopping", file=sys.stderr, flush=True)
            break
        except StoreError as exc:  # a full or read-only home: back off (doubling, up to a minute), never spin
            wait = min(poll * 2 ** failures, BACKOFF_MAX_S)
            failures += 1
            print(f"worker: {exc}; retrying in {wait:g} s", file=sys.stderr, flush=True)
            if once:
                break
            time.sleep(wait)
            continue
        if job is None:
            if once:
                break
            time.sleep(poll)
            continue
        try:
            _run_one(store, job, prefork)
        except StoreError as exc:
            print(f"worker: job {job.id}: {exc}", file=sys.stderr, flush=True)
        ran += 1
    return ran


def _run_one(store: JobStore, job, prefork: Prefork | None = None) -> None:
    """Run the attempt `job` was claimed for; if its process died without reporting, re-queue the job (attempts
    left) or finish it. A later claim by this loop (or any worker) runs the next attempt. A job for a cluster
    engine is submitted to it instead."""
    train = _train_section(job)
    if train is not None and train.launcher != "local":
        submit(store, job, train)
        now = store.get(job.id)
        print(f"job {job.id}: " + (f"submitted to {train.launcher} as {now.engine_id}" if now.status == "RUNNING"
                                   else f"{now.status} — {now.error}"), flush=True)
        return
    print(f"running job {job.id} ({job.name}, {job.method}), attempt {job.attempts} of {job.max_attempts}; "
          f"log: {job.log_path}", flush=True)
    proc = spawn(job.id, store, prefork)
    proc.wait()
    reap_stale(store)
    final = store.get(job.id)
    if final.status == "RUNNING" and final.attempts == job.attempts:  # died before reporting; lease not stale yet
        settled = store.retry_or_finish(job.id, job.attempts, f"job process exited with code {proc.returncode}; "
                                        f"see {job.log_path}")
        if settled is not None:
            clean_up(store, settled)
        final = store.get(job.id)
    print(f"job {job.id}: {final.status}" + (f" — {final.error}" if final.error else ""), flush=True)


def _train_section(job):
    """The recipe's `train:` section (validated at submission), or None when it cannot be read here: the job then
    runs locally and fails in its own process with the recipe's own error. Only this section is read, so the
    worker never imports a method (seconds of torch/Lightning imports per job) to learn its launcher."""
    try:
        return train_section(job.recipe_text, job.overrides)
    except Exception:  # noqa: BLE001
        return None


ENGINE_STOP_SECONDS = 30.0
"""How long a forced cancel of an engine job waits for the engine to report it stopped."""


def cancel(store: JobStore, job_id: str, *, force: bool = False) -> str:
    """PENDING → STOPPED; RUNNING → the cancel flag (the job stops at its next step or stage boundary,
    never inside registration). `force` also kills the job's process group (the lease reaper then records it
    STOPPED and cleans up), or for an engine job stops it through the engine first — before the flag, which the
    job would otherwise race to honour itself — and waits for the engine's state to settle it."""
    job = store.get(job_id)
    if force and job.status == "RUNNING" and job.engine and job.engine_id:
        launcher_for(job.engine).cancel(job)  # the engine kills every rank; reconcile records it STOPPED
        deadline = time.monotonic() + ENGINE_STOP_SECONDS
        while store.get(job_id).status == "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.5)
            safe_reconcile(store)
    status = store.request_cancel(job_id)
    job = store.get(job_id)
    if force and status == "RUNNING" and job.pid and not job.engine:
        kill_process_group(job.pid)  # its own process group: its ranks go too
        reap_stale(store)
    return store.get(job_id).status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m athanor.jobs.worker")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--job", help="run this claimed job in this process")
    group.add_argument("--rank", help="run a non-zero training rank of this job")
    parser.add_argument("--engine-task", action="store_true", help="with --job: a rank a cluster engine started")
    args = parser.parse_args(argv)
    os.environ.setdefault("USE_HUB_KERNELS", "0")  # as the CLI (jobs/cli.py): engines may not pass it on
    store = JobStore()
    if args.engine_task:
        # why: the worker loop never imports torch; only a job's own process runs a job
        from athanor.jobs.launchers.task import run_engine_task

        return run_engine_task(args.job, store)
    # why: the worker loop never imports torch; only a job's own process runs a job
    from athanor.jobs import run

    if args.rank:  # a rank's stdout is its own log file; the job process logs through its FileHandler only
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        run.run_rank(args.rank, store)
        return 0
    from athanor.jobs.trainer import rank_server

    train = _train_section(store.get(args.job))
    with rank_server(train) if train is not None else contextlib.nullcontext():  # before the job starts a thread
        job = run.execute(args.job, store, progress=False)
    return 0 if job.status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())

"""The worker: claims PENDING jobs atomically and runs each in its own process (own process group,
so `athanor cancel` can stop the job and every process it started).

    athanor worker                 # poll forever
    athanor worker --once          # run what is pending, then exit
    python -m jobs.worker --job ID # (internal) run one claimed job in this process
    python -m jobs.worker --rank ID  # (internal) a non-zero training rank of job ID
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time

from jobs.store import JobStore

log = logging.getLogger("athanor.worker")


def spawn(job_id: str, store: JobStore) -> subprocess.Popen:
    job = store.get(job_id)
    logfile = open(job.log_path, "ab")
    env = {**os.environ, "ATHANOR_HOME": str(store.home), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.worker", "--job", job_id], stdout=logfile,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    store.update(job_id, pid=proc.pid)
    return proc


def work(store: JobStore, *, once: bool = False, poll: float = 2.0, max_jobs: int | None = None) -> int:
    """Run pending jobs one after another; return how many ran."""
    ran = 0
    stopping = False

    def stop(signum, frame):  # finish the current job, then exit
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping and (max_jobs is None or ran < max_jobs):
        for lost in store.reap():
            log.warning("job %s lost its process; marked FAILED", lost)
        job = store.claim()
        if job is None:
            if once:
                break
            time.sleep(poll)
            continue
        print(f"running job {job.id} ({job.name}, {job.method}); log: {job.log_path}", flush=True)
        proc = spawn(job.id, store)
        proc.wait()
        store.reap()
        final = store.get(job.id)
        if final.status == "RUNNING":  # the process died before it could report
            store.finish(job.id, "FAILED", error=f"job process exited with code {proc.returncode}; see {job.log_path}")
            final = store.get(job.id)
        print(f"job {job.id}: {final.status}" + (f" — {final.error}" if final.error else ""), flush=True)
        ran += 1
    return ran


def cancel(store: JobStore, job_id: str) -> str:
    """PENDING → STOPPED; RUNNING → SIGTERM to the job's process group, then STOPPED."""
    job = store.get(job_id)
    if job.status == "PENDING":
        store.finish(job.id, "STOPPED", error="cancelled before it started")
    elif job.status == "RUNNING":
        if job.pid:
            try:
                if os.getpgid(job.pid) == job.pid:
                    os.killpg(job.pid, signal.SIGTERM)
                else:
                    os.kill(job.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        store.finish(job.id, "STOPPED", error="cancelled")
    return store.get(job.id).status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.worker")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--job", help="run this claimed job in this process")
    group.add_argument("--rank", help="run a non-zero training rank of this job")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = JobStore()
    from jobs import run

    if args.rank:
        run.run_rank(args.rank, store)
        return 0
    job = run.execute(args.job, store, progress=False)
    return 0 if job.status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())

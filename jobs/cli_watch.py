"""The `athanor` commands that watch and steer queued jobs: list, status, wait, logs, cancel, workers (jobs/cli.py
holds the parser's other commands). Exit codes (jobs/cli_exit.py) carry the job's outcome for scripts; `--json`
prints the API's job objects (jobs/job_view.py), one per line.

    athanor wait JOB && echo ok         # 0 SUCCEEDED, 1 FAILED, 3 STOPPED, 124 --timeout ran out
    athanor list --json | jq -r 'select(.status == "FAILED") | .id'
    .venv/bin/python -m pytest tests/jobs/test_cli_exit.py tests/jobs/test_cli_json.py -q
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from athanor.jobs.cli_exit import EXIT_BAD_INPUT, EXIT_CONFLICT, EXIT_JOB_FAILED, EXIT_OK, EXIT_TIMEOUT, exit_for
from athanor.jobs.store import FINAL, STATUSES, JobStore


def store_of(args: argparse.Namespace) -> Any:
    return JobStore(args.home)


def job_of(store: Any, job_id: str) -> Any:
    try:
        return store.get(job_id)
    except KeyError:
        print(f"error: no job '{job_id}' (or the prefix matches several); see `athanor list`", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def reap(store: Any) -> None:
    """Settle jobs whose process died (and engine jobs that ended), so what is shown is true now."""
    # why: loaded only by this command, so `athanor --help` stays fast
    from athanor.jobs.launchers import safe_reconcile
    from athanor.jobs.leases import reap_stale

    reap_stale(store)
    safe_reconcile(store)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":")), flush=True)


def job_json_or_exit(job: Any, full: bool = True) -> dict[str, Any]:
    """The job's JSON; a bad $ATHANOR_MLFLOW_UI is one line and exit code 2."""
    # why: loaded only by this command, so `athanor --help` stays fast
    from athanor.jobs.job_view import job_json

    try:
        return job_json(job, full=full)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def warn_if_no_worker(store: Any) -> None:
    # why: loaded only by this command, so `athanor --help` stays fast
    from athanor.jobs.workers import pending_without_worker

    if warning := pending_without_worker(store):
        print(f"warning: {warning}", file=sys.stderr)


def _age(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def stage_text(job: Any) -> str:
    """'train 12/30' while training, the stage otherwise ('' before a worker took the job)."""
    if job.progress_step is not None:
        return f"{job.stage} {job.progress_step}/{job.progress_total or '?'}"
    return job.stage or ""


def _gate_failed(job: Any) -> bool:
    return ((job.result or {}).get("gate") or {}).get("passed") is False


def cmd_list(args: argparse.Namespace) -> int:
    store = store_of(args)
    reap(store)
    jobs = store.list(limit=args.limit, status=args.status)
    if args.json:
        for job in jobs:
            print_json(job_json_or_exit(job, full=False))
    else:
        print(f"{'JOB':24} {'STATUS':10} {'METHOD':12} {'NAME':24} {'CREATED':19}  {'STAGE':14} ERROR")
        for j in jobs:
            note = j.error or ("gate: failed" if _gate_failed(j) else "")
            print(f"{j.id:24} {j.status:10} {j.method:12} {j.name[:24]:24} {_age(j.created_at):19}  "
                  f"{stage_text(j)[:14]:14} {note[:60]}")
    warn_if_no_worker(store)
    return EXIT_OK


def status_fields(job: Any) -> dict[str, Any]:
    """What `athanor status` prints: every field that has a value, none that would read `None`."""
    fields = {k: getattr(job, k) for k in ("id", "name", "method", "status", "submission_id", "error")}
    fields.update(labels=", ".join(f"{k}={v}" for k, v in job.labels.items()), stage=stage_text(job),
                  attempts=f"{job.attempts} of {job.max_attempts}" if job.attempts else None,
                  cancel="requested" if job.cancel_requested and job.status == "RUNNING" else None)
    fields.update({k: getattr(job, k) for k in ("pid", "engine", "engine_id", "engine_state", "recipe_path",
                                                "recipe_hash", "overrides", "log_path", "mlflow_run_id",
                                                "model_version")})
    fields.update(created=_age(job.created_at), started=job.started_at and _age(job.started_at),
                  finished=job.finished_at and _age(job.finished_at))
    if job.status == "RUNNING" and job.heartbeat_at:
        fields["heartbeat"] = f"{time.time() - job.heartbeat_at:.0f} s ago"
    gate = (job.result or {}).get("gate")
    if gate and gate.get("conditions"):
        fields["gate"] = "passed" if gate["passed"] else "failed — " + "; ".join(gate["failed"])
    return {k: v for k, v in fields.items() if v not in (None, "", [], {})}


def cmd_status(args: argparse.Namespace) -> int:
    store = store_of(args)
    reap(store)
    job = job_of(store, args.job)
    if args.json:
        print_json(job_json_or_exit(job))
        return EXIT_OK
    for key, value in status_fields(job).items():
        print(f"{key:14} {', '.join(value) if isinstance(value, list) else value}")
    if job.result:
        # why: loaded only by this command, so `athanor --help` stays fast
        from athanor.jobs.report import print_table

        print_table(job)
    if job.status == "PENDING":
        warn_if_no_worker(store)
    return EXIT_OK


def await_final(store: Any, job_id: str, *, poll: float = 1.0, timeout: float | None = None) -> Any:
    """The job once it is final, or as it is when `timeout` seconds passed; says once (stderr) when it is PENDING
    and no worker is alive to run it."""
    deadline = time.monotonic() + timeout if timeout is not None else None
    warned = False
    job = store.get(job_id)
    while job.status not in FINAL and (deadline is None or time.monotonic() < deadline):
        if job.status == "PENDING" and not warned:
            warn_if_no_worker(store)
            warned = True
        time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))
        reap(store)
        job = store.get(job_id)
    return job


def report_outcome(job: Any, as_json: bool = False) -> int:
    """Print the final job (JSON, or one line: stdout when it succeeded, stderr otherwise); its exit code."""
    if as_json:
        print_json(job_json_or_exit(job))
    elif job.status == "SUCCEEDED":
        print(f"job {job.id}: SUCCEEDED" + (" (gate: failed)" if _gate_failed(job) else ""))
    else:
        print(f"job {job.id}: {job.status}" + (f" — {job.error}" if job.error else ""), file=sys.stderr)
    return exit_for(job.status)


def cmd_wait(args: argparse.Namespace) -> int:
    store = store_of(args)
    job = await_final(store, job_of(store, args.job).id, poll=args.poll, timeout=args.timeout)
    if job.status not in FINAL:
        print(f"job {job.id}: still {job.status} after {args.timeout:g} s (--timeout)", file=sys.stderr)
        return EXIT_TIMEOUT
    return report_outcome(job, args.json)


def cmd_logs(args: argparse.Namespace) -> int:
    """The log; with --follow, until the job is final, then exit with its outcome as `athanor wait` does."""
    store = store_of(args)
    job = job_of(store, args.job)
    if args.engine:
        return _engine_logs(job)
    if not args.follow:
        if not job.log_path or not os.path.exists(job.log_path):
            print("(no log yet)")
            return EXIT_OK
        with open(job.log_path, errors="replace") as f:
            sys.stdout.write(f.read())
        return EXIT_OK
    while not os.path.exists(job.log_path or "") and job.status not in FINAL:  # PENDING: no log until it starts
        time.sleep(0.5)
        reap(store)
        job = store.get(job.id)
    if os.path.exists(job.log_path or ""):
        with open(job.log_path, errors="replace") as f:
            while True:
                sys.stdout.write(f.read()), sys.stdout.flush()
                if job.status in FINAL:
                    sys.stdout.write(f.read())  # what was written before the final status
                    break
                time.sleep(0.5)
                reap(store)
                job = store.get(job.id)
    return report_outcome(job) if job.status != "SUCCEEDED" else EXIT_OK


def _engine_logs(job: Any) -> int:
    """`athanor logs JOB --engine`: every rank's output as the cluster engine keeps it."""
    # why: loaded only by this command, so `athanor --help` stays fast
    from athanor.jobs.launchers import LaunchError, launcher_for

    if not job.engine or not job.engine_id:
        print(f"job {job.id} did not run under a cluster engine (train.launcher: local); see `athanor logs {job.id}`",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        sys.stdout.write(launcher_for(job.engine).logs(job))
    except LaunchError as exc:
        print(f"job {job.id}: {job.engine} job {job.engine_id}: {exc}", file=sys.stderr)
        return EXIT_JOB_FAILED
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    # why: loaded only by this command, so `athanor --help` stays fast
    from athanor.jobs.launchers import LaunchError
    from athanor.jobs.worker import cancel

    store = store_of(args)
    job = job_of(store, args.job)
    if job.status in FINAL:  # as the API's 409: nothing was cancelled, and a script must be able to tell
        print(f"error: job {job.id} is already {job.status}; nothing to cancel", file=sys.stderr)
        return EXIT_CONFLICT
    try:
        status = cancel(store, job.id, force=args.force)
    except LaunchError as exc:
        print(f"job {job.id}: {job.engine} could not cancel {job.engine_id}: {exc}", file=sys.stderr)
        return EXIT_JOB_FAILED
    if status == "RUNNING":
        print(f"job {job.id}: cancel requested; it stops at its next training step or stage boundary "
              f"(`athanor wait {job.id}`; `athanor cancel --force` kills it now)")
    else:
        print(f"job {job.id}: {status}")
    return EXIT_OK


def cmd_workers(args: argparse.Namespace) -> int:
    # why: loaded only by this command, so `athanor --help` stays fast
    from athanor.jobs.job_view import workers_report

    report = workers_report(store_of(args))
    if args.json:
        print_json(report.model_dump(mode="json"))
        return EXIT_OK
    for w in report.workers:
        seen = time.time() - w.seen_at.timestamp()
        print(f"{w.id:40} {'alive' if w.alive else 'gone':6} last seen {seen:.0f} s ago")
    print(f"{report.alive} worker(s) alive, {report.pending} job(s) PENDING")
    if report.warning:
        print(f"warning: {report.warning}", file=sys.stderr)
    return EXIT_OK


def add_commands(sub: Any) -> None:
    """The parsers of list, status, wait, logs, cancel and workers."""
    p = sub.add_parser("list", help="list jobs (--json: one object per line)")
    p.add_argument("--status", default=None, choices=list(STATUSES))
    p.add_argument("--limit", type=int, default=30), _with_json(p), p.set_defaults(fn=cmd_list)
    p = sub.add_parser("status", help="show one job")
    p.add_argument("job"), _with_json(p), p.set_defaults(fn=cmd_status)
    p = sub.add_parser("wait", help="wait until a job is final; exit 0 SUCCEEDED, 1 FAILED, 3 STOPPED")
    p.add_argument("job"), _with_json(p)
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (exit 124)")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between looks at the job")
    p.set_defaults(fn=cmd_wait)
    p = sub.add_parser("cancel", help="stop a job (at its next step; --force kills it now); exit 4 if already final")
    p.add_argument("job"), p.add_argument("--force", action="store_true", help="kill the job's processes now")
    p.set_defaults(fn=cmd_cancel)
    p = sub.add_parser("logs", help="print a job's log (-f: follow it, then exit as `athanor wait` does)")
    p.add_argument("job"), p.add_argument("--follow", "-f", action="store_true"), p.set_defaults(fn=cmd_logs)
    p.add_argument("--engine", action="store_true", help="every rank's output as the cluster engine keeps it")
    p = sub.add_parser("workers", help="the workers seen on this home, and whether queued jobs wait for none")
    _with_json(p), p.set_defaults(fn=cmd_workers)


def _with_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="JSON, as the HTTP API answers (see docs/api.md)")

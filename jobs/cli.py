"""`athanor` command line. Heavy libraries (torch, lightning, mlflow) load only inside the commands
that need them, so `athanor --help` starts instantly.

    athanor validate recipes/minilm.yaml
    athanor submit recipes/minilm.yaml --wait -o train.max_steps=50
    athanor worker & athanor list; athanor logs JOB --follow; athanor ui
    athanor serve --port 8000            # the HTTP job API (jobs/api.py)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

EXIT_OK, EXIT_JOB_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _store(args):
    from athanor.jobs.store import JobStore

    return JobStore(args.home)


def _job(store, job_id: str):
    try:
        return store.get(job_id)
    except KeyError:
        print(f"error: no job '{job_id}' (or the prefix matches several); see `athanor list`", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _print_problems(problems: list, recipe: str, outcome: str = "") -> None:
    """One stderr line per problem (capped: a broken file can hold thousands), then the count."""
    from athanor.convert.recipe_types import one_line
    from athanor.jobs.recipe import render_problems

    for line in render_problems(problems, recipe):
        print(line, file=sys.stderr)
    print(f"{len(problems)} problem(s) in {one_line(recipe, 300)}{outcome}", file=sys.stderr)


def cmd_validate(args) -> int:
    from athanor.jobs.validate import check, render_estimate

    report = check(args.recipe, overrides=args.override, force=args.force)
    if report.problems:
        _print_problems(report.problems, args.recipe)
        return EXIT_BAD_INPUT
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.recipe}: valid ({report.loaded.recipe.method})")
    if report.estimate:
        print(render_estimate(report.estimate))
    for note in report.notes:
        print(note)
    return EXIT_OK


def cmd_schema(args) -> int:
    from athanor.jobs.recipe import json_schema, recipe_model

    schema = recipe_model(args.method).model_json_schema() if args.method else json_schema()
    print(json.dumps(schema, indent=2))
    return EXIT_OK


def cmd_submit(args) -> int:
    """Validate first; a job row exists only for a valid recipe (an invalid one is reported and
    stored nowhere: no FAILED rows holding megabytes of someone's broken file)."""
    from athanor.jobs.validate import check

    report = check(args.recipe, overrides=args.override, force=args.force)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if report.problems:
        _print_problems(report.problems, args.recipe, "; no job was created")
        return EXIT_BAD_INPUT
    loaded = report.loaded
    name, method = loaded.recipe.name, loaded.recipe.method
    store = _store(args)
    job = store.create(name=name, method=method, recipe_text=loaded.text, recipe_path=os.path.abspath(args.recipe),
                       overrides=args.override, recipe_hash=loaded.hash,
                       max_attempts=loaded.recipe.train.max_attempts)
    if not args.wait:
        print(f"submitted job {job.id} ({name}); run `athanor worker` to execute it, "
              f"`athanor status {job.id}` to watch")
        return EXIT_OK
    from athanor.jobs import run

    store.claim(job.id)
    if loaded.recipe.train.launcher != "local":
        from athanor.jobs.launchers import submit_and_follow

        final = submit_and_follow(store, store.get(job.id), loaded.recipe.train)
    else:
        print(f"running job {job.id} ({name}, {method}) in the foreground; log: {job.log_path}", flush=True)
        final = run.execute(job.id, store, progress=not args.no_progress)
    if final.status == "SUCCEEDED":
        from athanor.jobs.report import print_table

        print_table(final)
        return EXIT_OK
    print(f"job {final.id}: {final.status} — {final.error}", file=sys.stderr)
    return EXIT_JOB_FAILED


def cmd_worker(args) -> int:
    from athanor.jobs.store import StoreError
    from athanor.jobs.worker import work

    while True:  # a home that cannot be opened yet (read-only, full): say so once per poll, stay up
        try:
            store = _store(args)
            break
        except StoreError as exc:
            print(f"worker: {exc}; retrying in {args.poll:g} s", file=sys.stderr, flush=True)
            if args.once:
                return EXIT_JOB_FAILED
            time.sleep(args.poll)
    work(store, once=args.once, poll=args.poll, max_jobs=args.max_jobs)
    return EXIT_OK


def _age(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _reap(store) -> None:
    from athanor.jobs.launchers import safe_reconcile
    from athanor.jobs.leases import reap_stale

    reap_stale(store)
    safe_reconcile(store)


def cmd_list(args) -> int:
    store = _store(args)
    _reap(store)
    jobs = store.list(limit=args.limit, status=args.status)
    print(f"{'JOB':24} {'STATUS':10} {'METHOD':12} {'NAME':24} {'CREATED':19}  ERROR")
    for j in jobs:
        note = j.error or ("gate: failed" if _gate_failed(j) else "")
        print(f"{j.id:24} {j.status:10} {j.method:12} {j.name[:24]:24} {_age(j.created_at):19}  {note[:60]}")
    return EXIT_OK


def _gate_failed(job) -> bool:
    return ((job.result or {}).get("gate") or {}).get("passed") is False


def cmd_status(args) -> int:
    store = _store(args)
    _reap(store)
    job = _job(store, args.job)
    shown = ("id", "name", "method", "status", "attempts", "pid", "engine", "engine_id", "engine_state", "recipe_path",
             "recipe_hash", "overrides", "log_path", "mlflow_run_id", "model_version", "error")
    fields = {k: getattr(job, k) for k in shown}
    fields.update(created=_age(job.created_at), started=_age(job.started_at), finished=_age(job.finished_at))
    gate = (job.result or {}).get("gate")
    if gate and gate.get("conditions"):
        fields["gate"] = "passed" if gate["passed"] else "failed — " + "; ".join(gate["failed"])
    for key, value in fields.items():
        print(f"{key:14} {value}")
    if job.result:
        from athanor.jobs.report import print_table

        print_table(job)
    return EXIT_OK


def cmd_logs(args) -> int:
    store = _store(args)
    job = _job(store, args.job)
    if args.engine:
        return _engine_logs(job)
    if not job.log_path or not os.path.exists(job.log_path):
        print("(no log yet)")
        return EXIT_OK
    with open(job.log_path, errors="replace") as f:
        while True:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk), sys.stdout.flush()
            if not args.follow or store.get(job.id).status not in ("PENDING", "RUNNING"):
                if args.follow:
                    sys.stdout.write(f.read())
                return EXIT_OK
            time.sleep(0.5)


def _engine_logs(job) -> int:
    """`athanor logs JOB --engine`: every rank's output as the cluster engine keeps it."""
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


def cmd_cancel(args) -> int:
    from athanor.jobs.worker import cancel

    store = _store(args)
    job = _job(store, args.job)
    if job.status not in ("PENDING", "RUNNING"):
        print(f"job {job.id} is already {job.status}")
        return EXIT_OK
    from athanor.jobs.launchers import LaunchError

    try:
        status = cancel(store, job.id, force=args.force)
    except LaunchError as exc:
        print(f"job {job.id}: {job.engine} could not cancel {job.engine_id}: {exc}", file=sys.stderr)
        return EXIT_JOB_FAILED
    if status == "RUNNING":
        print(f"job {job.id}: cancel requested; it stops at its next training step or stage boundary "
              f"(`athanor status {job.id}`; `athanor cancel --force` kills it now)")
    else:
        print(f"job {job.id}: {status}")
    return EXIT_OK


def cmd_ui(args) -> int:
    from athanor.jobs.store import athanor_home
    from athanor.jobs.tracking import default_tracking_uri

    home = athanor_home(args.home)
    uri = args.tracking_uri or default_tracking_uri(home)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port), "--workers", str(args.workers)]
    if uri.startswith("sqlite:"):
        cmd += ["--default-artifact-root", (home / "mlartifacts").as_uri()]
    print(f"MLflow UI on http://{args.host}:{args.port} (store {uri}); Ctrl-C stops it", flush=True)
    os.execv(sys.executable, cmd)


def cmd_serve(args) -> int:
    """The HTTP job API; off the loopback only with ATHANOR_TOKEN (checked before anything starts)."""
    from athanor.jobs.api import serve, token_problem
    from athanor.jobs.store import athanor_home

    token = os.environ.get("ATHANOR_TOKEN") or None
    problem = token_problem(args.host, token)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    home = athanor_home(args.home)
    os.environ["ATHANOR_HOME"] = str(home)
    auth = "bearer token required" if token else "no token (loopback only)"
    where = f"http://{args.host}:{args.port}" if args.port else f"{args.host}, a free port (uvicorn's line below)"
    print(f"athanor API on {where} (home {home}; {auth}); run `athanor worker` to execute the jobs it queues",
          flush=True)
    serve(home, host=args.host, port=args.port, token=token)
    return EXIT_OK


def cmd_push(args) -> int:
    from athanor.jobs.registry import PushRefused, push_job

    store = _store(args)
    job = _job(store, args.job)
    try:
        name, version, job_id = push_job(store, job.id, args.alias, force=args.force)
    except PushRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{name}: alias '{args.alias}' → version {version} (job {job_id})")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="athanor",
                                     description="Distil and convert pretrained models from recipe YAML files.")
    parser.add_argument("--home", default=None,
                        help="athanor home (job store, MLflow store); default $ATHANOR_HOME or ./.athanor")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_overrides(p):
        p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe key, e.g. -o train.max_steps=50 (repeatable)")

    def with_force(p):
        p.add_argument("--force", action="store_true", help="accept a size estimate beyond this machine's memory")

    p = sub.add_parser("validate", help="check a recipe: every problem at once, plus a size estimate")
    p.add_argument("recipe"), with_overrides(p), with_force(p), p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("schema", help="print the recipe JSON Schema (for editors)")
    p.add_argument("--method", default=None, help="only this method's recipe"), p.set_defaults(fn=cmd_schema)
    p = sub.add_parser("submit", help="queue a job (or run it now with --wait)")
    p.add_argument("recipe"), with_overrides(p), with_force(p)
    p.add_argument("--wait", action="store_true", help="run in the foreground with progress; print before/after")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(fn=cmd_submit)
    p = sub.add_parser("worker", help="run queued jobs, each in its own process")
    p.add_argument("--once", action="store_true", help="exit when nothing is pending")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between polls")
    p.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs")
    p.set_defaults(fn=cmd_worker)
    p = sub.add_parser("list", help="list jobs")
    p.add_argument("--status", default=None, choices=["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"])
    p.add_argument("--limit", type=int, default=30), p.set_defaults(fn=cmd_list)
    p = sub.add_parser("status", help="show one job")
    p.add_argument("job"), p.set_defaults(fn=cmd_status)
    p = sub.add_parser("cancel", help="stop a job (at its next step; --force kills it now)")
    p.add_argument("job"), p.add_argument("--force", action="store_true", help="kill the job's processes now")
    p.set_defaults(fn=cmd_cancel)
    p = sub.add_parser("logs", help="print a job's log")
    p.add_argument("job"), p.add_argument("--follow", "-f", action="store_true"), p.set_defaults(fn=cmd_logs)
    p.add_argument("--engine", action="store_true", help="every rank's output as the cluster engine keeps it")
    p = sub.add_parser("ui", help="start the MLflow UI on the job store (127.0.0.1 by default)")
    p.add_argument("--host", default="127.0.0.1"), p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=1, help="server worker processes")
    p.add_argument("--tracking-uri", default=None), p.set_defaults(fn=cmd_ui)
    p = sub.add_parser("push", help="point a registry alias at a job's registered version")
    p.add_argument("job"), p.add_argument("--alias", required=True), p.set_defaults(fn=cmd_push)
    p.add_argument("--force", action="store_true", help="also onto a version whose job missed its gate")
    p = sub.add_parser("serve", help="HTTP job API on 127.0.0.1 (another --host needs ATHANOR_TOKEN)")
    p.add_argument("--host", default="127.0.0.1"), p.add_argument("--port", type=int, default=8000)
    p.set_defaults(fn=cmd_serve)
    for command in sub.choices.values():  # `athanor COMMAND --home DIR` works as well as `athanor --home DIR COMMAND`
        command.add_argument("--home", default=argparse.SUPPRESS, help="athanor home (as the global --home)")
    return parser


def main(argv: list[str] | None = None) -> int:
    # Hub kernels (transformers' `kernels` integration, on by default in every from_pretrained) download and
    # run code from the hub at load time, and would make a teacher's numbers depend on what a machine fetched:
    # off unless the operator sets USE_HUB_KERNELS. Workers and ranks inherit it from this process.
    os.environ.setdefault("USE_HUB_KERNELS", "0")
    args = build_parser().parse_args(argv)
    if args.home:
        os.environ["ATHANOR_HOME"] = os.path.abspath(args.home)
    from athanor.jobs.store import StoreError

    try:
        return args.fn(args)
    except StoreError as exc:  # read-only home, full disk: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_JOB_FAILED


if __name__ == "__main__":
    sys.exit(main())

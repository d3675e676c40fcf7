"""`athanor` command line. Heavy libraries (torch, lightning, mlflow) load only inside the commands
that need them, so `athanor --help` starts instantly.

    athanor validate recipes/minilm.yaml
    athanor submit recipes/minilm.yaml --wait -o train.max_steps=50
    athanor worker & athanor list; athanor logs JOB --follow; athanor ui
    athanor serve --port 8000            # the HTTP job API (jobs/api.py)
    athanor new-method NAME              # the skeleton of a new conversion method (jobs/scaffold.py)

list, status, wait, logs, cancel and workers live in jobs/cli_watch.py; exit codes in jobs/cli_exit.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from athanor.jobs.cli_exit import (  # noqa: F401 — the codes are part of this module's interface
    EXIT_BAD_INPUT,
    EXIT_CONFLICT,
    EXIT_JOB_FAILED,
    EXIT_JOB_STOPPED,
    EXIT_OK,
    EXIT_TIMEOUT,
    exit_for,
)
from athanor.jobs.cli_watch import (
    add_commands,
    await_final,
    job_json_or_exit,
    job_of,
    print_json,
    report_outcome,
    store_of,
)
from athanor.jobs.store import StoreError, athanor_home

_store, _job = store_of, job_of


def _print_problems(problems: list, recipe: str, outcome: str = "") -> None:
    """One stderr line per problem (capped: a broken file can hold thousands), then the count."""
    # why: loaded only by this command, so `athanor --help` stays fast
    from athanor.convert.recipe_types import one_line
    from athanor.jobs.recipe import render_problems

    for line in render_problems(problems, recipe):
        print(line, file=sys.stderr)
    print(f"{len(problems)} problem(s) in {one_line(recipe, 300)}{outcome}", file=sys.stderr)


def cmd_validate(args) -> int:
    # why: loaded only by this command, so `athanor --help` stays fast
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
    # why: loaded only by this command, so `athanor --help` stays fast
    from athanor.jobs.recipe import json_schema, recipe_model

    schema = recipe_model(args.method).model_json_schema() if args.method else json_schema()
    print(json.dumps(schema, indent=2))
    return EXIT_OK


def cmd_submit(args) -> int:
    """Validate first; a job row exists only for a valid recipe (an invalid one is reported and
    stored nowhere: no FAILED rows holding megabytes of someone's broken file)."""
    # why: loaded only by this command, so `athanor --help` stays fast
    from athanor.jobs.submission import SubmissionConflict, create_job, parse_labels, submission_id_problems
    from athanor.jobs.validate import check

    labels, problems = parse_labels(args.label)
    problems += submission_id_problems(args.submission_id, "--submission-id")
    report = check(args.recipe, overrides=args.override, force=args.force)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if problems or report.problems:
        _print_problems([*problems, *report.problems], args.recipe, "; no job was created")
        return EXIT_BAD_INPUT
    try:
        job, created = create_job(_store(args), report.loaded, recipe_path=os.path.abspath(args.recipe),
                                  submission_id=args.submission_id, labels=labels)
    except SubmissionConflict as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFLICT
    if not created:
        print(f"job {job.id} ({job.status}) was submitted earlier as {job.submission_id!r}; nothing new queued",
              file=sys.stderr)
    if args.wait:
        return _run_foreground(args, job, report.loaded)
    if args.json:
        print_json(job_json_or_exit(job))
    elif created:
        print(f"submitted job {job.id} ({job.name}); run `athanor worker` to execute it, "
              f"`athanor wait {job.id}` to wait for its outcome")
    return EXIT_OK


def _run_foreground(args, job, loaded) -> int:
    """`submit --wait`: run the job here (stage lines, training bar; --json: the final job on stdout, the rest on
    stderr), or, when a worker already holds it (a resubmitted submission id), wait for its outcome."""
    # why: loaded only by this command, so `athanor --help` stays fast
    from athanor.jobs import run
    from athanor.jobs.console import foreground

    store = _store(args)
    out = sys.stderr if args.json else sys.stdout
    if store.claim(job.id) is None:  # final already, or another process runs it
        final = await_final(store, job.id)
    elif loaded.recipe.train.launcher != "local":
        # why: loaded only by this command, so `athanor --help` stays fast
        from athanor.jobs.launchers import submit_and_follow

        final = submit_and_follow(store, store.get(job.id), loaded.recipe.train)
    else:
        print(f"running job {job.id} ({job.name}, {job.method}) in the foreground; log: {job.log_path}", file=out,
              flush=True)
        # why: loaded only by this command, so `athanor --help` stays fast
        from athanor.jobs.trainer import rank_server

        with (rank_server(loaded.recipe.train), foreground(verbose=args.verbose, stream=out),
              contextlib.redirect_stdout(out)):  # the rank server first: before any thread
            final = run.execute(job.id, store, progress=not args.no_progress)
    if final.status == "SUCCEEDED" and not args.json:
        # why: loaded only by this command, so `athanor --help` stays fast
        from athanor.jobs.report import print_table

        print_table(final)
        return EXIT_OK
    return report_outcome(final, args.json)


def cmd_worker(args) -> int:
    # why: loaded only by this command, so `athanor --help` stays fast
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


def cmd_ui(args) -> int:
    # why: loaded only by this command, so `athanor --help` stays fast
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
    # why: loaded only by this command, so `athanor --help` stays fast
    from athanor.jobs.api import serve, token_problem
    from athanor.jobs.job_view import mlflow_ui_url

    token = os.environ.get("ATHANOR_TOKEN") or None
    problem = token_problem(args.host, token)
    try:
        mlflow_ui = mlflow_ui_url(args.mlflow_ui)
    except ValueError as exc:
        problem = problem or str(exc)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    home = athanor_home(args.home)
    os.environ["ATHANOR_HOME"] = str(home)
    auth = "bearer token required" if token else "no token (loopback only)"
    where = f"http://{args.host}:{args.port}" if args.port else f"{args.host}, a free port (uvicorn's line below)"
    print(f"athanor API on {where} (home {home}; {auth}); run `athanor worker` to execute the jobs it queues",
          flush=True)
    serve(home, host=args.host, port=args.port, token=token, mlflow_ui=mlflow_ui)
    return EXIT_OK


def cmd_push(args) -> int:
    # why: loaded only by this command, so `athanor --help` stays fast
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


def cmd_new_method(args) -> int:
    # why: loaded only by this command, so `athanor --help` stays fast
    from athanor.jobs.scaffold import ScaffoldError, create, next_steps

    try:
        skeleton = create(args.name, args.root)
    except ScaffoldError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print("\n".join(next_steps(args.name, skeleton)))
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
    p.add_argument("-v", "--verbose", action="store_true", help="with --wait: also Lightning's, MLflow's and Python's "
                                                                  "console output (otherwise in the job log only)")
    p.add_argument("--json", action="store_true", help="print the job as JSON (with --wait: the final job)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="label the job (repeatable)")
    p.add_argument("--submission-id", default=None, metavar="ID",
                   help="your id for this submission: the same id and recipe again returns that job, no new one")
    p.set_defaults(fn=cmd_submit)
    p = sub.add_parser("worker", help="run queued jobs, each in its own process")
    p.add_argument("--once", action="store_true", help="exit when nothing is pending")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between polls")
    p.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs")
    p.set_defaults(fn=cmd_worker)
    add_commands(sub)
    p = sub.add_parser("ui", help="start the MLflow UI on the job store (127.0.0.1 by default)")
    p.add_argument("--host", default="127.0.0.1"), p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=1, help="server worker processes")
    p.add_argument("--tracking-uri", default=None), p.set_defaults(fn=cmd_ui)
    p = sub.add_parser("push", help="point a registry alias at a job's registered version")
    p.add_argument("job"), p.add_argument("--alias", required=True), p.set_defaults(fn=cmd_push)
    p.add_argument("--force", action="store_true", help="also onto a version whose job missed its gate")
    p = sub.add_parser("serve", help="HTTP job API on 127.0.0.1 (another --host needs ATHANOR_TOKEN)")
    p.add_argument("--host", default="127.0.0.1"), p.add_argument("--port", type=int, default=8000)
    p.add_argument("--mlflow-ui", default=None, metavar="URL", help="the MLflow UI job links point to (default: "
                   "$ATHANOR_MLFLOW_UI, else http://127.0.0.1:5000, where `athanor ui` serves)")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("new-method", help="write a working skeleton of a new conversion method (CONTRIBUTING.md)")
    p.add_argument("name", help="the method's name: a lower-case identifier (package, recipe section, registry key)")
    p.add_argument("--root", default=".", help="the repository checkout to write into (default: here)")
    p.set_defaults(fn=cmd_new_method)
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

    try:
        return args.fn(args)
    except StoreError as exc:  # read-only home, full disk: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_JOB_FAILED
    except SystemExit as exc:  # a command's own early exit (no such job: 2) returns its code to an in-process caller
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

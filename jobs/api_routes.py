"""Routes of the HTTP job API (`jobs/api.py` builds the app): submit, list, show, logs, cancel, push, the workers
seen, and the recipe JSON Schema. A submission goes through the same checks as `athanor submit` (jobs/validate.py)
plus the path confinement of jobs/api_paths.py; only a valid recipe creates a job row, and a resubmitted
submission id returns the job it made (jobs/submission.py).

    .venv/bin/python -m pytest tests/jobs/test_api.py -q
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse, StreamingResponse
from mlflow.exceptions import MlflowException
from pydantic import ValidationError

from athanor.convert.recipe_types import one_line
from athanor.jobs.api_models import (
    MAX_OVERRIDES,
    SUBMISSION_ID_DOC,
    ApiError,
    CancelOut,
    ErrorOut,
    HealthOut,
    JobCreated,
    JobDetail,
    JobSummary,
    Override,
    PushIn,
    PushOut,
    Status,
    SubmissionId,
    SubmitIn,
    WorkersOut,
)
from athanor.jobs.api_paths import confine
from athanor.jobs.job_view import detail, links, workers_report
from athanor.jobs.launchers import LaunchError
from athanor.jobs.leases import reap_stale
from athanor.jobs.recipe import RecipeInvalid, check_alias, json_schema, load_recipe
from athanor.jobs.recipe_yaml import MAX_PROBLEMS, MAX_RECIPE_BYTES, MISSING, Problem, RecipeFileError, decode
from athanor.jobs.registry import PushRefused, push_job
from athanor.jobs.store import FINAL, Job, JobStore
from athanor.jobs.submission import (
    MAX_LABELS,
    SubmissionConflict,
    create_job,
    label_problems,
    parse_labels,
    submission_id_problems,
)
from athanor.jobs.validate import check
from athanor.jobs.worker import cancel

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/plain")
LOG_POLL_S = 0.5
LOG_CHUNK = 1 << 20
VALIDATIONS = 4
"""Recipe checks at once per app (each may build models on the meta device); more wait their turn."""
JOB_ID = PathParam(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9-]*$",
                   description="a job id, or a prefix of exactly one")
OVERRIDES = Query([], max_length=MAX_OVERRIDES, description="key.path=value, as `athanor submit -o` (repeatable)")
SUBMISSION_QUERY = Query(None, description=SUBMISSION_ID_DOC)
LABELS = Query([], max_length=MAX_LABELS, description="KEY=VALUE (repeatable); JSON bodies may use `labels`")
ERRORS = {code: {"model": ErrorOut, "description": why} for code, why in (
    (400, "malformed request (a body that is not JSON where JSON is expected, a bad Content-Length)"),
    (401, "missing or wrong bearer token (when the server has one)"), (413, "request body over 256 KiB"),
    (422, "invalid request: every problem, each with its key path, value, fix and line"))}
NOT_FOUND = {404: {"model": ErrorOut, "description": "no such job"}}
SUBMIT_RESPONSES = {**ERRORS, 415: {"model": ErrorOut, "description": "not YAML/JSON"},
                    200: {"model": JobCreated, "description": "the job this submission_id created earlier"},
                    409: {"model": ErrorOut, "description": "the submission_id was used for another request"}}
SUBMIT_BODY = {"required": True, "content": {
    "application/yaml": {"schema": {"type": "string", "maxLength": MAX_RECIPE_BYTES,
                                    "description": "the recipe YAML (schema: #/components/schemas/Recipe); "
                                                   "overrides as repeated ?override=key.path=value"}},
    "application/json": {"schema": {"$ref": "#/components/schemas/SubmitIn"}}}}


def _job(store: JobStore, job_id: str) -> Job:
    try:
        return store.get(job_id)
    except KeyError:
        raise ApiError(404, f"no job '{job_id}' (or the prefix matches several); see GET /jobs") from None


def _invalid(problems: list[Problem], what: str = "recipe") -> ApiError:
    shown = problems[:MAX_PROBLEMS]
    more = f" (the first {MAX_PROBLEMS} shown)" if len(problems) > MAX_PROBLEMS else ""
    return ApiError(422, f"{len(problems)} problem(s) in the {what}{more}; no job was created", shown)


@dataclass
class Submission:
    """One POST /jobs, whichever form it came in."""

    text: str
    overrides: list[str]
    submission_id: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


def submit_recipe(store: JobStore, sub: Submission) -> tuple[Job, list[str], bool]:
    """Validate the recipe as `athanor submit` does, with its paths confined to the home; create the job, or find the
    one its submission id made (created False). ApiError 422 listing every problem, 409 for a reused submission id."""
    try:
        loaded = load_recipe(None, text=sub.text, overrides=sub.overrides)
    except RecipeInvalid as exc:
        raise _invalid(exc.problems) from None
    problems, absolute = confine(loaded, store.home)
    if problems:  # nothing outside the home is even looked at
        raise _invalid(problems)
    report = check(None, text=sub.text, overrides=[*sub.overrides, *absolute])
    if report.problems:
        raise _invalid(report.problems)
    try:
        job, created = create_job(store, report.loaded, recipe_path=None, submission_id=sub.submission_id,
                                  labels=sub.labels)
    except SubmissionConflict as exc:
        raise ApiError(409, str(exc)) from None
    return job, report.warnings, created


async def recipe_request(request: Request, override: list[str], submission_id: str | None,
                         label: list[str]) -> Submission:
    """The submission from a YAML body (overrides, submission id and labels in the query) or a JSON `SubmitIn` (the
    query's overrides are added to its own; a submission id or label given both ways must agree)."""
    labels, problems = parse_labels(label, "query.label")
    problems += submission_id_problems(submission_id, "query.submission_id")
    kind = request.headers.get("content-type", "application/yaml").split(";")[0].strip().lower()
    body = await request.body()
    if kind == "application/json":
        try:
            given = SubmitIn.model_validate_json(body)
        except ValidationError as exc:
            raise _invalid([Problem(".".join(str(p) for p in e["loc"]) or "(body)", None,
                                    e.get("input", MISSING), e["msg"]) for e in exc.errors(include_url=False)],
                           "request body") from None
        problems += label_problems(given.labels)
        if given.submission_id and submission_id and given.submission_id != submission_id:
            problems.append(Problem("submission_id", None, given.submission_id, f"differs from the query's "
                                    f"submission_id {submission_id!r}: send it once"))
        problems += [Problem(f"labels.{k}", None, v, f"the query's label {k} says {labels[k]!r}: send it once")
                     for k, v in given.labels.items() if k in labels and labels[k] != v]
        if problems:
            raise _invalid(problems, "request")
        return Submission(given.recipe, [*given.overrides, *override], given.submission_id or submission_id,
                          {**labels, **given.labels})
    if kind not in YAML_TYPES:
        raise ApiError(415, f"send the recipe as application/yaml, or as JSON {{recipe, overrides}}; "
                            f"not {one_line(kind, 80)}")
    if problems:
        raise _invalid(problems, "request")
    try:
        return Submission(decode(body), list(override), submission_id, labels)
    except RecipeFileError as exc:
        raise _invalid([Problem("(file)", None, MISSING, str(exc))]) from None


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(LOG_CHUNK)
    except FileNotFoundError:
        return b""


async def log_stream(store: JobStore, job: Job, follow: bool) -> AsyncIterator[bytes]:
    """The job's log from the start; with `follow`, then what is appended until the job is final."""
    offset, path = 0, Path(job.log_path or store.home / "jobs" / job.id / "job.log")
    while True:
        chunk = await anyio.to_thread.run_sync(_read_from, path, offset)
        if chunk:
            offset += len(chunk)
            yield chunk
            continue
        if not follow:
            return
        if (await anyio.to_thread.run_sync(store.get, job.id)).status in FINAL:
            follow = False  # read what was written before the final status, then stop
            continue
        await anyio.sleep(LOG_POLL_S)


def cancel_job(store: JobStore, job_id: str, force: bool) -> CancelOut:
    job = _job(store, job_id)
    if job.status in FINAL:
        raise ApiError(409, f"job {job.id} is already {job.status}; nothing to cancel")

    try:
        status = cancel(store, job.id, force=force)
    except LaunchError as exc:  # the engine could not be reached: the job is unchanged
        raise ApiError(502, f"{job.engine} could not cancel {job.engine_id}: {exc}") from None
    message = (f"cancel requested: job {job.id} stops at its next training step or stage boundary"
               if status == "RUNNING" else f"job {job.id} is {status}")
    return CancelOut(id=job.id, status=status, message=message)


def push(store: JobStore, job_id: str, alias: str, force: bool = False) -> PushOut:
    if problem := check_alias(alias):
        raise _invalid([Problem("alias", None, alias, problem)], "request body")
    job = _job(store, job_id)
    try:
        name, version, _ = push_job(store, job.id, alias, force=force)
    except PushRefused as exc:
        raise ApiError(409, str(exc)) from None
    except MlflowException as exc:  # the registered model or version was removed by hand, say
        raise ApiError(409, f"the model registry refused: {one_line(str(exc), 300)}") from None
    return PushOut(job=job.id, name=name, alias=alias, version=version)


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def add_routes(app: FastAPI, store: JobStore, mlflow_ui: str) -> None:
    _meta_routes(app)

    @app.get("/workers", response_model=WorkersOut, tags=["meta"], responses=ERRORS,
             summary="the workers seen (heartbeats) and a warning when jobs are PENDING with none alive")
    def workers() -> WorkersOut:
        return workers_report(store)

    _job_routes(app, store, mlflow_ui)
    app.openapi = lambda: openapi(app)


def _meta_routes(app: FastAPI) -> None:
    @app.get("/health", response_model=HealthOut, tags=["meta"], summary="liveness (never needs the token)")
    def health() -> HealthOut:
        return HealthOut()

    @app.get("/schema/recipe", response_model=dict[str, Any], tags=["meta"], responses={401: ERRORS[401]},
             summary="the recipe JSON Schema (what `athanor schema` prints)")
    def recipe_schema() -> dict[str, Any]:
        return _recipe_schema()


def _job_routes(app: FastAPI, store: JobStore, ui: str) -> None:
    validations = anyio.CapacityLimiter(VALIDATIONS)

    @app.post("/jobs", status_code=201, response_model=JobCreated, tags=["jobs"], openapi_extra={
        "requestBody": SUBMIT_BODY}, responses=SUBMIT_RESPONSES,
        summary="submit a recipe: 201 with the job (200: the job this submission_id made), or 422 with every "
                "problem (no job created)")
    async def submit(request: Request, response: Response, override: list[Override] = OVERRIDES,
                     submission_id: SubmissionId | None = SUBMISSION_QUERY, label: list[str] = LABELS) -> Any:
        sub = await recipe_request(request, override, submission_id, label)
        job, warnings, created = await anyio.to_thread.run_sync(submit_recipe, store, sub, limiter=validations)
        response.headers["Location"] = f"/jobs/{job.id}"
        response.status_code = 201 if created else 200  # a resubmission answers with the job it made
        return JobCreated(**JobSummary.of(job).model_dump(), overrides=job.overrides, warnings=warnings,
                          links=links(job, ui, _base(request)))

    @app.get("/jobs", response_model=list[JobSummary], tags=["jobs"], responses=ERRORS, summary="list jobs")
    def list_jobs(status: Status | None = None, limit: int = Query(50, ge=1, le=1000)) -> list[JobSummary]:
        reap_stale(store)  # as `athanor list`: a job whose process died shows as failed, not running
        return [JobSummary.of(j) for j in store.list(limit=limit, status=status)]

    @app.get("/jobs/{job_id}", response_model=JobDetail, tags=["jobs"], responses={**ERRORS, **NOT_FOUND},
             summary="one job: status, metrics, MLflow run and model version links")
    def show(request: Request, job_id: str = JOB_ID) -> JobDetail:
        reap_stale(store)
        return detail(_job(store, job_id), ui, _base(request))

    @app.get("/jobs/{job_id}/logs", response_class=PlainTextResponse, tags=["jobs"], responses={
        **ERRORS, **NOT_FOUND}, summary="the job's log, streamed; follow=true streams until the job is final")
    def logs(job_id: str = JOB_ID, follow: bool = False) -> StreamingResponse:
        return StreamingResponse(log_stream(store, _job(store, job_id), follow), media_type="text/plain; charset=utf-8")

    @app.post("/jobs/{job_id}/cancel", response_model=CancelOut, tags=["jobs"], responses={
        **ERRORS, **NOT_FOUND, 409: {"model": ErrorOut, "description": "the job is already final"}},
        summary="stop a job at its next step (force=true kills its processes now)")
    def cancel(job_id: str = JOB_ID, force: bool = False) -> CancelOut:
        return cancel_job(store, job_id, force)

    @app.post("/jobs/{job_id}/push", response_model=PushOut, tags=["jobs"], responses={
        **ERRORS, **NOT_FOUND, 409: {"model": ErrorOut, "description": "the job has no registered version"}},
        summary="point a registry alias at the job's registered version (as `athanor push`)")
    def push_alias(body: PushIn, job_id: str = JOB_ID) -> PushOut:
        return push(store, job_id, body.alias, body.force)


def openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the JSON submit body and the recipe JSON Schema (components `Recipe`,
    one `<Method>Recipe` per method, their sections prefixed with it)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["SubmitIn"] = SubmitIn.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(recipe_components())
        for code, response in schema["paths"]["/jobs/{job_id}/logs"]["get"]["responses"].items():
            if code != "200" and "content" in response:  # errors are JSON, as everywhere
                response["content"] = {"application/json": response["content"].popitem()[1]}
        app.openapi_schema = schema
    return app.openapi_schema


@cache
def _recipe_schema() -> dict[str, Any]:
    return json_schema()


@cache
def recipe_components() -> dict[str, Any]:
    found: dict[str, Any] = {}
    variants = json_schema()["oneOf"]
    for variant in variants:
        title = variant["title"]
        defs = variant.pop("$defs", {})
        for name, sub in {title: variant, **{f"{title}_{k}": v for k, v in defs.items()}}.items():
            found[name] = _rewrite_refs(sub, f"#/components/schemas/{title}_")
    found["Recipe"] = {"title": "athanor recipe", "oneOf": [{"$ref": f"#/components/schemas/{v['title']}"}
                                                          for v in variants]}
    return found


def _rewrite_refs(node: Any, prefix: str) -> Any:
    if isinstance(node, dict):
        return {k: (prefix + v.removeprefix("#/$defs/") if k == "$ref" and isinstance(v, str) else
                    _rewrite_refs(v, prefix)) for k, v in node.items()}
    return [_rewrite_refs(v, prefix) for v in node] if isinstance(node, list) else node

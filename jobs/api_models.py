"""Request and response models of the HTTP job API (`jobs/api.py`): they make its OpenAPI schema precise,
and turn job rows and recipe problems into JSON (non-finite metrics become null: JSON has no NaN).

    .venv/bin/python -m pytest tests/jobs/test_api.py -q
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from athanor.convert.recipe_types import short_repr
from athanor.jobs.recipe_yaml import MAX_RECIPE_BYTES, MISSING, Problem
from athanor.jobs.store import Job
from athanor.jobs.submission import MAX_LABEL_VALUE, MAX_LABELS, SUBMISSION_ID

Status = Literal["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"]
MAX_OVERRIDES = 100
MAX_OVERRIDE_CHARS = 4096
Override = Annotated[str, Field(max_length=MAX_OVERRIDE_CHARS, examples=["train.max_steps=50"])]
SubmissionId = Annotated[str, Field(pattern=SUBMISSION_ID.pattern, max_length=128, examples=["nightly-2026-12-07"])]
SUBMISSION_ID_DOC = ("your own id for this submission: sending it again with the same recipe, overrides and labels "
                     "returns the job it created (200), with anything else 409 (jobs/submission.py)")
LABELS_DOC = (f"at most {MAX_LABELS} labels: keys of 1-63 letters, digits and . _ / -, string values of at most "
              f"{MAX_LABEL_VALUE} characters; stored with the job, never read by athanor")
STAGE_DOC = ("the stage the current (or, once final, the last) attempt reached: prepare (loading the teacher, building "
             "the student, data), tracking, before, train, after, arms, timing, track, export, register; null before "
             "a worker claims the job")


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProblemOut(_Out):
    """One thing wrong with a request: where, what was there, how to fix it."""

    path: str = Field(description="dotted key path in the recipe (or the request field)")
    value: Any = Field(None, description="the value found there (null when missing; long values shortened)")
    fix: str = Field(description="what is allowed, or what to do")
    line: int | None = Field(None, description="1-based line of the key in the recipe YAML, when known")

    @classmethod
    def of(cls, problem: Problem) -> ProblemOut:
        return cls(path=problem.path, value=json_value(problem.value), fix=problem.message, line=problem.line)


class ErrorOut(_Out):
    """Every error response: one line, plus every problem for an invalid recipe or request."""

    detail: str
    problems: list[ProblemOut] = Field(default_factory=list)


class SubmitIn(_Out):
    """POST /jobs as JSON (the other form is the YAML itself, overrides as `?override=` parameters)."""

    recipe: str = Field(max_length=MAX_RECIPE_BYTES, description="the recipe YAML text")
    overrides: list[Override] = Field(default_factory=list, max_length=MAX_OVERRIDES,
                                      description="key.path=value overrides, as `athanor submit -o`")
    submission_id: SubmissionId | None = Field(None, description=SUBMISSION_ID_DOC)
    labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_LABELS, description=LABELS_DOC)


class PushIn(_Out):
    alias: str = Field(max_length=255, examples=["champion"], description="the registry alias to move")
    force: bool = Field(False, description="also onto a version whose job missed its promotion gate")


class Registered(_Out):
    name: str
    version: str
    alias: str | None = Field(description="the alias set on the version (none when the job missed its gate)")


class Links(_Out):
    self: str | None = Field(None, description="this job in the API (absent from `athanor status --json`)")
    logs: str | None = Field(None, description="its log in the API (absent from `athanor status --json`)")
    mlflow_run: str | None = Field(None, description="runs:/<id> (mlflow.artifacts.download_artifacts takes it)")
    mlflow_run_ui: str | None = Field(None, description="the parent run in the MLflow UI")
    model_version: str | None = Field(None, description="models:/<name>/<version>")
    model_version_ui: str | None = Field(None, description="the registered version in the MLflow UI")


class Metrics(_Out):
    """The job's before/after evaluation (null where a metric is not a finite number)."""

    before: dict[str, float | None] = Field(default_factory=dict)
    after: dict[str, float | None] = Field(default_factory=dict)
    untrained: dict[str, float | None] | None = None
    speedup: float | None = None
    params: dict[str, float | None] | None = None
    comparison: dict[str, float | None] | None = None
    arms: dict[str, dict[str, float | None]] | None = None
    seconds: float | None = None
    export: str | None = None
    intervals: dict[str, Any] | None = Field(None, description="95% paired-bootstrap intervals of the per-sample "
                                             "metrics: each side's, and the differences after − before, ...")


class GateCondition(_Out):
    text: str
    passed: bool


class Gate(_Out):
    """The promotion gate's verdict: a job that missed it is SUCCEEDED, its version registered without the alias."""

    passed: bool
    failed: list[str] = Field(default_factory=list)
    conditions: list[GateCondition] = Field(default_factory=list)


class Progress(_Out):
    """Optimizer steps of the training run going on (the main student's, or a comparison arm's during `arms`)."""

    step: int
    max_steps: int | None = None
    fraction: float | None = Field(None, description="step / max_steps")


class JobSummary(_Out):
    id: str
    name: str
    method: str
    status: Status
    attempts: int
    created_at: datetime = Field(description="ISO-8601, UTC")
    started_at: datetime | None = Field(None, description="ISO-8601, UTC: when the current (last) attempt started")
    finished_at: datetime | None = Field(None, description="ISO-8601, UTC")
    error: str | None = None
    stage: str | None = Field(None, description=STAGE_DOC)
    progress: Progress | None = Field(None, description="training progress while a stage trains; null otherwise")
    submission_id: str | None = Field(None, description=SUBMISSION_ID_DOC)
    labels: dict[str, str] = Field(default_factory=dict, description=LABELS_DOC)
    engine: str | None = Field(None, description="the cluster engine running it (slurm, ray); null: a local worker")
    engine_id: str | None = Field(None, description="the engine's own id (Slurm job id, Ray submission id)")

    @classmethod
    def of(cls, job: Job) -> JobSummary:
        return cls(**_summary_fields(job))


class JobCreated(JobSummary):
    overrides: list[str]
    warnings: list[str] = Field(default_factory=list, description="what could not be checked (not errors)")
    links: Links


class JobDetail(JobSummary):
    recipe_hash: str
    overrides: list[str]
    mlflow_run_id: str | None = None
    model_version: str | None = None
    cancel_requested: bool = False
    heartbeat_at: datetime | None = Field(None, description="ISO-8601, UTC: the running attempt's last lease renewal")
    metrics: Metrics | None = None
    registered: Registered | None = None
    gate: Gate | None = None
    links: Links


class CancelOut(_Out):
    id: str
    status: Status
    message: str


class PushOut(_Out):
    job: str
    name: str
    alias: str
    version: str


class HealthOut(_Out):
    status: Literal["ok"] = "ok"


class WorkerOut(_Out):
    id: str = Field(description="host:pid:start of one `athanor worker`")
    host: str
    pid: int
    started_at: datetime
    seen_at: datetime = Field(description="its last heartbeat (every 5 s while it runs)")
    alive: bool = Field(description="seen within stale_seconds")


class WorkersOut(_Out):
    """Whether anything will run the queued jobs."""

    alive: int = Field(description="workers seen within stale_seconds")
    pending: int = Field(description="jobs waiting for a worker")
    stale_seconds: float
    warning: str | None = Field(None, description="set when jobs are PENDING and no worker is alive")
    workers: list[WorkerOut]


def iso(t: float | None) -> datetime | None:
    """Seconds since the epoch as an aware UTC datetime (JSON: ISO-8601 with a Z)."""
    return datetime.fromtimestamp(t, tz=UTC) if t is not None else None


def progress_of(job: Job) -> Progress | None:
    if job.progress_step is None:
        return None
    total = job.progress_total
    return Progress(step=job.progress_step, max_steps=total,
                    fraction=round(job.progress_step / total, 4) if total else None)


def _summary_fields(job: Job) -> dict[str, Any]:
    fields = {k: getattr(job, k) for k in JobSummary.model_fields if k != "progress"}
    fields.update(created_at=iso(job.created_at), started_at=iso(job.started_at), finished_at=iso(job.finished_at),
                  progress=progress_of(job))
    return fields


def finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _numbers(data: Any) -> dict[str, float | None] | None:
    return {str(k): finite(v) for k, v in data.items()} if isinstance(data, dict) else None


def metrics_of(result: dict[str, Any] | None) -> Metrics | None:
    if not result:
        return None
    arms = result.get("arms")
    return Metrics(before=_numbers(result.get("before")) or {}, after=_numbers(result.get("after")) or {},
                   untrained=_numbers(result.get("untrained")), speedup=finite(result.get("speedup")),
                   params=_numbers(result.get("params")), comparison=_numbers(result.get("comparison")),
                   arms={str(k): _numbers(v) or {} for k, v in arms.items()} if isinstance(arms, dict) else None,
                   seconds=finite(result.get("seconds")), export=result.get("export"),
                   intervals=result.get("intervals"))


def gate_of(result: dict[str, Any] | None) -> Gate | None:
    gate = (result or {}).get("gate")
    return Gate(**gate) if isinstance(gate, dict) else None


def json_value(value: Any) -> Any:
    """A recipe value as JSON: plain scalars as they are (strings up to 300 characters), anything else
    (mappings, lists, dates, bytes, infinities) as its shortened repr."""
    if value is MISSING or value is None:
        return None
    if isinstance(value, bool | int) or (isinstance(value, float) and math.isfinite(value)):
        return value
    if isinstance(value, str) and len(value) <= 300:
        return value
    return short_repr(value)


class ApiError(Exception):
    """An error response: status, one line, and the problems behind it."""

    def __init__(self, status: int, detail: str, problems: list[Problem] = ()) -> None:
        super().__init__(detail)
        self.status, self.detail, self.problems = status, detail, list(problems)

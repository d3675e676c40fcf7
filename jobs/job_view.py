"""One job as JSON, the same shape for the API (`GET /jobs/{id}`) and the CLI (`athanor status --json`, `submit
--json`, `list --json`), with its MLflow links. The MLflow UI's address comes from configuration: `athanor serve
--mlflow-ui URL`, else `$ATHANOR_MLFLOW_UI`, else `athanor ui`'s own default, http://127.0.0.1:5000; a job
tracked on a remote MLflow server links to that server's UI.

    .venv/bin/python -m pytest tests/jobs/test_cli_json.py tests/jobs/test_api_submission.py -q
"""

from __future__ import annotations

import os
import time
from typing import Any
from urllib.parse import urlsplit

from athanor.jobs.api_models import (
    JobDetail,
    JobSummary,
    Links,
    Registered,
    WorkerOut,
    WorkersOut,
    gate_of,
    iso,
    metrics_of,
)
from athanor.jobs.mlflow_views import MODEL_TRAINING  # MLflow 3.17 opens its GenAI pages without it
from athanor.jobs.recipe import RecipeInvalid, load_recipe
from athanor.jobs.store import Job, JobStore
from athanor.jobs.workers import STALE_SECONDS, pending_without_worker, seen_workers

MLFLOW_UI_ENV = "ATHANOR_MLFLOW_UI"
DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"
"""Where `athanor ui` serves by default."""


def mlflow_ui_url(explicit: str | None = None) -> str:
    """The configured MLflow UI base URL, without a trailing slash; ValueError naming the setting when it is not an
    http(s) URL with a host."""
    source = "--mlflow-ui" if explicit else MLFLOW_UI_ENV
    url = explicit or os.environ.get(MLFLOW_UI_ENV) or DEFAULT_MLFLOW_UI
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"{source} = {url!r}: give the MLflow UI's base URL, e.g. http://127.0.0.1:5000 or "
                         f"https://mlflow.example.org/mlflow (http or https, a host, no query)")
    return url.rstrip("/")


def _tracking_uri(job: Job) -> str | None:
    try:
        return load_recipe(None, text=job.recipe_text, overrides=job.overrides).recipe.tracking.uri
    except RecipeInvalid:
        return None


def links(job: Job, mlflow_ui: str, base: str | None = None) -> Links:
    """The job's links; `base` is the API's own URL (None from the CLI: no self/logs links)."""
    uri = _tracking_uri(job) if job.mlflow_run_id else None
    ui = uri.rstrip("/") if uri and uri.startswith(("http://", "https://")) else mlflow_ui  # a server's own UI
    registered = (job.result or {}).get("registered") or {}
    name, version, run = registered.get("name"), job.model_version, job.mlflow_run_id
    return Links(self=f"{base}/jobs/{job.id}" if base else None, logs=f"{base}/jobs/{job.id}/logs" if base else None,
                 mlflow_run=f"runs:/{run}" if run else None,
                 mlflow_run_ui=f"{ui}/#/runs/{run}?{MODEL_TRAINING}" if run else None,
                 model_version=f"models:/{name}/{version}" if name and version else None,
                 model_version_ui=f"{ui}/#/models/{name}/versions/{version}" if name and version else None)


def detail(job: Job, mlflow_ui: str, base: str | None = None) -> JobDetail:
    registered = (job.result or {}).get("registered")
    return JobDetail(**JobSummary.of(job).model_dump(), recipe_hash=job.recipe_hash, overrides=job.overrides,
                     mlflow_run_id=job.mlflow_run_id, model_version=job.model_version,
                     cancel_requested=bool(job.cancel_requested), heartbeat_at=iso(job.heartbeat_at),
                     metrics=metrics_of(job.result),
                     registered=Registered(name=str(registered["name"]), version=str(registered["version"]),
                                           alias=registered.get("alias")) if registered else None,
                     gate=gate_of(job.result), links=links(job, mlflow_ui, base))


def job_json(job: Job, *, full: bool = True, mlflow_ui: str | None = None) -> dict[str, Any]:
    """What the CLI prints with --json: the API's JobDetail (`full`) or JobSummary, without the API's own links."""
    if not full:
        return JobSummary.of(job).model_dump(mode="json")
    return detail(job, mlflow_ui or mlflow_ui_url()).model_dump(mode="json", exclude={"links": {"self", "logs"}})


def workers_report(store: JobStore) -> WorkersOut:
    """`GET /workers` and `athanor workers --json`: every worker seen, and a warning when queued jobs wait for none."""
    now, seen = time.time(), seen_workers(store)
    return WorkersOut(alive=sum(w.alive(now) for w in seen), pending=store.count("PENDING"),
                      stale_seconds=STALE_SECONDS, warning=pending_without_worker(store),
                      workers=[WorkerOut(id=w.id, host=w.host, pid=w.pid, started_at=iso(w.started_at),
                                         seen_at=iso(w.seen_at), alive=w.alive(now)) for w in seen])

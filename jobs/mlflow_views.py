"""What a job's MLflow runs show at a glance: the experiment opening on its runs, provenance tags MLflow's UI
reads (source, git commit, "Created by"), the parent's plottable figures (after/before ratio and after − before
difference per metric, the headline metrics that sort in the runs table), the child runs' params, the summary
line on top of the description, and the system metrics sampled while the student trains.

`tracking.Tracker` calls these; the before/after values themselves stay on the child runs `baseline` and
`converted` under the same `eval/*` keys (select both and press *Compare*).

    .venv/bin/python -m pytest tests/jobs/test_tracking_views.py tests/jobs/test_mlflow_ui.py -q
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import logging
import math
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from athanor.jobs.methods import get_method
from athanor.jobs.report import headline_keys

log = logging.getLogger("athanor.tracking")

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""MLflow 3's UI opens an experiment without this tag on the GenAI overview (traces, token usage: empty for a
distillation job); this value (its `ExperimentKind.CUSTOM_MODEL_DEVELOPMENT`) opens it on the runs table."""
MODEL_TRAINING = "workflowType=machine_learning"
"""MLflow 3.17's UI chooses its GenAI or model-training pages from a switch of its own (this URL parameter, else the
choice saved in the browser, GenAI by default), not from the experiment's kind: a link to a job's experiment or runs
opens on the runs only with it (`ui_url`). The experiment tag still says what the experiment is, for MLflow versions
and tools that read it."""
REPO = Path(__file__).resolve().parents[1]
"""athanor's own source tree: its git commit is the code that ran the job."""
RATIO, DIFF, HEADLINE = "ratio/", "diff/", "headline/"
"""Parent-run metric prefixes (each a section of MLflow's chart view): after/before, after − before, and the
converted model's headline values."""


def set_experiment_kind(client: Any, experiment_id: str) -> None:
    """Tag the experiment as model development unless someone already chose its kind."""
    experiment = client.get_experiment(experiment_id)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def ui_url(base: str, experiment_id: str, run_id: str | None = None, path: str = "") -> str:
    """The MLflow UI page of an experiment (its runs table) or of one of its runs (`path`: e.g. 'artifacts/x.png'),
    on the model-training pages."""
    route = f"/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") + (f"/{path}" if path else "")
    return f"{base.rstrip('/')}/#{route}?{MODEL_TRAINING}"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.cache
def git_tags() -> dict[str, str]:
    """MLflow's `mlflow.source.git.*` tags for athanor's checkout ({} when it is not one, e.g. a wheel install);
    `athanor.git.dirty` says the commit alone does not reproduce the code (uncommitted changes)."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return {}
    tags = {"mlflow.source.git.commit": commit}
    branch = _git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        tags["mlflow.source.git.branch"] = branch
    remote = _git("config", "--get", "remote.origin.url")
    if remote:  # never a token or password a clone URL may carry (https://user:token@host/...)
        parts = urllib.parse.urlsplit(remote)
        host = parts.netloc.rpartition("@")[2]
        tags["mlflow.source.git.repoURL"] = parts._replace(netloc=host).geturl() if parts.scheme else remote
    tags["athanor.git.dirty"] = "true" if _git("status", "--porcelain", "--untracked-files=no") else "false"
    return tags


def source_tags(job: Any) -> dict[str, str]:
    """Provenance in MLflow's standard tags: what ran (the recipe), by whom, at which commit of athanor."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = "unknown"
    name = job.recipe_path or f"recipe {job.name}"
    return {"mlflow.source.name": f"athanor submit {name}"[:500], "mlflow.source.type": "LOCAL",
            "mlflow.user": user, **git_tags()}


def logged_params(recipe: Any) -> dict[str, Any]:
    """The recipe fields the user set (in the file or with -o), never a `None`: the full effective recipe is the
    artifact `recipe/effective.yaml`, and 70 default params hide the few that differ between jobs."""
    return recipe.model_dump(mode="json", exclude_unset=True, exclude_none=True)


def child_params(recipe: Any, side: str, tags: dict[str, str] | None) -> dict[str, str]:
    """What one child run measured: which side, which model, the seed it was trained (or evaluated) with."""
    seed = (tags or {}).get("athanor.seed") or str(recipe.train.seed)
    teacher = recipe.teacher.source or "inline config"
    if side == "baseline":
        model = f"teacher {teacher}"
    elif side == "untrained":
        model = f"untrained student ({recipe.method})"
    elif side.startswith("arm_"):
        model = f"comparison arm {(tags or {}).get('athanor.arm', side[4:])} ({recipe.method})"
    else:
        model = f"student {recipe.registry.name} ({recipe.method})"
    return {"side": side, "model": model[:500], "seed": seed, "method": recipe.method}


def _finite(*values: float | None) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def parent_metrics(before: dict[str, float], after: dict[str, float], speedup: float | None,
                   headline: list[str]) -> dict[str, float]:
    """The parent run's figures a chart or the runs table can show: per metric after/before (`ratio/`, where the
    teacher's value is finite and non-zero) and after − before (`diff/`), and the converted model's headline
    values (`headline/`) with the speed-up. Undefined figures are left out, never logged as NaN."""
    out: dict[str, float] = {}
    for key, b in before.items():
        a = after.get(key)
        if not _finite(a, b):
            continue
        out[DIFF + key] = a - b
        if b != 0:
            out[RATIO + key] = a / b
    for key in headline:
        if _finite(after.get(key)):
            out[HEADLINE + key] = after[key]
    if _finite(speedup):
        out[HEADLINE + "speedup"] = float(speedup)
    return out


def headline_for(recipe: Any, keys: list[str]) -> list[str]:
    """The job's headline metrics: its gate's `retain` keys, every quality metric the method declares, then the
    lm-evaluation-harness results (`eval.lm_eval`: all of them quality metrics, directed by their tasks)."""
    directions = {**get_method(recipe.method).metrics, **{k: "higher" for k in keys if k.startswith("lm_eval/")}}
    return headline_keys(keys, directions, list(recipe.gate.retain))


@contextlib.contextmanager
def system_metrics(run_id: str, uri: str, every_s: float | None, *, resumed: bool,
                   lost: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """MLflow's system metrics (CPU, memory, disk, network; GPU when one is visible) sampled every `every_s`
    seconds into run `run_id` as `system/*` while the block runs (None: off). A retried job continues the steps.
    `lost()`: the tracking server became unreachable (then the sampler is stopped without waiting for it)."""
    if every_s is None:
        yield
        return
    monitor = None
    try:
        # why: `athanor list`/`status` and the worker loop import this module; mlflow costs seconds
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, resume_logging=resumed, tracking_uri=uri)
        monitor.start()
    except Exception:  # noqa: BLE001 — monitoring must never stop training
        log.warning("system metrics are not logged for this job", exc_info=True)
    try:
        yield
    finally:
        if monitor is not None:
            _stop(monitor, abandon=lost())


def _stop(monitor: Any, *, abandon: bool) -> None:
    """MLflow's `finish()` waits for the sampler's request in flight, then sends what it batched: with the server
    gone, minutes of retries that would hold the failing job. Then the (daemon) sampler is only told to stop, and
    its unsent points are dropped (the job is failing on that server anyway)."""
    if not abandon:
        monitor.finish()
        return
    stop = getattr(monitor, "_shutdown_event", None)  # MLflow 3.17's SystemMetricsMonitor
    if stop is not None:
        stop.set()
    log.warning("tracking server lost: system metrics of this attempt's last seconds are not sent")

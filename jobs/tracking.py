"""MLflow tracking for one job: a parent run, child runs `baseline` and `converted` with equal keys.

The default store is embedded: `sqlite:///<home>/mlflow.db` with artifacts in `<home>/mlartifacts`,
so `athanor ui` and the Python API see the same runs. Any tracking URI is accepted instead.
A retried job (a later attempt) reopens its parent run (`resume_parent`): its children are reused by name, never
duplicated, and training curves continue at the step they reached (points already logged are not logged again).

A remote (`http(s)://`) tracking server is health-checked first; every request the tracker makes (its client, the
Lightning logger, logging the model) runs with short HTTP timeouts and retries (`HTTP_DEFAULTS`, only inside those
calls and only where the user set none), and a server that cannot be reached any more ends the job with one line,
`TrackingUnavailable` (the underlying error goes to the job log).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from athanor.jobs.mlflow_views import (
    child_params,
    headline_for,
    logged_params,
    parent_metrics,
    set_experiment_kind,
    source_tags,
    system_metrics,
)
from athanor.jobs.report import comparison_markdown, summary_line
from athanor.jobs.store import Job
from athanor.jobs.tracking_http import ONE_TRY, TrackingUnavailable, _Guarded, check_server, http_settings, unreachable

EVAL_PREFIX = "eval/"
log = logging.getLogger("athanor.tracking")


def default_tracking_uri(home: Path) -> str:
    return f"sqlite:///{home / 'mlflow.db'}"


def _flatten(data: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(data) if isinstance(data, (list, dict)) else str(data)}


class Tracker:
    """Thin layer over MlflowClient for the runs of one job (rank 0 only)."""

    def __init__(self, home: Path, uri: str | None, experiment: str) -> None:
        # why: `athanor list`/`status` and the worker loop import this module; mlflow costs seconds
        import mlflow

        # why: `athanor list`/`status` and the worker loop import this module; mlflow costs seconds
        from mlflow import MlflowClient

        self.home = home
        self.uri = uri or default_tracking_uri(home)
        self.remote = self.uri.startswith(("http://", "https://"))
        self.lost: str | None = None
        """Why the remote server became unreachable (None while it answers); later requests are tried once."""
        if self.remote:
            check_server(self.uri)
        elif self.uri == default_tracking_uri(home):
            init_embedded_store(home)
        os.environ["MLFLOW_TRACKING_URI"] = self.uri
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        self.client = _Guarded(MlflowClient(self.uri, self.uri), self) if self.remote else MlflowClient(self.uri,
                                                                                                         self.uri)
        self.experiment_id = self._experiment(experiment)
        set_experiment_kind(self.client, self.experiment_id)
        self.parent_id: str | None = None
        self.resumed = False
        self.job: Job | None = None
        self.recipe: Any = None
        """The job and its recipe (`describe`): child runs' params and the headline metrics come from them."""

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Around every request to a remote server: short HTTP timeouts and retries (`HTTP_DEFAULTS` where the
        user set none; a single try once the server was lost), and a server that cannot be reached raised as
        `TrackingUnavailable` (one line naming it), the underlying error logged. Nothing changes for local stores."""
        if not self.remote:
            yield
            return
        started = time.monotonic()
        with http_settings(ONE_TRY if self.lost else None):
            retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "?")
            try:
                yield
            except TrackingUnavailable:
                raise
            except Exception as exc:
                reason = unreachable(exc)
                if reason is None:
                    raise
                log.warning("tracking server %s unreachable (%s)", self.uri, what, exc_info=not self.lost)
                tries = "one try" if self.lost else f"{retries} retries"
                self.lost = reason
                raise TrackingUnavailable(f"tracking server {self.uri} became unreachable: {reason} ({what}; gave "
                                          f"up after {tries}, {time.monotonic() - started:.0f} s)") from None

    def _experiment(self, name: str) -> str:
        """The experiment's id, creating it; two jobs creating it at once both get the same one."""
        # why: `athanor list`/`status` and the worker loop import this module; mlflow costs seconds
        from mlflow.exceptions import MlflowException  # (a lost server is TrackingUnavailable, never one of these)

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = (self.home / "mlartifacts" / name).as_uri() if self.uri.startswith("sqlite:") else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def close_open_runs(self, status: str) -> None:
        """Terminate the parent run and any child still RUNNING (a reaped job's runs)."""
        parent = self.client.get_run(self.parent_id)
        children = self.client.search_runs([parent.info.experiment_id],
                                           f"tags.mlflow.parentRunId = '{self.parent_id}'")
        for run in [parent, *children]:
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, status)

    def describe(self, job: Job, loaded: Any) -> None:
        """The job this tracker records (before `start_parent` or `resume_parent`)."""
        self.job, self.recipe = job, loaded.recipe

    def start_parent(self, job: Job, loaded: Any, tags: dict[str, str]) -> str:
        """The job's parent run, tagged with its lineage and provenance (source, user, git commit); logs the recipe
        fields that were set as params, and the recipe as files."""
        self.describe(job, loaded)
        run = self.client.create_run(self.experiment_id, run_name=f"{job.name}-{job.id}",
                                     tags={**source_tags(job), **tags})
        self.parent_id = run.info.run_id
        self._log_params(self.parent_id, _flatten(logged_params(loaded.recipe)))
        self.client.log_text(self.parent_id, job.recipe_text, "recipe/recipe.yaml")
        self.client.log_text(self.parent_id, loaded.effective_yaml(), "recipe/effective.yaml")
        return self.parent_id

    def resume_parent(self, run_id: str, attempt: int) -> str:
        """Reopen the parent run of an earlier attempt of this job (status RUNNING again) for attempt `attempt`."""
        self.parent_id, self.resumed = run_id, True
        self.client.update_run(run_id, status="RUNNING")
        self.set_attempt(attempt)
        return run_id

    def set_attempt(self, attempt: int) -> None:
        """The attempt now running, as the parent's tag `athanor.attempt` and a point of its metric `job/attempt`."""
        self.client.set_tag(self.parent_id, "athanor.attempt", str(attempt))
        self.client.log_metric(self.parent_id, "job/attempt", float(attempt), step=attempt)

    def _child(self, name: str) -> str | None:
        """The id of the parent's child run named `name` (an earlier attempt's), reopened; None when there is none."""
        runs = self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{self.parent_id}' and "
                                       f"attributes.run_name = '{name}'", max_results=1)
        if not runs:
            return None
        self.client.update_run(runs[0].info.run_id, status="RUNNING")
        return runs[0].info.run_id

    def start_child(self, name: str, tags: dict[str, str] | None = None) -> str:
        """A child run of the job's parent, left open (e.g. for a comparison arm's training curves); on a later
        attempt, the one an earlier attempt started under that name."""
        found = self._child(name) if self.resumed else None
        if found:
            return found
        params = child_params(self.recipe, name, tags) if self.recipe is not None else {"side": name}
        provenance = source_tags(self.job) if self.job is not None else {}
        run = self.client.create_run(
            self.experiment_id, run_name=name,
            tags={**provenance, "mlflow.parentRunId": self.parent_id, "athanor.side": name,
                  "athanor.model": params.get("model", name), **(tags or {})},
        )
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        """Params in batches (one request per 100, not one per param); MLflow's key and value limits applied."""
        # why: `athanor list`/`status` and the worker loop import this module; mlflow costs seconds
        from mlflow.entities import Param

        items = [Param(k[:250], str(v)[:6000]) for k, v in list(params.items())[:500]]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_child(self, name: str, metrics: dict[str, float], tags: dict[str, str] | None = None,
                  run_id: str | None = None) -> str:
        """`eval/*` metrics in a child run (a new one, or `run_id` from `start_child`), then close it."""
        run_id = run_id or self.start_child(name, tags)
        for key, value in metrics.items():
            self.client.log_metric(run_id, EVAL_PREFIX + key, float(value))
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Plain metrics on the parent run (e.g. a method's summary over its comparison arms), in one request."""
        # why: `athanor list`/`status` and the worker loop import this module; mlflow costs seconds
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, 0) for key, value in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.parent_id, metrics=items[start:start + 1000])

    def log_datasets(self, data: Any, num_train: int, num_eval: int) -> None:
        """The training and held-out data as MLflow dataset inputs (shown on the run page)."""
        # why: `athanor list`/`status` and the worker loop import this module; mlflow costs seconds
        from mlflow.data.code_dataset_source import CodeDatasetSource

        # why: `athanor list`/`status` and the worker loop import this module; mlflow costs seconds
        from mlflow.data.meta_dataset import MetaDataset

        # why: `athanor list`/`status` and the worker loop import this module; mlflow costs seconds
        from mlflow.entities import DatasetInput, InputTag

        described = {"kind": data.kind, "paths": list(data.paths), "loader": data.loader, "split": data.split,
                     "seed": data.seed}
        inputs = []
        for context, count in (("training", num_train), ("evaluation", num_eval)):
            source = CodeDatasetSource({**{k: json.dumps(v) for k, v in described.items()}, "examples": str(count)})
            name = f"{data.kind}:{','.join(data.paths) or 'builtin'}"[:200] + f" ({context})"
            dataset = MetaDataset(source, name=name, digest=f"{abs(hash((name, count))) % 10**8:08d}")
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", context)]))
        self.client.log_inputs(self.parent_id, datasets=inputs)

    def log_comparison(self, results: Any) -> None:
        """The job's comparison on the parent: per metric after/before and after − before, the headline metrics
        and the speed-up (`eval/speedup`) as metrics, a JSON table (with the 95% intervals), the grouped
        before/after plot, and a summary line over the markdown table as the run's description. The before and
        after values themselves are the child runs' `eval/*` metrics (MLflow's compare view)."""
        before, after, speedup, intervals = results.before, results.after, results.speedup, results.intervals
        headline = headline_for(self.recipe, list(before)) if self.recipe is not None else []
        table = {k: {"before": before[k], "after": after[k]} for k in before}
        self.client.log_dict(self.parent_id, {"metrics": table, "speedup": speedup, "intervals": intervals or None},
                             "eval/before_after.json")
        figures = parent_metrics(before, after, speedup, headline)
        if speedup is not None:
            figures[f"{EVAL_PREFIX}speedup"] = float(speedup)
        self.log_metrics(figures)
        note = summary_line(before, after, speedup, headline, results.gate)
        self.client.set_tag(self.parent_id, "mlflow.note.content", (note + "\n\n" if note else "")
                            + comparison_markdown(before, after, speedup, intervals, headline))
        self.client.log_figure(self.parent_id, comparison_figure(before, after), "plots/before_after.png")

    def system_metrics(self) -> contextlib.AbstractContextManager[None]:
        """MLflow's system metrics on the parent run while the block runs (`tracking.system_metrics_every_s`)."""
        every = self.recipe.tracking.system_metrics_every_s if self.recipe is not None else None
        return system_metrics(self.parent_id, self.uri, every, resumed=self.resumed, lost=lambda: bool(self.lost))

    def log_training_curves(self) -> None:
        # why: only a finished job draws; matplotlib costs about a second
        import matplotlib

        matplotlib.use("Agg")
        # why: only a finished job draws; matplotlib costs about a second
        import matplotlib.pyplot as plt

        keys = [m for m in self.client.get_run(self.parent_id).data.metrics if m.startswith("train/")]
        if not keys:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in sorted(keys):
            history = self.client.get_metric_history(self.parent_id, key)
            if len(history) > 1:
                ax.plot([h.step for h in history], [h.value for h in history], label=key)
        ax.set_xlabel("step"), ax.set_yscale("log"), ax.legend(fontsize=7), ax.set_title("training losses")
        self.client.log_figure(self.parent_id, fig, "plots/training_curves.png")
        plt.close(fig)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file, or a directory's contents, under `artifact_path` of the parent run."""
        if Path(path).is_dir():
            self.client.log_artifacts(self.parent_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.parent_id, str(path), artifact_path)

    def finish(self, status: str) -> None:
        """Close the parent run. After the server was lost, one quick try: a run it cannot close stays RUNNING there
        (said in the log), and the job's own status is what counts."""
        if self.parent_id:
            mlflow_status = {"SUCCEEDED": "FINISHED", "FAILED": "FAILED", "STOPPED": "KILLED"}[status]
            if not self.lost:
                self.client.set_terminated(self.parent_id, mlflow_status)
                return
            try:
                self.client.set_terminated(self.parent_id, mlflow_status)
            except TrackingUnavailable as exc:
                log.warning("MLflow run %s stays RUNNING: %s", self.parent_id, exc)

    def logged_through(self, run_id: str) -> int:
        """The last step any metric of `run_id` was logged at (-1: none); a resumed fit logs only later steps."""
        run = self.client.get_run(run_id)
        steps = [h.step for key in run.data.metrics for h in self.client.get_metric_history(run_id, key)
                 if not key.startswith(("eval/", "compare/", "job/"))]
        return max(steps, default=-1)

    def lightning_logger(self, run_id: str | None = None, holds: Any = None):
        """Lightning's MLflow logger writing into the parent run (or the child run `run_id`); on a later attempt it
        skips the steps an earlier attempt logged (between its last checkpoint and its death), so each curve has
        one point per step. Nothing is logged once `holds()` is False (this attempt lost its job)."""
        # why: `athanor list`/`status` and the worker loop import this module; lightning costs seconds
        from lightning.pytorch.loggers import MLFlowLogger

        run_id = run_id or self.parent_id
        through = self.logged_through(run_id) if self.resumed else -1
        tracker = self

        class ContinuingLogger(MLFlowLogger):
            @property
            def experiment(self) -> Any:
                with tracker.guard("connecting the training logger"):
                    return MLFlowLogger.experiment.fget(self)

            def log_hyperparams(self, params: Any) -> None:
                with tracker.guard("logging hyperparameters"):
                    super().log_hyperparams(params)

            def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
                if (step is None or step > through) and (holds is None or holds()):
                    with tracker.guard("logging training metrics"):
                        super().log_metrics(metrics, step)

            def finalize(self, status: str = "success") -> None:  # never close a run another attempt now holds
                if (holds is None or holds()) and not tracker.lost:  # a lost server: the job closes its run
                    with tracker.guard("closing the training run"):
                        super().finalize(status)

        return ContinuingLogger(tracking_uri=self.uri, run_id=run_id, log_model=False)


def init_embedded_store(home: Path) -> None:
    """Create and migrate the embedded MLflow database once per home, under a file lock: two jobs
    starting on a fresh home raced MLflow's schema migration ('duplicate column name')."""
    # why: `athanor list`/`status` and the worker loop import this module; mlflow costs seconds
    from mlflow.version import VERSION

    marker = home / "mlflow.db.ready"
    if marker.is_file() and marker.read_text().strip() == VERSION:
        return
    with open(home / "mlflow.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text().strip() == VERSION:
            return
        # why: `athanor list`/`status` and the worker loop import this module; mlflow costs seconds
        from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore

        # why: `athanor list`/`status` and the worker loop import this module; mlflow costs seconds
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        uri = default_tracking_uri(home)
        SqlAlchemyStore(uri, (home / "mlartifacts").as_uri())
        RegistryStore(uri)
        marker.write_text(VERSION + "\n")


def comparison_figure(before: dict[str, float], after: dict[str, float]):
    """One small bar panel per metric: baseline vs converted on its own scale."""
    # why: only a finished job draws; matplotlib costs about a second
    import matplotlib

    matplotlib.use("Agg")
    # why: only a finished job draws; matplotlib costs about a second
    import matplotlib.pyplot as plt

    keys = list(before)
    cols = min(4, len(keys)) or 1
    rows = math.ceil(len(keys) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        ax.bar(["baseline", "converted"], [before[key], after[key]], color=["#7a7a7a", "#d9822b"])
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle("before (teacher) vs after (converted)")
    fig.tight_layout()
    return fig

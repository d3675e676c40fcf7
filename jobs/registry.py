"""Model card, MLflow Model Registry versions and aliases.

A successful job logs its export (with the `mlflow.transformers` flavour when the method says so,
as plain artifacts otherwise), registers it as a new version of `registry.name`, points the alias
(`candidate` by default) at it and tags it with its lineage. Failed jobs register nothing.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from athanor.jobs.mlflow_views import headline_for
from athanor.jobs.recipe import check_alias, load_recipe
from athanor.jobs.report import comparison_markdown
from athanor.jobs.tracking import Tracker

log = logging.getLogger("athanor.registry")


def write_model_card(out_dir: Path, *, recipe: Any, job_id: str, results: Any, trains: bool = True) -> Path:
    """README.md in the export: how it was made (method, teacher, recipe, training) and measured
    (before/after table with 95% intervals, speed-up, the gate's verdict, the comparison arms' summary); notes
    the method left in `training_notes.txt` are appended."""
    params, before, after, speedup = results.params, results.before, results.after, results.speedup
    notes_file = out_dir / "training_notes.txt"
    notes = f"## Notes from the method\n{notes_file.read_text().strip()}\n" if notes_file.is_file() else ""
    training = ("none (a training-free conversion)" if not trains else
                f"{recipe.train.max_steps} optimizer steps, lr {recipe.train.lr:g}, strategy {recipe.train.strategy}, "
                f"precision {recipe.train.precision}, data `{recipe.data.kind}`")
    teacher = recipe.teacher.source or f"inline config ({(recipe.teacher.config or {}).get('model_type', '?')})"
    text = f"""---
library_name: {_library(out_dir)}
tags: [athanor, {recipe.method}, distillation]
---
# {recipe.registry.name}

Converted by **athanor** with the **{recipe.method}** method (job `{job_id}`, recipe `{recipe.name}`).
{recipe.description}

- Teacher: `{teacher}` — {params['teacher']:,.0f} parameters
- Student: {params['student']:,.0f} parameters ({params['student'] / max(params['teacher'], 1):.1%} of the teacher)
- Training: {training}
- Metrics: measured by the job on held-out data, teacher ("before") and converted model ("after") with
  the same code; latency is the median of interleaved runs of both models in one measurement.

## Before (teacher) and after (converted)
{comparison_markdown(before, after, speedup, results.intervals, headline_for(recipe, list(before)))}
{_gate_markdown(results.gate)}{_arms_markdown(results.comparison)}{notes}
"""
    path = out_dir / "README.md"
    path.write_text(text)
    return path


def card_summary(card: Path, limit: int = 5000) -> str | None:
    """The model card without its metadata header and the method's notes, for the version's description (the
    registry page shows it); None without a card. Cut at a line under `limit` characters (MLflow keeps 5000)."""
    if not card.is_file():
        return None
    text = card.read_text()
    if text.startswith("---\n"):
        text = text.split("\n---\n", 1)[-1]
    text = text.split("## Notes from the method", 1)[0].strip()
    if len(text) > limit:
        text = text[:text.rfind("\n", 0, limit - 2)] + "\n…"
    return text


def _gate_markdown(gate: dict[str, Any] | None) -> str:
    if not gate or not gate["conditions"]:
        return ""
    rows = "\n".join(f"- {'met' if c['passed'] else '**missed**'}: {c['text']}" for c in gate["conditions"])
    verdict = "met: registered with the alias" if gate["passed"] else "missed: registered without the alias"
    return f"## Promotion gate ({verdict})\n{rows}\n\n"


def version_tags(results: Any, verdict: Any) -> dict[str, str]:
    """The model version's measurement tags: each metric's before (teacher) and after (this version) value, the
    speed-up and the gate's verdict, so the registry's version list answers "how good, how fast" without a run."""
    tags = {}
    for key in list(results.after)[:24]:
        tags[f"before.{key}"] = f"{results.before.get(key, float('nan')):.6g}"
        tags[f"after.{key}"] = f"{results.after[key]:.6g}"
    if results.speedup is not None:
        tags["speedup"] = f"{results.speedup:.3g}"
    tags["athanor.gate"] = "none" if not verdict.conditions else "passed" if verdict.passed else "failed"
    if verdict.failed:
        tags["athanor.gate.failed"] = "; ".join(verdict.failed)[:4000]
    return tags


def _arms_markdown(comparison: dict[str, float] | None) -> str:
    """The comparison arms' summary (same steps and data, other settings; see the child runs `arm_*`)."""
    if not comparison:
        return ""
    rows = "\n".join(f"| {key} | {value:.4g} |" for key, value in comparison.items())
    return ("## Comparison arms (same steps and data; child runs `arm_*`)\n| figure | value |\n|---|---|\n"
            f"{rows}\n\n")


def _library(out_dir: Path) -> str:
    """The library that loads the export, for the model card's metadata."""
    if (out_dir / "modules.json").is_file():
        return "sentence-transformers"
    config = out_dir / "config.json"
    if config.is_file() and "_diffusers_version" in config.read_text():
        return "diffusers"
    return "transformers" if config.is_file() else "athanor"


def _requirements(*extra: str) -> list[str]:
    pins = []
    for dist in ("torch", "transformers", "safetensors", "tokenizers", "diffusers", *extra):
        try:
            pins.append(f"{dist}=={importlib.metadata.version(dist).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return pins


def _log_model(tracker: Tracker, export_dir: Path, method: Any) -> tuple[str, str | None]:
    """Log the export with the flavour the method declares; (model source URI, logged-model id)."""
    # why: the API server imports this module at start; mlflow costs seconds
    import mlflow

    if method.mlflow_flavor == "transformers" and (export_dir / "modules.json").is_file():
        # A sentence-transformers directory: loads back with mlflow.sentence_transformers.load_model.
        # why: only a sentence-transformers export needs it (seconds)
        from sentence_transformers import SentenceTransformer

        with mlflow.start_run(run_id=tracker.parent_id):
            info = mlflow.sentence_transformers.log_model(
                SentenceTransformer(str(export_dir), device="cpu"), name="model",
                pip_requirements=_requirements("sentence-transformers"))
        return info.model_uri, info.model_id
    if method.mlflow_flavor == "transformers":
        # In-memory form: MLflow 3.17's local-checkpoint path breaks on transformers 5 (lazy pipeline impls).
        # why: only the transformers flavour needs it (seconds)
        import transformers

        auto = getattr(transformers, method.auto_class or "AutoModel")
        components = {"model": auto.from_pretrained(export_dir),
                      "tokenizer": transformers.AutoTokenizer.from_pretrained(export_dir)}
        with mlflow.start_run(run_id=tracker.parent_id):
            info = mlflow.transformers.log_model(transformers_model=components, name="model", task=method.mlflow_task,
                                                 pip_requirements=_requirements())
        return info.model_uri, info.model_id
    tracker.client.log_artifacts(tracker.parent_id, str(export_dir), "model")
    return tracker.client.get_run(tracker.parent_id).info.artifact_uri + "/model", None


@dataclass
class Registration:
    """A model version this job created, and where the alias pointed before (to undo it)."""

    name: str
    version: str
    alias: str | None
    previous: str | None


def register(tracker: Tracker, *, export_dir: Path, method: Any, name: str, alias: str | None,
             tags: dict[str, str], hook: Any = None) -> Registration:
    """Log the export under the parent run, add a registry version and point the alias at it (no alias: a job
    that missed its gate). If anything fails after the version exists, it is deleted and the alias restored
    before re-raising."""
    # why: the API server imports this module at start; mlflow costs seconds
    import mlflow

    client = tracker.client  # on a remote server a lost connection is TrackingUnavailable, never an MlflowException
    with tracker.guard("logging the model"):
        source, model_id = _log_model(tracker, export_dir, method)
    try:
        client.create_registered_model(name, description="Converted models registered by athanor.")
    except mlflow.exceptions.MlflowException:
        pass  # it exists (or another job created it a moment ago)
    previous = None
    try:
        if alias is not None:
            previous = str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        pass
    version = client.create_model_version(name, source, run_id=tracker.parent_id, tags=tags, model_id=model_id,
                                          description=card_summary(export_dir / "README.md"))
    registration = Registration(name, str(version.version), alias, previous)
    try:
        if hook is not None:
            hook("registered")
        if alias is not None:
            client.set_registered_model_alias(name, alias, registration.version)
    except BaseException:
        undo(tracker, registration)
        raise
    return registration


def undo(tracker: Tracker, registration: Registration) -> None:
    """Delete the version and point the alias back where it was; never raises (logs what it could not do)."""
    client = tracker.client
    try:
        client.delete_model_version(registration.name, registration.version)
        if registration.alias is not None and registration.previous is not None:
            client.set_registered_model_alias(registration.name, registration.alias, registration.previous)
    except Exception:  # noqa: BLE001
        log.exception("could not undo registry version %s of %s", registration.version, registration.name)


def move_alias(tracker: Tracker, name: str, alias: str, version: str) -> None:
    tracker.client.set_registered_model_alias(name, alias, version)


def drop_job_versions(tracker: Tracker, name: str, job_id: str) -> None:
    """Delete the versions of `name` an earlier attempt of job `job_id` created before it died (a retried job
    registers one version, its own); an alias left on one of them is removed with it."""
    # why: the API server imports this module at start; mlflow costs seconds
    import mlflow

    try:
        versions = tracker.client.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:
        return  # no such model yet
    for version in versions:
        if version.tags.get("athanor.job_id") == job_id:
            log.warning("deleting version %s of %s left by an earlier attempt of job %s", version.version, name,
                        job_id)
            tracker.client.delete_model_version(name, version.version)


class PushRefused(ValueError):
    """A push that cannot happen (bad alias, no registered version); the message is one line."""

    def __init__(self, message: str, *, conflict: bool = False) -> None:
        super().__init__(message)
        self.conflict = conflict
        """True when the alias is fine but the job has nothing to push (not finished, not registered)."""


def push_job(store: Any, job_id: str, alias: str, *, force: bool = False) -> tuple[str, str, str]:
    """Point registry alias `alias` at the version job `job_id` registered: (model name, version, job id).
    KeyError for an unknown job, PushRefused (one line) before any registry call when it cannot happen; a version
    whose job missed its gate needs `force`."""
    problem = check_alias(alias)
    if problem:
        raise PushRefused(f"--alias {alias[:80]!r}: {problem}")
    job = store.get(job_id)
    if job.status != "SUCCEEDED" or not job.model_version or not (job.result or {}).get("registered"):
        raise PushRefused(f"job {job.id} has no registered version (status {job.status}); only succeeded, "
                          "registered jobs can be pushed", conflict=True)
    gate = job.result.get("gate") or {}
    if gate.get("passed") is False and not force:
        raise PushRefused(f"job {job.id} missed its gate ({'; '.join(gate['failed'])}); pass --force to point "
                          f"'{alias[:80]}' at version {job.model_version} anyway", conflict=True)

    recipe = load_recipe(job.recipe_path, text=job.recipe_text, overrides=job.overrides).recipe
    name = job.result["registered"]["name"]
    tracker = Tracker(store.home, recipe.tracking.uri, recipe.tracking.experiment or recipe.name)
    move_alias(tracker, name, alias, job.model_version)
    return name, job.model_version, job.id

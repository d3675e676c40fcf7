"""Model card, MLflow Model Registry versions and aliases.

A successful job logs its export (with the `mlflow.transformers` flavour when the method says so,
as plain artifacts otherwise), registers it as a new version of `registry.name`, points the alias
(`candidate` by default) at it and tags it with its lineage. Failed jobs register nothing.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

from jobs.tracking import Tracker


def write_model_card(out_dir: Path, *, recipe: Any, job_id: str, params: dict[str, float],
                     before: dict[str, float], after: dict[str, float]) -> Path:
    """README.md in the export: method, teacher, student size and the before/after metrics."""
    rows = "\n".join(f"| {k} | {before[k]:.6g} | {after[k]:.6g} |" for k in before)
    teacher = recipe.teacher.source or f"inline config ({(recipe.teacher.config or {}).get('model_type', '?')})"
    text = f"""---
library_name: transformers
tags: [athanor, {recipe.method}, distillation]
---
# {recipe.registry.name}

Converted by **athanor** with the **{recipe.method}** method (job `{job_id}`, recipe `{recipe.name}`).
{recipe.description}

- Teacher: `{teacher}` — {params['teacher']:,.0f} parameters
- Student: {params['student']:,.0f} parameters ({params['student'] / max(params['teacher'], 1):.1%} of the teacher)

## Before (teacher) and after (converted)
| metric | before | after |
|---|---|---|
{rows}
"""
    path = out_dir / "README.md"
    path.write_text(text)
    return path


_AUTO_CLASS = {"feature-extraction": "AutoModel", "text-generation": "AutoModelForCausalLM",
               "fill-mask": "AutoModelForMaskedLM"}


def _requirements() -> list[str]:
    pins = []
    for dist in ("torch", "transformers", "safetensors", "tokenizers", "diffusers"):
        try:
            pins.append(f"{dist}=={importlib.metadata.version(dist).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return pins


def register(tracker: Tracker, *, export_dir: Path, flavor: str, task: str | None, name: str, alias: str,
             tags: dict[str, str]) -> str:
    """Log the export under the parent run, add a registry version, set its alias; return the version."""
    import mlflow

    client = tracker.client
    if flavor == "transformers":
        # In-memory form: MLflow 3.17's local-checkpoint path breaks on transformers 5 (lazy pipeline impls).
        import transformers

        auto = getattr(transformers, _AUTO_CLASS.get(task or "", "AutoModel"))
        components = {"model": auto.from_pretrained(export_dir),
                      "tokenizer": transformers.AutoTokenizer.from_pretrained(export_dir)}
        with mlflow.start_run(run_id=tracker.parent_id):
            info = mlflow.transformers.log_model(
                transformers_model=components, name="model", task=task, pip_requirements=_requirements(),
            )
        source, model_id = info.model_uri, info.model_id
    else:
        client.log_artifacts(tracker.parent_id, str(export_dir), "model")
        source, model_id = client.get_run(tracker.parent_id).info.artifact_uri + "/model", None
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="Converted models registered by athanor.")
    version = client.create_model_version(name, source, run_id=tracker.parent_id, tags=tags, model_id=model_id)
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def move_alias(tracker: Tracker, name: str, alias: str, version: str) -> None:
    tracker.client.set_registered_model_alias(name, alias, version)

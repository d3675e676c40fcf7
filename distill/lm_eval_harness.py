"""lm-evaluation-harness (PyPI `lm-eval`) on one causal LM, for the recipe key `eval.lm_eval` (`LMEvalSpec`).

The spine runs it on the teacher and on the student with the same settings (tasks, limit, few-shot count, seeds);
every result becomes an ordinary before/after key `lm_eval/<task>/<metric>` (`<metric>_<filter>` for a filter
other than the task's default), its direction the one the harness reports for that metric (`higher_is_better`).
A metric the harness aggregates from one value per document (a mean, a perplexity, bits per byte) comes back
per document (`PerSample`, checked against the harness's own aggregate), so the spine's paired intervals cover it.

Offline: a task in `include_path` is read from its YAML here, with a relative `dataset_kwargs.data_files` made
absolute beside that YAML, and handed to the harness as a config, so a task over a local JSONL file needs no
network; only the harness's built-in tasks fetch their datasets from the hub.

    .venv/bin/python -m pytest tests/distill/test_lm_eval_harness.py -q
"""

from __future__ import annotations

import difflib
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from athanor.distill.intervals import PerSample
from athanor.distill.spec import Direction, LMEvalSpec

log = logging.getLogger(__name__)

PREFIX = "lm_eval/"
"""Every key the harness adds starts with this (after it: the task, then the metric)."""
SEED = 1234
"""The harness's seeds (Python, numpy, torch, few-shot sampling): the same examples and shots on both sides."""


def _manager(include_path: str | None, *, defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


def local_tasks(include_path: str | None) -> dict[str, Path]:
    """Task name -> its YAML file, for the tasks (not groups or tags) defined under `include_path`."""
    if not include_path:
        return {}
    from lm_eval.tasks._index import Kind

    index = _manager(include_path, defaults=False).task_index
    return {name: entry.yaml_path for name, entry in index.items() if entry.kind == Kind.TASK and entry.yaml_path}


def task_problems(spec: LMEvalSpec, include_path: str | None) -> list[tuple[str, Any, str]]:
    """(key, value, message) for every task the harness would not find: local tasks are looked up under the
    (resolved) `include_path`, the rest among the harness's built-in tasks, groups and tags."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return [("eval.lm_eval", spec.tasks, "needs the lm-eval package (lm-evaluation-harness), not installed here")]
    if include_path and not Path(include_path).is_dir():
        return [("eval.lm_eval.include_path", spec.include_path, "no such folder (tried from the working directory, "
                 "then beside the recipe)")]
    local = set(local_tasks(include_path))
    missing = [(i, task) for i, task in enumerate(spec.tasks) if task not in local]
    if not missing:
        return []
    known = set(_manager(None, defaults=True).all_tasks) | local
    problems = []
    for i, task in missing:
        if task in known:
            continue
        guess = difflib.get_close_matches(task[:200], sorted(known), n=1)
        where = f"under {include_path} or " if include_path else ""
        problems.append((f"eval.lm_eval.tasks.{i}", task, f"no task of that name {where}among the harness's tasks"
                         + (f"; did you mean '{guess[0]}'?" if guess else "")))
    return problems


def _absolute_data_files(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The task's `dataset_kwargs.data_files` read beside its YAML (the harness would read them from the working
    directory)."""
    kwargs = dict(config.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")

    def fix(value: Any) -> Any:
        if isinstance(value, str):
            return value if "://" in value or Path(value).is_absolute() else str(folder / value)
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    if files is not None:
        kwargs["data_files"] = fix(files)
        config = {**config, "dataset_kwargs": kwargs}
    return config


def task_specs(spec: LMEvalSpec) -> list[str | dict[str, Any]]:
    """What the harness is asked to run: a local task as its config dict (data files made absolute), a built-in
    task by name."""
    from lm_eval.tasks._yaml_loader import load_yaml

    local = local_tasks(spec.include_path)
    specs: list[str | dict[str, Any]] = []
    for task in spec.tasks:
        if task in local:
            specs.append(_absolute_data_files(load_yaml(local[task], resolve_func=True), local[task].parent))
        else:
            specs.append(task)
    return specs


def _direction(higher: bool | None) -> Direction:
    return "neutral" if higher is None else "higher" if higher else "lower"


def _weighted_mean(rows: np.ndarray) -> float:
    return float(rows[:, 0].sum() / rows[:, 1].sum())


def _perplexity(rows: np.ndarray) -> float:
    return math.exp(-float(rows.mean()))


def _weighted_perplexity(rows: np.ndarray) -> float:
    return math.exp(-_weighted_mean(rows))


def _bits_per_byte(rows: np.ndarray) -> float:
    return -_weighted_mean(rows) / math.log(2)


def _per_document(values: list[Any], aggregate: float) -> PerSample | float:
    """The document values as a `PerSample` whose statistic reproduces the harness's aggregate (a mean, a
    perplexity from log-likelihoods, a weighted perplexity or bits per byte from (log-likelihood, length) pairs);
    the aggregate alone when none does (e.g. an F1 over the whole set)."""
    try:
        rows = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        return aggregate
    if rows.ndim == 1 and len(rows):
        candidates = [PerSample.mean(rows), PerSample(rows, _perplexity)]
    elif rows.ndim == 2 and rows.shape[1] == 2 and len(rows):
        candidates = [PerSample(rows, _weighted_perplexity), PerSample(rows, _bits_per_byte),
                      PerSample(rows, _weighted_mean)]
    else:
        return aggregate
    for candidate in candidates:
        with np.errstate(all="ignore"):
            if math.isclose(candidate.value, aggregate, rel_tol=1e-9, abs_tol=1e-12):
                return candidate
    return aggregate


def metrics_of(output: dict[str, Any]) -> tuple[dict[str, PerSample | float], dict[str, Direction]]:
    """The harness's output as metric keys (`lm_eval/<task>/<metric>`) with their directions; stderr entries and
    non-numbers are left out (the spine computes its own intervals)."""
    metrics: dict[str, PerSample | float] = {}
    directions: dict[str, Direction] = {}
    samples = output.get("samples") or {}
    for task, results in output["results"].items():
        docs = sorted(samples.get(task, []), key=lambda s: s["doc_id"])
        for name, value in results.items():
            metric, _, filt = name.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            key = f"{PREFIX}{task}/{metric if filt == 'none' else f'{metric}_{filt}'}"
            values = [d[metric] for d in docs if d.get("filter") == filt and metric in d]
            metrics[key] = _per_document(values, float(value)) if values else float(value)
            directions[key] = _direction((output.get("higher_is_better") or {}).get(task, {}).get(metric))
    return metrics, directions


def evaluate_harness(model: Any, tokenizer: Any, spec: LMEvalSpec) -> tuple[dict[str, PerSample | float],
                                                                            dict[str, Direction]]:
    """Run `spec`'s tasks on `model` (a transformers causal LM with its `tokenizer`, or an `lm_eval` LM with
    tokenizer None); (metrics, their directions)."""
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM

    if isinstance(model, LM):
        lm = model
    else:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, backend="causal", batch_size=spec.batch_size)
    specs = task_specs(spec)
    manager = _manager(spec.include_path, defaults=any(isinstance(s, str) for s in specs))
    output = simple_evaluate(model=lm, tasks=specs, num_fewshot=spec.num_fewshot, limit=spec.limit,
                             task_manager=manager, bootstrap_iters=0, log_samples=True, random_seed=SEED,
                             numpy_random_seed=SEED, torch_random_seed=SEED, fewshot_random_seed=SEED)
    metrics, directions = metrics_of(output)
    log.info("lm-eval: %s", ", ".join(f"{k.removeprefix(PREFIX)} {_value(v):.4g}" for k, v in metrics.items()))
    return metrics, directions


def _value(metric: PerSample | float) -> float:
    return metric.value if isinstance(metric, PerSample) else metric

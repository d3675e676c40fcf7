"""The spine's side of `eval.lm_eval`: lm-evaluation-harness on the teacher, the untrained student and the
converted student with the same settings (comparison arms are not scored: their comparison reads the method's own
metrics), its results merged into the side's metrics as ordinary keys, each declared with the direction its task
gives it; and the recipe checks (a method whose models are not causal LMs, a task the harness would not find).

The method says which causal LM the harness scores with the optional protocol call `lm_eval_model`
(`distill/spec.py`); the harness itself is `distill/lm_eval_harness.py`.

    .venv/bin/python -m pytest tests/distill/test_lm_eval_harness.py tests/recipes/test_sinklora_recipe.py -q
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from athanor.distill.lm_eval_harness import evaluate_harness
from athanor.distill.lm_eval_harness import task_problems as problems
from athanor.distill.method_base import overrides
from athanor.jobs.results import check_declared

log = logging.getLogger("athanor.job")


def measured(p: Any, model: Any, side: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` (what the method's `evaluate` returned for `side`) plus the harness's results when the recipe asks
    for them, every key checked against the method's declaration and the harness's directions."""
    spec = p.loaded.recipe.eval.lm_eval
    directions: dict[str, str] = {}
    if spec is not None and not side.startswith("arm_"):
        log.info("lm-evaluation-harness on %s: %s", side, ", ".join(spec.tasks))
        with p.method.lm_eval_model(model, p.teacher, p.loaded.args) as (lm, tokenizer):
            scores, directions = evaluate_harness(lm, tokenizer, spec)
        metrics = {**metrics, **scores}
    check_declared(p.method, metrics, directions)
    return metrics


def method_problems(recipe: Any, method: Any) -> list[tuple[str, Any, str]]:
    """`eval.lm_eval` on a method whose models the harness cannot score (no `lm_eval_model`)."""
    if recipe.eval.lm_eval is None or overrides(method, "lm_eval_model"):
        return []
    return [("eval.lm_eval", recipe.eval.lm_eval.tasks, f"method {method.name} does not produce causal LMs that "
             "lm-evaluation-harness can score; remove eval.lm_eval")]


def task_problems(recipe: Any, recipe_path: Path | None) -> list[tuple[str, Any, str]]:
    """Tasks the harness would not find (read where the job will read them: include_path beside the recipe)."""
    spec = recipe.eval.lm_eval
    if spec is None:
        return []
    # why: jobs/recipe.py imports this module at its top (a cycle)
    from athanor.jobs.recipe import resolve_relative

    include = resolve_relative(spec.include_path, recipe_path) if spec.include_path else None
    return problems(spec, include)

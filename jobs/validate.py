"""`athanor validate`: schema problems, then checks that need the method (sources, student vs
teacher), all collected; plus a size estimate built on the `meta` device (no weights loaded).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

from distill.spec import RecipeError
from convert.module_utils import count_params
from jobs.recipe import LoadedRecipe, Problem, RecipeInvalid, load_recipe, path_fields, resolve_relative


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """What could not be checked here (e.g. a hub teacher while offline); not errors."""
    estimate: dict[str, float] = field(default_factory=dict)
    loaded: LoadedRecipe | None = None


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check(path: str | Path | None, *, text: str | None = None, overrides: list[str] = ()) -> Report:
    """Validate a recipe completely; never raises for recipe problems."""
    report = Report()
    try:
        loaded = load_recipe(path, text=text, overrides=list(overrides))
    except RecipeInvalid as exc:
        report.problems = exc.problems
        return report
    report.loaded = loaded
    recipe = loaded.recipe
    base = Path(path).parent if path else None

    def problem(exc: RecipeError) -> None:
        report.problems.append(Problem(exc.key, None, exc.value, exc.fix))

    if recipe.data.kind in ("files", "datasets"):
        if not recipe.data.paths and recipe.data.loader != "disk":
            report.problems.append(Problem("data.paths", None, [], f"kind '{recipe.data.kind}' needs at least one path"))
        for i, entry in enumerate(recipe.data.paths):
            resolved = resolve_relative(entry, Path(path) if path else None)
            if not glob.glob(resolved):
                report.problems.append(Problem(f"data.paths.{i}", None, entry, "no file or directory matches"))
    for key, section, name in path_fields(recipe):
        value = getattr(section, name)
        for entry in [value] if isinstance(value, str) else value or []:
            if not Path(resolve_relative(entry, Path(path) if path else None)).exists():
                report.problems.append(Problem(key, None, entry, "no such file (paths are tried from the working "
                                                                 "directory, then beside the recipe)"))

    from jobs.methods import get_method
    from jobs.sources import resolve_source

    method = get_method(recipe.method)
    try:
        try:
            source = resolve_source(recipe.teacher, "teacher", base=base)
        except RecipeError as exc:
            if "hub is offline" not in exc.fix:
                raise
            # Cannot be decided offline: the job will fail clearly if the hub stays unreachable.
            report.warnings.append(f"{exc.key}: {exc.value!r} is a hub id and the hub is offline; "
                                   "its config was not checked and the size estimate is skipped")
            return report
        teacher = method.load_teacher(source, meta=True)
        student = method.convert(teacher, loaded.student, loaded.args)
    except RecipeError as exc:
        problem(exc)
        return report
    n_teacher = count_params(method.teacher_model(teacher))
    n_student = count_params(student)
    weight_bytes = 2 if recipe.train.precision == "bf16-true" else 4
    report.estimate = {
        "teacher_params": n_teacher,
        "student_params": n_student,
        "teacher_memory_bytes": n_teacher * weight_bytes,
        # student weights + gradients + two AdamW moments (fp32), before activations
        "student_train_memory_bytes": n_student * (weight_bytes + 4 + 8),
    }
    return report


def render_estimate(estimate: dict[str, float]) -> str:
    if not estimate:
        return ""
    t, s = estimate["teacher_params"], estimate["student_params"]
    return (f"teacher: {t / 1e6:,.2f}M parameters (weights {_bytes(estimate['teacher_memory_bytes'])})\n"
            f"student: {s / 1e6:,.2f}M parameters ({s / max(t, 1):.1%} of the teacher; weights+grads+AdamW "
            f"{_bytes(estimate['student_train_memory_bytes'])}, activations extra)")

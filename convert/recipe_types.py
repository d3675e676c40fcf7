"""The recipe-facing types shared by model surgery (`convert/`), training (`distill/`) and the job
spine (`jobs/`). They live here, at the bottom of the import graph, so that `convert/` never imports
`distill/` or `jobs/` (surgery sits below training); `distill/spec.py` re-exports them."""

from __future__ import annotations

import reprlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

import annotated_types
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.fields import FieldInfo

SHOWN_CHARS = 120
"""Longest value shown in an error line: a recipe value can be a 256 KiB string or a list that
aliases expanded, and one error must stay one readable line (terminal, job store, MLflow)."""


def _bounded_repr() -> reprlib.Repr:
    """reprlib.Repr set up for recipe values (Python 3.11's Repr takes no keyword arguments)."""
    bounded_repr = reprlib.Repr()
    bounded_repr.maxlevel, bounded_repr.maxlong = 3, 40
    bounded_repr.maxdict = bounded_repr.maxlist = bounded_repr.maxtuple = bounded_repr.maxset = 6
    bounded_repr.maxstring = bounded_repr.maxother = SHOWN_CHARS
    return bounded_repr


_REPR = _bounded_repr()


def one_line(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` on one line (control characters escaped) and at most `limit` characters, ending in '…'
    when cut: error text is built from user input and must not spill over lines or screens."""
    flat = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit + 1])
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def short_repr(value: Any, limit: int = SHOWN_CHARS) -> str:
    """repr() of a recipe value, bounded before it is built (reprlib for containers), then cut to
    `limit` with '…' marking the cut."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return one_line(repr(value[: limit + 1]), limit)
    return one_line(_REPR.repr(value), limit)


class RecipeError(ValueError):
    """Bad recipe input, reported as one line: the key path, the bad value and how to fix it."""

    def __init__(self, key: str, value: Any, fix: str) -> None:
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"{one_line(key)}: {short_repr(value)} — {one_line(fix, 600)}")


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, not silently ignored; floats are finite
    (`.inf`/`.nan` in YAML, or 1e999 overflowing to inf, would pass every `gt`/`le` bound as nan does)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True,
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """A number field takes a YAML number only: `true` is not 1, and the strings YAML 1.1 would have read
        as numbers (`010` as 8, `1:30` as 90; the recipe loader keeps them strings) are refused by name."""
        if isinstance(value, (bool, str)) and _numeric(cls.model_fields[info.field_name].annotation):
            kind = "true/false" if isinstance(value, bool) else f"the string {value!r}"
            raise ValueError(f"{kind} is not a number; write a plain number such as 10 (a leading zero or "
                             "h:mm is not one)")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _numbers_within_reason(cls, value: Any, info: ValidationInfo) -> Any:
        """A number field without an upper bound of its own gets one: seeds fit numpy and Lightning (0..2**32-1),
        counts stay below a billion and weights, scales and rates below a million, so a typo such as 1e308 or
        2**63 is one keyed error at validate time instead of an overflow or a diverged loss hours later."""
        field = cls.model_fields[info.field_name]
        if any(isinstance(m, (annotated_types.Le, annotated_types.Lt)) for m in field.metadata):
            return value
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if "seed" in info.field_name:
            if any(isinstance(n, int) and not 0 <= n <= SEED_CEILING for n in numbers):
                raise ValueError(f"a seed is a whole number from 0 to {SEED_CEILING:,} (numpy and Lightning take "
                                 "no other)")
            return value
        for number in numbers:
            if isinstance(number, int) and not isinstance(number, bool) and abs(number) > COUNT_CEILING:
                raise ValueError(f"must be at most {COUNT_CEILING:,} in size: no count or size in a recipe is "
                                 "larger (a typo?)")
            if isinstance(number, float) and abs(number) > SCALE_CEILING:
                raise ValueError(f"must be at most {SCALE_CEILING:,.0f} in size: no weight, scale or rate in a "
                                 "recipe is larger (a typo such as 1e308?)")
        return value


SEED_CEILING = 2**32 - 1
COUNT_CEILING = 10**9
SCALE_CEILING = 1e6


def _numeric(annotation: Any) -> bool:
    """Whether a field's type is int or float (optionally None), not bool or a union with other types."""
    args = set(get_args(annotation)) - {type(None)} if get_args(annotation) else {annotation}
    return bool(args) and args <= {int, float}


@dataclass(frozen=True)
class PathRole:
    """What a recipe string names on disk. Confinement is a property of the type: the spine resolves, checks
    and (for a recipe sent over HTTP) confines every field whose type carries a PathRole, in every section and
    every method, by walking the schema (`path_fields`); no list of keys to forget."""

    kind: str
    """'file' (a file or folder), 'glob' (a file, folder or glob pattern), 'source' (a model: folder, `.gguf`,
    `pkg:` or hub id), 'loader' (a `datasets` builder name, or a local script or folder) or 'store' (an MLflow
    tracking URI: a local store is a path)."""
    must_exist: bool = True
    """`validate` checks it exists (False: a folder the job creates, such as a cache)."""
    base: str = "recipe"
    """Where a relative path is read from: 'recipe' (the working directory, then beside the recipe; the home
    over HTTP) or 'teacher' (inside the teacher's folder, which it may not leave)."""


@dataclass(frozen=True)
class NotAPath:
    """Marks a string field that is never read as a path (names, prompts, column names, Slurm options)."""


def _encodable(value: str) -> str:
    """Text that UTF-8 can hold: a lone surrogate (YAML's "\\ud800") would fail later, when the job store, MLflow
    or a model card writes the recipe out."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{exc.object[exc.start:exc.end]!r} at character {exc.start} is a lone surrogate, not "
                         "text; remove it") from None
    return value


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("a NUL byte cannot be part of a path; remove it")
    return _encodable(value)


_NO_NUL = AfterValidator(_no_nul)
RecipePath = Annotated[str, PathRole("file"), _NO_NUL]
"""A file or folder the job reads; relative: from the working directory, then beside the recipe."""
RecipeGlob = Annotated[str, PathRole("glob"), _NO_NUL]
"""A file, folder or glob pattern (`**` recursive) the job reads."""
RecipeCacheDir = Annotated[str, PathRole("file", must_exist=False), _NO_NUL]
"""A folder the job writes (created when missing)."""
TeacherFile = Annotated[str, PathRole("file", base="teacher"), _NO_NUL]
"""A file or folder read inside the teacher's folder when relative (an absolute one is read where it is)."""
ModelRef = Annotated[str, PathRole("source"), _NO_NUL]
"""A model: a local folder, a `.gguf` file, `pkg:<package>/<subdir>` or a hub id."""
DataLoader = Annotated[str, PathRole("loader"), _NO_NUL]
"""A `datasets` builder ('json', 'imagefolder', 'disk', a hub dataset) or a local loading script or folder."""
TrackingURI = Annotated[str, PathRole("store"), _NO_NUL]
"""An MLflow tracking URI; a local store (a folder, file:, sqlite:) is a path."""
Text = Annotated[str, NotAPath(), AfterValidator(_encodable)]
"""Free text or a name, never opened as a path."""


def _markers(annotation: Any) -> Iterator[Any]:
    """Every Annotated metadata item inside a type (Optional, list and tuple arguments included)."""
    if get_origin(annotation) is Annotated:
        yield from annotation.__metadata__
        annotation = get_args(annotation)[0]
    for arg in get_args(annotation):
        if get_origin(arg) is not Literal:
            yield from _markers(arg)


def path_role(info: FieldInfo) -> PathRole | None:
    """The PathRole of a field (pydantic keeps a top-level Annotated's metadata on the FieldInfo)."""
    return next((m for m in [*info.metadata, *_markers(info.annotation)] if isinstance(m, PathRole)), None)


def is_text(info: FieldInfo) -> bool:
    """Whether a field is declared free text (`Text`)."""
    return any(isinstance(m, NotAPath) for m in [*info.metadata, *_markers(info.annotation)])


def path_fields(section: BaseModel, prefix: str = "") -> Iterator[tuple[str, BaseModel, str, PathRole]]:
    """(key path, owning section, field name, role) of every path-typed field set in a recipe, nested sections
    included (also inside lists and dicts of sections, e.g. `lora_composer.concepts.bag.path`)."""
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        if (role := path_role(info)) is not None:
            yield f"{prefix}{name}", section, name, role
            continue
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in [("", value)] if isinstance(value, BaseModel) else items:
            if isinstance(item, BaseModel):
                yield from path_fields(item, f"{prefix}{name}.{key}." if key != "" else f"{prefix}{name}.")

LIMIT_REASON = "limit_reason"
"""`json_schema_extra` key holding why a field has an upper bound; error messages quote it."""


def bounded(default: Any, *, le: float, reason: str, ge: float | None = None, gt: float | None = None) -> Any:
    """A field with an upper bound and the reason for it (shown when a recipe exceeds it): bounds stop
    typos such as `max_steps: 1e30` or `devices: 1e6` at validation instead of hours into a job."""
    return Field(default, le=le, ge=ge, gt=gt, json_schema_extra={LIMIT_REASON: reason})

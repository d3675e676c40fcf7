"""The recipe-facing types shared by model surgery (`convert/`), training (`distill/`) and the job
spine (`jobs/`). They live here, at the bottom of the import graph, so that `convert/` never imports
`distill/` or `jobs/` (surgery sits below training); `distill/spec.py` re-exports them."""

from __future__ import annotations

import reprlib
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

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


def _numeric(annotation: Any) -> bool:
    """Whether a field's type is int or float (optionally None), not bool or a union with other types."""
    args = set(get_args(annotation)) - {type(None)} if get_args(annotation) else {annotation}
    return bool(args) and args <= {int, float}


RECIPE_PATH = {"recipe_path": True}
"""Mark a recipe field that holds a file path (`Field(None, json_schema_extra=RECIPE_PATH)`): the spine
resolves it relative to the working directory, then beside the recipe, and `validate` checks it exists."""

LIMIT_REASON = "limit_reason"
"""`json_schema_extra` key holding why a field has an upper bound; error messages quote it."""


def bounded(default: Any, *, le: float, reason: str, ge: float | None = None, gt: float | None = None) -> Any:
    """A field with an upper bound and the reason for it (shown when a recipe exceeds it): bounds stop
    typos such as `max_steps: 1e30` or `devices: 1e6` at validation instead of hours into a job."""
    return Field(default, le=le, ge=ge, gt=gt, json_schema_extra={LIMIT_REASON: reason})

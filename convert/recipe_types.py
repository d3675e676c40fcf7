"""The recipe-facing types shared by model surgery (`convert/`), training (`distill/`) and the job
spine (`jobs/`). They live here, at the bottom of the import graph, so that `convert/` never imports
`distill/` or `jobs/` (surgery sits below training); `distill/spec.py` re-exports them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class RecipeError(ValueError):
    """Bad recipe input, reported as one line: the key path, the bad value and how to fix it."""

    def __init__(self, key: str, value: Any, fix: str) -> None:
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"{key}: {value!r} — {fix}")


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


RECIPE_PATH = {"recipe_path": True}
"""Mark a recipe field that holds a file path (`Field(None, json_schema_extra=RECIPE_PATH)`): the spine
resolves it relative to the working directory, then beside the recipe, and `validate` checks it exists."""

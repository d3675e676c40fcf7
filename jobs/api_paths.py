"""Paths in a recipe submitted over HTTP: confined to the athanor home.

A recipe posted to `athanor serve` has no directory of its own, so every path-valued key is read as
relative to the athanor home and must stay inside it (after symlinks are resolved); absolute paths
are accepted only inside the home, and `..` is refused outright. What is checked:

- `data.paths` (files or globs);
- `teacher.source`, `teacher.tokenizer` and `data.loader` (when it holds `/` or starts with `.` or `~`),
  except `pkg:` sources and hub ids (`org/name` that names no directory under the home; one that names
  a directory under the server's working directory is refused, as the worker would read that);
- `tracking.uri` when it is local: a plain path, `file:` or `sqlite:` (remote stores such as
  `http(s)://` are left alone);
- every field marked RECIPE_PATH (e.g. `minilm.sts_file`) and every field whose name ends in
  `_dir`, `_file` or `_path` (plural too; e.g. `koala.cache_dir`).

Each accepted relative path becomes an absolute one inside the home through an extra override stored
with the job, so the worker reads exactly what was checked whatever its working directory.

    .venv/bin/python -m pytest tests/jobs/test_api.py -q -k path
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from athanor.jobs.recipe import LoadedRecipe, Problem
from athanor.jobs.sources import looks_like_hub_id

PATH_NAME = re.compile(r"_(dir|file|path)s?$")
LOCAL_SCHEMES = ("", "file", "sqlite")


class Escape(ValueError):
    """A recipe path that would leave the athanor home; the message is the fix."""


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def place(value: str, home: Path) -> Path:
    """Where `value` points for a recipe without a directory: relative to the home, symlinks resolved;
    Escape when it leaves the home."""
    if any(part == ".." for part in re.split(r"[\\/]", value)):
        raise Escape("'..' is not allowed in paths of a recipe submitted over HTTP")
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # `~nosuchuser/...`
        raise Escape("no such user's home directory; give a path relative to the athanor home") from None
    root = Path(os.path.realpath(home))
    resolved = Path(os.path.realpath(path if path.is_absolute() else root / path))
    if not _inside(resolved, root):
        raise Escape(f"leaves the athanor home {root}; over HTTP a recipe may only name files inside it "
                     "(relative paths are read from the home)")
    return resolved


def _source(value: str, home: Path) -> str | None:
    """The absolute form of a teacher source inside the home; None for `pkg:` and hub ids."""
    if value.startswith("pkg:"):
        return None
    if looks_like_hub_id(value) and not (home / value).exists():
        if Path(value).exists():  # the worker would read it from its working directory, outside the home
            raise Escape("names a directory of the server's working directory, outside the athanor home; "
                         "put it under the home or use a hub id that is no local path")
        return None
    return str(place(value, home))


def _tracking(uri: str, home: Path) -> str | None:
    """The absolute form of a local tracking URI inside the home; None for a remote store."""
    scheme = uri.partition(":")[0].lower() if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", uri) else ""
    if scheme not in LOCAL_SCHEMES:
        return None
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///"):
            raise Escape("a local SQLite store is sqlite:///<path>; use a path inside the athanor home")
        return f"sqlite:///{place(uri[len('sqlite:///'):], home)}"
    if scheme == "file":
        rest = uri[len("file:"):]
        rest = rest[2:] if rest.startswith("//") else rest
        if rest and not rest.startswith("/"):
            raise Escape("a file: URI names no host here; use file:///<path> inside the athanor home")
        return place(rest, home).as_uri()
    return str(place(uri, home))


def _fields(section: BaseModel, prefix: str = "") -> list[tuple[str, Any]]:
    """(key path, value) of every RECIPE_PATH field and every field named *_dir/_file/_path(s)."""
    found = []
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        marked = isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("recipe_path")
        if isinstance(value, BaseModel):
            found += _fields(value, f"{prefix}{name}.")
        elif (marked or PATH_NAME.search(name)) and value is not None:
            found.append((f"{prefix}{name}", value))
    return found


def _confine_one(key: str, value: Any, home: Path, fix: Any) -> tuple[Problem | None, str | None]:
    """(problem, override) for one key: `fix(value, home)` gives the absolute form or None (left as is)."""
    try:
        if isinstance(value, list):
            placed = [fix(v, home) if isinstance(v, str) else v for v in value]
            absolute = None if all(p is None for p in placed) else [
                p if p is not None else v for p, v in zip(placed, value)]
        else:
            absolute = fix(value, home) if isinstance(value, str) else None
    except Escape as exc:
        return Problem(key, None, value, str(exc)), None
    if absolute is None or absolute == value:
        return None, None
    return None, f"{key}={json.dumps(absolute)}"


def _path(value: str, home: Path) -> str:
    return str(place(value, home))


def _loader(value: str, home: Path) -> str | None:
    """A `datasets` loader that is a path (a script or folder) is confined; 'json', 'text' and hub
    datasets (`org/name`) are not paths."""
    return _source(value, home) if "/" in value or value.startswith((".", "~")) else None


def confine(loaded: LoadedRecipe, home: Path) -> tuple[list[Problem], list[str]]:
    """Every path-valued key of an HTTP recipe checked against the home: (problems naming the key, the
    overrides that make the accepted relative paths absolute)."""
    recipe = loaded.recipe
    keys: list[tuple[str, Any, Any]] = [("data.paths", recipe.data.paths, _path),
                                        ("data.loader", recipe.data.loader, _loader),
                                        ("teacher.source", recipe.teacher.source, _source),
                                        ("teacher.tokenizer", recipe.teacher.tokenizer, _source),
                                        ("tracking.uri", recipe.tracking.uri, _tracking)]
    keys += [(key, value, _path) for key, value in _fields(recipe) if key not in ("data.paths",)]
    problems, overrides = [], []
    for key, value, fix in keys:
        if value is None or value == []:
            continue
        problem, override = _confine_one(key, value, home, fix)
        if problem is not None:
            problems.append(problem)
        elif override is not None:
            overrides.append(override)
    return problems, overrides


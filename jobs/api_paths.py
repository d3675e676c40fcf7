"""Paths in a recipe submitted over HTTP: confined to the athanor home.

A recipe posted to `athanor serve` has no directory of its own, so every path it holds is read as relative to
the athanor home and must stay inside it (after symlinks are resolved); absolute paths are accepted only inside
the home, and `..` is refused outright. Which strings are paths is a property of their type
(athanor/convert/recipe_types.py): every field typed RecipePath, RecipeGlob, RecipeCacheDir, TeacherFile,
ModelRef, DataLoader or TrackingURI, in every section of every method, nested sections, lists and dicts
included, is found by `path_fields`; a test walks the schema so that no string field can be left untyped.

- files and folders: resolved inside the home; a folder is walked (bounded) and a symlink in it that leads out
  of the home is refused;
- globs: expanded inside the home, every match confined; the job gets the list of matches, so it reads
  exactly what was checked even if the tree changes later;
- model sources and loaders: `pkg:` sources and hub ids (`org/name` that names no directory under the home;
  one that names a directory under the server's working directory is refused, as the worker would read that)
  are not paths; anything else is;
- tracking URIs: a local store (a folder, `file:`, `sqlite:` in any `sqlite+driver` spelling) must be inside
  the home; remote stores (`http(s)://`, database servers) are left alone;
- a path read inside the teacher's folder (`lora_composer.concepts.*.path`): a relative one is confined by the
  method to the (confined) teacher folder; an absolute one must be inside the home.

Each accepted relative path becomes an absolute one inside the home through an extra override stored with the
job, so the worker reads exactly what was checked whatever its working directory.

    .venv/bin/python -m pytest tests/jobs/test_api.py tests/jobs/test_api_paths.py -q
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from athanor.convert.recipe_types import PathRole, path_fields
from athanor.jobs.recipe import LoadedRecipe, Problem
from athanor.jobs.sources import looks_like_hub_id

LOCAL_SCHEMES = ("", "file", "sqlite")
MAX_ENTRIES = 10_000
"""Most files a glob or folder of an HTTP recipe may name: each is checked, and the job reads them all."""


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
    written = uri.partition(":")[0] if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", uri) else ""
    scheme = written.lower().partition("+")[0]  # sqlite+pysqlite is SQLite too
    if scheme not in LOCAL_SCHEMES:
        return None
    if scheme == "sqlite":
        if not uri.startswith(f"{written}:///"):
            raise Escape("a local SQLite store is sqlite:///<path>; use a path inside the athanor home")
        return f"{written}:///{place(uri[len(written) + 4:], home)}"
    if scheme == "file":
        rest = uri[len("file:"):]
        rest = rest[2:] if rest.startswith("//") else rest
        if rest and not rest.startswith("/"):
            raise Escape("a file: URI names no host here; use file:///<path> inside the athanor home")
        return place(rest, home).as_uri()
    return str(place(uri, home))


def _walk_folder(root: Path, home: Path) -> None:
    """A folder the job will read: no symlink inside it may lead out of the home (checked for at most
    MAX_ENTRIES entries; a larger tree is refused, name a smaller folder or a glob)."""
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            seen += 1
            if seen > MAX_ENTRIES:
                raise Escape(f"the folder holds more than {MAX_ENTRIES} entries; name a smaller folder")
            entry = Path(dirpath) / name
            if entry.is_symlink() and not _inside(Path(os.path.realpath(entry)), home):
                raise Escape(f"{entry.relative_to(root)} inside it is a symlink that leaves the athanor home")


def _file(value: str, home: Path) -> str:
    placed = place(value, home)
    if placed.is_dir():
        _walk_folder(placed, Path(os.path.realpath(home)))
    return str(placed)


def _glob(value: str, home: Path) -> list[str]:
    """The matches of a glob inside the home, each confined (a plain path is one match)."""
    if not glob.has_magic(value):
        return [_file(value, home)]
    place(value, home)  # refuses '..', `~user` and a pattern that starts outside the home
    pattern = value if Path(value).is_absolute() else str(Path(os.path.realpath(home)) / value)
    matches = []
    for match in glob.iglob(pattern, recursive=True):
        if len(matches) == MAX_ENTRIES:
            raise Escape(f"the glob matches more than {MAX_ENTRIES} paths; name a folder or a narrower glob")
        try:
            matches.append(_file(match, home))
        except Escape as exc:
            raise Escape(f"its match {Path(match).relative_to(home) if _inside(Path(match), home) else match} "
                         f"{exc}") from None
    if not matches:
        raise Escape("no file under the athanor home matches it")
    return matches


def _teacher_file(value: str, home: Path) -> str | None:
    """Relative: the method keeps it inside the teacher's folder (no '..'). Absolute: inside the home."""
    if any(part == ".." for part in re.split(r"[\\/]", value)):
        raise Escape("'..' is not allowed in paths of a recipe submitted over HTTP")
    return _file(value, home) if Path(value).expanduser().is_absolute() or value.startswith("~") else None


def _loader(value: str, home: Path) -> str | None:
    """A `datasets` loader that is a path (a script or folder) is confined; 'json', 'text' and hub
    datasets (`org/name`) are not paths."""
    return _source(value, home) if "/" in value or value.startswith((".", "~")) else None


FIXES: dict[str, Callable[[str, Path], Any]] = {
    "file": _file, "glob": _glob, "source": _source, "loader": _loader, "store": _tracking}


def _confine_one(key: str, value: Any, role: PathRole, home: Path) -> tuple[Problem | None, str | None]:
    """(problem, override) for one field: the absolute, confined form of what it names (None: left as is)."""
    fix = _teacher_file if role.base == "teacher" else FIXES[role.kind]
    try:
        if isinstance(value, list):
            placed = [fix(v, home) for v in value]
            flat = [m for p, v in zip(placed, value) for m in (p if isinstance(p, list) else [v if p is None else p])]
            absolute = None if all(p is None for p in placed) else flat
        else:
            absolute = fix(value, home)
    except Escape as exc:
        return Problem(key, None, value, str(exc)), None
    if absolute is None or absolute == value:
        return None, None
    return None, f"{key}={json.dumps(absolute)}"


def confine(loaded: LoadedRecipe, home: Path) -> tuple[list[Problem], list[str]]:
    """Every path-typed field of an HTTP recipe checked against the home: (problems naming the key, the
    overrides that make the accepted paths absolute)."""
    problems, overrides = [], []
    for key, section, name, role in path_fields(loaded.recipe):
        value = getattr(section, name)
        if value is None or value == [] or (role.kind == "store" and value == ""):
            continue
        problem, override = _confine_one(key, value, role, home)
        if problem is not None:
            problems.append(problem)
        elif override is not None:
            overrides.append(override)
    return problems, overrides

"""Reading a recipe document defensively, before pydantic sees it: file → text → dict with the `-o`
overrides applied, and the `Problem` lines every recipe error becomes. Recipes come from users,
editors and scripts, so a bad one must end as one line per problem naming its key, never a
traceback, a hang or a multi-megabyte error (issue 9).

- the file: at most `MAX_RECIPE_BYTES`, a regular file, UTF-8 (a UTF-8 or UTF-16 byte-order mark is
  honoured; binary data, UTF-16 without a BOM and invalid UTF-8 are named as such);
- the YAML: `RecipeLoader`, a `yaml.SafeLoader` (no Python tags) that also refuses more than
  `MAX_ALIASES` alias uses, aliases expanding the document past `MAX_NODES` nodes, self-referencing
  anchors, nesting deeper than `MAX_DEPTH` and duplicate mapping keys; scalars follow YAML 1.2 for
  booleans (only true/false: `on`/`yes` stay strings) and floats (`1e-4` is a number, as users mean).

    .venv/bin/python -m pytest tests/jobs/test_hostile_recipes.py -q
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from athanor.convert.recipe_types import one_line, short_repr

MAX_RECIPE_BYTES = 256 * 1024
"""The largest recipe accepted: the biggest shipped recipe is ~4 KiB; a larger file is not a recipe."""
MAX_ALIASES = 20
"""Alias uses (`*name`) per document: merge keys reuse a block a few times; more is an alias bomb."""
MAX_NODES = 200_000
"""Nodes after aliases are expanded: a 1 KiB alias bomb otherwise expands to gigabytes of errors."""
MAX_DEPTH = 50
"""Nesting depth: recipes nest 4 levels; 1000 levels overflow the composer's recursion."""
MAX_PROBLEMS = 50
"""Problems listed per recipe; past that the list says how many more (a broken 256 KiB file can hold
100,000 errors, and nobody reads more than the first screen)."""
MISSING = object()
"""`Problem.value` when there is no value to show (a missing key, a YAML error)."""

_BOOL = "tag:yaml.org,2002:bool"
_FLOAT = "tag:yaml.org,2002:float"
_INT = "tag:yaml.org,2002:int"
_MERGE = "tag:yaml.org,2002:merge"


class RecipeYAMLError(yaml.MarkedYAMLError):
    """A document the recipe loader refuses; `path` is the dotted key path where known."""

    def __init__(self, problem: str, mark: yaml.Mark | None, path: str = "(yaml)") -> None:
        super().__init__(problem=problem, problem_mark=mark)
        self.path = path


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader with limits on aliases, size after expansion and depth, and no duplicate keys."""

    yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _FLOAT, _INT)]
                               for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._path: list[Any] = []
        """Key path of the node being composed (its length is the nesting depth), for error lines."""

    def _refuse(self, problem: str) -> RecipeYAMLError:
        where = ".".join(str(p) for p in self._path[1:] if p is not None) or "(yaml)"
        return RecipeYAMLError(problem, self.peek_event().start_mark, where)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        # `index`: the key node for a mapping value, the position for a sequence item, None for a key.
        self._path.append(index.value if isinstance(index, yaml.ScalarNode) else index)
        try:
            if self.check_event(yaml.AliasEvent):
                self._aliases += 1
                if self._aliases > MAX_ALIASES:
                    raise self._refuse(f"more than {MAX_ALIASES} aliases (*name); write the values out")
            if len(self._path) > MAX_DEPTH:
                raise self._refuse(f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._path.pop()

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None:
            _expanded_size(node, {}, set())
            _refuse_duplicate_keys(node, (), set())
        return node


# YAML 1.2 integers: decimal without a leading zero, 0o octal, 0x hex. YAML 1.1's `010` (octal 8), `1:30`
# (sexagesimal 90) and `0b11` stay strings, so an integer field refuses them by name instead of reading a surprise.
RecipeLoader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                   list("-+0123456789"))


def _construct_int(loader: RecipeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    return int(text[2:], 8) if text.startswith("0o") else int(text[2:], 16) if text.startswith("0x") else int(text)


RecipeLoader.add_constructor(_INT, _construct_int)
RecipeLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
RecipeLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"^(?![-+]?0[0-9_]+$)(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """Nodes in the document once every alias is expanded (each shared node counted per use); refuses
    cycles (`&a [*a]`) and expansions past MAX_NODES. Memoised, so linear in the composed nodes."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise RecipeYAMLError("an alias refers to the collection that holds it (a cycle)", node.start_mark)
    open_.add(key)
    total = 1 + sum(_expanded_size(child, sizes, open_) for child in _children(node))
    open_.discard(key)
    if total > MAX_NODES:
        raise RecipeYAMLError(f"aliases expand the document past {MAX_NODES:,} values", node.start_mark)
    sizes[key] = total
    return total


def _refuse_duplicate_keys(node: yaml.Node, path: tuple, seen: set[int]) -> None:
    """YAML keeps the last of two equal keys silently, so `lr` set twice trains with the one the author
    did not look at; refuse it, naming both lines. Merge keys (`<<: *base`) may be overridden."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE:
                line = key.start_mark.line + 1
                if (key.tag, key.value) in first_line:
                    where = ".".join(str(p) for p in (*path, key.value))
                    raise RecipeYAMLError(f"duplicate key (lines {first_line[key.tag, key.value]} and {line}); "
                                          "YAML would silently keep the last one: remove one", key.start_mark, where)
                first_line[key.tag, key.value] = line
            name = key.value if isinstance(key, yaml.ScalarNode) else "?"
            _refuse_duplicate_keys(value, (*path, name), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, (*path, i), seen)


def safe_load(text: str) -> Any:
    """The document in `text`, through RecipeLoader (safe tags only; what `yaml.safe_load` does)."""
    loader = RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def compose(text: str) -> yaml.Node | None:
    """The node tree of `text` with the same limits (for line numbers)."""
    loader = RecipeLoader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


class RecipeFileError(Exception):
    """The file cannot be a recipe (size, type, encoding); the message is one line."""


def decode(raw: bytes) -> str:
    """Recipe bytes as text: UTF-8 (BOM optional), or UTF-16 with its BOM; anything else is refused
    with what it looks like, because a decoding traceback names neither the file nor the fix."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            raise RecipeFileError("not valid UTF-16 after its byte-order mark; save the recipe as UTF-8") from None
    if b"\x00" in raw:
        half = raw[1::2] if raw[:1] != b"\x00" else raw[::2]
        if raw and half.count(0) * 2 >= len(half):
            raise RecipeFileError("UTF-16 text without a byte-order mark; save the recipe as UTF-8")
        raise RecipeFileError("a binary file (NUL bytes), not YAML text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RecipeFileError(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                              "save the recipe as UTF-8") from None


def read_recipe_bytes(path: str | Path) -> bytes:
    """At most MAX_RECIPE_BYTES of a regular file: a FIFO would block the open and /dev/zero never ends
    (opened non-blocking, so a FIFO is refused instead of waiting for a writer)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise RecipeFileError("not a regular file (a directory, device or pipe)")
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise RecipeFileError(f"cannot read recipe: {exc.strerror or exc}") from None
    check_size(len(raw))
    return raw


def check_size(n_bytes: int) -> None:
    if n_bytes > MAX_RECIPE_BYTES:
        raise RecipeFileError(f"larger than {MAX_RECIPE_BYTES // 1024} KiB; a recipe is a few KiB of YAML")


@dataclass
class Problem:
    """One recipe error: where it is, what was there, what is allowed."""

    path: str
    line: int | None
    value: Any
    message: str

    def render(self, file: str = "recipe") -> str:
        """One line, whatever the recipe held: key, value and message are shortened and escaped."""
        where = f"{one_line(file, 300)}:{self.line}" if self.line else one_line(file, 300)
        shown = "" if self.value is MISSING else f" = {short_repr(self.value)}"
        key = one_line(self.path) if self.path.strip() else repr(self.path)  # a blank key stays visible
        return f"{where}: {key}{shown}: {one_line(self.message, 600)}"


def render_problems(problems: list[Problem], file: str = "recipe", limit: int = MAX_PROBLEMS) -> list[str]:
    """The first `limit` problems, one line each, and a last line counting the rest."""
    lines = [p.render(file) for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"{one_line(file, 300)}: … and {len(problems) - limit} more problem(s) not shown")
    return lines


class RecipeInvalid(Exception):
    """Every problem found in a recipe, rendered one per line (at most MAX_PROBLEMS of them)."""

    def __init__(self, problems: list[Problem], file: str = "recipe") -> None:
        problems = sorted(problems, key=lambda p: (p.line is None, p.line or 0))
        self.problems, self.file = problems, file
        super().__init__("\n".join(render_problems(problems, file)))


def line_map(text: str) -> dict[tuple, int]:
    """Map each key path in the YAML document to its 1-based line (keys and sequence items)."""
    lines: dict[tuple, int] = {}
    try:
        root = compose(text)  # the recipe loader's limits: this walk would otherwise expand alias bombs
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node, path: tuple) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                walk(value, path + (name,))
                lines[path + (name,)] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    if root is not None:
        walk(root, ())
    return lines


def _yaml_problem(exc: yaml.YAMLError, text: str) -> Problem:
    """One line for a YAML error: where (line), and the parser's own words or the loader's refusal."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = mark.line + 1 if mark else None
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        return Problem("(yaml)", line, MISSING, f"not valid YAML text: character {exc.character!r} is not allowed")
    if hasattr(exc, "path"):  # RecipeYAMLError: a limit of the recipe loader
        return Problem(exc.path, line, MISSING, exc.problem)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    return Problem("(yaml)", line, MISSING, f"not valid YAML: {problem}" + (f" ({context})" if context else ""))


def apply_override(data: dict, override: str) -> Problem | None:
    """Apply `a.b.c=value` (value parsed by the recipe YAML loader) to a nested dict. A malformed
    override comes back as a Problem instead of an exception, so every bad `-o` is listed at once."""
    key, sep, raw = override.partition("=")
    parts = [part.strip() for part in key.split(".")]
    if not sep or not all(parts):
        return Problem(f"-o {override}", None, MISSING, "an override looks like key.path=value, "
                                                         "e.g. -o train.max_steps=50")
    path = ".".join(parts)
    try:
        value = safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        return Problem(path, None, raw, f"override value: {_yaml_problem(exc, raw).message}")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            return Problem(path, None, value, f"'{where}' holds a {type(child).__name__}, not a section: "
                                              "no key can be set inside it")
        node = child
    node[parts[-1]] = value
    return None


def read_text(path: str | Path | None, text: str | None, file: str) -> str:
    """The recipe text, size-capped and decoded; one `(file)` problem when it cannot be a recipe."""
    try:
        if text is None:
            return decode(read_recipe_bytes(path))
        check_size(len(text.encode("utf-8", "replace")))
        return text
    except RecipeFileError as exc:
        raise RecipeInvalid([Problem("(file)", None, MISSING, str(exc))], file) from None


def parse(text: str, overrides: list[str], file: str) -> dict:
    """The document as a dict with the overrides applied; RecipeInvalid for YAML or override problems."""
    try:
        data = safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeInvalid([_yaml_problem(exc, text)], file) from None
    if not isinstance(data, dict):
        raise RecipeInvalid([Problem("(top level)", 1, MISSING, "a recipe is a YAML mapping of sections")], file)
    problems = [p for p in (apply_override(data, o) for o in overrides) if p is not None]
    keys = [key for key in (".".join(part.strip() for part in o.partition("=")[0].split(".")) for o in overrides
                            if "=" in o) if all(key.split("."))]  # a malformed one is already a problem
    problems += [Problem(key, None, MISSING, f"set {keys.count(key)} times with -o; give it once")
                 for key in dict.fromkeys(keys) if keys.count(key) > 1]
    if problems:
        raise RecipeInvalid(problems, file)
    return data

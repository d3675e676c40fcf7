"""`athanor new-method NAME`: the skeleton of a new conversion method, in a checkout of this repository.

It writes a working method (a random MLP teacher distilled into a narrower MLP: `jobs/scaffold_templates.py`)
that passes the protocol tests and runs its tiny recipe end to end, so a method author starts from green and
replaces the model, data and metrics. Exactly these change (CONTRIBUTING.md lists what each is for):

    distill/<name>/__init__.py, config.py, method.py, train.py     the method package
    recipes/<name>_tiny.yaml                                        its tiny recipe
    tests/distill/<name>/test_method.py                             its test (the tiny recipe end to end)
    jobs/methods.py                                                 one registry line

Tests: `.venv/bin/python -m pytest tests/jobs/test_scaffold.py -q`.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template

from athanor.jobs import scaffold_templates as templates

NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
"""A method name is a lower-case Python identifier: it names a package, a recipe section and a registry key."""
REGISTRY = "jobs/methods.py"
REGISTRY_OPEN = "METHODS: dict[str, str] = {\n"


class ScaffoldError(ValueError):
    """A name or a checkout the scaffold refuses; the message is one line."""


@dataclass(frozen=True)
class Skeleton:
    """What `create` wrote, relative to the checkout."""

    created: list[str]
    registry_line: str


def class_name(name: str) -> str:
    """The method's class name: 'my_method' -> 'MyMethod'."""
    return "".join(part.capitalize() for part in name.split("_") if part)


def files_for(name: str) -> dict[str, str]:
    """Path in the checkout -> the text written there."""
    values = {"name": name, "Class": class_name(name)}
    parts = {
        f"distill/{name}/__init__.py": templates.INIT,
        f"distill/{name}/config.py": templates.CONFIG,
        f"distill/{name}/method.py": templates.METHOD,
        f"distill/{name}/train.py": templates.TRAIN,
        f"recipes/{name}_tiny.yaml": templates.RECIPE,
        f"tests/distill/{name}/test_method.py": templates.TEST,
    }
    return {path: _sorted_imports(Template(text).substitute(values)) for path, text in parts.items()}


def _sorted_imports(text: str) -> str:
    """Runs of one-line `from athanor... import` statements in module order, as ruff's isort wants them: where
    the method's own modules go among athanor's depends on its name."""
    lines, out = text.split("\n"), []
    for line in lines:
        run = out[-1] if out and isinstance(out[-1], list) else None
        if line.startswith("from athanor."):
            out.append([line]) if run is None else run.append(line)
        else:
            out.append(line)
    return "\n".join(line for item in out
                     for line in (sorted(item, key=lambda s: s.split()[1]) if isinstance(item, list) else [item]))


def registered_names(registry: str) -> set[str]:
    """Names in the METHODS dict of a jobs/methods.py text (read, not imported: the checkout may not be the
    installed one)."""
    body = registry.partition(REGISTRY_OPEN)[2].partition("\n}")[0]
    return set(re.findall(r'^\s*"([^"]+)"\s*:', body, re.MULTILINE))


def check(name: str, root: Path) -> str:
    """The registry's text, after refusing a bad name, a taken one or a folder that is not a checkout."""
    if not NAME.fullmatch(name) or keyword.iskeyword(name) or name.endswith("_"):
        raise ScaffoldError(f"{name!r} is not a method name: use a lower-case Python identifier such as 'my_method' "
                            "(letters, digits, '_'; at most 40 characters)")
    registry = root / REGISTRY
    if not registry.is_file() or not (root / "distill" / "spec.py").is_file():
        raise ScaffoldError(f"{root} is not an athanor checkout (no {REGISTRY}): run this from the repository root "
                            "or give --root")
    text = registry.read_text()
    if REGISTRY_OPEN not in text:
        raise ScaffoldError(f"{registry} has no `{REGISTRY_OPEN.strip()}` to add the method to")
    if name in registered_names(text):
        raise ScaffoldError(f"method {name!r} already exists in {REGISTRY}: choose another name")
    # A module of that name beside the package would shadow it or be shadowed (distill/spec.py for 'spec').
    places = (f"distill/{name}", f"distill/{name}.py", f"convert/{name}", f"convert/{name}.py",
              f"recipes/{name}_tiny.yaml", f"tests/distill/{name}")
    if taken := next((p for p in places if (root / p).exists()), None):
        raise ScaffoldError(f"{name!r} is taken: {taken} exists; choose another name")
    return text


def create(name: str, root: Path | str = ".") -> Skeleton:
    """Write the skeleton of method `name` into the checkout at `root` and register it (one line)."""
    root = Path(root).resolve()
    registry = check(name, root)
    files = files_for(name)
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    line = f'    "{name}": "athanor.distill.{name}:{class_name(name)}",\n'
    head, _, tail = registry.partition(REGISTRY_OPEN)
    entries, closing, rest = tail.partition("}\n")
    (root / REGISTRY).write_text(head + REGISTRY_OPEN + entries + line + closing + rest)
    return Skeleton(sorted(files), line.strip())


def next_steps(name: str, skeleton: Skeleton) -> list[str]:
    """What `athanor new-method` prints after writing the skeleton."""
    return [*(f"created {path}" for path in skeleton.created), f"registered {skeleton.registry_line} in {REGISTRY}",
            f"next: .venv/bin/python -m pytest tests/distill/{name} tests/jobs/test_protocol.py -k {name} -q, then "
            f"replace the MLP in distill/{name}/method.py (checklist: CONTRIBUTING.md)"]

"""The README and docs/*.md say only what is true of this checkout, checked in process and fast (no job runs, no
subprocess, no model is built):

- every fenced block has a language; `text` blocks are output samples and are skipped on purpose;
- shell blocks (`bash`): every `athanor ...` command parses with the CLI's own parser (`jobs/cli.py`'s
  `build_parser`), and the recipe of a `validate`/`submit` loads and passes the recipe schema with the overrides
  given (`load_recipe`; the full `athanor validate` of every shipped recipe, models on the meta device, is
  tests/recipes/test_shipped_recipes.py's); every `make` target is one the Makefile defines; every script
  exists, and a benchmark's `--flags` are ones it declares; any other program must be in `EXTERNAL`;
- `python` blocks compile, and every `athanor` module and name they import exists; a block fenced
  `python runnable` (self-contained and cheap) also runs;
- `yaml` blocks parse, and each validates as a recipe (a whole one as written, a fragment as the sections it
  replaces in a shipped recipe); `json` blocks parse, and a job sample validates against the API's `JobDetail`;
- every repository path written in backticks (`recipes/...`, `jobs/...`) exists, every relative link resolves
  (headings included), and the README stays a front door that links every page of docs/.

A failure names the file, the line and the command or block.

    .venv/bin/python -m pytest tests/test_docs.py -q -n 0
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))
DOCS = [README, *PAGES]
IDS = [str(p.relative_to(REPO)) for p in DOCS]

README_MAX_CHARS = 6000
FRONT_DOOR_LINES = (  # CI runs the README's `make test`; both lines stay exactly as they are
    "make demo   # builds .venv, distils all-MiniLM-L6-v2 into a 3-layer student, prints before/after and its "
    "wall time",
    "make test   # builds .venv, runs the whole test suite (unit, end-to-end, 2-process DDP/DeepSpeed, UI, "
    "Slurm/Ray/PostgreSQL)",
)
SHELL = {"bash", "sh", "shell", "console"}
SKIPPED = {"text"}  # output samples, error lines: nothing to run
EXTERNAL = {"curl", "export", "git", "apt-get", "openssl", "jq", "cd", "cat"}  # programs not from this repository
REPO_DIRS = ("jobs/", "convert/", "distill/", "kernels/", "recipes/", "benchmarks/", "tests/", "docs/", ".ci/")
REPO_FILES = {"Makefile", "pyproject.toml", "requirements.lock", "README.md", "CONTRIBUTING.md"}
BASE_RECIPES = ("minilm_tiny", "sinklora_tiny", "sentencevae_tiny", "koala_tiny", "linvideo_tiny",
                "lora_composer_fashion")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the block's first content line
    lang: str
    text: str
    runnable: bool = False  # the fence says `python runnable`: self-contained and cheap, so the test runs it

    def at(self, offset: int = 0) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line + offset}"


def fenced_blocks(path: Path) -> list[Block]:
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(\s*)(`{3,})\s*([\w+-]*)(.*)", lines[i])
        if not fence:
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence.group(2)):
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{path.relative_to(REPO)}:{start}: unclosed code fence"
        blocks.append(Block(path, start + 1, fence.group(3).lower(), "\n".join(body), "runnable" in fence.group(4)))
        i += 1
    return blocks


def prose(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of the text outside fenced blocks."""
    out, inside = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside = not inside
        elif not inside:
            out.append((n, line))
    return out


# ---------------------------------------------------------------------------------------------------- shell


def shell_commands(block: Block) -> list[tuple[int, str, list[str]]]:
    """(line offset, source text, argv) for every simple command: continuations joined, comments dropped, split
    at `;`, `&&`, `||`, `|` and `&`, redirections and leading VAR=value assignments removed."""
    commands, lines, n = [], block.text.splitlines(), 0
    while n < len(lines):
        first, text = n, lines[n]
        while text.endswith("\\") and n + 1 < len(lines):
            n += 1
            text = text[:-1] + " " + lines[n]
        n += 1
        lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split, lexer.commenters = True, "#"
        try:
            tokens = list(lexer)
        except ValueError as exc:
            commands.append((first, text, ["<unparsable>", str(exc)]))
            continue
        argv: list[str] = []
        redirect = False
        for token in [*tokens, ";"]:
            if token and set(token) <= set(";&|"):
                if argv:
                    while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
                        argv.pop(0)
                    if argv:
                        commands.append((first, text.strip(), argv))
                argv, redirect = [], False
            elif token and set(token) <= set("<>"):
                redirect = True
            elif not redirect:
                argv.append(token)
    return commands


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", (REPO / "Makefile").read_text(), re.M))


def script_flags(script: Path) -> set[str]:
    """Every option string a script's argparse declares (and --no-X for --X)."""
    flags = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("-"):
                    flags |= {arg.value, "--no-" + arg.value.lstrip("-")}
    return flags


def check_athanor(argv: list[str]) -> str | None:
    from athanor.jobs.cli import build_parser
    from athanor.jobs.recipe import load_recipe
    from athanor.jobs.recipe_yaml import RecipeInvalid

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv)
    except SystemExit:
        return "the CLI refuses it: " + " ".join(err.getvalue().split())[-300:]
    if args.command in ("validate", "submit"):
        if not (REPO / args.recipe).is_file():
            return f"no recipe {args.recipe}"
        try:
            load_recipe(REPO / args.recipe, overrides=args.override)
        except RecipeInvalid as exc:
            return "the recipe is invalid: " + "; ".join(p.render(args.recipe) for p in exc.problems)
    return None


def check_python_command(argv: list[str]) -> str | None:
    rest = argv[1:]
    if rest[:2] == ["-m", "pytest"]:
        missing = [a for a in rest[2:] if a.startswith("tests/") and not (REPO / a.split("::")[0]).exists()]
        return f"no such test file: {missing}" if missing else None
    if rest[:1] == ["-m"]:
        return None
    if not rest or not (REPO / rest[0]).is_file():
        return f"no script {rest[:1]}"
    if rest[0].startswith("benchmarks/"):
        unknown = [a.split("=")[0] for a in rest[1:] if a.startswith("-")
                   and a.split("=")[0] not in script_flags(REPO / rest[0])]
        if unknown:
            return f"{rest[0]} declares no option {unknown}"
    return None


def check_command(argv: list[str]) -> str | None:
    program = argv[0]
    if program == "<unparsable>":
        return f"shell syntax: {argv[1]}"
    if program in ("athanor", ".venv/bin/athanor"):
        return check_athanor(argv[1:])
    if program == "make":
        unknown = [a for a in argv[1:] if "=" not in a and not a.startswith("-") and a not in makefile_targets()]
        return f"the Makefile has no target {unknown}" if unknown else None
    if program in ("python", "python3", ".venv/bin/python"):
        return check_python_command(argv)
    if program in (".", "source"):
        return None if (REPO / argv[1]).exists() else f"nothing to source at {argv[1]}"
    if "/" in program:
        return None if (REPO / program).is_file() else f"no script {program}"
    if program in EXTERNAL:
        missing = [a for a in (t.lstrip("@") for t in argv[1:]) if a.startswith(REPO_DIRS) and not (REPO / a).exists()]
        return f"no such path {missing}" if missing else None
    return f"unknown program {program!r}: add it to EXTERNAL in tests/test_docs.py, or fence an output sample as text"


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_every_shell_command_parses_and_names_what_exists(doc, monkeypatch):
    monkeypatch.chdir(REPO)
    stale = []
    for block in fenced_blocks(doc):
        if block.lang in SHELL:
            for offset, text, argv in shell_commands(block):
                if problem := check_command(argv):
                    stale.append(f"{block.at(offset)}: `{text}`: {problem}")
    assert not stale, "stale commands:\n" + "\n".join(stale)


# --------------------------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_every_code_block_says_its_language(doc):
    known = SHELL | SKIPPED | {"python", "yaml", "json"}
    bad = [f"{b.at(-1)}: a ``` block {'without a language' if not b.lang else f'in {b.lang!r}'} (use one of "
           f"{sorted(known)}; `text` for output samples, which are not checked)"
           for b in fenced_blocks(doc) if b.lang not in known]
    assert not bad, "\n".join(bad)


def defined_names(module_file: Path) -> set[str]:
    names = set()
    for node in ast.parse(module_file.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def athanor_module(name: str) -> Path | None:
    """The file of module `athanor.x.y` in this checkout (the root folders are athanor's subpackages)."""
    base = REPO.joinpath(*name.split(".")[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_python_blocks_compile_and_import_what_exists(doc, monkeypatch):
    """Every block compiles and imports only what exists; a `python runnable` block also runs, from the repository
    root, with stdout captured."""
    monkeypatch.chdir(REPO)
    stale = []
    for block in (b for b in fenced_blocks(doc) if b.lang == "python"):
        try:
            tree = ast.parse(compile(block.text, block.at(), "exec", ast.PyCF_ONLY_AST))
        except SyntaxError as exc:
            stale.append(f"{block.at((exc.lineno or 1) - 1)}: does not compile: {exc.msg}")
            continue
        if block.runnable:
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(compile(block.text, block.at(), "exec"), {"__name__": "__doc_block__"})
            except Exception as exc:  # noqa: BLE001 — any failure of a documented example is the finding
                stale.append(f"{block.at()}: the runnable block fails: {type(exc).__name__}: {exc}"[:600])
        for node in ast.walk(tree):
            modules = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("athanor."):
                modules = [(node.module, [a.name for a in node.names])]
            elif isinstance(node, ast.Import):
                modules = [(a.name, []) for a in node.names if a.name.startswith("athanor.")]
            for module, names in modules:
                where = f"{block.at(node.lineno - 1)}: `{ast.unparse(node)}`"
                file = athanor_module(module)
                if file is None:
                    stale.append(f"{where}: no module {module}")
                    continue
                missing = [n for n in names if n not in defined_names(file) and athanor_module(f"{module}.{n}") is None]
                if missing:
                    stale.append(f"{where}: {module} defines no {missing}")
    assert not stale, "stale Python:\n" + "\n".join(stale)


def recipe_problems(data: dict) -> list[str]:
    """[] when `data` is a valid recipe, or valid as the sections it replaces in some shipped recipe."""
    from athanor.jobs.recipe import load_recipe
    from athanor.jobs.recipe_yaml import RecipeInvalid

    if "method" in data:
        candidates = [data]
    else:
        candidates = [{**yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text()), **data}
                      for name in BASE_RECIPES]
    first = []
    for candidate in candidates:
        try:
            load_recipe(text=yaml.safe_dump(candidate, sort_keys=False))
            return []
        except RecipeInvalid as exc:
            first = first or [p.render("recipe") for p in exc.problems]
    return first


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_yaml_blocks_are_valid_recipes_or_recipe_sections(doc, monkeypatch):
    monkeypatch.chdir(REPO)
    stale = []
    for block in (b for b in fenced_blocks(doc) if b.lang == "yaml"):
        try:
            data = yaml.safe_load(block.text)
        except yaml.YAMLError as exc:
            stale.append(f"{block.at()}: not YAML: {' '.join(str(exc).split())}")
            continue
        if not isinstance(data, dict):
            stale.append(f"{block.at()}: not a recipe or recipe sections")
        elif problems := recipe_problems(data):
            stale.append(f"{block.at()}: not a valid recipe (as sections of recipes/{BASE_RECIPES[0]}.yaml): "
                         + "; ".join(problems))
    assert not stale, "stale YAML:\n" + "\n".join(stale)


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_json_blocks_parse_and_job_samples_match_the_api(doc):
    stale = []
    for block in (b for b in fenced_blocks(doc) if b.lang == "json"):
        try:
            data = json.loads(block.text)
        except json.JSONDecodeError as exc:
            stale.append(f"{block.at(exc.lineno - 1)}: not JSON: {exc.msg}")
            continue
        if isinstance(data, dict) and "recipe_hash" in data:
            from pydantic import ValidationError

            from athanor.jobs.api_models import JobDetail

            unknown = sorted(set(data) - set(JobDetail.model_fields))
            if unknown:
                stale.append(f"{block.at()}: JobDetail has no field {unknown}")
            try:
                JobDetail.model_validate(data)
            except ValidationError as exc:
                stale.append(f"{block.at()}: not a JobDetail: {' '.join(str(exc).split())[:500]}")
    assert not stale, "stale JSON:\n" + "\n".join(stale)


# --------------------------------------------------------------------------------------------- paths, links


def repo_path_problem(text: str) -> str | None:
    if not (text.startswith(REPO_DIRS) or text in REPO_FILES) or re.search(r"[<>{}$ ]|\.\.\.|…", text):
        return None
    if any(c in text for c in "*?["):
        return None if list(REPO.glob(text)) else "matches nothing"
    return None if (REPO / text.split("::")[0]).exists() else "does not exist"


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_repository_paths_in_backticks_exist(doc):
    stale = []
    for n, line in prose(doc):
        for span in re.findall(r"`([^`]+)`", line):
            if problem := repo_path_problem(span.strip()):
                stale.append(f"{doc.relative_to(REPO)}:{n}: `{span}` {problem}")
    assert not stale, "stale paths:\n" + "\n".join(stale)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for _, line in prose(path) if re.match(r"^#{1,6} ", line)}


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_relative_links_resolve(doc):
    stale = []
    for n, line in prose(doc):
        for target in re.findall(r"\[[^\]]+\]\(([^)\s]+)\)", line):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            resolved = (doc.parent / file).resolve() if file else doc
            if not resolved.exists():
                stale.append(f"{doc.relative_to(REPO)}:{n}: link to {target}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                stale.append(f"{doc.relative_to(REPO)}:{n}: link to {target}: no heading #{anchor} there")
    assert not stale, "stale links:\n" + "\n".join(stale)


def test_the_readme_is_a_front_door():
    text = README.read_text()
    assert len(text) <= README_MAX_CHARS, (f"README.md has {len(text):,} characters (at most {README_MAX_CHARS:,}): "
                                           "move reference material to a page of docs/ and link it")
    lines = {line.rstrip() for line in text.splitlines()}
    for command in FRONT_DOOR_LINES:
        assert command in lines, f"README.md lost its quick-start line: {command}"
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", text))
    orphans = [str(p.relative_to(REPO)) for p in PAGES if str(p.relative_to(REPO)) not in linked]
    assert not orphans, f"README.md's 'Read on' links no {orphans}"


def test_the_checks_catch_stale_docs(tmp_path):
    """The checks above fail on what they are meant to catch (a renamed flag, target, recipe key or path)."""
    assert check_command(["athanor", "submit", "recipes/minilm_tiny.yaml", "--wiat"])
    assert check_command(["athanor", "validate", "recipes/minilm_tiny.yaml", "-o", "train.max_stpes=5"])
    assert check_command(["athanor", "validate", "recipes/no_such.yaml"])
    assert check_command(["make", "no-such-target"])
    assert check_command([".venv/bin/python", "benchmarks/attention.py", "--no-such-flag"])
    assert check_command(["athanr", "list"])
    assert check_command(["athanor", "status", "JOB"]) is None
    assert repo_path_problem("recipes/no_such.yaml") and repo_path_problem("recipes/minilm.yaml") is None
    assert recipe_problems({"train": {"max_stpes": 5}}) and recipe_problems({"train": {"max_steps": 5}}) == []
    assert repo_path_problem("docs/*.md") is None and repo_path_problem("docs/*.nothing")
    doc = tmp_path / "page.md"
    doc.write_text("intro\n\n```bash\nathanor list  # jobs\nmake demo && \\\n  make lint\n```\n"
                   "```python runnable\nprint(1)\n```\n")
    block, python = fenced_blocks(doc)
    assert (python.lang, python.runnable, python.line, block.runnable) == ("python", True, 9, False)
    assert [(o, argv) for o, _, argv in shell_commands(block)] == [(0, ["athanor", "list"]), (1, ["make", "demo"]),
                                                                   (1, ["make", "lint"])]

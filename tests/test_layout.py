"""House rules that keep six methods livable, checked by reading the source (no imports run):

- `convert/` (surgery) never imports `distill/` or `jobs/`; `kernels/` imports only torch, triton and fla
  (flash-linear-attention, optional: imported only on its CUDA path);
  methods (`convert/`, `distill/`) know nothing of jobs, MLflow or SQLite;
- one package per method: every registered method lives in `distill/<name>/`;
- a module docstring that names a test file names one that exists;
- no test asserts a timing (speed claims live in `benchmarks/`).

    .venv/bin/python -m pytest tests/test_layout.py -q
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from athanor.jobs.methods import METHODS

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("convert", "distill", "kernels", "jobs", "benchmarks", "tests")
                 for p in (REPO / folder).rglob("*.py"))


LAYERS = ("convert", "distill", "kernels", "jobs")


def imported_names(path: Path) -> set[str]:
    """Absolute module names imported anywhere in a file (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def imported_roots(path: Path) -> set[str]:
    """Top-level names imported by a file, athanor's layers by their own name (`athanor.distill.x` -> `distill`)."""
    return {name.removeprefix("athanor.").split(".")[0] for name in imported_names(path)}


def test_project_code_is_imported_only_as_athanor():
    """The layers are installed as athanor.convert, athanor.distill, ...: a bare `import kernels` would pick
    up PyPI's `kernels` (or, from the repository root, a folder), never ours."""
    offenders = {str(p.relative_to(REPO)): sorted(n for n in imported_names(p) if n.split(".")[0] in LAYERS)
                 for p in SOURCES if any(n.split(".")[0] in LAYERS for n in imported_names(p))}
    assert offenders == {}


@pytest.mark.parametrize(("folder", "forbidden"), [
    ("convert", {"distill", "jobs", "mlflow", "sqlite3"}),
    ("distill", {"jobs", "mlflow", "sqlite3"}),
])
def test_layers_import_only_downwards(folder, forbidden):
    offenders = {str(p.relative_to(REPO)): sorted(imported_roots(p) & forbidden)
                 for p in (REPO / folder).rglob("*.py") if imported_roots(p) & forbidden}
    assert offenders == {}


def test_kernels_import_only_torch_and_triton():
    allowed = {"torch", "triton", "fla", "kernels", *sys.stdlib_module_names}
    offenders = {str(p.relative_to(REPO)): sorted(imported_roots(p) - allowed)
                 for p in (REPO / "kernels").rglob("*.py") if imported_roots(p) - allowed}
    assert offenders == {}


@pytest.mark.parametrize("name", sorted(n for n, target in METHODS.items() if target.startswith("athanor.distill.")))
def test_every_method_is_one_package(name):
    module = METHODS[name].partition(":")[0]
    assert module == f"athanor.distill.{name}" and (REPO / "distill" / name / "__init__.py").is_file()
    flat = [p.name for p in (REPO / "distill").glob(f"{name}_*.py")]
    assert flat == [], f"method files outside the package: {flat}"


def test_docstrings_name_test_files_that_exist():
    named = {}
    for path in SOURCES:
        for ref in re.findall(r"tests/[\w/.*-]+?\.py", path.read_text()):
            if not list(REPO.glob(ref)):
                named.setdefault(str(path.relative_to(REPO)), []).append(ref)
    assert named == {}


TIMING_WORDS = re.compile(r"speedup|latency|_ms\b|per_s\b|seconds|elapsed|throughput", re.IGNORECASE)


def test_no_test_asserts_a_timing():
    """An ordering comparison (<, >, <=, >=) on a timing is a flaky test on a loaded machine; equality
    checks that a number is reported consistently are fine."""
    found = []
    for path in (REPO / "tests").rglob("test_*.py"):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Assert):
                continue
            for cmp in (n for n in ast.walk(node.test) if isinstance(n, ast.Compare)):
                ordering = any(isinstance(op, (ast.Lt, ast.Gt, ast.LtE, ast.GtE)) for op in cmp.ops)
                operands = [cmp.left, *cmp.comparators]
                if any(isinstance(o, ast.Set) or (isinstance(o, ast.Call) and getattr(o.func, "id", "") == "set")
                       for o in operands):
                    continue  # a comparison of key sets, not of numbers
                if ordering and TIMING_WORDS.search(ast.get_source_segment(source, cmp) or ""):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.get_source_segment(source, cmp)}")
    assert found == []


SETS_STATUS = re.compile(r"\bUPDATE\s+jobs\s+SET\b(?:(?!\bWHERE\b).)*\bstatus\s*=", re.IGNORECASE | re.DOTALL)


def _sql_texts(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string literal of a module, f-strings with their placeholders kept as `{}`."""
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):
            texts.append((node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)))
    return texts


def test_only_the_lifecycle_writes_a_job_status():
    """jobs/lifecycle.py's `transition` is the one writer of `jobs.status`: no other module has SQL that sets it,
    assigns a `.status`, or passes `status=` to the store's `update` (which refuses it); rows are inserted (PENDING)
    only by JobStore.create."""
    found = []
    for path in sorted((REPO / "jobs").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        if rel == "jobs/lifecycle.py":
            continue
        tree = ast.parse(path.read_text())
        for line, text in _sql_texts(tree):
            if SETS_STATUS.search(text) or (re.search(r"\bINSERT\s+INTO\s+jobs\b", text, re.I)
                                            and rel != "jobs/store.py"):
                found.append(f"{rel}:{line}: SQL writes a job status")
        for node in ast.walk(tree):
            targets = (node.targets if isinstance(node, ast.Assign) else [node.target]
                       if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            if any(isinstance(t, ast.Attribute) and t.attr == "status" for t in targets):
                found.append(f"{rel}:{node.lineno}: assigns .status")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update"
                    and any(k.arg == "status" for k in node.keywords)):
                found.append(f"{rel}:{node.lineno}: update(status=...)")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                    re.search(r"\bUPDATE\s+jobs\b", text, re.I) for _, text in _sql_texts(node)):
                # SQL built from a dict (`SET {sets}`): its keys must not include the status
                keys = [k for d in ast.walk(node) if isinstance(d, ast.Dict) for k in d.keys]
                if any(isinstance(k, ast.Constant) and k.value == "status" for k in keys):
                    found.append(f"{rel}:{node.lineno}: {node.name} builds an UPDATE with a status")
    assert found == []
    lifecycle = (REPO / "jobs" / "lifecycle.py").read_text()
    assert SETS_STATUS.search(lifecycle.replace("{sets}", "status = ?")), "the lifecycle must be the writer"


def test_test_faults_live_in_one_module():
    """Fault injection for tests (ATHANOR_TEST_HOOK) is read only by jobs/fault_hooks.py; the spine calls its hooks."""
    readers = sorted(str(p.relative_to(REPO)) for p in (REPO / "jobs").rglob("*.py")
                     if re.search(r"ATHANOR_TEST|TEST_HOOK|kill_steps|KillAtStep", p.read_text()))
    assert readers == ["jobs/fault_hooks.py"]


HEADER = re.compile(r"^\s+(Args|Student|trains|mlflow_flavor|mlflow_task|auto_class|nan_metrics|metrics)"
                    r"\s*:\s*ClassVar\b", re.MULTILINE)
"""The protocol's class-variable header (`mlflow_flavor: ClassVar[...]`; not `name`, which launchers declare too)."""


def test_the_method_header_is_declared_only_by_the_base_class():
    """MethodBase declares the class variables (and spec.Method lists them); a method states only its values."""
    allowed = {"distill/method_base.py", "distill/spec.py"}
    found = sorted(str(p.relative_to(REPO)) for p in SOURCES
                   if str(p.relative_to(REPO)) not in allowed and HEADER.search(p.read_text()))
    assert found == []


def _package_imports(path: Path, package: str) -> set[str]:
    """Sibling modules of `package` that `path` imports (TYPE_CHECKING and function-level imports included)."""
    prefix = f"athanor.distill.{package}."
    return {name.removeprefix(prefix).split(".")[0] for name in imported_names(path) if name.startswith(prefix)}


@pytest.mark.parametrize("name", sorted(n for n, target in METHODS.items() if target.startswith("athanor.distill.")))
def test_method_packages_have_no_import_circles(name):
    """Modules of a method package import each other one way (config <- train/evaluation <- method); a circle
    (evaluation importing method's Args under TYPE_CHECKING) is what `config.py` exists to break."""
    folder = REPO / "distill" / name
    graph = {p.stem: _package_imports(p, name) for p in folder.glob("*.py") if p.stem != "__init__"}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    assert sorted(m for m in graph if reaches(m, m, set())) == []
    assert (folder / "config.py").is_file(), "a method's recipe sections live in distill/<method>/config.py"


def _module_name(path: Path) -> str:
    return "athanor." + ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def test_jobs_modules_import_no_circle_at_their_top():
    """Module-level imports among jobs/ form no circle (e.g. api -> api_routes -> cli -> api): each module can be
    imported first. A function-level import that closes a circle says so in its `# why:` comment."""
    modules = {_module_name(p): p for p in (REPO / "jobs").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                deps |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names}
        graph[name] = sorted(d for d in deps if d in modules and d != name)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def circle(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for dep in graph[name]:
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep] if dep in path else [*path, dep]
            if dep not in state and (found := circle(dep, [*path, dep])):
                return found
        state[name] = 2
        return None

    circles = [found for name in sorted(graph) if name not in state and (found := circle(name, [name]))]
    assert circles == []

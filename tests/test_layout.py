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

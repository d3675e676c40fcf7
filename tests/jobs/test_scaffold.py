"""`athanor new-method NAME` (jobs/scaffold.py) in a copy of this repository: it writes only the new method's
package, recipe and test and one registry line, refuses taken and invalid names in one line (exit 2), and the
skeleton passes the protocol and layout tests and runs its tiny recipe end to end with the copy's code.

    .venv/bin/python -m pytest tests/jobs/test_scaffold.py -q
"""

from __future__ import annotations

import difflib
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from athanor.jobs import cli

REPO = Path(__file__).resolve().parents[2]
LAYERS = ("convert", "distill", "kernels", "jobs")
NAME = "widget"
CREATED = {f"distill/{NAME}/__init__.py", f"distill/{NAME}/config.py", f"distill/{NAME}/method.py",
           f"distill/{NAME}/train.py", f"recipes/{NAME}_tiny.yaml", f"tests/distill/{NAME}/test_method.py"}


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` -> a digest of its bytes."""
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> tuple[Path, dict[str, str], dict[str, str]]:
    """A copy of the repository's files (tracked and new, not ignored ones: no .venv), scaffolded once:
    (the copy, its files before, after)."""
    copy = tmp_path_factory.mktemp("checkout") / "repo"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():  # a tracked file deleted in the working tree is listed too
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / name, copy / name)  # copies, never links: the scaffold edits jobs/methods.py
    before = snapshot(copy)
    assert cli.main(["new-method", NAME, "--root", str(copy)]) == cli.EXIT_OK
    return copy, before, snapshot(copy)


def test_new_method_writes_only_its_files_and_one_registry_line(checkout):
    copy, before, after = checkout
    assert set(after) - set(before) == CREATED and set(before) - set(after) == set()
    assert {p for p in before if before[p] != after[p]} == {"jobs/methods.py"}
    diff = [line for line in difflib.unified_diff((REPO / "jobs/methods.py").read_text().splitlines(),
                                                  (copy / "jobs/methods.py").read_text().splitlines(), lineterm="")
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert diff == [f'+    "{NAME}": "athanor.distill.{NAME}:Widget",']
    ruff = Path(sys.executable).parent / "ruff"
    sources = sorted(p for p in CREATED if p.endswith(".py"))
    lint = subprocess.run([str(ruff), "check", "--no-cache", "--config", str(REPO / "pyproject.toml"), *sources,
                           "jobs/methods.py"], cwd=copy, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout[-3000:]


@pytest.mark.parametrize(("name", "says"), [
    (NAME, "already exists"), ("minilm", "already exists"), ("spec", "distill/spec.py exists"),
    ("Bad-Name", "not a method name"), ("class", "not a method name"), ("2fast", "not a method name"),
])
def test_new_method_refuses_a_taken_or_invalid_name_in_one_line(checkout, capsys, name, says):
    copy, _, after = checkout
    assert cli.main(["new-method", name, "--root", str(copy)]) == cli.EXIT_BAD_INPUT == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert snapshot(copy) == after


def test_new_method_refuses_a_folder_that_is_not_a_checkout(tmp_path, capsys):
    assert cli.main(["new-method", NAME, "--root", str(tmp_path)]) == cli.EXIT_BAD_INPUT
    assert "not an athanor checkout" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_skeleton_passes_its_tests_with_the_copy_s_code(checkout, tmp_path):
    """The generated test (the tiny recipe through `athanor submit --wait`), the protocol and the layout tests
    for the new method, run by pytest in the copy, importing `athanor` from the copy."""
    copy, _, _ = checkout
    site = tmp_path / "site" / "athanor"  # athanor.distill = the copy's distill/, ahead of the editable install
    site.mkdir(parents=True)
    for layer in LAYERS:
        (site / layer).symlink_to(copy / layer, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "MLFLOW_", "ATHANOR_HOME"))}
    env["PYTHONPATH"] = str(site.parent)
    where = subprocess.run([sys.executable, "-c", "import athanor.jobs.methods as m; print(m.__file__)"], cwd=copy,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).resolve().is_relative_to(copy.resolve()), where
    run = subprocess.run([sys.executable, "-m", "pytest", f"tests/distill/{NAME}", "tests/jobs/test_protocol.py",
                          "tests/test_layout.py", "-k", NAME, "-q", "-n", "0", "-p", "no:cacheprovider"],
                         cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1]

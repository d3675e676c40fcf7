"""athanor owns every top-level import name it installs: one, `athanor`. The layout's root folders are its
subpackages (`athanor.convert` = `convert/`, ...) and are not regular packages themselves, so neither an
installed wheel nor the repository root (on sys.path for `python -m ...` and pytest) ever shadows another
distribution's top-level name; PyPI's `kernels`, which transformers requires, stays importable beside us.

    .venv/bin/python -m pytest tests/test_packages.py -q
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("convert", "distill", "kernels", "jobs")


def _load_setup() -> ModuleType:
    """setup.py as a module (it calls setup() only as __main__): the packages and data it finds."""
    spec = importlib.util.spec_from_file_location("athanor_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETUP = _load_setup()
PACKAGES = sorted(SETUP.FOLDERS)


def repo_files() -> set[str]:
    """Every file of the layers as the wheel names it (athanor/distill/...), caches left out."""
    return {"athanor/" + p.relative_to(REPO).as_posix() for layer in LAYERS for p in (REPO / layer).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def folder_of(package: str) -> Path:
    """The repository folder of an athanor package: athanor.distill.minilm -> distill/minilm."""
    return REPO.joinpath(*package.split(".")[1:])


def test_every_folder_with_code_is_an_installed_package():
    """Every folder with .py files under the layers is installed, found by setup.py (no list to forget a new
    method's folder in): a package where it has an __init__.py (the layer roots always), else its files are
    package data of the package above it (distill/corpus, a data builder's script), like the testbeds' files."""
    installed = {f"athanor/{package.replace('.', '/').removeprefix('athanor/')}/{name}"
                 for package, names in SETUP.PACKAGE_DATA.items() for name in names}
    folders = {p.parent for layer in LAYERS for p in (REPO / layer).rglob("*.py") if "__pycache__" not in p.parts}
    for folder in folders:
        package = "athanor." + ".".join(folder.relative_to(REPO).parts)
        files = {"athanor/" + p.relative_to(REPO).as_posix() for p in folder.glob("*.py")}
        assert package in PACKAGES or files <= installed, f"{folder.relative_to(REPO)} would not be installed"
    packages = {"athanor." + ".".join(p.parent.relative_to(REPO).parts)
                for layer in LAYERS for p in (REPO / layer).rglob("__init__.py") if "__pycache__" not in p.parts}
    assert packages | {f"athanor.{layer}" for layer in LAYERS} == set(PACKAGES)
    assert [p for p in PACKAGES if not folder_of(p).is_dir()] == []


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_from_this_repo(package):
    module = importlib.import_module(package)
    assert Path(next(iter(module.__path__))).resolve() == folder_of(package)


def test_root_folders_are_never_regular_packages():
    """A regular package `kernels/` at the repository root would win over PyPI's `kernels` for any process
    started there; a folder without __init__.py is at most a namespace portion, which never wins."""
    assert [layer for layer in LAYERS if (REPO / layer / "__init__.py").exists()] == []


def test_pypi_kernels_is_installed_and_transformers_sees_it_from_the_repo_root():
    assert importlib.metadata.version("kernels")
    code = ("import kernels, transformers.modeling_utils; from transformers.utils import is_kernels_available; "
            "print(kernels.__file__, is_kernels_available())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    path, available = out.split()
    assert Path(path).is_relative_to(sysconfig.get_paths()["purelib"]) and available == "True"


IMPORT_ALL = """
import importlib, json, sys, kernels
names = json.loads(sys.argv[1])
files = {n: list(importlib.import_module(n).__path__)[0] for n in names}
from athanor.jobs.cli import build_parser
build_parser()
print(json.dumps({"files": files, "kernels": kernels.__file__}))
"""


@pytest.mark.slow
def test_a_wheel_installs_only_athanor_and_runs_outside_the_repository(tmp_path):
    """Build a wheel, install it (no deps) into a fresh venv outside the repository that borrows the locked
    environment's libraries, and import every athanor package and the CLI from a folder that is not the repo."""
    import json

    source, wheels = tmp_path / "source", tmp_path / "wheels"  # a copy: setuptools writes build/ beside the source
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    for layer in LAYERS:
        shutil.copytree(REPO / layer, source / layer, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(source)], check=True, capture_output=True, cwd=tmp_path)
    wheel = next(wheels.glob("athanor-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"athanor"}
    # Every module and every data file of the layers (testbeds, corpus) is in it, none left behind by discovery.
    assert {n for n in zipfile.ZipFile(wheel).namelist() if not n.split("/")[0].endswith(".dist-info")} == repo_files()

    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the repo on it reads as "already installed"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, cwd=tmp_path, env=clean)
    borrowed = {"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": "/usr/bin:/bin", "USE_HUB_KERNELS": "0"}
    done = subprocess.run([str(python), "-c", IMPORT_ALL, json.dumps(PACKAGES)], capture_output=True, text=True,
                          cwd=tmp_path, env=borrowed)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    fresh_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    assert {n: Path(f).is_relative_to(fresh_site) for n, f in report["files"].items()} == dict.fromkeys(PACKAGES, True)
    assert Path(report["kernels"]).is_relative_to(sysconfig.get_paths()["purelib"])
    cli = subprocess.run([str(env_dir / "bin" / "athanor"), "--help"], capture_output=True, text=True, cwd=tmp_path,
                         env=borrowed)
    assert cli.returncode == 0 and "validate" in cli.stdout, cli.stderr[-2000:]

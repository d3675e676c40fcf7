"""The package list and package data, found rather than listed (everything else is in pyproject.toml).

setuptools' declarative `packages.find` names packages after their folders (`distill.minilm`), and athanor
installs its root folders as subpackages of `athanor` (`package-dir` in pyproject.toml), so the list is computed
here: every folder with an `__init__.py` under a root folder is a package, and every other file below a package
(testbeds, the corpus) that no subpackage owns is its package data. A new method's folder needs no edit here.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
LAYERS = ("convert", "distill", "kernels", "jobs")
SKIP = {"__pycache__"}


def _package_folders() -> dict[str, Path]:
    """athanor package name -> its folder (the layer roots are packages without an __init__.py)."""
    folders = {f"athanor.{layer}": ROOT / layer for layer in LAYERS}
    for layer in LAYERS:
        for init in sorted((ROOT / layer).rglob("__init__.py")):
            if not SKIP & set(init.parts):
                folders["athanor." + ".".join(init.parent.relative_to(ROOT).parts)] = init.parent
    return folders


def _data(folder: Path, packages: set[Path]) -> list[str]:
    """Files below `folder` that are not its modules and that no subpackage owns, relative to it."""
    found = []
    for path in sorted(folder.rglob("*")):
        owner = next(p for p in path.parents if p in packages or p == folder)
        if (path.is_file() and owner == folder and not SKIP & set(path.parts) and path.suffix != ".pyc"
                and not (path.parent == folder and path.suffix == ".py")):
            found.append(path.relative_to(folder).as_posix())
    return found


FOLDERS = _package_folders()
PACKAGE_DATA = {name: data for name, folder in FOLDERS.items() if (data := _data(folder, set(FOLDERS.values())))}

if __name__ == "__main__":  # setuptools runs this file as __main__; tests/test_packages.py imports it
    setup(packages=sorted(FOLDERS), package_data=PACKAGE_DATA)

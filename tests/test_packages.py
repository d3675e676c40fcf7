"""The generic top-level names (`kernels`, `convert`, `jobs`, `distill`) must resolve to this repo,
never to a same-named PyPI package (PyPI's `kernels` is one that transformers probes for)."""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["kernels", "convert", "jobs", "distill"])
def test_package_imports_from_this_repo(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == REPO / name


def test_pypi_kernels_package_is_not_installed_and_transformers_does_not_see_ours():
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("kernels")
    code = "from transformers.utils import is_kernels_available; print(is_kernels_available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True).stdout
    assert out.strip() == "False"

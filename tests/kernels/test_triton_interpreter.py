"""Triton kernels (forward and backward) against the PyTorch references, on CPU via TRITON_INTERPRET=1.

The interpreter flag must be set before triton is imported, so the cases run in one subprocess
(`triton_interp_cases.py`) and the flag never reaches other test packages. Tolerances are relative
to the reference's largest magnitude. bf16 is covered for linear attention only: the interpreter's
own bf16 `tl.dot` is wrong on CPU (a plain 16×16 bf16 dot is off by ~1e10), which is a property of
the interpreter, not of the kernels; the sparse kernel's bf16 path needs a GPU to test.
Run: `.venv/bin/python -m pytest tests/kernels/test_triton_interpreter.py -q`
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from triton_interp_cases import LINEAR, SPARSE  # noqa: E402

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def report() -> dict[str, dict[str, float]]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(HERE / "triton_interp_cases.py")],
        env=env, capture_output=True, text=True, timeout=600, cwd=HERE.parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]


@pytest.mark.parametrize("name", list(LINEAR))
def test_linear_triton_matches_reference(report, name):
    errors = report[name]
    assert set(errors) >= {"out", "dq", "dk", "dv"}
    tol = _tolerance(LINEAR[name][-1])
    assert max(errors.values()) < tol, errors


@pytest.mark.parametrize("name", list(SPARSE))
def test_sparse_triton_matches_reference(report, name):
    errors = report[name]
    assert set(errors) == {"out", "dq", "dk", "dv"}
    tol = _tolerance(SPARSE[name][-1])
    assert max(errors.values()) < tol, errors


def test_dispatcher_took_the_triton_path(report):
    assert report["_dispatch"] == {"kernels._linear_triton": 1.0, "kernels._sparse_triton": 1.0}

"""The Triton kernels compile for an H100 (sm_90) in their CUDA launch configuration, on this CPU box.

No GPU is needed to lower a kernel to a cubin (triton ships ptxas); this catches GPU-only compile
errors (type mismatches across branches, dot shape/dtype rules) that the CPU interpreter accepts,
and checks each kernel fits the H100's 227 KiB of shared memory per block.
Slow (about a CPU-minute of ptxas; 22 kernel variants): marked `slow`.
Run: `.venv/bin/python -m pytest tests/kernels/test_triton_compile.py -q -m slow`
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
HERE = Path(__file__).parent
H100_SHARED_BYTES = 227 * 1024
EXPECTED = 3 * 2 + 1 + 7 * 2 + 1  # sparse: 3 kernels × 2 half configs + 1 fp32; linear: 7 × 2 + 1 fp32


@pytest.mark.slow
def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # really compile, and leave no cache behind
    proc = subprocess.run(
        [sys.executable, str(HERE / "triton_compile_cases.py")],
        env=env, capture_output=True, text=True, timeout=600, cwd=HERE.parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == EXPECTED, sorted(report)
    for name, info in report.items():
        assert info["cubin_bytes"] > 0, name
        assert 0 <= info["shared"] <= H100_SHARED_BYTES, (name, info)

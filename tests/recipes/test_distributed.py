"""Two-process training on CPU (gloo): DDP and DeepSpeed ZeRO-2 on the tiny MiniLM recipe.

Both see the same data shards and seeds, so they must train the same student.
    .venv/bin/python -m pytest tests/recipes/test_distributed.py -q
"""

from __future__ import annotations

import pytest
from test_minilm_recipe import TINY, athanor

from jobs.store import JobStore


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_and_deepspeed_zero2_train_the_same_student(home):
    results = {}
    for strategy in ("ddp", "deepspeed_stage_2"):
        done = athanor("submit", str(TINY), "--wait", "--no-progress", "-o", f"train.strategy={strategy}",
                       "-o", "train.devices=2", "-o", "train.accelerator=cpu", "-o", "train.max_steps=16")
        assert done.returncode == 0, done.stderr[-3000:]
        job = JobStore(home).list()[0]
        assert job.status == "SUCCEEDED" and job.model_version is not None
        results[strategy] = job.result["after"]
    assert results["ddp"]["similarity_agreement"] == pytest.approx(results["deepspeed_stage_2"]["similarity_agreement"], abs=2e-3)

"""Two-process training on CPU (gloo): DDP and DeepSpeed ZeRO-2 on the tiny MiniLM recipe.

Both see the same data shards and seeds, so they must train the same student.
    .venv/bin/python -m pytest tests/recipes/test_distributed.py -q
"""

from __future__ import annotations

import pytest
from harness import RECIPES, athanor

from jobs.store import JobStore


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_and_deepspeed_zero2_train_the_same_student(home):
    results, untrained = {}, {}
    for strategy in ("ddp", "deepspeed_stage_2"):
        done = athanor("submit", str(RECIPES / "minilm_tiny.yaml"), "--wait", "--no-progress",
                       "-o", f"train.strategy={strategy}", "-o", "train.devices=2", "-o", "train.accelerator=cpu",
                       "-o", "train.max_steps=16", "-o", "eval.include_untrained=true")
        assert done.returncode == 0, done.stderr[-3000:]
        job = JobStore(home).list()[0]
        assert job.status == "SUCCEEDED" and job.model_version is not None
        results[strategy], untrained[strategy] = job.result["after"], job.result["untrained"]
    agreement = {s: r["similarity_agreement"] for s, r in results.items()}
    assert agreement["ddp"] == pytest.approx(agreement["deepspeed_stage_2"], abs=2e-3)
    # Both really trained: each beats the same untrained student.
    assert untrained["ddp"]["similarity_agreement"] == untrained["deepspeed_stage_2"]["similarity_agreement"]
    assert all(a > untrained["ddp"]["similarity_agreement"] + 0.01 for a in agreement.values()), (agreement, untrained)

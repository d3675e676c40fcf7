"""Two-process training on CPU (gloo): DDP and DeepSpeed ZeRO-2 on the tiny MiniLM recipe.

Both see the same data shards and seeds, so they must train the same student.
    .venv/bin/python -m pytest tests/recipes/test_distributed.py -q
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from harness import RECIPES, athanor

from athanor.jobs.store import JobStore


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
        log = Path(job.log_path).read_text()  # rank 1 is forked from the job's rank server, no fresh interpreter
        assert "rank 1: process" in log and "forked from the rank server" in log and "a fresh interpreter" not in log
    agreement = {s: r["similarity_agreement"] for s, r in results.items()}
    assert agreement["ddp"] == pytest.approx(agreement["deepspeed_stage_2"], abs=2e-3)
    # Both really trained: each beats the same untrained student.
    assert untrained["ddp"]["similarity_agreement"] == untrained["deepspeed_stage_2"]["similarity_agreement"]
    assert all(a > untrained["ddp"]["similarity_agreement"] + 0.01 for a in agreement.values()), (agreement, untrained)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_rank_that_dies_before_joining_fails_the_job_at_once_in_one_line(home, tmp_path):
    """Rank 1 fails as it starts (test hook `fail:rank`): rank 0 stops waiting for it before the rendezvous and the
    job FAILS naming the rank and its log, registering nothing. Before, rank 0 waited in the rendezvous until the
    process group's 30-minute timeout (the call's own timeout here)."""
    from recipes_toy import TOY, write_toy
    from test_faults import assert_promises_kept

    path = write_toy(tmp_path, TOY)
    done = athanor("submit", str(path), "--wait", "--no-progress", "-o", "train.strategy=ddp", "-o", "train.devices=2",
                   "-o", "train.accelerator=cpu", env={"ATHANOR_TEST_HOOK": "fail:rank"}, timeout=300)
    (job,) = JobStore(home).list()
    assert done.returncode != 0 and job.status == "FAILED" and "\n" not in job.error, job.error
    found = re.search(r"training rank 1 exited with code \d+ before joining the other ranks; see (\S+)", job.error)
    assert found, job.error
    assert "test hook failure at rank" in Path(found.group(1)).read_text()  # the named log holds rank 1's error
    assert not list(Path(job.log_path).parent.glob("**/rank*.ready"))
    assert_promises_kept(home)


@pytest.mark.slow
@pytest.mark.distributed
def test_linvideo_trains_on_two_ranks_under_deepspeed_zero2(home):
    """The gates, feature maps and weights train on two ranks; the job ends with the target count of linear
    layers (the selection is committed identically on every rank) and an export that reloads."""
    from athanor.convert.linvideo import linear_layers, load_student

    small = ["linvideo.prompts=[a sneaker moving left, a trouser moving up, a bag moving right, a dress moving down]",
             "linvideo.eval_prompts=[a sneaker moving left]", "linvideo.eval_seeds=[0]", "linvideo.eval_steps=4",
             "linvideo.trajectory_steps=8", "linvideo.heldout_points=8", "linvideo.latency_frames=null",
             "linvideo.latency_height=null", "linvideo.latency_width=null", "train.max_steps=12",
             "data.batch_size=4", "eval.latency_repeats=2", "linvideo.compare=[]",  # the recipe's arms: not here
             "linvideo.target=3"]  # not half: the selection's layer count under ZeRO-2's optimizer (the recipe: 2)
    # ZeRO-2 only: DDP and ZeRO-2 train the same student (the MiniLM test above), and LinVideo's rank logic (the
    # committed selection) is the same under both; each 2-rank LinVideo job is ~100 s on one thread per worker.
    for strategy in ("deepspeed_stage_2",):
        args = [a for o in small for a in ("-o", o)]
        done = athanor("submit", str(RECIPES / "linvideo_tiny.yaml"), "--wait", "--no-progress", *args,
                       "-o", f"train.strategy={strategy}", "-o", "train.devices=2", "-o", "train.accelerator=cpu",
                       timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        job = JobStore(home).list()[0]
        assert job.status == "SUCCEEDED" and job.model_version is not None, job.error
        assert job.result["after"]["linear_layers"] == 3  # the target asked: 3 of 4
        assert len(linear_layers(load_student(job.result["export"]))) == 3


@pytest.mark.slow
@pytest.mark.distributed
def test_comparison_arms_train_on_every_rank(home, tmp_path):
    """Each arm launches the other ranks again (ATHANOR_ARM tells them which arm): a two-rank DDP job with
    arms finishes, and its arms are as trained as the single-process ones."""
    from recipes_toy import TOY, write_toy  # tests/jobs is on sys.path (conftest.py)

    path = write_toy(tmp_path, TOY + "toy:\n  compare: [2]\n")
    results = {}
    for devices in (1, 2):
        done = athanor("submit", str(path), "--wait", "--no-progress", "-o", "train.strategy=ddp",
                       "-o", f"train.devices={devices}", "-o", "train.accelerator=cpu")
        assert done.returncode == 0, done.stderr[-3000:]
        job = JobStore(home).list()[0]
        assert job.status == "SUCCEEDED", job.error
        results[devices] = job.result
    # two ranks see half the data each per step: close to, not equal to, one rank
    assert results[2]["arms"]["h2"]["mse_to_teacher"] == pytest.approx(results[1]["arms"]["h2"]["mse_to_teacher"],
                                                                       rel=0.5)

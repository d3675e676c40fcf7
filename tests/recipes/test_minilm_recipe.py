"""recipes/minilm_tiny.yaml end to end through `athanor submit --wait`, and MiniLM bad input.

    .venv/bin/python -m pytest tests/recipes/test_minilm_recipe.py -q
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from harness import RECIPES, athanor, child_runs, eval_metrics, mlflow_client

from athanor.jobs.store import JobStore

TINY = RECIPES / "minilm_tiny.yaml"


@pytest.mark.slow
def test_tiny_minilm_job_end_to_end(home):
    done = athanor("submit", str(TINY), "--wait", "--no-progress", "-o", "eval.include_untrained=true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "registered: minilm-tiny-student version 1 (alias 'candidate')" in done.stdout
    (job,) = JobStore(home).list()
    assert job.status == "SUCCEEDED"
    before, after, untrained = job.result["before"], job.result["after"], job.result["untrained"]
    assert set(before) == set(after) == set(untrained) >= {"params", "latency_ms", "similarity_agreement"}
    assert before["similarity_agreement"] == pytest.approx(1.0)
    assert math.isnan(after["embedding_cosine"])  # the student is narrower (32 vs 64)
    assert after["params"] < before["params"]
    # Training, not the copied initialisation, made the student agree with the teacher.
    assert untrained["similarity_agreement"] < after["similarity_agreement"] < 1
    assert job.result["speedup"] == pytest.approx(before["latency_ms"] / after["latency_ms"])

    client = mlflow_client(home)
    losses = [m.value for m in client.get_metric_history(job.mlflow_run_id, "train/loss")]
    assert len(losses) >= 5 and sum(losses[-3:]) < sum(losses[:3])
    runs = child_runs(client, job.mlflow_run_id)
    assert set(runs) == {"baseline", "untrained", "converted"}
    assert set(eval_metrics(runs["baseline"])) == set(eval_metrics(runs["converted"]))

    import mlflow
    from transformers import AutoModel, AutoTokenizer

    version = client.get_model_version_by_alias("minilm-tiny-student", "candidate")
    assert version.tags["athanor.job_id"] == job.id
    pipeline = mlflow.transformers.load_model("models:/minilm-tiny-student@candidate")
    features = pipeline("distillation keeps the attention relations")
    assert len(features[0][0]) == 32  # the student's hidden size

    export = Path(job.result["export"])
    model, tokenizer = AutoModel.from_pretrained(export), AutoTokenizer.from_pretrained(export)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert "MiniLM" in (export / "README.md").read_text() or "minilm" in (export / "README.md").read_text()
    out = model(**tokenizer(["a test sentence"], return_tensors="pt")).last_hidden_state
    assert out.shape[-1] == 32


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["student.hidden_size=128", "student.intermediate_size=256"], "student.hidden_size"),
        (["student.layers=6"], "student.layers"),
        (["teacher.config.model_type=gpt2"], "teacher"),
    ],
)
def test_minilm_bad_students_fail_before_running(home, overrides, key):
    args = [a for o in overrides for a in ("-o", o)]
    done = athanor("submit", str(TINY), *args, "--wait")
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if f": {key}" in line]
    assert len(lines) == 1, done.stderr
    assert JobStore(home).list() == []  # rejected before any job row is written


def test_empty_dataset_fails_the_job_naming_the_key(home, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    done = athanor("submit", str(TINY), "-o", "data.kind=files", "-o", f"data.paths=[{empty}]", "--wait")
    assert done.returncode != 0
    (job,) = JobStore(home).list()
    assert job.status == "FAILED" and "data." in job.error and job.model_version is None

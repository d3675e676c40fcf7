"""What a job leaves in MLflow reads at a glance (issue 27): the experiment opens on its runs, the parent run
carries provenance, plottable ratios/differences and headline metrics (never a NaN, never a `None` param), the child
runs their own params, the description a summary line and numbers formatted by kind, the registered version the
model card and its before/after tags; system metrics are sampled while the student trains.

    .venv/bin/python -m pytest tests/jobs/test_tracking_views.py -q
"""

from __future__ import annotations

import getpass
import math
import subprocess

import pytest
from harness import REPO, child_runs, mlflow_client
from recipes_toy import TOY

from athanor.jobs import cli
from athanor.jobs.recipe import TrackingSpec
from athanor.jobs.report import comparison_rows, format_value, headline_keys, summary_line
from athanor.jobs.store import JobStore

RECIPE = TOY.replace("registry:\n", "tracking:\n  system_metrics_every_s: 0.2\ngate:\n  min_speedup: 0.001\n"
                     "toy:\n  sleep_s: 0.05\nregistry:\n")
"""The toy job, its training slowed to ~1.5 s so that the 0.2 s system-metrics sampler logs several points."""


@pytest.fixture(scope="module")
def job_home(tmp_path_factory):
    """One finished toy job (its MLflow runs and registered version) shared by the tests of this module."""
    home = tmp_path_factory.mktemp("views") / "home"
    recipe = home.parent / "toy.yaml"
    recipe.write_text(RECIPE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATHANOR_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert cli.main(["submit", str(recipe), "--wait", "--no-progress"]) == 0
    (job,) = JobStore(home).list()
    return home, job, recipe


def test_experiment_opens_on_runs_and_parent_carries_provenance(job_home):
    home, job, recipe = job_home
    client = mlflow_client(home)
    parent = client.get_run(job.mlflow_run_id)
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    tags = parent.data.tags
    assert tags["mlflow.source.name"] == f"athanor submit {recipe}" and tags["mlflow.user"] == getpass.getuser()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout: the commit that ran the job
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    params = parent.data.params
    assert params["train.max_steps"] == "30" and params["toy.sleep_s"] == "0.05"
    assert "None" not in params.values() and "tracking.uri" not in params and "train.accelerator" not in params


def test_parent_metrics_are_ratios_differences_and_headlines(job_home):
    home, job, _ = job_home
    metrics = mlflow_client(home).get_run(job.mlflow_run_id).data.metrics
    before, after = job.result["before"], job.result["after"]
    assert not [k for k in metrics if k.endswith(("/before", "/after"))]  # those live on the child runs
    assert metrics["ratio/params"] == pytest.approx(after["params"] / before["params"])
    assert metrics["ratio/latency_ms"] == pytest.approx(after["latency_ms"] / before["latency_ms"])
    assert metrics["diff/mse_to_teacher"] == pytest.approx(after["mse_to_teacher"] - before["mse_to_teacher"])
    assert "ratio/mse_to_teacher" not in metrics  # the teacher's mse to itself is 0: no ratio, and no NaN logged
    assert metrics["headline/mse_to_teacher"] == pytest.approx(after["mse_to_teacher"])
    assert metrics["headline/speedup"] == pytest.approx(job.result["speedup"]) == pytest.approx(metrics["eval/speedup"])
    assert "headline/params" not in metrics and not any(math.isnan(v) for v in metrics.values())


def test_child_runs_carry_side_model_and_seed(job_home):
    home, job, _ = job_home
    runs = child_runs(mlflow_client(home), job.mlflow_run_id)
    assert runs["baseline"].data.params == {"side": "baseline", "model": "teacher inline config", "seed": "0",
                                            "method": "toy"}
    converted = runs["converted"].data
    assert converted.params["model"] == "student toy-student (toy)" and converted.params["side"] == "converted"
    assert converted.tags["athanor.side"] == "converted" and converted.tags["mlflow.user"] == getpass.getuser()


def test_description_leads_with_the_headline_and_formats_by_kind(job_home):
    home, job, _ = job_home
    note = mlflow_client(home).get_run(job.mlflow_run_id).data.tags["mlflow.note.content"]
    first = note.splitlines()[0]
    assert first.startswith("**mse_to_teacher** 0 → ") and "speed-up **" in first and "gate **passed**" in first
    rows = [line.split(" | ")[0].lstrip("| ") for line in note.splitlines() if line.startswith("| ")][1:]
    assert rows == ["mse_to_teacher", "params", "latency_ms"]  # headline first; then the rest in the method's order
    assert "nan" not in note.lower() and " ms" in note


def test_format_value_by_kind_and_rows_headline_first():
    assert format_value("params", 22_713_216.0) == "22,713,216"
    assert format_value("latency_ms", 12.3456) == "12.35 ms"
    assert format_value("latency_ms", 3.2, 0.41) == "3.2 ± 0.41 ms"
    assert format_value("sts_spearman", 0.8512345, 0.0123) == "0.8512 ± 0.012"
    assert format_value("loss", 1.5e-5) == "1.50e-05" and format_value("perplexity", 123456.7) == "123,457"
    assert format_value("acc", math.nan) == "—" == format_value("acc", None)
    before, after = {"params": 100.0, "acc": 0.5, "latency_ms": 2.0}, {"params": 50.0, "acc": math.nan,
                                                                      "latency_ms": 1.0}
    headline = headline_keys(list(before), {"params": "neutral", "acc": "higher", "latency_ms": "lower"})
    assert headline == ["acc"]
    assert headline_keys(["a", "b", "params"], {"a": "higher", "b": "lower", "params": "neutral"}, ["eval/b"]) == [
        "b", "a"]  # the gate's retained metrics lead
    rows = comparison_rows(before, after, None, headline=headline)
    assert [r[0] for r in rows] == ["acc", "params", "latency_ms"]
    assert rows[0][2] == "—" and rows[0][4] == "—" and rows[1][4] == "0.500"  # undefined after, ratio after/before
    assert summary_line(before, after, 2.0, headline, None) == "**acc** 0.5 → — · speed-up **2×**"


def test_registered_version_holds_the_card_and_before_after_tags(job_home):
    home, job, _ = job_home
    version = mlflow_client(home).get_model_version("toy-student", job.model_version)
    assert version.description.startswith("# toy-student\n") and "library_name" not in version.description
    assert "| mse_to_teacher |" in version.description and "## Promotion gate (met" in version.description
    before, after = job.result["before"], job.result["after"]
    for key in before:
        assert float(version.tags[f"before.{key}"]) == pytest.approx(before[key], rel=1e-5, abs=1e-12)
        assert float(version.tags[f"after.{key}"]) == pytest.approx(after[key], rel=1e-5, abs=1e-12)
    assert float(version.tags["speedup"]) == pytest.approx(job.result["speedup"], rel=1e-2)
    assert version.tags["athanor.gate"] == "passed"


def test_system_metrics_are_sampled_while_training(job_home):
    home, job, _ = job_home
    client = mlflow_client(home)
    history = client.get_metric_history(job.mlflow_run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 2 and all(0 <= h.value <= 100 * 64 for h in history)
    assert "system/system_memory_usage_megabytes" in client.get_run(job.mlflow_run_id).data.metrics
    assert TrackingSpec().system_metrics_every_s == 10.0  # on by default

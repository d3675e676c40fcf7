"""The job spine end to end with the toy method: submit, worker, MLflow runs, registry, cancel, push."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import athanor, athanor_popen, child_runs, eval_metrics, mlflow_client
from recipes_toy import TOY, write_toy

from athanor.jobs import cli
from athanor.jobs.store import JobStore


def _versions(home: Path, name: str) -> list:
    return mlflow_client(home).search_model_versions(f"name='{name}'")


def test_help_does_not_import_heavy_libraries():
    code = ("import sys, jobs.cli; jobs.cli.build_parser().format_help(); "
            "print([m for m in ('torch', 'lightning', 'mlflow', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_submit_wait_runs_tracks_and_registers(tmp_path, home, capsys):
    assert cli.main(["submit", str(write_toy(tmp_path)), "--wait", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "mse_to_teacher" in out and "registered: toy-student version 1 (alias 'candidate')" in out
    (job,) = JobStore(home).list()
    assert job.status == "SUCCEEDED" and job.model_version == "1" and job.error is None
    before, after = job.result["before"], job.result["after"]
    assert before["mse_to_teacher"] == 0.0 and after["params"] < before["params"]

    client = mlflow_client(home)
    parent = client.get_run(job.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["athanor.job_id"] == job.id
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"baseline", "converted"}
    keys = {name: {k for k in r.data.metrics if k.startswith("eval/")} for name, r in by_name.items()}
    assert keys["baseline"] == keys["converted"] == {"eval/params", "eval/mse_to_teacher", "eval/latency_ms"}
    # One speed ratio, on the parent, from the interleaved timing the two children's latencies come from.
    speedup = parent.data.metrics["eval/speedup"]
    assert speedup == pytest.approx(before["latency_ms"] / after["latency_ms"]) == pytest.approx(job.result["speedup"])
    assert "eval/speedup" not in by_name["baseline"].data.metrics
    description = parent.data.tags["mlflow.note.content"]
    assert "| mse_to_teacher | 0 ± 0 |" in description and "Speed-up" in description
    contexts = sorted(i.tags[0].value for i in parent.inputs.dataset_inputs)
    assert contexts == ["evaluation", "training"]
    assert by_name["converted"].data.metrics["eval/mse_to_teacher"] == pytest.approx(after["mse_to_teacher"])
    losses = [m.value for m in client.get_metric_history(parent.info.run_id, "train/loss")]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"recipe", "plots", "eval", "samples", "model_card"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/before_after.png", "plots/training_curves.png"}

    (version,) = _versions(home, "toy-student")
    assert client.get_model_version_by_alias("toy-student", "candidate").version == version.version
    assert version.tags["athanor.job_id"] == job.id and version.tags["athanor.recipe_hash"] == job.recipe_hash
    export = Path(job.result["export"])
    assert (export / "model.safetensors").is_file() and not (export.parent / "export.partial").exists()
    card = (export / "README.md").read_text()
    assert "toy" in card and "| mse_to_teacher | 0 ± 0 |" in card and "30 optimizer steps" in card


def test_training_free_method_skips_training_and_still_tracks_and_registers(tmp_path, home, capsys):
    text = TOY.replace("method: toy", "method: toy_pruning").replace("registry:\n", "toy_pruning: {}\nregistry:\n")
    assert cli.main(["submit", str(write_toy(tmp_path, text)), "--wait", "--no-progress"]) == 0
    (job,) = JobStore(home).list()
    assert job.status == "SUCCEEDED" and job.model_version == "1"
    before, after = job.result["before"], job.result["after"]
    assert after["params"] < before["params"] and 0 < after["mse_to_teacher"]
    client = mlflow_client(home)
    parent = client.get_run(job.mlflow_run_id)
    assert not [k for k in parent.data.metrics if k.startswith("train/")]  # nothing was trained
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "plots")} == {"plots/before_after.png"}
    assert "training for" not in Path(job.log_path).read_text()
    assert "training-free" in (Path(job.result["export"]) / "README.md").read_text()


def test_untrained_student_is_its_own_child_run_with_the_same_keys(tmp_path, home):
    path = write_toy(tmp_path, TOY.replace("registry:\n", "eval:\n  include_untrained: true\nregistry:\n"))
    assert cli.main(["submit", str(path), "--wait", "--no-progress"]) == 0
    (job,) = JobStore(home).list()
    untrained, after = job.result["untrained"], job.result["after"]
    assert set(untrained) == set(after) and untrained["params"] == after["params"]
    assert after["mse_to_teacher"] < untrained["mse_to_teacher"]  # training moved the student toward the teacher
    runs = child_runs(mlflow_client(home), job.mlflow_run_id)
    assert set(runs) == {"baseline", "untrained", "converted"}
    assert eval_metrics(runs["untrained"])["mse_to_teacher"] == pytest.approx(untrained["mse_to_teacher"])


def test_comparison_arms_train_fresh_students_and_log_child_runs(tmp_path, home, capsys):
    path = write_toy(tmp_path, TOY + "toy:\n  compare: [2, 12]\n")
    assert cli.main(["submit", str(path), "--wait", "--no-progress"]) == 0
    (job,) = JobStore(home).list()
    arms, comparison = job.result["arms"], job.result["comparison"]
    assert set(arms) == {"h2", "h12"} and arms["h12"]["params"] == 8 * 12 + 12 + 12 * 8 + 8  # its own width
    assert arms["h12"]["mse_to_teacher"] != arms["h2"]["mse_to_teacher"]
    assert comparison["best_arm_mse"] == min(a["mse_to_teacher"] for a in arms.values())
    assert comparison["after_minus_best"] == pytest.approx(job.result["after"]["mse_to_teacher"] -
                                                           comparison["best_arm_mse"])
    client = mlflow_client(home)
    runs = child_runs(client, job.mlflow_run_id)
    assert set(runs) == {"baseline", "converted", "arm_h2", "arm_h12"}
    assert eval_metrics(runs["arm_h12"])["mse_to_teacher"] == pytest.approx(arms["h12"]["mse_to_teacher"])
    assert "train/loss" in runs["arm_h2"].data.metrics  # each arm's own training curve, in its child run
    parent = client.get_run(job.mlflow_run_id).data.metrics
    assert parent["compare/best_arm_mse"] == pytest.approx(comparison["best_arm_mse"])
    assert "comparison arms (h12, h2" in capsys.readouterr().out
    card = (Path(job.result["export"]) / "README.md").read_text()
    assert "## Comparison arms" in card and "| best_arm_mse |" in card
    assert (job.result["params"]["student"] == 8 * 4 + 4 + 4 * 8 + 8)  # the exported student is the recipe's


def test_arms_repeat_over_train_seeds_and_an_arm_at_the_jobs_seed_starts_where_the_student_started(tmp_path, home):
    """An arm identical to the converted student (same width) at the job's seed trains from the same initial
    weights on the same data, so it ends with the same figures; at another seed it differs. With train.seeds the
    arm's figure is the mean over seeds, with its standard deviation and one child run per seed."""
    path = write_toy(tmp_path, TOY.replace("max_steps: 30", "max_steps: 6") + "toy:\n  compare: [4]\n")
    assert cli.main(["submit", str(path), "-o", "train.seeds=[0, 1]", "--wait", "--no-progress"]) == 0
    (job,) = JobStore(home).list()
    runs = child_runs(mlflow_client(home), job.mlflow_run_id)
    assert {"arm_h4_seed0", "arm_h4_seed1", "arm_h4"} <= set(runs)
    seed0, seed1 = (eval_metrics(runs[f"arm_h4_seed{s}"])["mse_to_teacher"] for s in (0, 1))
    assert seed0 == pytest.approx(job.result["after"]["mse_to_teacher"], rel=1e-6) and seed1 != seed0
    assert job.result["arms"]["h4"]["mse_to_teacher"] == pytest.approx((seed0 + seed1) / 2)
    assert job.result["arms_sd"]["h4"]["mse_to_teacher"] == pytest.approx(abs(seed0 - seed1) / 2 ** 0.5)
    paired = job.result["intervals"]["differences"]["after - arm_h4"]["mse_to_teacher"]
    assert paired["estimate"] == pytest.approx(0, abs=1e-6) and not paired["significant"]


def test_a_failing_job_registers_nothing_and_says_why(tmp_path, home, capsys):
    path = write_toy(tmp_path, TOY + "toy:\n  fail_at: export\n")
    assert cli.main(["submit", str(path), "--wait", "--no-progress"]) == cli.EXIT_JOB_FAILED
    (job,) = JobStore(home).list()
    assert job.status == "FAILED" and job.error.startswith("RuntimeError: toy failure in export")
    assert "\n" not in job.error
    assert _versions(home, "toy-student") == []
    job_dir = home / "jobs" / job.id
    assert not (job_dir / "export").exists() and not (job_dir / "export.partial").exists()
    assert mlflow_client(home).get_run(job.mlflow_run_id).info.status == "FAILED"


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda t: t.replace("hidden: 4", "hidden: 64"), "student.hidden"),
        (lambda t: t.replace("method: toy", "method: nope"), "method"),
        (lambda t: t.replace("max_steps: 30", "max_steps: many"), "train.max_steps"),
        (lambda t: t.replace("  config: {width: 8, hidden: 16}", "  source: ./no/such/dir"), "teacher.source"),
    ],
)
def test_bad_input_is_one_line_naming_the_key_and_no_job_is_created(tmp_path, home, capsys, edit, key):
    path = write_toy(tmp_path, edit(TOY))
    assert cli.main(["submit", str(path), "--wait"]) == cli.EXIT_BAD_INPUT
    lines = capsys.readouterr().err.splitlines()
    err = [line for line in lines if f" {key}" in line]
    assert len(err) == 1, err
    assert "no job was created" in lines[-1] and JobStore(home).list() == []  # rejected before any row
    assert _versions(home, "toy-student") == []


def test_worker_runs_queued_jobs_in_their_own_processes(tmp_path, home):
    path = write_toy(tmp_path)
    ids = []
    for steps in (5, 6):
        out = athanor("submit", str(path), "-o", f"train.max_steps={steps}", check=True).stdout
        ids.append(out.split()[2])
    assert [j.status for j in JobStore(home).list()] == ["PENDING", "PENDING"]
    worker = athanor("worker", "--once", check=True, timeout=300)
    assert worker.stdout.count(": SUCCEEDED") == 2
    assert worker.stdout.count("forked from the preloaded server") == 2  # jobs/prefork.py: no import per job
    jobs = {j.id: j for j in JobStore(home).list()}
    assert all(jobs[i].status == "SUCCEEDED" for i in ids)
    assert {str(v.version) for v in _versions(home, "toy-student")} == {"1", "2"}
    listing = athanor("list", check=True).stdout
    assert all(i in listing for i in ids)
    assert "training for 5 steps" in athanor("logs", ids[0], check=True).stdout

    assert cli.main(["push", ids[0], "--alias", "champion"]) == 0
    client = mlflow_client(home)
    assert str(client.get_model_version_by_alias("toy-student", "champion").version) == jobs[ids[0]].model_version
    assert str(client.get_model_version_by_alias("toy-student", "candidate").version) == jobs[ids[1]].model_version


def test_cancel_stops_a_running_job_and_its_process_group(tmp_path, home):
    path = write_toy(tmp_path, TOY.replace("max_steps: 30", "max_steps: 100000") + "toy:\n  sleep_s: 0.05\n")
    job_id = athanor("submit", str(path), check=True).stdout.split()[2]
    worker = athanor_popen("worker", "--once")
    store = JobStore(home)
    deadline = time.time() + 120
    while time.time() < deadline:
        job = store.get(job_id)
        log = Path(job.log_path).read_text() if Path(job.log_path).exists() else ""
        if job.status == "RUNNING" and "training for" in log:
            break
        time.sleep(0.5)
    pid = store.get(job_id).pid
    assert cli.main(["cancel", job_id]) == 0
    worker.wait(timeout=120)
    job = store.get(job_id)
    assert job.status == "STOPPED" and job.error == "cancelled"
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert _versions(home, "toy-student") == []
    assert "job cancelled" in Path(job.log_path).read_text()


def test_cancel_a_pending_job(tmp_path, home, capsys):
    job_id = athanor("submit", str(write_toy(tmp_path)), check=True).stdout.split()[2]
    assert cli.main(["cancel", job_id]) == 0
    assert JobStore(home).get(job_id).status == "STOPPED"
    assert cli.main(["status", job_id]) == 0
    assert "STOPPED" in capsys.readouterr().out


def test_hub_teacher_while_offline_fails_the_job_with_the_key(tmp_path, home, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_toy(tmp_path, TOY.replace("  config: {width: 8, hidden: 16}", "  source: some-org/some-model"))
    assert cli.main(["submit", str(path), "--wait", "--no-progress"]) == cli.EXIT_JOB_FAILED
    err = capsys.readouterr().err
    assert "warning: teacher.source: 'some-org/some-model' is a hub id and the hub is offline" in err
    (job,) = JobStore(home).list()
    assert job.status == "FAILED" and job.error.startswith("teacher.source: 'some-org/some-model'")
    assert "hub is offline" in job.error and _versions(home, "toy-student") == []


@pytest.mark.parametrize("alias", ["../x", "latest", "", "v3", "a b"])
def test_push_refuses_bad_aliases_in_one_line_before_any_registry_call(tmp_path, home, capsys, alias):
    assert cli.main(["submit", str(write_toy(tmp_path, TOY.replace("max_steps: 30", "max_steps: 3"))), "--wait",
                     "--no-progress"]) == 0
    (job,) = JobStore(home).list()
    capsys.readouterr()
    assert cli.main(["push", job.id, "--alias", alias]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--alias" in err[0]
    assert [a for a in mlflow_client(home).get_registered_model("toy-student").aliases] == ["candidate"]

"""The promotion gate (jobs/gate.py): conditions judged with the metric's direction, metric names checked at
validation, and end to end: a job that misses its gate is SUCCEEDED with `gate: failed`, its version registered
without the alias and tagged with what failed, and `push` refuses to move an alias onto it without --force.

    .venv/bin/python -m pytest tests/jobs/test_gate.py -q
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from harness import mlflow_client
from recipes_toy import TOY, write_toy

from athanor.jobs import cli
from athanor.jobs.api import create_app
from athanor.jobs.gate import GateSpec, judge
from athanor.jobs.store import JobStore

METRICS = {"acc": "higher", "ppl": "lower", "params": "neutral"}
FAST = TOY.replace("max_steps: 30", "max_steps: 3")


def test_retain_is_after_over_before_or_before_over_after_by_direction():
    before, after = {"acc": 0.80, "ppl": 20.0}, {"acc": 0.76, "ppl": 25.0}
    verdict = judge(GateSpec(retain={"acc": 0.95, "ppl": 0.8}), METRICS, before, after, speedup=2.0)
    assert verdict.passed, verdict.failed  # 0.76/0.80 = 0.95 and 20/25 = 0.8: exactly at the thresholds
    verdict = judge(GateSpec(retain={"eval/acc": 0.96, "ppl": 0.81}, min_speedup=2.5), METRICS, before, after, 2.0)
    assert not verdict.passed and len(verdict.failed) == 3
    assert verdict.failed[0].startswith("acc kept 0.950 of the teacher's (after/before")
    assert "≥ 0.96" in verdict.failed[0]
    assert "ppl kept 0.800" in verdict.failed[1] and "before/after" in verdict.failed[1]
    assert verdict.failed[2] == "speed-up 2.00× (needs ≥ 2.5×)"
    assert judge(GateSpec(), METRICS, before, after, None).line() == "gate: none set"
    zero = judge(GateSpec(retain={"acc": 0.5}), METRICS, {"acc": 0.0}, {"acc": 0.3}, None)
    assert not zero.passed and "cannot be judged" in zero.failed[0]  # no ratio of a zero baseline


@pytest.mark.parametrize("gate,message", [
    ("retain: {accuracy: 0.9}", "gate.retain.accuracy = 'accuracy': not a metric this method reports; choose one of "
                                "latency_ms, mse_to_teacher"),
    ("retain: {params: 0.9}", "gate.retain.params = 'params': has no better direction"),
    ("retain: {mse_to_teacher: 0}", "each retain value is a fraction of the teacher's value in (0, 10]"),
    ("min_speedup: -1", "gate.min_speedup"),
])
def test_validate_refuses_a_gate_the_method_cannot_judge(tmp_path, home, gate, message, capsys):
    # In process (cli.main, as the console script calls it): a subprocess per case cost ~10 s of imports.
    code = cli.main(["validate", str(write_toy(tmp_path, FAST + f"gate:\n  {gate}\n"))])
    shown = capsys.readouterr()
    assert code == cli.EXIT_BAD_INPUT and message in shown.out + shown.err, shown.out + shown.err


def test_a_job_that_misses_its_gate_registers_without_the_alias_and_push_needs_force(tmp_path, home, capsys):
    recipe = write_toy(tmp_path, FAST + "gate:\n  retain: {mse_to_teacher: 0.5}\n  min_speedup: 0.001\n")
    assert cli.main(["submit", str(recipe), "--wait", "--no-progress"]) == cli.EXIT_OK
    shown = capsys.readouterr().out
    (job,) = JobStore(home).list()
    assert job.status == "SUCCEEDED" and job.model_version == "1"
    gate = job.result["gate"]
    assert gate["passed"] is False and len(gate["conditions"]) == 2 and gate["conditions"][1]["passed"]
    assert gate["failed"] == [c["text"] for c in gate["conditions"] if not c["passed"]]
    assert gate["failed"][0].startswith("mse_to_teacher kept 0.000 of the teacher's (before/after; teacher 0,")
    assert "gate: failed — mse_to_teacher kept" in shown and "(no alias: the gate was not met)" in shown
    assert "mse_to_teacher" in shown and " ± " in shown and "after − before [95% CI]" in shown

    client = mlflow_client(home)
    version = client.get_model_version("toy-student", "1")
    assert version.aliases == [] and client.get_registered_model("toy-student").aliases == {}
    assert version.tags["athanor.gate"] == "failed" and version.tags["athanor.gate.failed"] == gate["failed"][0]
    assert version.tags["athanor.job_id"] == job.id

    assert cli.main(["status", job.id]) == cli.EXIT_OK
    assert "gate           failed — mse_to_teacher kept" in capsys.readouterr().out
    assert cli.main(["list"]) == cli.EXIT_OK and "gate: failed" in capsys.readouterr().out
    with TestClient(create_app(home, None)) as api:
        detail = api.get(f"/jobs/{job.id}").json()
        assert detail["status"] == "SUCCEEDED" and detail["gate"]["passed"] is False
        assert detail["gate"]["failed"] == gate["failed"] and detail["registered"]["alias"] is None
        assert detail["metrics"]["intervals"]["differences"]["after - before"]["mse_to_teacher"]["significant"]
        refused = api.post(f"/jobs/{job.id}/push", json={"alias": "champion"})
        assert refused.status_code == 409 and "missed its gate" in refused.json()["detail"]
    assert cli.main(["push", job.id, "--alias", "champion"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missed its gate" in err[0] and "--force" in err[0]
    assert client.get_registered_model("toy-student").aliases == {}  # nothing moved
    assert cli.main(["push", job.id, "--alias", "champion", "--force"]) == cli.EXIT_OK
    assert client.get_registered_model("toy-student").aliases == {"champion": 1}


def test_a_job_that_meets_its_gate_gets_the_alias_and_its_intervals(tmp_path, home, capsys):
    recipe = write_toy(tmp_path, FAST + "gate:\n  min_speedup: 0.001\n")
    assert cli.main(["submit", str(recipe), "--wait", "--no-progress"]) == cli.EXIT_OK
    (job,) = JobStore(home).list()
    assert job.result["gate"]["passed"] and job.result["registered"]["alias"] == "candidate"
    client = mlflow_client(home)
    assert client.get_registered_model("toy-student").aliases == {"candidate": 1}
    assert client.get_model_version("toy-student", "1").tags["athanor.gate"] == "passed"
    after = job.result["intervals"]["sides"]["after"]["mse_to_teacher"]
    assert after["n"] == 64 and after["low"] < job.result["after"]["mse_to_teacher"] < after["high"]
    description = client.get_run(job.mlflow_run_id).data.tags["mlflow.note.content"]
    assert "after − before [95% CI]" in description and "paired percentile bootstrap" in description
    card = (JobStore(home).job_dir(job.id) / "export" / "README.md").read_text()
    assert "## Promotion gate (met: registered with the alias)" in card and " ± " in card

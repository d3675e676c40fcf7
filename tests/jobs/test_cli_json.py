"""`--json` on submit, list, status and wait prints the HTTP API's job objects (jobs/job_view.py), one per line, so
scripts read the CLI and the API alike; `athanor status` prints no field without a value; the MLflow UI links take
the UI's address from $ATHANOR_MLFLOW_UI.

    .venv/bin/python -m pytest tests/jobs/test_cli_json.py -q
"""

from __future__ import annotations

import json
import re

import pytest
from harness import athanor
from recipes_toy import TOY, write_toy

from athanor.jobs import cli
from athanor.jobs.api_models import JobDetail, JobSummary
from athanor.jobs.store import JobStore

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
DETAIL_KEYS = set(JobDetail.model_fields)
SUMMARY_KEYS = set(JobSummary.model_fields)


def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_submit_list_and_status_json_shapes(tmp_path, home, capsys):
    path = write_toy(tmp_path)
    assert cli.main(["submit", str(path), "--json", "--label", "team=search", "--submission-id", "s-1"]) == 0
    (created,) = _lines(capsys.readouterr().out)
    assert set(created) == DETAIL_KEYS and created["status"] == "PENDING" and created["stage"] is None
    assert created["labels"] == {"team": "search"} and created["submission_id"] == "s-1"
    assert ISO.match(created["created_at"]) and created["started_at"] is None and created["progress"] is None
    assert set(created["links"]) == {"mlflow_run", "mlflow_run_ui", "model_version", "model_version_ui"}
    assert cli.main(["submit", str(path), "-o", "train.seed=2"]) == 0
    capsys.readouterr()

    assert cli.main(["list", "--json"]) == 0
    listed = _lines(capsys.readouterr().out)
    assert len(listed) == 2 and all(set(j) == SUMMARY_KEYS for j in listed)
    assert listed[1]["id"] == created["id"]  # newest first, as `athanor list`
    assert cli.main(["status", created["id"], "--json"]) == 0
    (shown,) = _lines(capsys.readouterr().out)
    assert shown == created


def test_submit_wait_json_prints_only_the_final_job_on_stdout(tmp_path, home, monkeypatch):
    monkeypatch.setenv("ATHANOR_MLFLOW_UI", "https://mlflow.example.org/ui/")
    path = write_toy(tmp_path, TOY.replace("max_steps: 30", "max_steps: 5"))
    done = athanor("submit", str(path), "--wait", "--json", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (job,) = _lines(done.stdout)  # stage lines, the bar and the table stay off stdout
    assert job["status"] == "SUCCEEDED" and job["stage"] == "register" and job["progress"] is None
    assert job["metrics"]["after"]["params"] == 76 and job["registered"]["version"] == "1"
    run = job["mlflow_run_id"]
    assert job["links"]["mlflow_run_ui"] == f"https://mlflow.example.org/ui/#/runs/{run}?workflowType=machine_learning"
    assert job["links"]["model_version_ui"] == "https://mlflow.example.org/ui/#/models/toy-student/versions/1"
    assert ISO.match(job["finished_at"]) and "loading teacher" in done.stderr

    waited = athanor("wait", job["id"], "--json", timeout=120)
    assert waited.returncode == 0 and _lines(waited.stdout) == [job]
    plain = athanor("status", job["id"], timeout=120)
    assert plain.returncode == 0 and "None" not in plain.stdout
    fields = dict(line.split(None, 1) for line in plain.stdout.splitlines() if line and line[0].isalpha()
                  and not line.startswith(("speed-up", "registered", "export")))
    assert fields["stage"] == "register" and fields["attempts"] == "1 of 1" and "pid" not in fields
    assert "engine" not in fields and "submission_id" not in fields and fields["model_version"] == "1"


def test_status_of_a_pending_job_prints_no_empty_field(tmp_path, home, capsys):
    assert cli.main(["submit", str(write_toy(tmp_path))]) == 0
    (job,) = JobStore(home).list()
    capsys.readouterr()
    assert cli.main(["status", job.id]) == 0
    out, err = capsys.readouterr()
    keys = [line.split()[0] for line in out.splitlines()]
    assert keys == ["id", "name", "method", "status", "recipe_path", "recipe_hash", "log_path", "created"]
    assert "None" not in out and "no worker seen" in err


@pytest.mark.parametrize("value", ["localhost:5000", "ftp://x", "http://", "http://h/?q=1"])
def test_a_bad_mlflow_ui_address_is_one_line_naming_the_setting(tmp_path, home, capsys, monkeypatch, value):
    assert cli.main(["submit", str(write_toy(tmp_path))]) == 0
    (job,) = JobStore(home).list()
    monkeypatch.setenv("ATHANOR_MLFLOW_UI", value)
    capsys.readouterr()
    assert cli.main(["status", job.id, "--json"]) == cli.EXIT_BAD_INPUT
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: ATHANOR_MLFLOW_UI = {value!r}: give the MLflow UI's base URL")
    assert cli.main(["status", job.id]) == 0  # only the JSON has links


def test_serve_refuses_a_bad_mlflow_ui_address_in_one_line(home):
    done = athanor("serve", "--port", "0", "--mlflow-ui", "mlflow:5000", timeout=120)
    assert done.returncode == cli.EXIT_BAD_INPUT and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: --mlflow-ui = 'mlflow:5000': give the MLflow UI's base URL, e.g. http://")

"""POST /jobs with a client's submission id and labels (jobs/submission.py): the same id and request again is the
same job (200), another request under that id is 409, concurrent resubmissions make one job; labels are validated
and returned; timestamps are ISO-8601; MLflow UI links follow the configured address.

    .venv/bin/python -m pytest tests/jobs/test_api_submission.py -q
"""

from __future__ import annotations

import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from api_server import served
from fastapi.testclient import TestClient
from recipes_toy import TOY

from athanor.jobs.api import create_app
from athanor.jobs.store import JobStore

YAML = {"content-type": "application/yaml"}
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@pytest.fixture
def client(home) -> TestClient:
    with TestClient(create_app(home, None)) as test_client:
        yield test_client


def test_resubmitting_a_submission_id_returns_the_same_job(client, home):
    first = client.post("/jobs", content=TOY, headers=YAML, params={"submission_id": "run-7", "label": ["team=nlp"]})
    assert first.status_code == 201, first.text
    job = first.json()
    assert job["submission_id"] == "run-7" and job["labels"] == {"team": "nlp"}
    again = client.post("/jobs", content=TOY, headers=YAML, params={"submission_id": "run-7", "label": ["team=nlp"]})
    assert again.status_code == 200 and again.json()["id"] == job["id"]
    assert again.headers["location"] == f"/jobs/{job['id']}"
    as_json = client.post("/jobs", json={"recipe": TOY, "submission_id": "run-7", "labels": {"team": "nlp"}})
    assert as_json.status_code == 200 and as_json.json()["id"] == job["id"]  # the same request in the other form
    assert [j.id for j in JobStore(home).list()] == [job["id"]]


@pytest.mark.parametrize(("change", "differs"), [
    ({"content": TOY.replace("lr: 0.01", "lr: 0.02")}, "another recipe"),
    ({"content": TOY, "params": {"override": ["train.seed=1"]}}, "another recipe"),
    ({"content": TOY, "params": {"label": ["team=vision"]}}, "other labels")])
def test_the_same_submission_id_with_another_request_is_409(client, home, change, differs):
    created = client.post("/jobs", content=TOY, headers=YAML, params={"submission_id": "run-8",
                                                                      "label": ["team=nlp"]}).json()
    params = {"submission_id": "run-8", "label": ["team=nlp"], **change.get("params", {})}
    response = client.post("/jobs", content=change["content"], headers=YAML, params=params)
    assert response.status_code == 409, response.text
    detail = response.json()["detail"]
    assert detail.startswith(f"submission id 'run-8' was used for job {created['id']} with {differs}")
    assert "choose a new submission id" in detail and len(JobStore(home).list()) == 1


def test_the_same_submission_id_sent_concurrently_makes_one_job(home):
    def post(_: int) -> tuple[int, str]:
        request = urllib.request.Request(f"{url}/jobs?submission_id=once", data=TOY.encode(), headers=YAML)
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.load(response)["id"]

    with served(create_app(home, None)) as url, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, range(8)))
    assert sorted(status for status, _ in answers) == [200] * 7 + [201]
    assert len({job_id for _, job_id in answers}) == 1 and len(JobStore(home).list()) == 1


@pytest.mark.parametrize(("request_kwargs", "path"), [
    ({"params": {"submission_id": "has space"}}, "query.submission_id"),
    ({"params": {"label": ["novalue"]}}, "query.label"),
    ({"params": {"label": ["-x=1"]}}, "query.label.-x"),
    ({"params": {"label": ["a=1", "a=2"]}}, "query.label a"),
    ({"json": {"recipe": TOY, "labels": {"k": "v\n"}}}, "labels.k"),
    ({"json": {"recipe": TOY, "labels": {"k": 1}}}, "labels.k"),
    ({"json": {"recipe": TOY, "labels": {f"k{i}": "v" for i in range(33)}}}, "labels"),
    ({"json": {"recipe": TOY, "submission_id": "a"}, "params": {"submission_id": "b"}}, "submission_id")])
def test_bad_submission_ids_and_labels_are_422_naming_the_field(client, home, request_kwargs, path):
    headers = {} if "json" in request_kwargs else YAML
    content = {} if "json" in request_kwargs else {"content": TOY}
    response = client.post("/jobs", headers=headers, **content, **request_kwargs)
    assert response.status_code == 422, response.text
    assert path in [p["path"] for p in response.json()["problems"]], response.json()
    assert JobStore(home).list() == []


def test_timestamps_are_iso_8601_utc(client, home):
    created = client.post("/jobs", content=TOY, headers=YAML).json()
    store = JobStore(home)
    store.claim(created["id"])
    store.finish(created["id"], "FAILED", error="x")
    shown = client.get(f"/jobs/{created['id']}").json()
    assert all(ISO.match(shown[k]) for k in ("created_at", "started_at", "finished_at"))
    assert shown["created_at"] == created["created_at"] and ISO.match(client.get("/jobs").json()[0]["created_at"])


def test_mlflow_ui_links_take_the_configured_address(home, monkeypatch):
    store = JobStore(home)
    store.update(store.create(name="n", method="toy", recipe_text=TOY, recipe_path=None, overrides=[],
                              recipe_hash="h").id, mlflow_run_id="abc123")
    (job,) = store.list()
    with TestClient(create_app(home, None, mlflow_ui="http://mlflow.internal:8080/")) as client:
        assert client.get(f"/jobs/{job.id}").json()["links"]["mlflow_run_ui"] == "http://mlflow.internal:8080/#/runs/abc123?workflowType=machine_learning"
    monkeypatch.setenv("ATHANOR_MLFLOW_UI", "https://ui.example.org/mlflow")
    with TestClient(create_app(home, None)) as client:
        links = client.get(f"/jobs/{job.id}").json()["links"]
        assert links["mlflow_run_ui"] == "https://ui.example.org/mlflow/#/runs/abc123?workflowType=machine_learning"
        assert links["self"].endswith(f"/jobs/{job.id}")
    monkeypatch.setenv("ATHANOR_MLFLOW_UI", "nonsense")
    with pytest.raises(ValueError, match="ATHANOR_MLFLOW_UI = 'nonsense'"):
        create_app(home, None)

"""The HTTP job API from the outside: schemathesis fuzzes every operation of its OpenAPI schema in process
(valid and invalid inputs; no 5xx, responses as documented), and a client submits recipes/minilm_tiny.yaml
to `athanor serve` (a real uvicorn) that `athanor worker` runs, polling until SUCCEEDED.

    .venv/bin/python -m pytest tests/jobs/test_api_client.py -q -s
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest
import schemathesis
from api_server import athanor_serve
from harness import RECIPES, athanor_popen, mlflow_client
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode

from athanor.jobs.api import create_app
from athanor.jobs.store import JobStore

EXAMPLES = 50
"""Generated cases per operation and mode (valid inputs, then invalid ones)."""
CONFIG = SchemathesisConfig.from_dict({"checks": {
    # A body over the documented maxLength is refused with 413 before it is read, as documented.
    "negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413, 415, 422]},
    # Any string fits the YAML body's schema, yet few strings are recipes: a 422 there is right.
    "positive_data_acceptance": {"enabled": False}}})


def _fuzz(operation: Any, mode: GenerationMode, seen: dict[str, int], server_errors: list[str]) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call()
        seen["cases"] += 1
        if response.status_code >= 500:
            server_errors.append(f"{operation.label} {response.status_code} {response.text[:300]}")
        case.validate_response(response)

    try:
        run()
    except Unsatisfiable:  # nothing to make invalid (an operation without parameters or body)
        assert mode is GenerationMode.NEGATIVE, operation.label


def test_schemathesis_finds_no_server_error_and_no_undocumented_response(home):
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(home, None), config=CONFIG)
    seen, server_errors = {"cases": 0}, []
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(operation, mode, seen, server_errors)
    print(f"\nschemathesis: {seen['cases']} cases over {len(operations)} operations, "
          f"{len(server_errors)} server errors")
    assert server_errors == []
    assert len(operations) >= 8 and seen["cases"] >= 8 * EXAMPLES


def _call(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None) -> Any:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=60) as response:
        data = response.read()
        return json.loads(data) if response.headers.get_content_type() == "application/json" else data.decode()


@pytest.mark.slow
def test_client_submits_the_tiny_recipe_over_http_and_it_succeeds(home):
    token = "t0ken-for-the-client-test-0123456789"
    auth = {"Authorization": f"Bearer {token}"}
    worker = athanor_popen("worker", "--poll", "0.5", merge_stderr=True)
    try:
        with athanor_serve(env={"ATHANOR_TOKEN": token}) as url:
            with pytest.raises(urllib.error.HTTPError) as refused:
                _call(f"{url}/jobs")
            assert refused.value.code == 401
            shorter = "&".join(f"override={urllib.parse.quote(o)}" for o in (  # what is checked needs no more
                "eval.include_untrained=false", "train.max_steps=8", "data.max_texts=128", "eval.latency_repeats=1"))
            created = _call(f"{url}/jobs?{shorter}", "POST",
                            (RECIPES / "minilm_tiny.yaml").read_bytes(), {**auth, "Content-Type": "application/yaml"})
            job = _wait(url, created["id"], auth)
            assert job["status"] == "SUCCEEDED", (job, JobStore(home).get(created["id"]).error)
            _check_succeeded(url, job, auth, home)
    finally:
        worker.terminate()
        out = worker.communicate(timeout=60)[0]
    assert f"job {created['id']}: SUCCEEDED" in out


def _wait(url: str, job_id: str, auth: dict, timeout: float = 1200) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = _call(f"{url}/jobs/{job_id}", headers=auth)
        if job["status"] not in ("PENDING", "RUNNING"):
            return job
        time.sleep(2)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


def _check_succeeded(url: str, job: dict, auth: dict, home: Any) -> None:
    metrics = job["metrics"]
    assert metrics["before"]["similarity_agreement"] == pytest.approx(1.0)
    assert metrics["after"]["embedding_cosine"] is None  # NaN (student narrower than teacher) becomes null
    assert metrics["after"]["params"] < metrics["before"]["params"] and metrics["speedup"] is not None
    assert job["registered"] == {"name": "minilm-tiny-student", "version": "1", "alias": "candidate"}
    links = job["links"]
    assert links["model_version"] == "models:/minilm-tiny-student/1"
    assert links["mlflow_run"] == f"runs:/{job['mlflow_run_id']}"
    assert links["mlflow_run_ui"].endswith(f"/#/runs/{job['mlflow_run_id']}?workflowType=machine_learning")
    log = _call(f"{url}/jobs/{job['id']}/logs?follow=true", headers=auth)
    assert "registering minilm-tiny-student" in log
    pushed = _call(f"{url}/jobs/{job['id']}/push", "POST", json.dumps({"alias": "champion"}).encode(),
                   {**auth, "Content-Type": "application/json"})
    assert pushed == {"job": job["id"], "name": "minilm-tiny-student", "alias": "champion", "version": "1"}
    version = mlflow_client(home).get_model_version_by_alias("minilm-tiny-student", "champion")
    assert str(version.version) == "1" and version.tags["athanor.job_id"] == job["id"]
    listed = _call(f"{url}/jobs", headers=auth)
    assert [j["id"] for j in listed] == [job["id"]]

"""The HTTP job API (`athanor serve`, jobs/api.py): submit, list, show, logs, cancel, push, errors as JSON,
the bearer token, the body limit, recipe paths confined to the home, and 100 concurrent submissions
against a real uvicorn. Schema-driven fuzzing and the end-to-end client: tests/jobs/test_api_client.py.

    .venv/bin/python -m pytest tests/jobs/test_api.py -q -s
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from api_server import served
from fastapi.testclient import TestClient
from harness import athanor
from recipes_toy import TOY

from athanor.jobs.api import create_app
from athanor.jobs.store import JobStore

YAML = {"content-type": "application/yaml"}
TOKEN = "s3cret-token-of-32-characters-xx"


@pytest.fixture
def client(home) -> TestClient:
    with TestClient(create_app(home, None)) as test_client:
        yield test_client


def _submit(client: TestClient, text: str = TOY, **params) -> dict:
    response = client.post("/jobs", content=text, headers=YAML, params=params)
    assert response.status_code == 201, response.text
    return response.json()


def test_submit_yaml_creates_a_job_listed_and_shown(client, home):
    created = _submit(client, override=["train.max_steps=3"])
    assert created["status"] == "PENDING" and created["name"] == "toy-demo" and created["method"] == "toy"
    assert created["overrides"] == ["train.max_steps=3"]
    (row,) = JobStore(home).list()
    assert row.id == created["id"] and row.recipe_text == TOY and row.recipe_path is None
    assert [j["id"] for j in client.get("/jobs").json()] == [row.id]
    assert client.get("/jobs", params={"status": "SUCCEEDED"}).json() == []
    shown = client.get(f"/jobs/{row.id}").json()
    assert shown["status"] == "PENDING" and shown["recipe_hash"] == row.recipe_hash and shown["metrics"] is None
    assert shown["links"]["self"].endswith(f"/jobs/{row.id}") and shown["links"]["model_version"] is None
    assert client.get(f"/jobs/{row.id[:-2]}").json()["id"] == row.id  # a unique prefix, as the CLI takes


def test_submit_json_with_overrides_and_location(client, home):
    response = client.post("/jobs", json={"recipe": TOY, "overrides": ["train.seed=7"]})
    assert response.status_code == 201 and response.headers["location"] == f"/jobs/{response.json()['id']}"
    assert JobStore(home).get(response.json()["id"]).overrides == ["train.seed=7"]


def test_invalid_recipe_lists_every_problem_with_path_value_fix_and_line(client, home):
    bad = TOY.replace("max_steps: 30", "max_steps: many").replace("lr: 0.01", "lr: 0.01\n  lrr: 2") \
             .replace("name: toy-demo", "name: ../escape")
    response = client.post("/jobs", content=bad, headers=YAML)
    assert response.status_code == 422
    body = response.json()
    problems = {p["path"]: p for p in body["problems"]}
    assert set(problems) == {"name", "train.max_steps", "train.lrr"}, body
    lines = bad.splitlines()
    assert problems["train.max_steps"]["value"] == "many"
    assert problems["train.max_steps"]["line"] == lines.index("  max_steps: many") + 1
    assert problems["name"]["value"] == "../escape" and problems["name"]["line"] == lines.index("name: ../escape") + 1
    assert problems["train.lrr"]["line"] == lines.index("  lrr: 2") + 1
    assert "did you mean 'lr'" in problems["train.lrr"]["fix"] and problems["train.lrr"]["value"] == 2
    assert "3 problem(s)" in body["detail"] and "no job was created" in body["detail"]
    assert JobStore(home).list() == []


@pytest.mark.parametrize(("body", "path"), [
    ("a: [1", "(yaml)"), ("just a string", "(top level)"), ("x: 1\nx: 2\n", "x"),
    ("a: &a [*a]\n", "(yaml)"), ("\x00\x01binary", "(file)")])
def test_malformed_yaml_is_one_json_problem(client, body, path):
    response = client.post("/jobs", content=body.encode(), headers=YAML)
    assert response.status_code == 422 and [p["path"] for p in response.json()["problems"]] == [path]


def test_method_stage_problem_and_bad_override(client):
    response = client.post("/jobs", content=TOY.replace("hidden: 4", "hidden: 64"), headers=YAML)
    assert response.status_code == 422 and response.json()["problems"][0]["path"] == "student.hidden"
    response = client.post("/jobs", content=TOY, headers=YAML, params={"override": ["nokey"]})
    assert response.status_code == 422 and "key.path=value" in response.json()["problems"][0]["fix"]


def test_bad_request_shapes_are_json_errors(client):
    assert client.get("/jobs/nope").status_code == 404
    assert client.get("/jobs/nope").json()["detail"].startswith("no job 'nope'")
    assert client.get("/jobs", params={"limit": "x"}).json()["problems"][0]["path"] == "query.limit"
    response = client.post("/jobs", content=b"<xml/>", headers={"content-type": "application/xml"})
    assert response.status_code == 415 and "application/yaml" in response.json()["detail"]
    response = client.post("/jobs", json={"recipe": TOY, "extra": 1})
    assert response.status_code == 422 and response.json()["problems"][0]["path"] == "extra"
    assert client.get("/no/such/route").json() == {"detail": "Not Found", "problems": []}


def test_hub_ids_and_package_sources_are_not_paths(client):
    created = _submit(client, TOY.replace("  config: {width: 8, hidden: 16}", "  source: some-org/some-model"))
    assert created["warnings"] and "hub id and the hub is offline" in created["warnings"][0]
    assert created["overrides"] == []
    text = TOY.replace("  config: {width: 8, hidden: 16}", "  source: pkg:nosuchpkg/m")
    response = client.post("/jobs", content=text, headers=YAML)
    assert response.status_code == 422 and "no installed Python package" in response.json()["problems"][0]["fix"]


def test_openapi_includes_every_route_and_the_recipe_schema(client):
    from athanor.jobs.recipe import json_schema

    spec = client.get("/openapi.json").json()
    assert {"/health", "/jobs", "/jobs/{job_id}", "/jobs/{job_id}/logs", "/jobs/{job_id}/cancel",
            "/jobs/{job_id}/push", "/schema/recipe"} <= set(spec["paths"])
    assert set(spec["paths"]["/jobs"]["post"]["requestBody"]["content"]) == {"application/yaml", "application/json"}
    components = spec["components"]["schemas"]
    assert {"Recipe", "ToyRecipe", "MinilmRecipe", "SubmitIn", "ErrorOut", "JobDetail"} <= set(components)
    assert "#/$defs/" not in json.dumps(spec)  # every recipe section lives among the components
    assert client.get("/schema/recipe").json() == json_schema()


def test_values_that_are_not_plain_json_come_back_escaped(client):
    response = client.post("/jobs", content=TOY.replace("name: toy-demo", 'name: "bad\\ud800"'), headers=YAML)
    assert response.status_code == 422 and response.json()["problems"][0]["path"] == "name"
    response = client.post("/jobs", content=TOY.replace("max_steps: 30", "max_steps: .inf"), headers=YAML)
    assert response.status_code == 422 and response.json()["problems"][0]["value"] == "inf"


def test_cancel_pending_then_already_final(client, home):
    job_id = _submit(client)["id"]
    response = client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "STOPPED"
    assert JobStore(home).get(job_id).status == "STOPPED"
    again = client.post(f"/jobs/{job_id}/cancel")
    assert again.status_code == 409 and "already STOPPED" in again.json()["detail"]
    assert client.post("/jobs/nope/cancel").status_code == 404


def test_cancel_running_sets_the_flag(client, home):
    job_id = _submit(client)["id"]
    JobStore(home).claim(job_id)
    response = client.post(f"/jobs/{job_id}/cancel")
    assert response.json()["status"] == "RUNNING" and "next training step" in response.json()["message"]
    assert client.get(f"/jobs/{job_id}").json()["cancel_requested"] is True


def test_push_needs_a_registered_version_and_a_valid_alias(client):
    job_id = _submit(client)["id"]
    response = client.post(f"/jobs/{job_id}/push", json={"alias": "champion"})
    assert response.status_code == 409 and "no registered version (status PENDING)" in response.json()["detail"]
    response = client.post(f"/jobs/{job_id}/push", json={"alias": "latest"})
    assert response.status_code == 422 and response.json()["problems"][0]["path"] == "alias"
    assert client.post("/jobs/nope/push", json={"alias": "champion"}).status_code == 404


def test_logs_whole_and_followed_until_final(client, home):
    store = JobStore(home)
    job_id = _submit(client)["id"]
    assert client.get(f"/jobs/{job_id}/logs").text == ""  # no log yet
    store.claim(job_id)
    log = Path(store.get(job_id).log_path)
    log.write_text("line 1\nline 2 ünïcode\n")
    assert client.get(f"/jobs/{job_id}/logs").text == "line 1\nline 2 ünïcode\n"

    def finish_later() -> None:
        time.sleep(1.0)
        with log.open("a") as f:
            f.write("line 3\n")
        store.finish(job_id, "FAILED", error="test")

    threading.Thread(target=finish_later).start()
    with client.stream("GET", f"/jobs/{job_id}/logs", params={"follow": "true"}) as response:
        assert response.headers["content-type"].startswith("text/plain")
        text = "".join(response.iter_text())
    assert text == "line 1\nline 2 ünïcode\nline 3\n"


def test_token_guards_every_route_but_health(home):
    with TestClient(create_app(home, TOKEN)) as client:
        assert client.get("/health").json() == {"status": "ok"}
        for method, url in (("GET", "/jobs"), ("GET", "/openapi.json"), ("GET", "/docs"), ("POST", "/jobs"),
                            ("GET", "/jobs/x"), ("GET", "/schema/recipe"), ("POST", "/jobs/x/cancel")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
                response = client.request(method, url, headers=headers)
                assert response.status_code == 401, (method, url, headers)
                assert response.headers["www-authenticate"] == "Bearer" and "bearer token" in response.json()["detail"]
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/jobs", headers=good).status_code == 200
        assert client.post("/jobs", content=TOY, headers={**good, **YAML}).status_code == 201
        assert client.get("/openapi.json", headers=good).status_code == 200


def test_serve_refuses_a_public_address_without_a_token(home):
    done = athanor("serve", "--host", "0.0.0.0", "--port", "0", env={"ATHANOR_TOKEN": ""}, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: --host 0.0.0.0 is not a loopback address: set ATHANOR_TOKEN")
    short = athanor("serve", "--port", "0", env={"ATHANOR_TOKEN": "short"}, timeout=60)
    assert short.returncode == 2 and "at least 16 characters" in short.stderr


def test_body_over_the_limit_is_413(client, home):
    big = TOY + "#" * (256 * 1024)
    response = client.post("/jobs", content=big, headers=YAML)
    assert response.status_code == 413 and "256 KiB" in response.json()["detail"]
    chunked = client.post("/jobs", content=iter([big[:200_000].encode(), big[200_000:].encode()]), headers=YAML)
    assert chunked.status_code == 413  # no Content-Length: counted as it arrives
    assert JobStore(home).list() == []


@pytest.mark.parametrize(("edit", "key"), [
    ("toy:\n  notes_file: ../../outside.txt\n", "toy.notes_file"),
    ("toy:\n  notes_file: /etc/hostname\n", "toy.notes_file"),
    ("toy:\n  notes_file: ~/notes.txt\n", "toy.notes_file"),
    ("tracking:\n  uri: sqlite:////tmp/elsewhere.db\n", "tracking.uri"),
    ("tracking:\n  uri: /tmp/mlruns\n", "tracking.uri"),
    ("tracking:\n  uri: file:///tmp/mlruns\n", "tracking.uri"),
])
def test_recipe_paths_may_not_leave_the_home(client, home, edit, key):
    response = client.post("/jobs", content=TOY + edit, headers=YAML)
    assert response.status_code == 422, response.text
    (problem,) = response.json()["problems"]
    assert problem["path"] == key and ("athanor home" in problem["fix"] or "'..'" in problem["fix"])


def test_teacher_and_data_paths_outside_the_home_are_refused(client, home, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (home / "link").symlink_to(outside)  # a symlink inside the home that points out of it
    text = TOY.replace("  config: {width: 8, hidden: 16}", f"  source: {outside}")
    problems = client.post("/jobs", content=text, headers=YAML).json()["problems"]
    assert [p["path"] for p in problems] == ["teacher.source"]
    text = TOY.replace("data:\n", "data:\n  kind: files\n  paths: [link/*.txt]\n")
    problems = client.post("/jobs", content=text, headers=YAML).json()["problems"]
    assert [p["path"] for p in problems] == ["data.paths"]


def test_relative_paths_are_read_from_the_home(client, home):
    (home / "notes").mkdir(parents=True)
    (home / "notes" / "n.txt").write_text("hello")
    job = _submit(client, TOY + "toy:\n  notes_file: notes/n.txt\n")
    assert job["overrides"] == [f"toy.notes_file={json.dumps(str((home / 'notes' / 'n.txt').resolve()))}"]
    missing = client.post("/jobs", content=TOY + "toy:\n  notes_file: notes/none.txt\n", headers=YAML)
    assert missing.status_code == 422 and missing.json()["problems"][0]["path"] == "toy.notes_file"
    job = _submit(client, TOY + "tracking:\n  uri: sqlite:///own.db\n")
    assert job["overrides"] == [f"tracking.uri=\"sqlite:///{(home / 'own.db').resolve()}\""]
    assert _submit(client, TOY + "tracking:\n  uri: http://mlflow.example:5000\n")["overrides"] == []  # remote


CONCURRENT = 100


def _post(url: str, i: int) -> str:
    request = urllib.request.Request(f"{url}/jobs?override=train.seed%3D{i}", data=TOY.encode(), headers=YAML)
    with urllib.request.urlopen(request, timeout=300) as response:
        assert response.status == 201
        return json.load(response)["id"]


def test_concurrent_submissions_all_become_distinct_jobs(home):
    with served(create_app(home, None)) as url, ThreadPoolExecutor(CONCURRENT) as pool:
        started = time.time()
        ids = list(pool.map(lambda i: _post(url, i), range(CONCURRENT)))
        seconds = time.time() - started
    rows = JobStore(home).list(limit=10 * CONCURRENT)
    seeds = sorted(int(j.overrides[0].partition("=")[2]) for j in rows)
    print(f"\n{CONCURRENT} concurrent API submissions -> {len(rows)} jobs, {len(set(ids))} distinct ids, "
          f"{len(rows) - len({j.id for j in rows})} duplicated rows ({seconds:.1f} s)")
    assert len(rows) == len(set(ids)) == CONCURRENT and sorted(ids) == sorted(j.id for j in rows)
    assert seeds == list(range(CONCURRENT))  # each submission exactly once

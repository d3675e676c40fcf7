"""Shared tracking: jobs tracked on a real `mlflow server` (HTTP, proxied artifacts) backed by PostgreSQL.

One private PostgreSQL cluster and one mlflow server per module, both on 127.0.0.1 (tests/services.py).
Needs `apt-get install -y postgresql` and `.venv/bin/pip install psycopg2-binary`; without them the tests fail
saying so (CI installs both).

    .venv/bin/python -m pytest tests/jobs/test_shared_tracking.py -q
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from harness import RECIPES, REPO, athanor, child_runs
from services import mlflow_on_postgres_fixture, postgres_fixture  # noqa: F401 — fixtures `mlflow_on_postgres`, `postgres`

from athanor.jobs.store import JobStore

TINY = RECIPES / "minilm_tiny.yaml"
NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}  # nothing leaves 127.0.0.1
FAST = ["-o", "data.max_texts=128", "-o", "eval.latency_repeats=1"]  # each test sets train.max_steps once

pytestmark = [pytest.mark.slow, pytest.mark.services]


@pytest.fixture
def mlflow_client_on():
    """`connect(uri)`: an MlflowClient on `uri`, also this process's MLflow default (so `models:/…` resolves there)
    for the test; afterwards the defaults, and the variables MLflow exports with them, are unset again (a later
    test's subprocess must not inherit the URI of a server that is gone)."""
    import mlflow

    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}

    def connect(uri: str):
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        return mlflow.MlflowClient(uri, uri)

    yield connect
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.bare_home  # asserts that nothing is written to an embedded store
def test_a_job_tracks_and_registers_on_an_mlflow_server_backed_by_postgres(home, postgres, mlflow_on_postgres,
                                                                            mlflow_client_on):
    server = mlflow_on_postgres
    done = athanor("submit", str(TINY), "--wait", "--no-progress", "-o", f"tracking.uri={server.uri}", *FAST,
                   "-o", "train.max_steps=8", env=NO_TELEMETRY, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + "\n" + server.describe()
    assert "registered: minilm-tiny-student version 1 (alias 'candidate')" in done.stdout
    (job,) = JobStore(home).list()
    assert job.status == "SUCCEEDED" and job.model_version == "1"
    assert not (home / "mlflow.db").exists()  # nothing went to the embedded store

    client = mlflow_client_on(server.uri)
    parent = client.get_run(job.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["athanor.job_id"] == job.id
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")  # uploaded through the server
    runs = child_runs(client, job.mlflow_run_id)
    assert set(runs) == {"baseline", "converted"}
    assert all(run.info.status == "FINISHED" for run in runs.values())
    assert {m.step for m in client.get_metric_history(job.mlflow_run_id, "train/loss")}
    version = client.get_model_version_by_alias("minilm-tiny-student", "candidate")
    assert version.version == "1" and version.run_id == job.mlflow_run_id
    assert version.tags["athanor.job_id"] == job.id and version.status == "READY"

    # The runs and the registry live in PostgreSQL, the artifacts in the server's artifact folder.
    ids = [job.mlflow_run_id, *(run.info.run_id for run in runs.values())]
    rows = postgres.query("SELECT run_uuid, status FROM runs WHERE run_uuid = ANY(%s)", (ids,), database="mlflow")
    assert sorted(rows) == sorted((run_id, "FINISHED") for run_id in ids)
    assert postgres.query("SELECT a.alias, a.version FROM registered_model_aliases a "
                          "WHERE a.name = 'minilm-tiny-student'", database="mlflow") == [("candidate", 1)]
    assert any(server.artifacts.rglob("model/**/config.json")), list(server.artifacts.rglob("*"))[:20]

    import mlflow

    pipeline = mlflow.transformers.load_model("models:/minilm-tiny-student@candidate")  # downloaded over HTTP
    features = pipeline("distillation keeps the attention relations")
    assert len(features[0][0]) == 32  # an embedding per token, the student's hidden size


def test_a_tracking_server_that_goes_away_mid_job_fails_it_in_one_line_and_keeps_the_checkpoint(
        home, postgres, mlflow_on_postgres, mlflow_client_on):
    server = mlflow_on_postgres
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "athanor.jobs.cli", "submit", str(TINY), "--wait", "--no-progress",
         "-o", f"tracking.uri={server.uri}", "-o", "registry.name=minilm-tiny-gone", *FAST,
         "-o", "train.max_steps=100000", "-o", "train.checkpoint_every_n_steps=2", "-o", "train.log_every_n_steps=1"],
        cwd=REPO, env={**env, **NO_TELEMETRY}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        checkpoints = home / "jobs"
        deadline = time.monotonic() + 300
        while not any(checkpoints.glob("*/checkpoints/*.ckpt")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no step checkpoint within 300 s"
            time.sleep(0.2)
        server.stop(signal.SIGKILL)  # gone, as a crashed or unplugged server is
        gone_at = time.monotonic()
        _, err = proc.communicate(timeout=180)
        failed_after = time.monotonic() - gone_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        server.start()  # again (if it was stopped): the checks below and the module's other tests use it

    (job,) = JobStore(home).list()
    assert proc.returncode != 0 and job.status == "FAILED", (job.status, err[-3000:])
    print(f"the job failed {failed_after:.1f} s after the server went away: {job.error}")
    assert job.error.startswith(f"tracking server {server.uri} became unreachable: connection "), job.error
    assert "\n" not in job.error and "Traceback" not in job.error and len(job.error) < 300, job.error
    assert f"{job.status} — {job.error}" in err  # what `submit --wait` prints

    client = mlflow_client_on(server.uri)
    assert client.search_model_versions("name = 'minilm-tiny-gone'") == []
    gone = postgres.query("SELECT count(*) FROM model_versions WHERE name = 'minilm-tiny-gone'", database="mlflow")
    assert gone == [(0,)]
    assert client.search_model_versions(f"tags.`athanor.job_id` = '{job.id}'") == []
    job_dir = home / "jobs" / job.id
    assert list((job_dir / "checkpoints").glob("step=*.ckpt")), "the trained step checkpoint was not kept"
    assert not (job_dir / "export").exists() and not (job_dir / "export.partial").exists()


def test_with_attempts_left_a_lost_tracking_server_requeues_the_job_and_it_resumes_from_its_checkpoint(
        home, postgres, mlflow_on_postgres):
    server = mlflow_on_postgres
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "athanor.jobs.cli", "submit", str(TINY), "--wait", "--no-progress",
         "-o", f"tracking.uri={server.uri}", "-o", "registry.name=minilm-tiny-back", *FAST, "-o", "train.max_steps=16",
         "-o", "train.checkpoint_every_n_steps=2", "-o", "train.log_every_n_steps=1", "-o", "train.max_attempts=2"],
        cwd=REPO, env={**env, **NO_TELEMETRY}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not any((home / "jobs").glob("*/checkpoints/*.ckpt")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no step checkpoint within 300 s"
            time.sleep(0.2)
        server.stop(signal.SIGKILL)
        proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        server.start()
    (job,) = JobStore(home).list()
    assert job.status == "PENDING" and "re-queued for attempt 2" in job.error, (job.status, job.error)
    worker = athanor("worker", "--once", env=NO_TELEMETRY)
    assert worker.returncode == 0, worker.stderr[-3000:]
    job = JobStore(home).get(job.id)
    assert job.status == "SUCCEEDED" and job.attempts == 2, (job.status, job.error)
    log = (home / "jobs" / job.id / "job.log").read_text()
    assert "attempt 2: resuming from" in log and "step=" in log.split("attempt 2: resuming from")[1][:400]

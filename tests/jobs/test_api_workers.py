"""Whether any worker is alive (jobs/workers.py): `GET /workers` and `athanor workers` list the workers' heartbeats and
warn when jobs are PENDING with none alive; a worker that stops cleanly removes its row, one that stops beating goes
stale.

    .venv/bin/python -m pytest tests/jobs/test_api_workers.py -q
"""

from __future__ import annotations

import json
import time

from fastapi.testclient import TestClient
from harness import athanor, athanor_popen
from recipes_toy import TOY

from athanor.jobs.api import create_app
from athanor.jobs.store import JobStore
from athanor.jobs.workers import WorkerBeat, seen_workers

YAML = {"content-type": "application/yaml"}


def test_no_worker_ever_while_a_job_is_pending_is_a_warning(home):
    with TestClient(create_app(home, None)) as client:
        assert client.get("/workers").json() == {"alive": 0, "pending": 0, "stale_seconds": 30.0, "warning": None,
                                                 "workers": []}
        client.post("/jobs", content=TOY, headers=YAML)
        report = client.get("/workers").json()
    assert report["pending"] == 1 and report["alive"] == 0
    assert report["warning"] == ("1 job(s) PENDING and no worker seen for 30 s (none ever ran on this home): start "
                                 "one with `athanor worker`")
    done = athanor("workers", "--json", timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout) == report
    plain = athanor("workers", timeout=120)
    assert plain.stdout.strip() == "0 worker(s) alive, 1 job(s) PENDING" and "no worker seen" in plain.stderr


def test_a_running_worker_is_alive_and_gone_once_it_stops(home):
    store = JobStore(home)
    worker = athanor_popen("worker", "--poll", "0.5")
    try:
        deadline = time.time() + 120
        while not seen_workers(store) and time.time() < deadline:
            time.sleep(0.3)
        with TestClient(create_app(home, None)) as client:
            report = client.get("/workers").json()
        (seen,) = report["workers"]
        assert report["alive"] == 1 and seen["alive"] and seen["pid"] == worker.pid and report["warning"] is None
        assert seen["seen_at"].endswith("Z") and seen["id"].startswith(f"{seen['host']}:{worker.pid}:")
    finally:
        worker.terminate()  # SIGTERM: the worker finishes its loop and removes its row
        worker.wait(timeout=120)
    assert seen_workers(store) == []


def test_a_worker_that_stopped_beating_goes_stale(home):
    store = JobStore(home)
    beat = WorkerBeat(store)
    beat.beat()
    with store.connection() as db:
        db.execute("UPDATE workers SET seen_at = seen_at - 100")
    store.create(name="n", method="toy", recipe_text=TOY, recipe_path=None, overrides=[], recipe_hash="h")
    with TestClient(create_app(home, None)) as client:
        report = client.get("/workers").json()
    assert report["alive"] == 0 and report["workers"][0]["alive"] is False
    assert report["warning"].startswith("1 job(s) PENDING and no worker seen for 30 s (the last one 100 s ago)")

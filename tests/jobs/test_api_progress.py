"""A running job's stage and training progress in `GET /jobs/{id}` (jobs/progress.py, written by the spine at each
stage and by a Lightning callback while training), with a real worker running the toy method slowly; a cancelled
job keeps the stage and step it stopped at.

    .venv/bin/python -m pytest tests/jobs/test_api_progress.py -q
"""

from __future__ import annotations

import time
from typing import Any

from fastapi.testclient import TestClient
from harness import athanor_popen
from recipes_toy import TOY

from athanor.jobs.api import create_app

SLOW = TOY.replace("max_steps: 30", "max_steps: 100000") + "toy:\n  sleep_s: 0.05\n"


def _until(client: TestClient, job_id: str, ready: Any, seconds: float = 300) -> dict:
    deadline = time.time() + seconds
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if ready(job) or time.time() > deadline:
            return job
        time.sleep(0.3)


def test_stage_and_progress_while_a_job_trains(home):
    with TestClient(create_app(home, None)) as client:
        job_id = client.post("/jobs", content=SLOW, headers={"content-type": "application/yaml"}).json()["id"]
        assert client.get(f"/jobs/{job_id}").json()["stage"] is None  # no worker took it yet
        worker = athanor_popen("worker", "--once")
        try:
            first = _until(client, job_id, lambda j: (j["progress"] or {}).get("step", 0) > 0)
            assert first["status"] == "RUNNING" and first["stage"] == "train", first
            assert first["progress"]["max_steps"] == 100000
            assert first["progress"]["fraction"] == round(first["progress"]["step"] / 100000, 4)
            assert first["heartbeat_at"].endswith("Z")
            later = _until(client, job_id, lambda j: j["progress"]["step"] > first["progress"]["step"])
            assert later["progress"]["step"] > first["progress"]["step"]  # it moves while the job trains
            assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
            assert worker.wait(timeout=300) == 0, worker.stderr.read()[-3000:]
        finally:
            if worker.poll() is None:
                worker.kill()
        stopped = client.get(f"/jobs/{job_id}").json()
        assert stopped["status"] == "STOPPED" and stopped["stage"] == "train"
        assert stopped["progress"]["step"] >= later["progress"]["step"]  # the step it stopped at
        assert client.get("/jobs").json()[0]["stage"] == "train"

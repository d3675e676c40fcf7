"""Many submits against a fresh home with several workers: none lost, none run twice, every job tracked
once and registered once (the embedded MLflow store is created once, under a lock).

    .venv/bin/python -m pytest tests/jobs/test_concurrency.py -q
"""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness import athanor, athanor_popen, child_runs, mlflow_client
from recipes_toy import TOY, write_toy

from athanor.jobs.store import JobStore

SUBMITS, WORKERS = 6, 2
"""Three jobs per worker, submitted from 6 threads at once onto a home that does not exist yet: every race the test
is for (creating the store and the MLflow database, claiming, registering) happens in the first few submits and
claims, and three jobs per worker still make each worker claim again while the other runs and registers. (It ran
50 submits until 2026-12: about 10 minutes of CI for the same races; 12 submits on 3 workers took 2.5, 8 on 2
about 2.)"""


@pytest.mark.slow
@pytest.mark.bare_home  # the MLflow store is created by the racing jobs themselves
def test_concurrent_submits_on_a_fresh_home_all_succeed_once(tmp_path, home):
    path = write_toy(tmp_path, TOY.replace("max_steps: 30", "max_steps: 3"))
    workers = [athanor_popen("worker", "--poll", "0.2") for _ in range(WORKERS)]
    try:
        with ThreadPoolExecutor(SUBMITS) as pool:
            submitted = list(pool.map(lambda i: athanor("submit", str(path), "-o", f"train.seed={i}"), range(SUBMITS)))
        assert all(s.returncode == 0 for s in submitted), [s.stderr[-500:] for s in submitted if s.returncode]
        store = JobStore(home)
        import time

        deadline = time.time() + 1500
        while time.time() < deadline and any(j.status in ("PENDING", "RUNNING") for j in store.list(limit=1000)):
            time.sleep(2)
    finally:
        for worker in workers:
            worker.terminate()
        logs = [worker.communicate(timeout=120) for worker in workers]
    jobs = store.list(limit=1000)
    assert len(jobs) == SUBMITS
    assert collections.Counter(j.status for j in jobs) == {"SUCCEEDED": SUBMITS}, [(j.id, j.error) for j in jobs
                                                                                  if j.status != "SUCCEEDED"]
    assert all(j.attempts == 1 for j in jobs)  # none run twice
    ran = collections.Counter(line.split()[2] for out, _ in logs for line in out.splitlines()
                              if line.startswith("running job"))
    assert sorted(ran) == sorted(j.id for j in jobs) and set(ran.values()) == {1}
    client = mlflow_client(home)
    versions = client.search_model_versions("name='toy-student'")
    assert sorted(v.tags["athanor.job_id"] for v in versions) == sorted(j.id for j in jobs)
    for job in jobs:
        assert set(child_runs(client, job.mlflow_run_id)) == {"baseline", "converted"}
        assert client.get_run(job.mlflow_run_id).info.status == "FINISHED"
    assert all("Traceback" not in err for _, err in logs)


def test_each_job_log_line_is_written_once(tmp_path, home):
    path = write_toy(tmp_path, TOY.replace("max_steps: 30", "max_steps: 3"))
    job_id = athanor("submit", str(path), check=True).stdout.split()[2]
    athanor("worker", "--once", check=True)
    log = Path(JobStore(home).get(job_id).log_path).read_text()
    assert log.count("exporting") == 1 and log.count("registering toy-student") == 1, log

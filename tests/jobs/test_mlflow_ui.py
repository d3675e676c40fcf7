"""The MLflow UI started by `athanor ui` shows a finished job's baseline and converted runs side by
side (compare page), rendered by headless Chromium on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from recipes_toy import write_toy

from athanor.jobs import cli
from athanor.jobs.store import JobStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=20000", "--window-size=1400,1000"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (Debian package `chromium`; .ci/run installs it)")
def test_compare_page_lists_both_child_runs(tmp_path, home):
    assert cli.main(["submit", str(write_toy(tmp_path)), "--wait", "--no-progress"]) == 0
    (job,) = JobStore(home).list()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    parent = client.get_run(job.mlflow_run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{job.mlflow_run_id}'")
    ids = json.dumps([r.info.run_id for r in children]).replace(" ", "")

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "athanor.jobs.cli", "ui", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "MLflow UI did not start"
                time.sleep(1)
        url = f'http://127.0.0.1:{port}/#/compare-runs?runs={ids}&experiments=["{parent.info.experiment_id}"]'
        shot = tmp_path / "compare.png"
        common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
        subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, timeout=180, check=True)
        dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=180,
                             check=True).stdout
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert "Comparing 2 Runs" in dom
    assert "baseline" in dom and "converted" in dom
    assert shot.stat().st_size > 20_000

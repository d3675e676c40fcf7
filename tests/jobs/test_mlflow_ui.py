"""The MLflow UI started by `athanor ui`, rendered by headless Chromium on 127.0.0.1 for one finished job (one job
and one server for the module): athanor's link to the experiment opens on its runs table (not the GenAI overview),
the parent run shows a readable description, the grouped before/after chart renders, the compare page lists both
child runs and plots their params and metrics. Screenshots go to the test's folder, or to $ATHANOR_SCREENSHOTS when
set (to look at them)."""

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
from pathlib import Path

import pytest
from harness import mlflow_client
from recipes_toy import write_toy

from athanor.jobs import cli
from athanor.jobs.mlflow_views import ui_url
from athanor.jobs.store import JobStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=20000", "--window-size=1400,1000"]
pytestmark = [pytest.mark.browser, pytest.mark.skipif(
    CHROMIUM is None, reason="needs headless Chromium (Debian package `chromium`; .ci/run installs it)")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UI:
    """The finished job's runs and the server showing them."""

    def __init__(self, base: str, home: Path, job, shots: Path, profile: Path) -> None:
        self.base, self.home, self.job, self.shots, self.profile = base, home, job, shots, profile
        client = mlflow_client(home)
        self.parent = client.get_run(job.mlflow_run_id)
        self.experiment_id = self.parent.info.experiment_id
        self.children = client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{job.mlflow_run_id}'")

    def _chromium(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", *args], capture_output=True,
                              text=True, timeout=180, check=True)

    def page(self, url: str, shot: str) -> str:
        """The DOM of `url` (after the UI's scripts ran) and a screenshot of it, `shot`.png."""
        if not url.startswith("http"):
            url = f"{self.base}/#{url}"
        self._chromium(f"--screenshot={self.shots / shot}.png", url)
        assert (self.shots / f"{shot}.png").stat().st_size > 20_000  # a rendered page, not a blank one
        return self._chromium("--dump-dom", url).stdout


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    home = root / "home"
    shots = Path(os.environ.get("ATHANOR_SCREENSHOTS") or root / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATHANOR_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert cli.main(["submit", str(write_toy(root)), "--wait", "--no-progress"]) == 0
        (job,) = JobStore(home).list()
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
        yield UI(f"http://127.0.0.1:{port}", home, job, shots, root / "profile")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_compare_page_lists_both_child_runs(ui):
    ids = json.dumps([r.info.run_id for r in ui.children]).replace(" ", "")
    dom = ui.page(f'/compare-runs?runs={ids}&experiments=["{ui.experiment_id}"]', "compare")
    assert "Comparing 2 Runs" in dom
    assert "baseline" in dom and "converted" in dom
    assert "eval/mse_to_teacher" in dom and "teacher inline config" in dom  # metrics and the child runs' params


def test_experiment_link_opens_on_the_runs_table(ui):
    assert mlflow_client(ui.home).get_experiment(ui.experiment_id).tags["mlflow.experimentKind"] == \
        "custom_model_development"
    dom = ui.page(ui_url(ui.base, ui.experiment_id), "experiment")
    assert ui.parent.info.run_name in dom and "matching runs" in dom  # the runs table, the job's parent run in it
    assert "Detect Issues" not in dom and "Tool calls" not in dom  # not the GenAI overview of traces


def test_parent_run_shows_the_summary_and_the_table(ui):
    dom = ui.page(ui_url(ui.base, ui.experiment_id, ui.job.mlflow_run_id), "parent_run")
    assert "speed-up" in dom and "mse_to_teacher" in dom and "after − before" in dom
    assert ">nan<" not in dom.lower() and "Child runs" in dom


def test_grouped_before_after_chart_renders(ui):
    url = ui_url(ui.base, ui.experiment_id, ui.job.mlflow_run_id, "artifacts/plots/before_after.png")
    dom = ui.page(url, "grouped_before_after")
    assert "plots/before_after.png" in dom and "Path:" in dom  # the artifact viewer on the PNG (see its screenshot)

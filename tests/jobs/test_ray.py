"""`train.launcher: ray` against a real two-node Ray cluster the test starts itself (tests/jobs/ray_cluster.py), each
node a network namespace of its own joined by a veth pair: a 2-node × 1-rank CPU DDP run of the tiny MiniLM recipe
through the Jobs API, a job stopped through Ray, one stopped by `athanor cancel --force`, and the worker node lost
mid-training (a job with an attempt left resumes from its checkpoint, one without FAILS naming the node). The
driver's rank layout, the entrypoint and the launcher's answers are checked without a cluster.

    .venv/bin/python -m pytest tests/jobs/test_ray.py -q
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest
from harness import RECIPES
from netns import node_network
from ray_cluster import SCENARIO_SECONDS, missing

from athanor.jobs.launchers import ENGINE_ID_ENV, RANKS_LAUNCHED_ENV, LaunchError, submit
from athanor.jobs.launchers.ray import RayLauncher, entrypoint, job_env
from athanor.jobs.launchers.ray_driver import lost_nodes, rank_envs
from athanor.jobs.recipe import load_recipe
from athanor.jobs.store import JobStore

TINY = str(RECIPES / "minilm_tiny.yaml")


@pytest.fixture(scope="module")
def tiny_train():
    return load_recipe(TINY, overrides=["train.launcher=ray", "train.accelerator=cpu"]).recipe.train


def _job(store: JobStore, overrides: tuple[str, ...] = ()):
    return store.create(name="x", method="minilm", recipe_text=Path(TINY).read_text(), recipe_path=None,
                        overrides=list(overrides), recipe_hash="h")


def test_ranks_fill_each_node_bundle_torchrun_style():
    ranks = rank_envs(2, 2, "10.0.0.5", 29400, "athanor-j-a1", [["3", "5"], ["0", "1"]])
    assert [bundle for bundle, _ in ranks] == [0, 0, 1, 1]
    for rank, (_, env) in enumerate(ranks):
        assert env["RANK"] == str(rank) and env["LOCAL_RANK"] == str(rank % 2) and env["NODE_RANK"] == str(rank // 2)
        assert env["WORLD_SIZE"] == "4" and env["LOCAL_WORLD_SIZE"] == "2"
        assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.5", "29400")
        assert env[RANKS_LAUNCHED_ENV] == "1" and env[ENGINE_ID_ENV] == "athanor-j-a1"
    # Every rank of a node sees its node's GPUs, so `cuda:LOCAL_RANK` is the rank's own.
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in ranks] == ["3,5", "3,5", "0,1", "0,1"]
    assert all("CUDA_VISIBLE_DEVICES" not in env for _, env in rank_envs(1, 2, "127.0.0.1", 1, "e"))


def test_the_entrypoint_runs_this_checkouts_driver_with_the_recipes_layout(tmp_path):
    train = load_recipe(TINY, overrides=["train.launcher=ray", "train.num_nodes=2", "train.devices=8",
                                         "train.accelerator=gpu", "train.ray.cpus_per_rank=4"]).recipe.train
    job = _job(JobStore(tmp_path))
    command = entrypoint(job, train, Path("/srv/athanor repo"), python="/opt/venv/bin/python")
    assert command == ("cd '/srv/athanor repo' && exec /opt/venv/bin/python -m athanor.jobs.launchers.ray_driver --job "
                       f"{job.id} --nodes 2 --devices 8 --cpus-per-rank 4 --gpus-per-rank 1")
    env = job_env("athanor-x-a1", tmp_path, {"ATHANOR_METHODS": "toy=m:T", "ATHANOR_TOKEN": "s" * 32,
                                             "HF_HUB_OFFLINE": "1", "PATH": "/bin", "MLFLOW_TRACKING_URI": "x"})
    assert env["ATHANOR_HOME"] == str(tmp_path) and env[ENGINE_ID_ENV] == "athanor-x-a1"
    assert env["ATHANOR_METHODS"] == "toy=m:T" and env["HF_HUB_OFFLINE"] == "1" and env["MLFLOW_TRACKING_URI"] == "x"
    assert "ATHANOR_TOKEN" not in env and "PATH" not in env  # no secrets in Ray's job table; the head's own PATH


def test_without_a_cluster_address_the_job_fails_with_one_line_naming_both_settings(tmp_path, monkeypatch,
                                                                                     tiny_train):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    store = JobStore(tmp_path)
    job = store.claim(_job(store).id)
    submit(store, job, tiny_train)
    job = store.get(job.id)
    assert job.status == "FAILED" and job.engine == "ray"
    assert job.error.startswith("ray: no Ray cluster") and "train.ray.address" in job.error
    assert "RAY_ADDRESS" in job.error and "\n" not in job.error


def test_an_unreachable_cluster_is_a_one_line_launch_error(tmp_path, tiny_train):
    store = JobStore(tmp_path)
    job = store.claim(_job(store).id)
    with pytest.raises(LaunchError, match=r"^Ray Jobs API at http://127.0.0.1:9: Failed to connect") as err:
        RayLauncher().submit(job, tiny_train.model_copy(update={"ray": tiny_train.ray.model_copy(
            update={"address": "http://127.0.0.1:9"})}), store)
    assert "\n" not in str(err.value)


class _FakeClient:
    """Ray's JobSubmissionClient as far as the launcher uses it; records what it was made with."""

    made: list[tuple[str, str | None]] = []
    info: object = None

    def __init__(self, address: str) -> None:
        import os

        self.made.append((address, os.environ.get("RAY_ADDRESS")))

    def get_job_info(self, engine_id: str):
        if self.info is None:
            raise RuntimeError(f"Request failed with status code 404: Job {engine_id} does not exist.")
        return self.info


@pytest.fixture
def fake_ray(monkeypatch):
    """The Ray client replaced by _FakeClient (no Ray needed)."""
    module = types.ModuleType("ray.job_submission")
    module.JobSubmissionClient = _FakeClient
    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))
    monkeypatch.setitem(sys.modules, "ray.job_submission", module)
    _FakeClient.made, _FakeClient.info = [], None
    return _FakeClient


@pytest.mark.parametrize(("status", "finished", "cancelled", "detail"), [
    ("PENDING", False, False, ""), ("RUNNING", False, False, ""), ("SUCCEEDED", True, False, ""),
    ("FAILED", True, False, "Job entrypoint command failed with exit code 1, last available logs:"),
    ("STOPPED", True, True, "Job was intentionally stopped."),
])
def test_rays_job_states_map_to_engine_states(tmp_path, monkeypatch, fake_ray, status, finished, cancelled, detail):
    monkeypatch.setenv("RAY_ADDRESS", "http://elsewhere:8265")
    job = _job(JobStore(tmp_path), ("train.launcher=ray", "train.ray.address=http://head:8265"))
    message = {"FAILED": "Job entrypoint command failed with exit code 1, last available logs:\nTraceback …",
               "STOPPED": "Job was intentionally stopped."}.get(status, "Job is running.")
    fake_ray.info = types.SimpleNamespace(status=types.SimpleNamespace(value=status), message=message)
    state = RayLauncher().state(job)
    assert (state.state, state.finished, state.cancelled, state.detail) == (status, finished, cancelled, detail)
    # The recipe's address wins over RAY_ADDRESS, which Ray's client would otherwise put first.
    assert fake_ray.made == [("http://head:8265", None)]


def test_a_job_the_cluster_no_longer_knows_has_ended(tmp_path, monkeypatch, fake_ray):
    monkeypatch.setenv("RAY_ADDRESS", "http://from-env:8265")
    state = RayLauncher().state(_job(JobStore(tmp_path), ("train.launcher=ray",)))
    assert state.state == "GONE" and state.finished and not state.cancelled
    assert fake_ray.made == [("http://from-env:8265", None)]


@pytest.fixture(scope="session")
def ray_scenario():
    """Start a two-node Ray cluster and run every Ray job below in it, each node a fresh network namespace (the
    scenario in tests/jobs/ray_cluster.py, run in the head's); its JSON result. Session-scoped: under pytest-xdist a
    worker may run other modules' tests between these, which would tear a module fixture down and run the scenario
    again."""
    problem = missing()
    if problem:
        pytest.fail(f"{problem} (CI installs them: see .ci/run)")
    root = Path(tempfile.mkdtemp(prefix="athanor-ray-"))  # short: Ray's unix socket paths live under it
    try:
        with node_network(2, tag="r", subnet="10.77.1") as net:
            done = subprocess.run([*net.enter(0), sys.executable, str(Path(__file__).with_name("ray_cluster.py")),
                                   "run-scenario", "--root", str(root), "--worker-ns", net.namespaces[1], "--ips",
                                   *net.addresses], capture_output=True, text=True, timeout=SCENARIO_SECONDS + 90)
        lines = done.stdout.strip().splitlines()
        assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
        result = json.loads(lines[-1])
        assert "error" not in result, result
        yield result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _private(address: str) -> bool:
    """Loopback, link-local, every-interface (in a namespace that has no other) or the nodes' own subnet."""
    ip = ipaddress.ip_address(address)
    ip = getattr(ip, "ipv4_mapped", None) or ip
    return ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip in ipaddress.ip_network("10.77.1.0/24")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.services
def test_ray_runs_in_namespaces_where_only_the_two_nodes_exist(ray_scenario):
    assert {line.split()[0] for line in ray_scenario["interfaces"]} == {"lo", "athveth"}, ray_scenario["interfaces"]
    assert all(_private(line.split()[1].split("/")[0]) for line in ray_scenario["interfaces"])
    for address in ray_scenario["listening"]:  # every socket Ray listened on in the head's namespace
        assert _private(address.rsplit(":", 1)[0]), address
    # The scenario kills what Ray leaves behind (its dashboard's forkserver outlives `ray start`); never a rank.
    assert not [cmd for _, cmd in ray_scenario["leftovers"] if "athanor.jobs.worker" in cmd], ray_scenario["leftovers"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.services
def test_a_two_node_ray_job_trains_and_succeeds(ray_scenario):
    """The lost-node scenario's retried job is the 2-node training run: its first Ray job placed one rank per node
    and trained until the node went, its second trained on what was left to success (no separate training job:
    the same path, ~1 minute of CI less)."""
    lost = ray_scenario["lost"]
    retried = lost["retried"]
    assert lost["returncodes"]["retried"] == 0, lost["outputs"]["retried"]
    assert retried["status"] == "SUCCEEDED" and retried["engine"] == "ray" and retried["attempts"] == 2, retried
    first, second = retried["ray_runs"]
    assert first["engine_id"].startswith("athanor-") and first["engine_id"].endswith("-a1")
    # One rank per node (Ray picks which bundle lands where): "ray_driver: rank 1/2 on node 1 (10.77.1.2), master …"
    placed = {line.split("(")[1].split(")")[0] for line in first["driver_lines"] if " on node " in line}
    assert placed == {"10.77.1.1", "10.77.1.2"}, first["driver_lines"]
    # Ray's own verdict is the driver's exit code: every rank exited 0 and the driver's cleanup did not crash it.
    assert second["ray_status"] == "SUCCEEDED", (second["ray_message"], second["driver_lines"])
    assert second["rank1_in_ray_logs"], second["logs_tail"]  # Ray's job logs carry the second rank's output


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.services
def test_a_lost_worker_node_requeues_a_job_with_attempts_left_and_fails_one_without_naming_it(ray_scenario):
    lost = ray_scenario["lost"]
    assert lost["checkpointed"] and lost["killed"], lost
    last = lost["last"]
    assert last["status"] == "FAILED", last
    assert re.search(r"node \d \(10\.77\.1\.2\) lost", last["error"]) and "\n" not in last["error"], last["error"]
    # Rank 0's collective broke (or the driver killed it first): either way Ray's state ended the job, not gloo's words.
    assert "by peer" not in last["error"], last["error"]
    retried = lost["retried"]
    assert retried["status"] == "SUCCEEDED" and retried["attempts"] == 2, retried
    step = int(Path(retried["resumed"]).stem.split("=")[1])
    assert 5 <= step < 150, retried["resumed"]  # a periodic checkpoint written before the node was lost
    assert retried["parents"] == [retried["run"]], retried  # one MLflow run, continued by attempt 2


def test_the_driver_names_the_nodes_ray_lists_dead_and_not_back():
    nodes = [{"NodeManagerAddress": "10.0.0.5", "Alive": True}, {"NodeManagerAddress": "10.0.0.6", "Alive": False},
             {"NodeManagerAddress": "10.0.0.7", "Alive": False}, {"NodeManagerAddress": "10.0.0.7", "Alive": True}]
    assert lost_nodes(["10.0.0.5", "10.0.0.6", "10.0.0.7"], nodes) == [1]  # .7 came back


def test_a_lost_node_the_driver_named_is_in_the_jobs_end(tmp_path, monkeypatch, fake_ray):
    job = _job(JobStore(tmp_path), ("train.launcher=ray", "train.ray.address=http://head:8265"))
    message = ("Job entrypoint command failed with exit code 1, last available logs:\nray_driver: rank 0 exited with "
               "code 143; stopping the others\nray_driver: node 1 (10.77.1.2) was lost\n")
    fake_ray.info = types.SimpleNamespace(status=types.SimpleNamespace(value="FAILED"), message=message)
    state = RayLauncher().state(job)
    assert state.finished and state.detail == ("Job entrypoint command failed with exit code 1, last available logs; "
                                               "node 1 (10.77.1.2) lost")


@pytest.mark.slow
@pytest.mark.services
def test_ray_stops_a_job_and_a_forced_cancel_goes_through_ray(ray_scenario):
    cancel = ray_scenario["cancel"]
    assert cancel["training_started"] and cancel["cancel"] == 0, cancel
    assert cancel["stopped"] and cancel["ranks_gone"], cancel
    by_ray = cancel["by_ray"]
    assert by_ray["status"] == "STOPPED" and by_ray["ray_status"] == "STOPPED", by_ray
    assert by_ray["error"].startswith("cancelled through ray (ray job athanor-"), by_ray["error"]
    by_athanor = cancel["by_athanor"]
    assert by_athanor["status"] == "STOPPED" and by_athanor["ray_status"] == "STOPPED", by_athanor
    # `athanor cancel --force` stops the Ray job before it sets the cancel flag: Ray's state ends it, not the job.
    assert by_athanor["error"].startswith("cancelled through ray (ray job athanor-"), by_athanor

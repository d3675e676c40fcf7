"""`train.launcher: slurm` against a real two-node Slurm cluster the test starts (tests/jobs/slurm_cluster.py: each
node a network namespace, joined by a veth pair): a 2-node × 1-rank CPU DDP run of the tiny MiniLM recipe trains the
same student as the local launcher; losing a node mid-training (every process of its namespace killed) re-queues a
job with an attempt left, whose next Slurm job resumes from its last checkpoint into the same MLflow run, and fails
one without, naming the node; the warning signal before a time limit (SIGUSR1) requeues the job, whose next run
resumes from its checkpoint as attempt 2; `scancel` ends a job STOPPED. The batch script, the naming of a lost node
and the classing of a broken collective are checked without a cluster.

    .venv/bin/python -m pytest tests/jobs/test_slurm.py -q
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from harness import RECIPES, athanor, mlflow_client
from slurm_cluster import Cluster, missing, slurm_cluster

from athanor.jobs.recipe import load_recipe
from athanor.jobs.store import JobStore

DDP = ["-o", "train.launcher=slurm", "-o", "train.strategy=ddp", "-o", "train.devices=2", "-o", "train.accelerator=cpu"]
TWO_NODES = ["-o", "train.launcher=slurm", "-o", "train.strategy=ddp", "-o", "train.num_nodes=2", "-o",
             "train.devices=1", "-o", "train.accelerator=cpu"]
TINY = str(RECIPES / "minilm_tiny.yaml")


def _opts(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("-o", p)]


def test_batch_script_places_devices_tasks_on_each_node_with_the_recipes_options(tmp_path):
    from athanor.jobs.launchers.slurm import batch_script

    recipe = load_recipe(TINY, overrides=["train.launcher=slurm", "train.num_nodes=2", "train.devices=8",
                                          "train.accelerator=gpu", "train.slurm.partition=gpu",
                                          "train.slurm.time_limit=1-00:00:00", "train.slurm.account=ml",
                                          "train.slurm.sbatch_lines=['#SBATCH --qos=high']"]).recipe
    store = JobStore(tmp_path)
    job = store.create(name="x", method="minilm", recipe_text="x", recipe_path=None, overrides=[], recipe_hash="h")
    script = batch_script(job, recipe.train, tmp_path, Path("/work"))
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gres=gpu:8", "#SBATCH --no-requeue",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1-00:00:00", "#SBATCH --account=ml", "#SBATCH --qos=high",
                 "#SBATCH --signal=USR1@120"):
        assert line in script.splitlines(), line
    assert f"-m athanor.jobs.worker --job {job.id} --engine-task" in script
    # Every #SBATCH line comes before the first command (sbatch stops reading options there).
    lines = script.splitlines()
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in lines[first_command:])


def test_the_2x8_recipe_gives_each_of_16_tasks_its_torchrun_ids_and_deepspeed_a_hostfile(tmp_path):
    from athanor.jobs.launchers.slurm import RANK_ENV, batch_script

    recipe = load_recipe(RECIPES / "sentencevae_smollm2_slurm_2x8.yaml").recipe
    store = JobStore(tmp_path)
    job = store.create(name="x", method="sentencevae", recipe_text="x", recipe_path=None, overrides=[],
                       recipe_hash="h")
    script = batch_script(job, recipe.train, tmp_path, Path("/work")).splitlines()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gres=gpu:8", "#SBATCH --exclusive",
                 "#SBATCH --signal=USR1@300"):
        assert line in script, line
    assert any("slots=8" in line and "hostfile" in line for line in script)
    # Task 11 of 16 is the fourth rank of the second node.
    slurm = {"SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_NODEID": "1", "SLURM_NTASKS": "16",
             "SLURM_NTASKS_PER_NODE": "8"}
    shown = subprocess.run(["bash", "-c", RANK_ENV + "echo $RANK $LOCAL_RANK $NODE_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE"],
                           env={**os.environ, **slurm}, capture_output=True, text=True, check=True).stdout.split()
    assert shown == ["11", "3", "1", "16", "8"]


def test_an_sbatch_line_that_smuggles_a_command_is_refused(tmp_path):
    done = athanor("validate", TINY, "-o", r'train.slurm.sbatch_lines=["#SBATCH --qos=high\nrm -rf /"]',
                   home=tmp_path)
    assert done.returncode == 2
    assert "train.slurm.sbatch_lines" in done.stdout + done.stderr


@pytest.fixture(scope="module")
def cluster():
    problem = missing()
    if problem:
        pytest.fail(f"{problem} (CI installs them: see .ci/run)")
    # Not under pytest's folder: it is private to root, and munged (the munge user) must reach its socket.
    root = Path(tempfile.mkdtemp(prefix="athanor-slurm-"))
    os.chmod(root, 0o755)
    try:
        with slurm_cluster(root / "cluster", nodes=2) as started:
            started.env["OMP_NUM_THREADS"] = "1"
            yield started
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _in_cluster(cluster: Cluster, *args: str, home: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`athanor ARGS` in node 0's namespace, where slurmctld is (the clients reach it there)."""
    env = {**os.environ, **cluster.env, "ATHANOR_HOME": str(home)}
    return subprocess.run([*cluster.prefix, *athanor_argv(), *args], cwd=RECIPES.parent, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _submit_waiting(cluster: Cluster, home: Path, *opts: str) -> subprocess.Popen:
    """`athanor submit --wait` in node 0's namespace, left running."""
    env = {**os.environ, **cluster.env, "ATHANOR_HOME": str(home)}
    return subprocess.Popen([*cluster.prefix, *athanor_argv(), "submit", TINY, "--wait", "--no-progress", *opts],
                            env=env, cwd=RECIPES.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.services
def test_a_two_node_slurm_job_trains_what_the_local_launcher_trains(cluster, tmp_path):
    steps = _opts("train.max_steps=12")
    on_slurm = _in_cluster(cluster, "submit", TINY, "--wait", "--no-progress", *TWO_NODES, *steps,
                           home=tmp_path / "slurm", timeout=600)
    assert on_slurm.returncode == 0, on_slurm.stdout[-2000:] + on_slurm.stderr[-3000:]
    job = JobStore(tmp_path / "slurm").list()[0]
    assert job.status == "SUCCEEDED" and job.engine == "slurm" and job.engine_id and job.attempts == 1
    out = _in_cluster(cluster, "logs", job.id, "--engine", home=tmp_path / "slurm")  # Slurm's output file
    assert out.returncode == 0 and "GLOBAL_RANK: 1, MEMBER: 2/2" in out.stdout, out.stdout[-2000:] + out.stderr
    shown = _scontrol(cluster, "show", "job", "-o", job.engine_id).split()
    assert "NodeList=node[0-1]" in shown and "NumNodes=2" in shown  # one task per node: rank 1 ran on node1
    assert job.engine_state == "RUNNING"  # Slurm's state as last seen by `submit --wait` while the job ran
    local = athanor("submit", TINY, "--wait", "--no-progress", *DDP[2:], *steps, home=tmp_path / "local",
                    env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert local.returncode == 0, local.stderr[-3000:]
    reference = JobStore(tmp_path / "local").list()[0]
    for key, value in reference.result["after"].items():
        if key != "latency_ms":
            assert job.result["after"][key] == pytest.approx(value, rel=1e-5, nan_ok=True), key
    version = mlflow_client(tmp_path / "slurm").get_model_version_by_alias("minilm-tiny-student", "candidate")
    assert version.run_id == job.mlflow_run_id


def _wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (found := predicate()):
            return found
        time.sleep(0.05)
    raise AssertionError(f"{what} within {seconds} s")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.services
def test_the_time_limit_warning_checkpoints_requeues_and_the_next_run_resumes_as_attempt_two(cluster, tmp_path):
    home = tmp_path / "home"
    # No periodic checkpoints: the only one is the one the warning makes.
    # 300 steps: the warning must land mid-training, 3 s after it starts, on a faster machine too.
    opts = _opts("train.max_steps=300", "train.max_attempts=2", "train.log_every_n_steps=5")
    proc = _submit_waiting(cluster, home, *DDP, *opts)
    log = _wait_for(lambda: next(iter((home / "jobs").glob("*/job.log")), None), 300, "the job's log")
    _wait_for(lambda: "training for" in log.read_text(errors="replace"), 300, "training to start")
    time.sleep(3)  # a few steps in
    job = JobStore(home).get(log.parent.name)
    signal = cluster.run(["scancel", "--signal=USR1", job.engine_id])
    assert signal.returncode == 0, signal.stderr
    # Slurm holds a requeued job for two minutes (its begin time); an admin's nudge starts it now.
    _wait_for(lambda: {"Restarts=1", "JobState=PENDING", "Reason=BeginTime"} <= set(
        _scontrol(cluster, "show", "job", "-o", job.engine_id).split()), 300, "the requeue")
    _scontrol(cluster, "update", f"JobId={job.engine_id}", "StartTime=now")
    output, _ = proc.communicate(timeout=600)
    job = JobStore(home).get(job.id)
    assert job.status == "SUCCEEDED", output[-3000:]
    assert job.attempts == 2 and job.engine_run == 1, (job.attempts, job.engine_run)
    text = log.read_text()
    assert "checkpoint written; requeueing" in text, text[-3000:]
    resumed = text.split("attempt 2: resuming from ")[1].split()[0]
    step = int(Path(resumed).stem.split("=")[1])
    assert 0 < step < 300, resumed  # the warning's own checkpoint, mid-training
    client = mlflow_client(home)
    parents = [r for r in client.search_runs([client.get_run(job.mlflow_run_id).info.experiment_id])
               if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in parents] == [job.mlflow_run_id]  # one parent run, continued by attempt 2


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.services
def test_a_lost_node_requeues_a_job_with_attempts_left_and_fails_one_without_naming_the_node(cluster, tmp_path):
    # Two 2-node jobs at once, so that one lost node shows both outcomes: the Slurm job of each ends NODE_FAIL; with
    # an attempt left athanor submits the next attempt, which resumes from the last checkpoint; without, the job
    # FAILS naming the node. No race decides which: the job without attempts left has no reachable end and has
    # checkpointed before the retried one (150 steps) is submitted, so both are training when the node goes.
    steps = _opts("train.checkpoint_every_n_steps=5", "train.log_every_n_steps=5")
    homes = {"last": tmp_path / "last", "retried": tmp_path / "retried"}
    extra = {"last": _opts("train.max_steps=100000"), "retried": _opts("train.max_steps=150", "train.max_attempts=2")}
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    try:
        for key, home in homes.items():  # each training, with a checkpoint to resume from, before the next starts
            procs[key] = _submit_waiting(cluster, home, *TWO_NODES, *steps, *extra[key])
            logs[key] = _wait_for(lambda h=home: next(iter((h / "jobs").glob("*/job.log")), None), 300, f"{key}'s log")
            _wait_for(lambda log=logs[key]: list((log.parent / "checkpoints").glob("step=*.ckpt")), 300,
                      f"{key} checkpoint")
        first = JobStore(homes["retried"]).get(logs["retried"].parent.name).engine_id
        cluster.kill_node(1)
        _wait_for(lambda: cluster.node_states().get("node1", "").startswith("down"), 120, "node1 DOWN")
        cluster.restart_node(1)  # the machine is back: the next attempt can run on it
        outputs = {k: p.communicate(timeout=600)[0] for k, p in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    last = JobStore(homes["last"]).get(logs["last"].parent.name)
    assert last.status == "FAILED", outputs["last"][-3000:]
    assert "NODE_FAIL" in last.error and "node node1 lost" in last.error and "\n" not in last.error, last.error
    retried = JobStore(homes["retried"]).get(logs["retried"].parent.name)
    assert retried.status == "SUCCEEDED", outputs["retried"][-3000:] + logs["retried"].read_text()[-3000:]
    assert retried.attempts == 2 and retried.engine_id != first, (retried.attempts, first, retried.engine_id)
    text = logs["retried"].read_text()
    assert "a peer rank was lost" in text or "the engine stopped this attempt" in text, text[-3000:]
    step = int(Path(text.split("attempt 2: resuming from ")[1].split()[0]).stem.split("=")[1])
    assert 5 <= step < 150, step  # a periodic checkpoint written before the node was lost
    client = mlflow_client(homes["retried"])
    parents = [r for r in client.search_runs([client.get_run(retried.mlflow_run_id).info.experiment_id])
               if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in parents] == [retried.mlflow_run_id]  # one MLflow run, continued by attempt 2


def test_a_lost_node_is_named_from_sruns_words_or_slurms_node_states():
    from athanor.jobs.launchers.slurm import lost_nodes

    shown = ("NodeName=node0 Arch=x86_64 CoresPerSocket=1 State=IDLE ThreadsPerCore=1 Reason=(null)\n"
             "NodeName=node1 Arch=x86_64 CoresPerSocket=1 State=DOWN+NOT_RESPONDING Reason=Not responding [slurm]\n"
             "NodeName=node2 State=MIXED+NOT_RESPONDING\n")
    assert lost_nodes("", shown) == ["node1", "node2"]
    output = "srun: error: node0: task 0: Exited with exit code 143\nsrun: error: Node failure on node3\n" * 2
    assert lost_nodes(output, shown) == ["node3"]  # srun's words hold after the node came back
    assert lost_nodes("srun: error: node0: task 0: Exited with exit code 1", "NodeName=node0 State=IDLE") == []


def test_a_collective_broken_by_a_lost_peer_is_the_engines_not_the_jobs_failure():
    import torch.distributed as dist

    from athanor.jobs.leases import engine_stopped

    reset = dist.DistBackendError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [10.77.0.2]:41235: "
                                  "Connection reset by peer. This is typically caused by a remote worker hanging")
    said = "a peer rank was lost (Read error [10.77.0.2]:41235: Connection reset by peer)"
    assert engine_stopped(reset, False) == said  # gloo's source location and advice left out
    try:  # Lightning wraps it: the cause still tells
        raise RuntimeError("training step failed") from RuntimeError("Gloo: Connection reset by peer")
    except RuntimeError as wrapped:
        assert engine_stopped(wrapped, False) == "a peer rank was lost (Gloo: Connection reset by peer)"
    assert engine_stopped(ValueError("loss is nan"), False) is None  # the job's own failure
    assert engine_stopped(ConnectionResetError("Connection reset by peer"), False) is None  # not a collective
    assert engine_stopped(ValueError("anything"), True) == "the engine stopped this attempt (SIGTERM)"


@pytest.mark.slow
@pytest.mark.services
def test_scancel_stops_the_job_and_a_forced_cancel_goes_through_slurm(cluster, tmp_path):
    home = tmp_path / "home"
    submitted = _in_cluster(cluster, "submit", TINY, *_opts("train.launcher=slurm", "train.accelerator=cpu",
                                                            "train.max_steps=100000"), home=home)
    assert submitted.returncode == 0, submitted.stderr
    worker = _in_cluster(cluster, "worker", "--once", home=home)
    assert "submitted to slurm" in worker.stdout, worker.stdout + worker.stderr
    job = JobStore(home).list()[0]
    _wait_for(lambda: "training for" in Path(job.log_path).read_text(errors="replace")
              if Path(job.log_path).exists() else False, 300, "training to start")
    done = _in_cluster(cluster, "cancel", job.id, "--force", home=home)
    assert done.returncode == 0, done.stderr
    # `athanor status` asks Slurm (reconcile): its CANCELLED state makes the job STOPPED.
    _wait_for(lambda: _in_cluster(cluster, "status", job.id, home=home) and JobStore(home).get(job.id).status
              == "STOPPED", 60, "STOPPED")
    job = JobStore(home).get(job.id)
    assert job.status == "STOPPED" and "cancelled through slurm" in job.error, job.error
    assert job.model_version is None


def _scontrol(cluster: Cluster, *args: str) -> str:
    return cluster.run(["scontrol", *args], timeout=30).stdout


def athanor_argv() -> list[str]:
    import sys

    return [sys.executable, "-m", "athanor.jobs.cli"]

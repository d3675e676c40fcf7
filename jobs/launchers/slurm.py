"""Slurm launcher: one `sbatch` job per attempt, `num_nodes` nodes × `devices` tasks, one training rank per task.

The batch script (written to the job folder, which every node must see) exports the athanor home, sets
MASTER_ADDR to the first node's address *as Slurm knows it* (its NodeAddr, so a cluster whose node names do not
resolve still works) and a port from the job id, writes DeepSpeed's hostfile (`host slots=devices`) into the job
folder, then `srun`s the common entry point with the torchrun-style RANK / LOCAL_RANK / NODE_RANK / WORLD_SIZE of each
task. Lightning reads the ranks from Slurm's environment (SLURMEnvironment; its own requeue handler is off: athanor's
is below).

Time limits: the job is submitted with `--signal=USR1@<train.slurm.signal_seconds>`. On SIGUSR1 the ranks agree (at
the end of the step any of them saw it) to write a step checkpoint together, then rank 0 requeues the job (`scontrol
requeue`); Slurm's next run of the same job id takes over as the next attempt, resuming from that checkpoint into the
same MLflow run (periodic `train.checkpoint_every_n_steps` are not needed for this). Otherwise Slurm never requeues
the job itself (`--no-requeue`; rank 0 turns requeueing on just for its own `scontrol requeue`): a lost node, a
pre-emption or a failed rank ends the Slurm job (NODE_FAIL, PREEMPTED, FAILED) and `reconcile` decides — the next
attempt is a new Slurm job resuming from the last checkpoint, or, with no attempt left, the job FAILS with Slurm's
state and the lost node's name (from srun's "Node failure on NODE" in the job's output, or the node's state). A
Slurm requeue after a node failure would restart the same job id on the node's stale steps, after a two-minute hold.
SIGTERM (pre-emption, `scancel`) is not a cancel here: the process dies like a killed one and Slurm's job state
decides what happens (CANCELLED: STOPPED). Neither is a collective that breaks because a peer rank's node went away
(`leases.engine_stopped`): rank 0 leaves the job to Slurm's state. `athanor cancel` stays the graceful way to stop.
Nodes with several interfaces need GLOO_SOCKET_IFNAME (exported to the job from the submitting environment).

Tests (start a real two-node cluster in network namespaces): `.venv/bin/python -m pytest tests/jobs/test_slurm.py -q`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from athanor.jobs.launchers import ENGINE_ID_ENV, RANKS_LAUNCHED_ENV, EngineState, LaunchError
from athanor.jobs.store import Job, JobStore

ENDED = {"COMPLETED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "CANCELLED", "SPECIAL_EXIT"}
"""Slurm job states after which nothing of the job runs again under its id (REQUEUED and REQUEUE_* are not)."""
COMMAND_SECONDS = 30
RANK_ENV = ("export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID NODE_RANK=$SLURM_NODEID WORLD_SIZE=$SLURM_NTASKS "
            "LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE; ")
"""Each task's torchrun-style ids (what DeepSpeed and torch.distributed read), from Slurm's."""


def _slurm(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise LaunchError(f"`{argv[0]}` is not on the PATH; install the Slurm client (Debian: slurm-client) or "
                          f"pick another train.launcher")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_SECONDS)
    except subprocess.TimeoutExpired as exc:
        raise LaunchError(f"`{' '.join(argv)}` did not answer in {COMMAND_SECONDS} s; is slurmctld up?") from exc
    if check and done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise LaunchError(f"`{' '.join(argv)}` failed: {said[-1] if said else f'exit {done.returncode}'}")
    return done


def batch_script(job: Job, train: Any, home: Path, workdir: Path) -> str:
    """The `sbatch` script of one attempt (pure: tested without a cluster)."""
    slurm = train.slurm
    gpu = train.accelerator == "gpu"
    gpus = slurm.gpus_per_node if slurm.gpus_per_node is not None else (train.devices if gpu else 0)
    out = home / "jobs" / job.id / "slurm-%j.out"
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=athanor-{job.id}",
        f"#SBATCH --nodes={train.num_nodes}",
        f"#SBATCH --ntasks-per-node={train.devices}",
        f"#SBATCH --cpus-per-task={slurm.cpus_per_task}",
        f"#SBATCH --output={out}",
        "#SBATCH --open-mode=append",
        "#SBATCH --no-requeue",  # a lost node ends the job (NODE_FAIL): athanor submits the next attempt
        f"#SBATCH --signal=USR1@{slurm.signal_seconds}",
    ]
    lines += [f"#SBATCH --gres=gpu:{gpus}"] if gpus else []
    lines += [f"#SBATCH --partition={slurm.partition}"] if slurm.partition else []
    lines += [f"#SBATCH --time={slurm.time_limit}"] if slurm.time_limit else []
    lines += [f"#SBATCH --account={slurm.account}"] if slurm.account else []
    lines += list(slurm.sbatch_lines)
    python = shlex.quote(sys.executable)
    lines += [
        "set -eu",
        f"export ATHANOR_HOME={shlex.quote(str(home))} PYTHONUNBUFFERED=1 {RANKS_LAUNCHED_ENV}=1",
        f"unset {ENGINE_ID_ENV}",
        "first=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)",
        "addr=$(scontrol show node \"$first\" -o | tr ' ' '\\n' | sed -n 's/^NodeAddr=//p')",
        "export MASTER_ADDR=\"${addr:-$first}\" MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        # DeepSpeed's own launcher form of the allocation, for its tools and for people debugging a run.
        f"scontrol show hostnames \"$SLURM_JOB_NODELIST\" | sed 's/$/ slots={train.devices}/' > "
        f"{shlex.quote(str(home / 'jobs' / job.id / 'hostfile'))}",
        f"cd {shlex.quote(str(workdir))}",
        "srun --kill-on-bad-exit=1 bash -c "
        + shlex.quote(f"{RANK_ENV}exec {python} -m athanor.jobs.worker --job {job.id} --engine-task"),
        "",
    ]
    return "\n".join(lines)


class SlurmLauncher:
    name = "slurm"

    def submit(self, job: Job, train: Any, store: JobStore) -> str:
        script = store.job_dir(job.id) / f"attempt{job.attempts}.sbatch"
        script.write_text(batch_script(job, train, store.home, Path.cwd()))
        done = _slurm("sbatch", "--parsable", str(script))
        return done.stdout.strip().split(";")[0]

    def state(self, job: Job) -> EngineState:
        done = _slurm("scontrol", "show", "job", "-o", str(job.engine_id), check=False)
        if done.returncode != 0:
            if "Invalid job id" in done.stderr:  # purged from slurmctld's memory (MinJobAge) after it ended
                return EngineState("GONE", finished=True, detail="no longer known to slurmctld")
            raise LaunchError((done.stderr or done.stdout).strip() or f"scontrol exit {done.returncode}")
        fields = dict(item.split("=", 1) for item in done.stdout.split() if "=" in item)
        state = fields.get("JobState", "UNKNOWN")
        reason = fields.get("Reason", "None")
        detail = "" if reason == "None" else f"reason {reason}, exit code {fields.get('ExitCode')}"
        if state in ENDED and state not in ("COMPLETED", "CANCELLED") and fields.get("NodeList", "(null)") != "(null)":
            detail = "; ".join(filter(None, [detail, _lost_detail(fields)]))  # the node a NODE_FAIL job lost
        return EngineState(state, finished=state in ENDED, cancelled=state == "CANCELLED", detail=detail)

    def cancel(self, job: Job) -> None:
        _slurm("scancel", str(job.engine_id))

    def logs(self, job: Job) -> str:
        fields = dict(item.split("=", 1) for item in _slurm("scontrol", "show", "job", "-o", str(job.engine_id))
                      .stdout.split() if "=" in item)
        path = Path(fields.get("StdOut", ""))
        if not path.is_file():
            raise LaunchError(f"Slurm's output file of job {job.engine_id} ({path}) cannot be read from here")
        return path.read_text(errors="replace")


NODE_FAILURE = re.compile(r"Node failure on (\S+)")
"""How srun names a node it lost, in the job's output file (`srun: error: Node failure on node1`)."""


def lost_nodes(output: str, show_node: str) -> list[str]:
    """The nodes an ended job lost: those srun named in the job's output, else those of its nodes that Slurm counts
    as down, failed or not responding now (`scontrol show node -o`; a node that came back is no longer one)."""
    named = list(dict.fromkeys(NODE_FAILURE.findall(output)))
    if named:
        return named
    lost = []
    for line in show_node.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if any(word in fields.get("State", "") for word in ("DOWN", "FAIL", "NOT_RESPONDING")):
            lost.append(fields.get("NodeName", "?"))
    return lost


def _lost_detail(fields: dict[str, str]) -> str:
    """'node node1 lost' for each node a failed job lost, '' when none is known."""
    out = Path(fields.get("StdOut", ""))
    output = ""
    if out.is_file():
        with out.open("rb") as f:  # srun's last words are at the end of what may be a long training log
            f.seek(max(0, out.stat().st_size - 64 * 1024))
            output = f.read().decode(errors="replace")
    lost = lost_nodes(output, "") or lost_nodes("", _slurm("scontrol", "show", "node", fields["NodeList"], "-o",
                                                            check=False).stdout)
    return ", ".join(f"node {name} lost" for name in lost)


def requeue_self() -> bool:
    """Rank 0 of an interrupted Slurm job: ask Slurm to run the job again (the next attempt); False outside Slurm
    or when Slurm refuses (the job then ends and `reconcile` re-queues it through athanor)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    try:  # requeueing is off (`--no-requeue`) but for this: on just long enough to requeue after the checkpoint
        _slurm("scontrol", "update", f"JobId={job_id}", "Requeue=1")
        _slurm("scontrol", "requeue", job_id)
    except LaunchError:
        return False
    finally:
        _slurm("scontrol", "update", f"JobId={job_id}", "Requeue=0", check=False)
    return True

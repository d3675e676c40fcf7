"""Where a job's training ranks run: the recipe's `train.launcher` and its `train.slurm` / `train.ray` sections.
These are service concerns, so they live with the jobs: the method-facing `TrainSpec` (distill/spec.py) says how
the Trainer trains, `JobTrainSpec` adds the launcher settings, and the recipe's `train:` section is a
`JobTrainSpec` (the YAML is unchanged). Methods receive it as the `TrainSpec` it extends and never read these fields.

    .venv/bin/python -m pytest tests/jobs/test_launchers.py tests/jobs/test_recipe.py -q -n 0
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from athanor.convert.recipe_types import Section, Text, bounded
from athanor.distill.spec import TrainSpec

_SBATCH_LINE = r"#SBATCH --[a-z][a-z0-9-]*(=[^\n\r]*)?"


class SlurmSpec(Section):
    """Slurm submission (`train.launcher: slurm`): one `sbatch` job of `num_nodes` nodes × `devices` tasks, each
    task one training rank (Lightning's SLURM environment). The job folder must be on a file system every node
    sees (the athanor home)."""

    partition: Text | None = Field(None, pattern=r"^[A-Za-z0-9_.,-]{1,64}$")
    """`--partition` (None: the cluster's default)."""
    time_limit: Text | None = Field(None, pattern=r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")
    """`--time`, in Slurm's forms: minutes, `HH:MM:SS`, `D-HH:MM:SS` (None: the partition's limit)."""
    account: Text | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """`--account` to charge (None: the user's default)."""
    gpus_per_node: int | None = bounded(None, ge=0, le=1024, reason="no node holds more than 1024 GPUs")
    """`--gres=gpu:N` (None: `train.devices` when the job trains on GPUs, else none)."""
    cpus_per_task: int = bounded(1, ge=1, le=4096, reason="no node has more than 4096 cores")
    """`--cpus-per-task` for each rank (its data loader workers and intra-op threads)."""
    signal_seconds: int = bounded(120, ge=10, le=3600, reason="the warning is sent at most an hour before the kill")
    """Seconds before the time limit at which Slurm sends SIGUSR1: every rank checkpoints at its next step and
    the job is requeued (`--requeue`), resuming there as its next attempt."""
    sbatch_lines: list[Text] = Field(default_factory=list, max_length=64)
    """Extra `#SBATCH --option[=value]` lines, copied verbatim (e.g. `#SBATCH --qos=high`)."""

    @field_validator("sbatch_lines")
    @classmethod
    def _one_option_per_line(cls, lines: list[str]) -> list[str]:
        for i, line in enumerate(lines):
            if not re.fullmatch(_SBATCH_LINE, line):
                raise ValueError(f"item {i} ({line!r}) is not one `#SBATCH --option[=value]` line; write e.g. "
                                 f"'#SBATCH --qos=high'")
        return lines


class RaySpec(Section):
    """Ray submission (`train.launcher: ray`) through the Ray Jobs API: a driver places `num_nodes × devices`
    ranks (one Ray task each, in a placement group) that run the same entry point as every launcher."""

    address: Text | None = Field(None, pattern=r"^(https?|ray)://[A-Za-z0-9_.:\[\]-]+/?$")
    """The Ray dashboard (Jobs API) address, e.g. `http://127.0.0.1:8265` (None: `RAY_ADDRESS`)."""
    cpus_per_rank: float = bounded(1.0, gt=0, le=4096, reason="no node has more than 4096 cores")
    """CPUs reserved for each rank."""
    gpus_per_rank: float | None = bounded(None, ge=0, le=16, reason="a rank drives at most a few GPUs")
    """GPUs reserved for each rank (None: 1 when the job trains on GPUs, else 0)."""


class JobTrainSpec(TrainSpec):
    """How the Lightning Trainer runs (`TrainSpec`), and where its ranks run."""

    launcher: Literal["local", "slurm", "ray"] = "local"
    """Where the ranks run: 'local' (processes on the worker's machine), 'slurm' (an `sbatch` job) or 'ray' (a
    Ray job). Every launcher runs the same entry point (`python -m athanor.jobs.worker --job ID --engine-task`)."""
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    """Slurm options (used with `launcher: slurm`)."""
    ray: RaySpec = Field(default_factory=RaySpec)
    """Ray options (used with `launcher: ray`)."""

    @field_validator("launcher")
    @classmethod
    def _engines_need_an_explicit_accelerator(cls, launcher: str, info: ValidationInfo) -> str:
        if launcher != "local" and info.data.get("accelerator") == "auto":
            raise ValueError(f"{launcher} runs the ranks on nodes that may differ from this machine, so 'auto' "
                             f"cannot be decided here: set train.accelerator to 'gpu' or 'cpu'")
        return launcher

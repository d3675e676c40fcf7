"""Whether a recipe fits the machine that would run it, decided at validate time, never hours into a job:

- local CPU ranks (`train.launcher: local`, training on CPU) beyond this machine's usable cores: each rank is a
  process, and `train.devices: 1024` would start 1,023 of them;
- local GPU ranks beyond the visible GPUs (on a machine without any GPU a GPU recipe is taken as written for
  another machine: a warning, so that `athanor validate` stays useful on a laptop);
- a size estimate (teacher weights plus the student's weights, gradients and AdamW moments per rank on this
  host, before activations) beyond this host's memory when the job trains on CPU, or beyond one visible GPU's
  memory when it trains on GPUs here. `--force` (validate, submit) turns that refusal into a warning, for a
  recipe that will run on a larger machine.

    .venv/bin/python -m pytest tests/jobs/test_recipe.py -q -k machine
"""

from __future__ import annotations

import os
from typing import Any

import torch

from athanor.jobs.recipe_yaml import Problem


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _on_gpu(train: Any) -> bool:
    return train.accelerator == "gpu" or (train.accelerator == "auto" and torch.cuda.is_available())


def placement_problems(train: Any) -> tuple[list[Problem], list[str]]:
    """(problems, warnings) for the ranks a local launcher would start on this machine."""
    if train.launcher != "local":
        return [], []  # the cluster places the ranks; its scheduler refuses what no node has

    ranks = train.devices * train.num_nodes
    if not _on_gpu(train):
        cores = usable_cores()
        if ranks > cores:
            return [Problem("train.devices", None, train.devices,
                            f"{ranks} CPU ranks would be {ranks} processes on this machine's {cores} cores; use "
                            f"train.devices ≤ {cores}, or a cluster launcher (train.launcher: slurm or ray)")], []
        return [], []
    visible = torch.cuda.device_count()
    if visible == 0:
        return [], ["train.accelerator: this machine has no visible GPU; the recipe was checked as written for "
                    "another machine (submitting it here would fail)"]
    if ranks > visible:
        return [Problem("train.devices", None, train.devices,
                        f"{ranks} GPU ranks but {visible} GPU(s) visible here; use train.devices ≤ {visible}, "
                        "or a cluster launcher")], []
    return [], []


def memory_problem(train: Any, estimate: dict[str, float], *, force: bool) -> tuple[list[Problem], list[str]]:
    """(problems, warnings) when the estimate exceeds the memory that would hold it here."""
    if not estimate:
        return [], []
    local_ranks = train.devices if train.launcher == "local" else 1
    per_rank = estimate["student_train_memory_per_rank_bytes"]
    if _on_gpu(train):
        if not torch.cuda.is_available():
            return [], []  # checked for another machine (placement_problems warned)
        need, have, where = estimate["teacher_memory_bytes"] + per_rank, torch.cuda.mem_get_info()[1], "one GPU"
    else:
        need, have, where = estimate["teacher_memory_bytes"] + per_rank * local_ranks, host_memory_bytes(), "host"
    if need <= have:
        return [], []
    key = "teacher" if estimate["teacher_memory_bytes"] > have else "student"
    fix = (f"the estimate needs {_gib(need)} (teacher weights + student weights, gradients and AdamW moments, "
           f"before activations) and this {where} has {_gib(have)}; make the model smaller, or pass --force if it "
           "will train on a larger machine")
    if force:
        return [], [f"{key}: {fix} (--force: accepted)"]
    return [Problem(key, None, "(size estimate)", fix)], []

"""Recipes that would overload the machine are refused at validate time, naming the key (issue 23, item 8):
local CPU ranks beyond the cores, and a size estimate beyond the memory that would hold it (`--force` accepts
the estimate for a recipe that trains elsewhere).

    .venv/bin/python -m pytest tests/jobs/test_machine_fit.py -q
"""

from __future__ import annotations

from harness import RECIPES

from athanor.jobs import cli
from athanor.jobs.machine_fit import host_memory_bytes, usable_cores
from athanor.jobs.validate import check

TINY = RECIPES / "minilm_tiny.yaml"
HUGE = ["student.intermediate_size=900000000"]  # within the 1e9 ceiling on sizes; estimate about 1.6 TiB


def test_local_cpu_ranks_beyond_the_cores_are_refused_naming_the_key():
    cores = usable_cores()
    too_many = check(TINY, overrides=["train.accelerator=cpu", f"train.devices={cores + 1}"])
    (problem,) = too_many.problems
    assert problem.path == "train.devices" and f"{cores} cores" in problem.message
    assert check(TINY, overrides=["train.accelerator=cpu", f"train.devices={cores}"]).problems == []
    assert check(TINY, overrides=["train.accelerator=cpu", "train.devices=1024", "train.launcher=slurm"]).problems \
        == []  # a cluster places its own ranks


def test_an_estimate_beyond_the_host_memory_is_refused_unless_forced(capsys):
    report = check(TINY, overrides=HUGE)
    (problem,) = report.problems
    need = report.estimate["teacher_memory_bytes"] + report.estimate["student_train_memory_per_rank_bytes"]
    assert need > host_memory_bytes()  # the refusal follows the printed estimate, not a guess
    assert problem.path == "student" and f"{host_memory_bytes() / 2**30:,.1f} GiB" in problem.message
    assert "--force" in problem.message
    forced = check(TINY, overrides=HUGE, force=True)
    assert forced.problems == [] and any("--force: accepted" in w for w in forced.warnings)
    assert cli.main(["validate", str(TINY), *[a for o in HUGE for a in ("-o", o)]]) != cli.EXIT_OK
    assert "student" in capsys.readouterr().err
    assert cli.main(["validate", str(TINY), "--force", *[a for o in HUGE for a in ("-o", o)]]) == cli.EXIT_OK

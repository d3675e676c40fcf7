"""The comparison-arms stage of a job (the optional protocol calls `comparison_arms` / `compare_arms`): each arm
is a fresh student trained with the same steps and data as the converted one, evaluated the same way, and logged
as a child run `arm_<name>` with its training curves. With `train.seeds: [0, 1, 2]` every arm is trained once per
seed (child runs `arm_<name>_seed<k>`); its figures are then the mean over seeds, with their standard deviation
in `arms_sd` and the summary child run `arm_<name>`. An arm at the job's own seed starts from the converted
student's initial weights (where the shapes agree), so the arms differ only in what the arm changes.

    .venv/bin/python -m pytest tests/jobs/test_cli_jobs.py -q -k arms
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

log = logging.getLogger("athanor.job")


def _mean_and_sd(runs: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    keys = runs[0]
    mean = {k: statistics.fmean(r[k] for r in runs) for k in keys}
    sd = {k: statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0 for k in keys}
    return mean, sd


def train_arms(run: Any, p: Any, results: Any) -> None:
    """Train, evaluate and log every comparison arm (per seed), then the method's summary over the arms."""
    # why: jobs/run.py imports this module at its top (a cycle)
    from athanor.jobs.run import _train, comparison_arms

    train = p.loaded.recipe.train
    seeds = list(dict.fromkeys(train.seeds)) or [train.seed]
    arms = comparison_arms(p)
    for name, args in arms.items():
        per_seed: dict[int, dict[str, float]] = {}
        for seed in seeds:
            run.stage("arms")
            side = f"arm_{name}" if len(seeds) == 1 else f"arm_{name}_seed{seed}"
            log.info("comparison arm %s (seed %d): training %d steps", name, seed, train.max_steps)
            run_id = run.tracker.start_child(side, {"athanor.arm": name, "athanor.seed": str(seed)})
            model = _train(p, run.job, run.store, logger=run.tracker.lightning_logger(run_id, run.holds),
                           progress=run.progress, arm=f"{name}@{seed}", lease=run.lease)
            per_seed[seed] = run.evaluate(p, model, side, args)
            run.tracker.log_child(side, per_seed[seed], run_id=run_id)
            del model
        results.arms[name], sd = _mean_and_sd(list(per_seed.values()))
        if len(seeds) > 1:
            results.arms_sd[name] = sd
            run.tracker.log_child(f"arm_{name}", {**results.arms[name], **{f"{k}_sd": v for k, v in sd.items()}},
                                  tags={"athanor.arm": name, "athanor.seeds": ",".join(map(str, seeds))})
            # The paired intervals compare the converted student with this arm at the job's seed (else the first).
            paired = train.seed if train.seed in per_seed else seeds[0]
            run.samples[f"arm_{name}"] = run.samples.pop(f"arm_{name}_seed{paired}", {})
            for seed in seeds:
                run.samples.pop(f"arm_{name}_seed{seed}", None)
    if arms:
        results.comparison = {k: float(v) for k, v in p.method.compare_arms(
            p.loaded.args, results.before, results.untrained, results.after, results.arms).items()}
        log.info("comparison: %s", ", ".join(f"{k} {v:.4g}" for k, v in results.comparison.items()))

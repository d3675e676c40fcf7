"""LinVideo's comparison arms (`linvideo.compare`): each a fresh student trained by the job's arms stage on the
same steps, data and initial weights as the converted one (`jobs/arms.py`), with one setting changed, so its
row answers one question about the method:

- `even_spread`: the target layers fixed to an even spread, no selection (is selection worth it?);
- `velocity_mse`: velocity MSE on the teacher's trajectory points instead of ADM (is ADM worth it?);
- `adm_cached` / `adm_rollout`: ADM from the teacher's cached trajectory points / the student's own rollout
  (does matching on the student's own states help?).

    .venv/bin/python -m pytest tests/distill/linvideo/test_arms.py -q
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from athanor.distill.linvideo.config import LinVideoArgs
from athanor.distill.spec import RecipeError

CHANGES: dict[str, dict[str, Any]] = {
    "even_spread": {"selection": "even_spread"},
    "velocity_mse": {"objective": "velocity"},
    "adm_cached": {"adm_source": "cached"},
    "adm_rollout": {"adm_source": "rollout"},
}
"""What each arm changes in the recipe's `linvideo:` settings."""

HEADLINE = "class_accuracy"


def arm_args(args: LinVideoArgs) -> dict[str, LinVideoArgs]:
    """Arm name -> the settings it trains with. An arm that would train exactly what the recipe already trains
    is refused (its row would be a second copy of the converted student, read as a comparison)."""
    arms: dict[str, LinVideoArgs] = {}
    for name in dict.fromkeys(args.compare):
        change = CHANGES[name]
        if name.startswith("adm_") and args.objective != "adm":
            raise RecipeError("linvideo.compare", args.compare, f"arm '{name}' changes where ADM's points come from, "
                              "but linvideo.objective is not adm; drop it or set objective: adm")
        if all(getattr(args, key) == value for key, value in change.items()):
            setting = ", ".join(f"linvideo.{k}: {v}" for k, v in change.items())
            raise RecipeError("linvideo.compare", args.compare, f"arm '{name}' is the recipe itself ({setting}); "
                              "list only arms that change something")
        arms[name] = args.model_copy(update={**change, "compare": []})
    return arms


def summary(args: LinVideoArgs, before: Mapping[str, float], untrained: Mapping[str, float] | None,
            after: Mapping[str, float], arms: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """class_accuracy of the teacher, the untrained switch, the converted student (`converted`) and every arm, the
    share of the teacher's each keeps (`kept_<row>`), and per arm `converted_beats_<arm>` (1.0/0.0): whether the
    recipe's own choice scored higher than the arm (the point estimates; the paired intervals are the job's)."""
    rows = {"teacher": before.get(HEADLINE, math.nan), "converted": after.get(HEADLINE, math.nan),
            **({"untrained": untrained.get(HEADLINE, math.nan)} if untrained else {}),
            **{name: metrics.get(HEADLINE, math.nan) for name, metrics in arms.items()}}
    out = {f"{HEADLINE}_{row}": value for row, value in rows.items()}
    teacher = rows["teacher"]
    for row, value in rows.items():
        if row != "teacher" and math.isfinite(teacher) and teacher > 0:
            out[f"kept_{row}"] = value / teacher
    for name in arms:
        out[f"converted_beats_{name}"] = float(rows["converted"] > rows[name])
    return out

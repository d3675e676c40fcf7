"""Every shipped recipe validates (schema, sources, student vs teacher on the meta device) and says
in its first line which command runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.validate import check

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_the_main_recipes_are_shipped():
    assert {"minilm.yaml", "minilm_tiny.yaml"} <= {p.name for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_is_valid(path: Path, home):
    assert path.read_text().startswith(f"# athanor submit recipes/{path.name}")
    report = check(path)
    assert report.problems == [], "\n".join(p.render(str(path)) for p in report.problems)
    assert 0 < report.estimate["student_params"] < report.estimate["teacher_params"]

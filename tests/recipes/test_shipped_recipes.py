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
def test_shipped_recipe_is_valid(path: Path, home, tmp_path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert any(f"athanor submit recipes/{path.name}" in line for line in header), "say in the header how to run it"
    report = check(path)
    if any(p.path.startswith("data.paths") for p in report.problems):
        # GPU recipes name the user's own dataset; check everything else against a stand-in folder.
        (tmp_path / "data").mkdir()
        report = check(path, overrides=[f"data.paths=[{tmp_path / 'data'}]"])
    assert report.problems == [], "\n".join(p.render(str(path)) for p in report.problems)
    if report.warnings:  # only a hub teacher while offline may stay unchecked
        assert all("hub is offline" in w for w in report.warnings)
        return
    assert report.estimate["student_params"] > 0 and report.estimate["teacher_params"] > 0
    if path.name.startswith(("minilm", "koala")):  # compression methods: the student is smaller
        assert report.estimate["student_params"] < report.estimate["teacher_params"]

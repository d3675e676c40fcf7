"""Every number in every method's recipe has an upper bound, and text is text (issue 23, item 9): a walk over the
whole schema sets each number field of each method to 1e308 (floats) or 2**63 (whole numbers) and expects one
error naming that key at load time, never an overflow or a diverged loss at run time.

    .venv/bin/python -m pytest tests/jobs/test_recipe_bounds.py -q
"""

from __future__ import annotations

from typing import Any, get_args

import pytest
from harness import RECIPES
from pydantic import BaseModel

from athanor.jobs.recipe import RecipeInvalid, load_recipe, recipe_model

SHIPPED = {"minilm": "minilm_tiny.yaml", "koala": "koala_tiny.yaml", "sentencevae": "sentencevae_tiny.yaml",
           "linvideo": "linvideo_tiny.yaml", "sinklora": "sinklora_tiny.yaml",
           "lora_composer": "lora_composer_fashion.yaml"}


def _kinds(annotation: Any) -> set[type]:
    args = set(get_args(annotation)) - {type(None)} if get_args(annotation) else {annotation}
    return {k for a in args for k in (_kinds(a) if get_args(a) else {a})}


def number_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type, bool]]:
    """(key, int or float, holds a list) of every number field reachable through plain sections."""
    found = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += number_fields(annotation, f"{prefix}{name}.")
            continue
        sections = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if sections and len(set(get_args(annotation)) - {type(None)}) == 1:
            found += number_fields(sections[0], f"{prefix}{name}.")  # an optional section
            continue
        kinds = _kinds(annotation)
        if kinds and kinds <= {int, float} and "tuple" not in str(annotation):
            found.append((f"{prefix}{name}", float if float in kinds else int, "list" in str(annotation)))
    return found


@pytest.mark.parametrize("method", sorted(SHIPPED))
def test_every_number_of_every_method_refuses_an_absurd_value_naming_its_key(method):
    text = (RECIPES / SHIPPED[method]).read_text()
    fields = number_fields(recipe_model(method))
    assert len(fields) > 20, fields
    accepted = []
    for key, kind, is_list in fields:
        huge = "1.0e308" if kind is float else str(2**63)
        with pytest.raises(RecipeInvalid) as refused:
            load_recipe(None, text=text, overrides=[f"{key}={f'[{huge}]' if is_list else huge}"])
        paths = [p.path for p in refused.value.problems]
        if not any(p == key or p.startswith(f"{key}.") for p in paths):
            accepted.append((key, paths))
    assert accepted == [], accepted
    load_recipe(None, text=text)  # the shipped values themselves are within every bound


def test_seeds_fit_numpy_and_text_is_text():
    text = (RECIPES / "minilm_tiny.yaml").read_text()
    for override, key in (("student.seed=-1", "student.seed"), ('description="a \\ud800 b"', "description"),
                          ('registry.name="x\\udfff"', "registry.name")):
        with pytest.raises(RecipeInvalid) as refused:
            load_recipe(None, text=text, overrides=[override])
        assert [p.path for p in refused.value.problems] == [key], refused.value.problems


def test_inputs_longer_than_a_teachers_learned_positions_are_refused_at_validate_naming_data_max_length():
    from athanor.jobs.validate import check

    short = check(RECIPES / "minilm_tiny.yaml", overrides=["teacher.config.max_position_embeddings=16"])
    assert [(p.path, p.value) for p in short.problems] == [("data.max_length", 32)]
    assert "16 learned positions" in short.problems[0].message and "data.max_length ≤ 16" in short.problems[0].message
    assert check(RECIPES / "minilm_tiny.yaml", overrides=["teacher.config.max_position_embeddings=32"]).problems == []
    # A rotary teacher (Llama) runs past its trained context: longer inputs are not refused.
    assert check(RECIPES / "sinklora_tiny.yaml", overrides=["data.max_length=1024"]).problems == []


def test_a_teacher_without_layers_is_reported_against_its_layer_count_not_the_layer_index():
    from athanor.jobs.validate import check

    report = check(RECIPES / "minilm_tiny.yaml", overrides=["teacher.config.num_hidden_layers=0"])
    assert [(p.path, p.value) for p in report.problems] == [("teacher.config.num_hidden_layers", 0)]

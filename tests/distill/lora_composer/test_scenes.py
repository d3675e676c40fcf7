"""`lora_composer.generate_scenes`: seeded scenes beyond the listed ones, in the recipe's layouts and prompt style.

    .venv/bin/python -m pytest tests/distill/lora_composer/test_scenes.py -q
"""

from __future__ import annotations

import itertools

import pytest
from harness import RECIPES

from athanor.distill.lora_composer.config import LoraComposerArgs
from athanor.distill.spec import RecipeError
from athanor.jobs.recipe import load_recipe
from athanor.jobs.validate import check

TWO = [{"box": [0.0, 0.0, 0.5, 1.0], "where": "on the left"}, {"box": [0.5, 0.0, 1.0, 1.0], "where": "on the right"}]
THREE = [{"box": [0.0, 0.2, 0.33, 0.8], "where": "on the left"},
         {"box": [0.33, 0.2, 0.66, 0.8], "where": "in the middle"},
         {"box": [0.66, 0.2, 1.0, 0.8], "where": "on the right"}]
CONCEPTS = {name: {"path": f"loras/{name}", "prompt": f"a {word} {name}", "word": word}
            for name, word in (("sneaker", "sks"), ("bag", "zwx"), ("dress", "vmj"))}
LISTED = {"prompt": "a sks sneaker on the left and a zwx bag on the right",
          "regions": [{"concept": "sneaker", "box": TWO[0]["box"]}, {"concept": "bag", "box": TWO[1]["box"]}]}


def args(count: int, seed: int = 0, layouts=(TWO, THREE), scenes=(LISTED,)) -> LoraComposerArgs:
    return LoraComposerArgs(concepts=CONCEPTS, scenes=list(scenes),
                            generate_scenes={"count": count, "seed": seed, "layouts": list(layouts)})


def as_tuples(scene) -> tuple:
    return tuple((r.concept, tuple(r.box)) for r in scene.regions)


def test_generated_scenes_are_new_distinct_and_seeded():
    # 3 concepts: 6 ordered pairs (one listed) + 6 ordered triples = 11 new scenes
    every = args(11).all_scenes()
    assert as_tuples(every[0]) == as_tuples(args(11).scenes[0])  # the listed scenes come first
    generated = [as_tuples(s) for s in every[1:]]
    expected = {tuple((n, tuple(slot["box"])) for n, slot in zip(names, layout))
                for layout in (TWO, THREE) for names in itertools.permutations(sorted(CONCEPTS), len(layout))}
    assert set(generated) == expected - {as_tuples(every[0])} and len(set(generated)) == 11
    assert [as_tuples(s) for s in args(5).all_scenes()] == [as_tuples(s) for s in args(5).all_scenes()]
    assert [as_tuples(s) for s in args(5, seed=1).all_scenes()] != [as_tuples(s) for s in args(5).all_scenes()]


def test_prompts_follow_the_listed_style():
    prompts = {as_tuples(s): s.prompt for s in args(11).all_scenes()[1:]}
    two = (("bag", tuple(TWO[0]["box"])), ("sneaker", tuple(TWO[1]["box"])))
    three = tuple((n, tuple(slot["box"])) for n, slot in zip(("dress", "bag", "sneaker"), THREE))
    assert prompts[two] == "a zwx bag on the left and a sks sneaker on the right"
    assert prompts[three] == "a vmj dress on the left, a zwx bag in the middle and a sks sneaker on the right"


def test_asking_for_more_scenes_than_there_are_is_one_error_naming_the_key():
    with pytest.raises(RecipeError) as caught:
        args(12).all_scenes()
    assert caught.value.key == "lora_composer.generate_scenes.count" and "at most 11" in caught.value.fix


def test_no_listed_and_no_generated_scene_is_an_error():
    with pytest.raises(RecipeError) as caught:
        LoraComposerArgs(concepts=CONCEPTS).all_scenes()
    assert caught.value.key == "lora_composer.scenes"
    assert len(args(3, scenes=()).all_scenes()) == 3  # generated scenes alone are enough


def test_the_fashion_recipe_validates_with_generated_scenes():
    recipe = RECIPES / "lora_composer_fashion.yaml"
    layouts = load_recipe(recipe).args.generate_scenes
    assert layouts is not None and layouts.count * len(load_recipe(recipe).args.seeds) >= 64
    assert check(recipe).problems == []
    report = check(recipe, overrides=["lora_composer.generate_scenes.count=1000"])
    assert [p.path for p in report.problems] == ["lora_composer.generate_scenes.count"]

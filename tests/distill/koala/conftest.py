"""Shared KOALA test setup: the tiny SDXL-shaped pipeline of tests/fixtures/koala_sdxl_tiny.yaml, shrunk
further (8x8 latents, 2 eval steps, one seed), and a student factory; and the Fashion-canvas testbed teacher
of recipes/koala_tiny.yaml (pixel space, no VAE, one text encoder), shrunk the same way. Used by every
test file in this folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from athanor.distill.koala.method import Koala
from athanor.jobs.recipe import load_recipe
from athanor.jobs.sources import resolve_source

ROOT = Path(__file__).parents[3]
SDXL_TINY = ROOT / "tests" / "fixtures" / "koala_sdxl_tiny.yaml"
SMALL = ["teacher.config.unet.sample_size=8", "teacher.config.unet.transformer_layers_per_block=[1,2,5]",
         "koala.eval_steps=2", "koala.eval_seeds=[0]", "eval.latency_repeats=1", "data.batch_size=2",
         "koala.data_free_steps=2", "koala.data_free_samples=1"]


@pytest.fixture(scope="module")
def tiny():
    """(method, loaded recipe, teacher); tests that change the teacher restore it."""
    loaded = load_recipe(SDXL_TINY, overrides=SMALL)
    method = Koala()
    teacher = method.load_teacher(resolve_source(loaded.recipe.teacher, "teacher"))
    return method, loaded, teacher


@pytest.fixture
def make_student(tiny) -> Callable:
    """`make_student(preset)`: a fresh untrained student of the tiny teacher."""
    method, loaded, teacher = tiny

    def build(preset: str = "koala-1b"):
        return method.convert(teacher, loaded.student.model_copy(update={"preset": preset}), loaded.args)

    return build


# The data-free mode (the tiny recipe trains on real canvases: test_canvas_training.py builds that mode itself).
# rollout_prob 0: one training step here is a real-image (or data-free) batch; the rollout tests set it themselves.
FASHION_SMALL = ["koala.train_data=data_free", "koala.rollout_prob=0", "koala.eval_steps=2", "koala.eval_seeds=[0]",
                 "eval.latency_repeats=1",
                 "data.batch_size=2",
                 "koala.data_free_steps=2", "koala.data_free_samples=1",
                 'koala.prompts=["a sneaker on the left", "a dress on the left, an ankle boot in the middle '
                 'and a shirt on the right"]',
                 'koala.eval_prompts=["a coat on the left", "a sneaker on the left and a dress on the right"]']


@pytest.fixture(scope="module")
def fashion():
    """(method, loaded recipe, teacher) of recipes/koala_tiny.yaml: the trained Fashion-canvas testbed."""
    loaded = load_recipe(ROOT / "recipes" / "koala_tiny.yaml", overrides=FASHION_SMALL)
    method = Koala()
    teacher = method.load_teacher(resolve_source(loaded.recipe.teacher, "teacher"))
    return method, loaded, teacher


CANVASES = [o for o in FASHION_SMALL if not o.startswith("koala.train_data")] + [
    "koala.train_data=canvases", "koala.canvas_examples=16", "koala.uncond_prob=0", "data.seed=7"]


@pytest.fixture(scope="module")
def canvas_job(fashion):
    """(method, loaded recipe, teacher, MethodData) of recipes/koala_tiny.yaml in its real-data mode (canvases),
    shrunk: 16 canvases, no caption dropout (so a test can recompute the conditioning), data seed 7."""
    method, _, teacher = fashion
    loaded = load_recipe(ROOT / "recipes" / "koala_tiny.yaml", overrides=CANVASES)
    return method, loaded, teacher, method.data(teacher, loaded.recipe.data, loaded.args)

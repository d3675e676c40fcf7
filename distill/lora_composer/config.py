"""LoRA-Composer's recipe sections: `student:` and `lora_composer:` (pydantic, validated by `athanor validate`).

Kept apart from `method.py` so that the rest of the package (training, evaluation) can import the
settings without importing the method, and a reader finds every recipe key of the method in one file.
"""

from __future__ import annotations

import itertools
import random
from typing import Literal

from pydantic import Field

from athanor.convert.recipe_types import TeacherFile, Text
from athanor.distill.lora_composer.sampling import ComposerSettings
from athanor.distill.spec import RecipeError, Section

__all__ = ["ARMS", "MAX_REGIONS", "Arm", "ConceptSpec", "RegionSpec", "SceneSpec", "LayoutSlot", "GeneratedScenes",
           "LoraComposerStudent", "LoraComposerArgs"]

Arm = Literal["plain", "inject_only", "plus_isolation", "plus_guidance", "plus_reinit"]
ARMS: tuple[Arm, ...] = ("plain", "inject_only", "plus_isolation", "plus_guidance", "plus_reinit")
"""The comparison rows `lora_composer.compare` can ask for (see `LoraComposerArgs.compare`)."""


MAX_REGIONS = 8
"""Concepts per scene: the per-count keys (`presence_<n>`, ...) are declared for 1..MAX_REGIONS."""


class ConceptSpec(Section):
    """One concept LoRA and how prompts name it."""

    path: TeacherFile
    """The LoRA: a diffusers-format file (`pytorch_lora_weights.safetensors`) or the directory holding it;
    relative paths are read inside the teacher's directory."""
    prompt: Text
    """The concept's own prompt, used inside its box (e.g. 'a sks sneaker')."""
    word: Text
    """The word naming the concept in its prompt and in scene prompts (e.g. 'sks'): its cross-attention
    map is what guidance and re-initialisation move into the box."""
    judge_class: Text | None = None
    """The judge's class name for this concept (presence metrics need it and a teacher judge)."""
    weight: float = Field(1.0, ge=0, le=10)
    """The baseline's `set_adapters` weight for this adapter."""
    class_word: Text | None = None
    """The plain word the base model knows for this concept (default `judge_class`, e.g. 'sneaker'): the `plain`
    arm prompts the base model with it, and measures its leakage on it."""

    def plain_word(self) -> str | None:
        return self.class_word or self.judge_class


class RegionSpec(Section):
    concept: Text
    """A key of `concepts`."""
    box: tuple[float, float, float, float]
    """(x0, y0, x1, y1) as fractions of the image width and height, 0 ≤ x0 < x1 ≤ 1, 0 ≤ y0 < y1 ≤ 1."""


class SceneSpec(Section):
    prompt: Text
    """The global prompt (the baseline's whole prompt; LoRA-Composer's prompt outside every box)."""
    regions: list[RegionSpec] = Field(min_length=1, max_length=MAX_REGIONS)
    """The scene's concepts, one box each (at most 8: each count has its own metric keys)."""
    plain_prompt: Text | None = None
    """The `plain` arm's prompt for the base model, naming each concept by its `class_word` (default: `prompt`
    with every concept word removed, 'a sks sneaker on the left ...' -> 'a sneaker on the left ...')."""


class LayoutSlot(Section):
    box: tuple[float, float, float, float]
    """(x0, y0, x1, y1) as fractions of the image width and height, as a region's box."""
    where: Text
    """How a caption places an item in this box ('on the left')."""


class GeneratedScenes(Section):
    """Scenes drawn by a seeded generator: concept combinations in the given layouts that `scenes` does not list,
    so the evaluation is not only of hand-picked scenes. Prompts follow the listed scenes' style: each concept's
    own prompt and its slot's `where`, joined as 'A on the left, B in the middle and C on the right'."""

    count: int = Field(16, ge=1, le=4096)
    """How many scenes to draw (without replacement) from every layout × ordered choice of distinct concepts."""
    seed: int = 0
    """The draw's seed: the same seed, concepts and layouts give the same scenes."""
    layouts: list[list[LayoutSlot]] = Field(min_length=1)
    """Arrangements of boxes a scene can use (e.g. two items left and right; three left, middle and right)."""

    def draw(self, concepts: list[str], prompts: dict[str, str], listed: list[SceneSpec]) -> list[SceneSpec]:
        """`count` scenes, none with the same concepts in the same boxes as a listed scene."""
        taken = {tuple((r.concept, tuple(r.box)) for r in s.regions) for s in listed}
        candidates = [(layout, names) for layout in self.layouts
                      for names in itertools.permutations(sorted(concepts), len(layout))
                      if tuple((n, tuple(slot.box)) for n, slot in zip(names, layout)) not in taken]
        if self.count > len(candidates):
            raise RecipeError("lora_composer.generate_scenes.count", self.count,
                              f"these concepts and layouts give {len(candidates)} scenes the recipe does not "
                              f"list: ask for at most {len(candidates)}, or add layouts or concepts")
        drawn = random.Random(self.seed).sample(candidates, self.count)
        return [SceneSpec(prompt=_caption([f"{prompts[n]} {slot.where}" for n, slot in zip(names, layout)]),
                          regions=[RegionSpec(concept=n, box=slot.box) for n, slot in zip(names, layout)])
                for layout, names in drawn]


def _caption(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


class LoraComposerStudent(Section):
    """Nothing to choose: the composed model is the teacher's U-Net with the concept adapters."""


class LoraComposerArgs(Section):
    """LoRA-Composer settings (the recipe's `lora_composer:` section)."""

    concepts: dict[str, ConceptSpec] = Field(min_length=1)
    """Adapter name -> its LoRA and prompt; all are held in one U-Net."""
    scenes: list[SceneSpec] = Field(default_factory=list)
    """The evaluated scenes: before and after sample each with every seed (with `generate_scenes`, these and the
    generated ones; at least one scene in all)."""
    generate_scenes: GeneratedScenes | None = None
    """More evaluated scenes, drawn by a seeded generator from the concepts and layouts (see GeneratedScenes)."""
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3], min_length=1)
    steps: int = Field(20, ge=1, le=1000)
    """DDIM steps."""
    guidance_scale: float = Field(3.0, ge=1, le=50)
    isolate: bool = True
    """Concept isolation: self-attention between different concepts' regions masked (plus its soft loss)."""
    inject: bool = True
    """Concept injection: inside box i the queries attend to concept i's prompt with adapter i."""
    reinit: bool = True
    """Latent re-initialisation at t = T from each concept word's best attention window."""
    guidance_steps: int = Field(25, ge=0, le=1000)
    """Latent guidance for at most this many steps (stopped earlier when the loss rises); 0 disables it."""
    compare: list[Arm] = Field(default_factory=list)
    """Extra rows, each sampled on the same scenes, seeds, noise, steps and guidance scale and scored by the same
    judge, reported on both sides as `arm_<name>/<metric>` (presence, confusion, vanishing per count and class,
    leakage). `plain`: the base model without LoRAs prompted with the concepts' class words (`plain_prompt`):
    whether composition is needed at all. The ablation ladder of the composer's pieces (its other settings as
    above): `inject_only` (region injection; no isolation, guidance or re-initialisation), `plus_isolation`,
    `plus_guidance` (`guidance_steps`, 25 when that is 0), `plus_reinit` (all four: the full method). Each costs
    one more sampling of every scene (`plus_guidance` and `plus_reinit` as much as the composer itself)."""
    eta0: float = Field(20.0, ge=0, le=1000)
    """η = eta0·√s_t, s from 1 to 0.5 over the guided steps."""
    top_k: float = Field(0.2, gt=0, le=1)
    """Share of each box's cells whose attention the injection loss averages."""
    loss_weights: dict[str, float] = Field(default_factory=dict)
    """Overrides of the guidance weights {injection: 8, fill: 1, isolation: 10}."""
    overlap_warn: float = Field(0.1, ge=0, le=1)
    """Warn when two boxes of a scene overlap by more than this share of the smaller one."""
    cpu_threads: int | None = Field(None, ge=1, le=1024)
    """Torch intra-op threads for the job (1 on a shared CPU)."""

    def all_scenes(self) -> list[SceneSpec]:
        """The listed scenes, then the generated ones (RecipeError when there are none, or too few to draw)."""
        generated = [] if self.generate_scenes is None else self.generate_scenes.draw(
            list(self.concepts), {name: c.prompt for name, c in self.concepts.items()}, self.scenes)
        if not self.scenes and not generated:
            raise RecipeError("lora_composer.scenes", [], "list at least one scene, or set generate_scenes")
        return [*self.scenes, *generated]

    def settings(self) -> ComposerSettings:
        return ComposerSettings(self.steps, self.guidance_scale, self.isolate, self.inject, self.reinit,
                                self.guidance_steps, self.eta0, self.top_k, dict(self.loss_weights))

    def arm_settings(self, arm: Arm) -> ComposerSettings:
        """The composer's settings for an ablation arm: its switches set, every other setting the recipe's."""
        if arm == "plain":
            raise ValueError("the plain arm is the base model, not a composer")
        rung = ARMS.index(arm)  # inject_only 1, plus_isolation 2, plus_guidance 3, plus_reinit 4
        guided = self.guidance_steps or ComposerSettings.guidance_steps
        return ComposerSettings(self.steps, self.guidance_scale, isolate=rung >= 2, inject=True, reinit=rung >= 4,
                                guidance_steps=guided if rung >= 3 else 0, eta0=self.eta0, top_k=self.top_k,
                                loss_weights=dict(self.loss_weights))

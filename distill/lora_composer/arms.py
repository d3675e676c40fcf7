"""LoRA-Composer's comparison rows (`lora_composer.compare`): the `plain` base model prompted with the concepts'
class words, and the ablation ladder of the composer's pieces (`inject_only`, `plus_isolation`, `plus_guidance`,
`plus_reinit`). Each is sampled on the job's scenes, seeds and noise with its steps and guidance scale, scored by
the same judge (`evaluation.evaluate`), and reported as `arm_<name>/<metric>` keys.

The spine's comparison arms (`comparison_arms`) are trained students, asked only of methods that train; this
training-free method evaluates its rows itself, once per job (the first evaluation, cached in the payload), and
returns the same figures on both sides so that before and after keep one set of keys. Their sample grids go to
`artifacts/arm_<name>/`.

    .venv/bin/python -m pytest tests/distill/lora_composer/test_arms.py -q
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from athanor.distill.fashion_mnist import CLASSES
from athanor.distill.intervals import PerSample
from athanor.distill.lora_composer import evaluation as ev
from athanor.distill.lora_composer.config import ARMS, MAX_REGIONS, Arm, LoraComposerArgs, SceneSpec
from athanor.distill.lora_composer.pipeline import Composer, ComposerTeacher, Mixer, PlainBase, Scene
from athanor.distill.lora_composer.sampling import ConceptRegion, word_positions
from athanor.distill.spec import Direction, RecipeError

KEY = "lora_composer"


def arm_metrics() -> dict[str, Direction]:
    """The keys an arm row can hold, `arm_<name>/` before each: per-count and per-class presence, confusion,
    vanishing, and leakage (declared for every arm so that `validate` knows them whatever the recipe asks)."""
    keys: dict[str, Direction] = {}
    for n in range(1, MAX_REGIONS + 1):
        keys.update({f"presence_{n}": "higher", f"confusion_{n}": "lower", f"vanishing_{n}": "lower"})
    keys.update({f"presence_{ev.class_key(c)}": "higher" for c in CLASSES})
    keys["leakage"] = "lower"
    return {f"arm_{arm}/{key}": direction for arm in ARMS for key, direction in keys.items()}


def plain_prompt(scene: SceneSpec, args: LoraComposerArgs) -> str:
    """The scene's `plain_prompt`, else its prompt with every concept word removed ('a sks sneaker on the left'
    -> 'a sneaker on the left'): the caption the base model was trained on."""
    if scene.plain_prompt:
        return scene.plain_prompt
    prompt = scene.prompt
    for region in scene.regions:
        prompt = re.sub(rf"\s*\b{re.escape(args.concepts[region.concept].word.strip())}\b", "", prompt)
    return prompt.strip()


def plain_scene(scene: SceneSpec, args: LoraComposerArgs) -> Scene:
    """The scene the `plain` arm samples: the plain prompt, each region's word its concept's class word (its
    leakage is measured on that word), adapters named only for the judge's labels."""
    prompt = plain_prompt(scene, args)
    return Scene(prompt, tuple(ConceptRegion(r.concept, tuple(r.box), prompt,
                                             args.concepts[r.concept].plain_word() or "")
                               for r in scene.regions))


def check_arms(args: LoraComposerArgs, tokenizer) -> None:
    """With the `plain` arm, every concept has a class word and every plain prompt holds its concepts' words."""
    if "plain" not in args.compare:
        return
    for name, concept in args.concepts.items():
        if not concept.plain_word():
            raise RecipeError(f"{KEY}.concepts.{name}.class_word", None, "the plain arm prompts the base model "
                              "with each concept's class word: set class_word (or judge_class)")
    for s, scene in enumerate(args.all_scenes()):
        prompt = plain_prompt(scene, args)
        for region in scene.regions:
            word = args.concepts[region.concept].plain_word()
            try:
                word_positions(tokenizer, prompt, word)
            except ValueError:
                raise RecipeError(f"{KEY}.scenes[{s}].plain_prompt", prompt, f"the class word {word!r} must appear "
                                  "in the plain arm's prompt: set plain_prompt") from None


def arm_model(arm: Arm, teacher: ComposerTeacher, args: LoraComposerArgs) -> Mixer | Composer:
    if arm == "plain":
        return PlainBase(teacher, args.steps, args.guidance_scale)
    return Composer(teacher, args.arm_settings(arm))


def arm_rows(teacher: ComposerTeacher, payload: dict[str, Any], args: LoraComposerArgs,
             artifact_root: Path) -> dict[str, float]:
    """Every asked-for arm's figures as `arm_<name>/<metric>` floats, sampled on the first call and kept in the
    evaluation payload (the second side returns the same figures: both sides keep one set of keys)."""
    cache = payload.setdefault("arm_rows", {})
    key = tuple(args.compare)
    if key not in cache:
        rows: dict[str, float] = {}
        for arm in dict.fromkeys(args.compare):
            scenes = payload["plain_scenes"] if arm == "plain" else payload["scenes"]
            metrics = ev.evaluate(arm_model(arm, teacher, args), scenes, payload["noise"], payload["labels"],
                                  teacher.judge, artifact_root / f"arm_{arm}", teacher.judge_classes,
                                  measure_memory=False)
            rows.update({f"arm_{arm}/{k}": (v.value if isinstance(v, PerSample) else float(v))
                         for k, v in metrics.items()})
        cache[key] = rows
    return dict(cache[key])

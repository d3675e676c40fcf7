"""LoRA-Composer's comparison rows (`distill.lora_composer.arms`, `lora_composer.compare`): the ablation ladder's
switches, the plain arm's prompts and checks, the plain arm as the bare base model, and every row evaluated once
with the same judge, seeds and noise and reported with the same keys on both sides, on the testbed base model with
random concept LoRAs made here.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/distill/lora_composer/test_arms.py -q
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from peft import LoraConfig

import athanor.distill.lora_composer
from athanor.distill.lora_composer import arms
from athanor.distill.lora_composer.config import ARMS, LoraComposerArgs, LoraComposerStudent
from athanor.distill.lora_composer.method import LoraComposer
from athanor.distill.lora_composer.pipeline import PlainBase
from athanor.distill.spec import DataSpec, EvalSpec, RecipeError, ResolvedSource

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:Already found a `peft_config`")]  # several adapters on purpose

TESTBED = Path(athanor.distill.lora_composer.__file__).parent / "testbed"
WORDS = {"sneaker": "sks", "bag": "zwx"}
LEFT, RIGHT = [0.03125, 0.0625, 0.46875, 0.9375], [0.53125, 0.0625, 0.96875, 0.9375]
PROMPT = "a sks sneaker on the left and a zwx bag on the right"


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    source = UNet2DConditionModel.from_pretrained(TESTBED / "unet").eval()
    root = tmp_path_factory.mktemp("loras")
    for seed, name in enumerate(WORDS):
        torch.manual_seed(400 + seed)
        source.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                      init_lora_weights=False), adapter_name=name)
        source.save_lora_adapter(root / name, adapter_name=name)
    return {name: root / name for name in WORDS}


def make_args(paths: dict[str, Path | str], **overrides) -> LoraComposerArgs:
    data = {"concepts": {name: {"path": str(paths[name]), "prompt": f"a {word} {name}", "word": word,
                                "judge_class": name} for name, word in WORDS.items()},
            "scenes": [{"prompt": PROMPT, "regions": [{"concept": "sneaker", "box": LEFT},
                                                      {"concept": "bag", "box": RIGHT}]}],
            "seeds": [0], "steps": 2, "guidance_steps": 1}
    return LoraComposerArgs(**{**data, **overrides})


DUMMY = {name: f"loras/{name}" for name in WORDS}


def test_the_ablation_ladder_adds_one_piece_per_rung():
    args = make_args(DUMMY, eta0=7.0, guidance_scale=4.0, guidance_steps=3)
    switches = {arm: (s.inject, s.isolate, s.guidance_steps, s.reinit)
                for arm in ARMS[1:] for s in [args.arm_settings(arm)]}
    assert switches == {"inject_only": (True, False, 0, False), "plus_isolation": (True, True, 0, False),
                        "plus_guidance": (True, True, 3, False), "plus_reinit": (True, True, 3, True)}
    assert args.arm_settings("plus_reinit") == args.settings()  # the full method with the recipe's settings
    assert {args.arm_settings(a).eta0 for a in ARMS[1:]} == {7.0}
    assert {args.arm_settings(a).guidance_scale for a in ARMS[1:]} == {4.0}
    assert make_args(DUMMY, guidance_steps=0).arm_settings("plus_guidance").guidance_steps == 25  # still guides
    with pytest.raises(ValueError, match="base model"):
        args.arm_settings("plain")


def test_plain_prompt_drops_the_concept_words():
    args = make_args(DUMMY)
    assert arms.plain_prompt(args.scenes[0], args) == "a sneaker on the left and a bag on the right"
    scene = arms.plain_scene(args.scenes[0], args)
    assert [(r.adapter, r.word, r.prompt) for r in scene.regions] == [
        ("sneaker", "sneaker", scene.prompt), ("bag", "bag", scene.prompt)]
    own = make_args(DUMMY, scenes=[{**args.scenes[0].model_dump(), "plain_prompt": "a shoe and a bag"}])
    own.concepts["sneaker"].class_word = "shoe"
    assert arms.plain_scene(own.scenes[0], own).prompt == "a shoe and a bag"
    assert arms.plain_scene(own.scenes[0], own).regions[0].word == "shoe"


def test_plain_arm_checks_name_the_key():
    tokenizer = LoraComposer().load_teacher(ResolvedSource(description="t", path=TESTBED), meta=True).tokenizer
    arms.check_arms(make_args(DUMMY, compare=["plain"]), tokenizer)
    no_class = make_args(DUMMY, compare=["plain"])
    no_class.concepts["bag"].judge_class = None
    with pytest.raises(RecipeError) as error:
        arms.check_arms(no_class, tokenizer)
    assert error.value.key == "lora_composer.concepts.bag.class_word"
    wrong = make_args(DUMMY, compare=["plain"])
    wrong.scenes[0].plain_prompt = "a sneaker on the left"
    with pytest.raises(RecipeError) as error:
        arms.check_arms(wrong, tokenizer)
    assert error.value.key == "lora_composer.scenes[0].plain_prompt" and "'bag'" in str(error.value)
    no_class.compare = []
    arms.check_arms(no_class, tokenizer)  # only the plain arm needs class words


def converted(loras, **overrides):
    method, args = LoraComposer(), make_args(loras, **overrides)
    teacher = method.load_teacher(ResolvedSource(description="t", path=TESTBED))
    composer = method.convert(teacher, LoraComposerStudent(), args)
    return method, args, teacher, composer, method.data(teacher, DataSpec(), args)


def test_plain_arm_is_the_base_model_without_adapters(loras):
    """The plain arm samples the bare base U-Net (DDIM + CFG written out here) under the plain prompt."""
    method, args, teacher, _, data = converted(loras, compare=["plain"])
    scene, z = data.eval["plain_scenes"][0], data.eval["noise"]
    images, _ = PlainBase(teacher, args.steps, args.guidance_scale).sample(scene, z)
    base = UNet2DConditionModel.from_pretrained(TESTBED / "unet").eval()
    ids = teacher.tokenizer([scene.prompt, ""], padding="max_length", max_length=teacher.max_length,
                            return_tensors="pt")["input_ids"]
    with torch.no_grad():
        cond, uncond = teacher.text_encoder(ids).last_hidden_state[:, None]
        ddim = DDIMScheduler.from_config(teacher.scheduler_config)
        ddim.set_timesteps(args.steps)
        x = z.clone()
        for t in ddim.timesteps:
            eps_c = base(x, t, encoder_hidden_states=cond).sample
            eps_u = base(x, t, encoder_hidden_states=uncond).sample
            x = ddim.step(eps_u + args.guidance_scale * (eps_c - eps_u), t, x).prev_sample
    torch.testing.assert_close(images, x, atol=1e-5, rtol=1e-5)


def test_every_row_is_evaluated_once_and_reported_on_both_sides(loras, tmp_path, monkeypatch):
    method, args, teacher, composer, data = converted(loras, compare=list(ARMS))
    calls = []
    evaluate = arms.ev.evaluate
    monkeypatch.setattr(arms.ev, "evaluate", lambda model, *a, **k: calls.append(type(model).__name__)
                        or evaluate(model, *a, **k))
    sides = {}
    for side, model in (("before", method.teacher_model(teacher)), ("after", composer)):
        (tmp_path / side).mkdir()
        sides[side] = method.evaluate(model, teacher, data, EvalSpec(), args, tmp_path / side)
    # the method's own side, the rows (once, on the first side), the other side
    assert calls == ["Mixer", "PlainBase", *["Composer"] * 4, "Composer"]
    before, after = ({k: v for k, v in m.items() if k.startswith("arm_")} for m in sides.values())
    assert before == after and set(before) <= set(method.metrics)
    for arm in ARMS:
        assert {f"arm_{arm}/{k}" for k in ("presence_2", "confusion_2", "vanishing_2", "presence_sneaker",
                                           "presence_bag", "leakage")} <= set(before)
        assert (tmp_path / f"arm_{arm}" / "samples.png").is_file()
    assert all(math.isfinite(v) for v in before.values())
    # the full rung is the composer itself: the same images, so the same figures as the after side
    full = {k.removeprefix("arm_plus_reinit/"): v for k, v in before.items() if k.startswith("arm_plus_reinit/")}
    assert full == {k: pytest.approx(float(getattr(sides["after"][k], "value", sides["after"][k]))) for k in full}

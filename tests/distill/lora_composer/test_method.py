"""The LoRA-Composer method (`distill.lora_composer.method`) called directly, without the job spine, on the testbed
base model with random concept LoRAs made here: one clear `RecipeError` per kind of bad input (naming its key),
the overlap warning, the memory of three adapters in one U-Net, and the export / `load_export` round trip.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/distill/lora_composer/test_method.py -q
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from safetensors.torch import load_file, save_file

import athanor.distill.lora_composer
from athanor.convert.lora_composer import LORA_FILE, adapter_bytes
from athanor.distill.lora_composer.config import LoraComposerArgs, LoraComposerStudent
from athanor.distill.lora_composer.method import LoraComposer, load_export
from athanor.distill.lora_composer.pipeline import Composer, ComposerTeacher
from athanor.distill.spec import DataSpec, RecipeError, ResolvedSource

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:Already found a `peft_config`")]  # several adapters on purpose

TESTBED = Path(athanor.distill.lora_composer.__file__).parent / "testbed"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
WORDS = {"sneaker": "sks", "bag": "zwx", "trouser": "qlv"}
LEFT, RIGHT = [0.03125, 0.0625, 0.46875, 0.9375], [0.53125, 0.0625, 0.96875, 0.9375]
PROMPT = "a sks sneaker on the left and a zwx bag on the right"
Q_KEY = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # a 64-channel attention projection


def base_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(TESTBED / "unet").eval()


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    """Three random (non-zero) LoRAs, saved from a separate copy of the testbed U-Net."""
    source, root = base_unet(), tmp_path_factory.mktemp("loras")
    for seed, name in enumerate(WORDS):
        torch.manual_seed(300 + seed)
        source.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False),
                           adapter_name=name)
        source.save_lora_adapter(root / name, adapter_name=name)
    return {name: root / name for name in WORDS}


def make_args(loras: dict[str, Path], **overrides) -> LoraComposerArgs:
    data = {"concepts": {name: {"path": str(loras[name]), "prompt": f"a {word} {name}", "word": word}
                         for name, word in WORDS.items()},
            "scenes": [{"prompt": PROMPT, "regions": [{"concept": "sneaker", "box": LEFT},
                                                      {"concept": "bag", "box": RIGHT}]}],
            "seeds": [0], "steps": 3, "guidance_steps": 2}
    return LoraComposerArgs(**{**data, **overrides})


def teacher() -> ComposerTeacher:
    return LoraComposer().load_teacher(ResolvedSource(description="t", path=TESTBED))


def convert(model: ComposerTeacher, args: LoraComposerArgs) -> Composer:
    return LoraComposer().convert(model, LoraComposerStudent(), args)


def bad_lora(tmp_path: Path, loras: dict[str, Path], edit) -> str:
    state = load_file(str(loras["sneaker"] / LORA_FILE))
    edit(state)
    (tmp_path / "bad").mkdir()
    save_file(state, str(tmp_path / "bad" / LORA_FILE))
    return str(tmp_path / "bad")


def _wrong_in_features(state):
    state[Q_KEY + ".lora_A.weight"] = torch.randn(4, 65)


def _wrong_rank(state):
    state[Q_KEY + ".lora_B.weight"] = torch.randn(64, 8)  # lora_A keeps rank 4


def _unknown_module(state):
    state[Q_KEY.replace("to_q", "to_zz") + ".lora_A.weight"] = state.pop(Q_KEY + ".lora_A.weight")
    state[Q_KEY.replace("to_q", "to_zz") + ".lora_B.weight"] = state.pop(Q_KEY + ".lora_B.weight")


def scene(prompt: str = PROMPT, left=None, right=None, concepts=("sneaker", "bag")) -> list[dict]:
    return [{"prompt": prompt, "regions": [{"concept": concepts[0], "box": left or LEFT},
                                           {"concept": concepts[1], "box": right or RIGHT}]}]


@pytest.mark.parametrize("scenes, key, words", [
    (scene(right=[0.5, 0.0, 1.2, 1.0]), "lora_composer.scenes[0].regions[1].box", ["inside the canvas", "1.2"]),
    (scene(right=[0.9, 0.0, 0.6, 1.0]), "lora_composer.scenes[0].regions[1].box", ["x0 < x1"]),
    (scene(concepts=("hat", "bag")), "lora_composer.scenes[0].regions[0].concept", ["hat", "'sneaker'"]),
    (scene(prompt="a sneaker on the left and a zwx bag on the right"), "lora_composer.scenes[0].prompt",
     ["'sks'", "must appear"]),
])
def test_bad_scenes(loras, scenes, key, words):
    model = teacher()
    with pytest.raises(RecipeError) as err:
        convert(model, make_args(loras, scenes=scenes))
    assert err.value.key == key
    assert all(word in str(err.value) for word in words), str(err.value)
    assert not getattr(model.unet, "peft_config", {})


def test_concept_word_absent_from_its_prompt(loras):
    args = make_args(loras)
    args.concepts["bag"].prompt = "a handbag"
    with pytest.raises(RecipeError) as err:
        convert(teacher(), args)
    assert err.value.key == "lora_composer.concepts.bag.word"
    assert "'zwx'" in str(err.value) and "a handbag" in str(err.value)


@pytest.mark.parametrize("edit, words", [
    (None, ["nope", LORA_FILE]),
    (_wrong_in_features, [Q_KEY, "in_features=64", "[r, 64]"]),
    (_wrong_rank, [Q_KEY, "(64, 8)", "one rank r"]),
    (_unknown_module, ["to_zz", "does not exist"]),
])
def test_bad_lora_files(tmp_path, loras, edit, words):
    args = make_args(loras)
    args.concepts["bag"].path = str(tmp_path / "nope") if edit is None else bad_lora(tmp_path, loras, edit)
    model = teacher()
    with pytest.raises(RecipeError) as err:
        convert(model, args)
    assert err.value.key == "lora_composer.concepts.bag.path"
    assert all(word in str(err.value) for word in words), str(err.value)
    assert not getattr(model.unet, "peft_config", {})  # every file is checked before any is loaded


@pytest.mark.parametrize("path", ["../x", "loras/../../x", "../testbed_copy"])
def test_relative_path_may_not_leave_the_teacher_directory(loras, path):
    args = make_args(loras)
    args.concepts["trouser"].path = path
    with pytest.raises(RecipeError) as err:
        convert(teacher(), args)
    assert err.value.key == "lora_composer.concepts.trouser.path"
    assert "inside the teacher directory" in str(err.value) and path in str(err.value)


def test_relative_path_inside_the_teacher_directory_is_read_there(loras):
    model, args = teacher(), make_args(loras)
    args.concepts["trouser"].path = "loras/sneaker"  # the testbed's own concept LoRA
    convert(model, args)
    assert model.adapters["trouser"] == (TESTBED / "loras" / "sneaker").resolve()
    assert set(model.unet.peft_config) == set(WORDS)


def test_overlapping_boxes_warn_but_convert(loras, caplog):
    model = teacher()
    overlapping = scene(right=[0.3, 0.0625, 0.8, 0.9375])  # x overlap 0.3..0.46875: ~39% of the smaller box
    with caplog.at_level(logging.WARNING, logger="athanor.distill.lora_composer.method"):
        composer = convert(model, make_args(loras, scenes=overlapping))
    assert isinstance(composer, Composer)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "overlap" in r.getMessage()]
    assert len(warnings) == 1 and "scenes[0]" in warnings[0].getMessage(), caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="athanor.distill.lora_composer.method"):
        convert(teacher(), make_args(loras, scenes=scene(right=[0.4, 0.0625, 0.9, 0.9375]), overlap_warn=0.5))
    assert not [r for r in caplog.records if "overlap" in r.getMessage()]  # 15% < overlap_warn 50%


def test_three_adapters_cost_little_memory(loras):
    model = teacher()
    base = sum(p.numel() * p.element_size() for p in base_unet().parameters())
    convert(model, make_args(loras))
    assert set(model.unet.peft_config) == set(WORDS)
    total = sum(p.numel() * p.element_size() for p in model.unet.parameters())
    assert adapter_bytes(model.unet) > 0 and total - base == adapter_bytes(model.unet)
    assert total < 1.2 * base


def test_export_round_trip_reproduces_the_images(loras, tmp_path):
    method, model, args = LoraComposer(), teacher(), make_args(loras)
    composer = convert(model, args)
    payload = method.data(model, DataSpec(), args).eval
    scene0, noise = payload["scenes"][0], payload["noise"]
    assert noise.shape == (1, 1, 32, 64)
    images, info = composer.sample(scene0, noise)
    assert len(info["guidance_loss"]) == 2
    out = method.export(composer, model, tmp_path / "export", args)
    assert {p.name for p in out.iterdir()} == {"unet", "text_encoder", "tokenizer", "scheduler", "loras",
                                               "composition.json"}
    restored, scenes, restored_noise = load_export(out)
    assert scenes == payload["scenes"] and torch.equal(restored_noise, noise)
    assert set(restored.unet.peft_config) == set(WORDS)
    again, _ = restored.sample(scenes[0], restored_noise)
    assert torch.equal(again, images)


def test_declared_metrics_cover_every_scene_size_and_judge_class(loras):
    from athanor.distill.fashion_mnist import CLASSES

    metrics = LoraComposer.metrics
    for n in range(1, 9):
        assert (metrics[f"presence_{n}"], metrics[f"confusion_{n}"], metrics[f"vanishing_{n}"]) == \
            ("higher", "lower", "lower")
    assert {metrics[f"presence_{c}"] for c in ("sneaker", "bag", "t_shirt", "ankle_boot")} == {"higher"}
    assert len([k for k in metrics if k.startswith("presence_") and not k[-1].isdigit()]) == len(CLASSES)
    assert metrics["leakage"] == "lower" and metrics["peak_mem_mb"] == metrics["weights_mb"] == "neutral"
    nine = [{"concept": "sneaker", "box": [i / 9, 0.0, (i + 1) / 9, 1.0]} for i in range(9)]
    with pytest.raises(ValueError, match="at most 8"):  # a ninth concept would have no declared keys
        make_args(loras, scenes=[{"prompt": PROMPT, "regions": nine}])

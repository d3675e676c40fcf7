"""LinVideo's comparison arms and its evaluation set: each arm changes exactly one setting and starts from the same
student on the same budget; the summary reads class_accuracy per row; the evaluation covers every caption.

    .venv/bin/python -m pytest tests/distill/linvideo/test_arms.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import WanTransformer3DModel

from athanor.convert import linvideo as lv
from athanor.distill.linvideo.arms import CHANGES, arm_args, summary
from athanor.distill.linvideo.config import LinVideoArgs, LinVideoStudent
from athanor.distill.linvideo.data import LinVideoTeacher
from athanor.distill.linvideo.method import LinVideo
from athanor.distill.spec import DataSpec, RecipeError, TrainSpec

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
              text_dim=16, freq_dim=16, ffn_dim=32, num_layers=4, rope_max_seq_len=32)
CAPTIONS = ["a bag moving left", "a shirt moving up", "a sneaker moving right", "a coat moving down",
            "a dress moving left", "a sandal moving up"]


@pytest.fixture(scope="module")
def teacher() -> LinVideoTeacher:
    torch.manual_seed(0)
    return LinVideoTeacher(WanTransformer3DModel(**CONFIG).eval(), captions=list(CAPTIONS),
                           conditions=torch.randn(len(CAPTIONS), 4, 16), clip={"frames": 2, "canvas": 8})


def _changed(a: LinVideoArgs, b: LinVideoArgs) -> dict:
    x, y = a.model_dump(), b.model_dump()
    return {k: y[k] for k in x if x[k] != y[k]}


def test_each_arm_changes_exactly_its_setting():
    args = LinVideoArgs(target=3, compare=["even_spread", "velocity_mse", "adm_cached"])
    arms = arm_args(args)
    assert list(arms) == ["even_spread", "velocity_mse", "adm_cached"]
    for name, arm in arms.items():
        assert _changed(args, arm) == {**CHANGES[name], "compare": []}, name
    cached = LinVideoArgs(adm_source="cached", compare=["adm_rollout"])
    assert _changed(cached, arm_args(cached)["adm_rollout"]) == {"adm_source": "rollout", "compare": []}


@pytest.mark.parametrize("settings, words", [
    (dict(adm_source="cached", compare=["adm_cached"]), "is the recipe itself (linvideo.adm_source: cached)"),
    (dict(selection="even_spread", compare=["even_spread"]), "is the recipe itself (linvideo.selection"),
    (dict(objective="velocity", compare=["adm_cached"]), "linvideo.objective is not adm"),
])
def test_an_arm_that_changes_nothing_is_refused(settings, words):
    with pytest.raises(RecipeError) as caught:
        arm_args(LinVideoArgs(**settings))
    assert caught.value.key == "linvideo.compare" and caught.value.value == settings["compare"]
    assert words in caught.value.fix


def test_arms_start_from_the_same_student_on_the_same_budget(teacher):
    """What the job's arms stage relies on (`jobs/arms.py` restores the RNG state before each arm's convert):
    the conversion does not depend on the arm's setting, and each arm's module trains as its setting says."""
    method, spec = LinVideo(), TrainSpec(max_steps=7, lr=1e-4, accelerator="cpu")
    args = LinVideoArgs(target=3, compare=["even_spread", "velocity_mse", "adm_cached"])
    rows = {"recipe": args, **method.comparison_arms(args, spec)}
    modules, weights = {}, {}
    for name, arm in rows.items():
        torch.manual_seed(123)
        student = method.convert(teacher, LinVideoStudent(), arm)
        weights[name] = {k: v.clone() for k, v in student.state_dict().items()}
        modules[name] = method.lightning_module(teacher, student, None, arm, spec)
    for name in rows:
        assert weights[name].keys() == weights["recipe"].keys()
        assert all(torch.equal(weights[name][k], weights["recipe"][k]) for k in weights[name]), name
        assert modules[name].train_spec.max_steps == 7 and modules[name].target == 3
    assert modules["recipe"].rollout == {"steps": 16, "guidance": 3.0, "shift": 1.0}
    assert modules["recipe"].committed is None  # the gates select
    assert modules["adm_cached"].rollout is None and modules["adm_cached"].objective == "adm"
    assert modules["velocity_mse"].objective == "velocity"
    even = lv.choose_linear(method.convert(teacher, LinVideoStudent(), args), 3)
    assert modules["even_spread"].committed == {n: 0.0 if n in even else 1.0 for n in modules["recipe"].layer_names}


def test_summary_reads_class_accuracy_of_every_row():
    out = summary(LinVideoArgs(), {"class_accuracy": 0.8}, {"class_accuracy": 0.2}, {"class_accuracy": 0.6},
                  {"even_spread": {"class_accuracy": 0.7}, "velocity_mse": {"class_accuracy": 0.5}})
    assert out["kept_converted"] == pytest.approx(0.75) and out["kept_untrained"] == pytest.approx(0.25)
    assert out["converted_beats_even_spread"] == 0.0 and out["converted_beats_velocity_mse"] == 1.0
    assert out["class_accuracy_even_spread"] == 0.7 and out["class_accuracy_teacher"] == 0.8
    assert math.isnan(summary(LinVideoArgs(), {}, None, {}, {})["class_accuracy_teacher"])


def test_evaluation_covers_every_caption_by_default(teacher, one_torch_thread):
    method = LinVideo()
    args = LinVideoArgs(trajectory_steps=2, eval_seeds=[0, 1], heldout_points=4, guidance_scale=1.0)
    payload = method.data(teacher, DataSpec(batch_size=2), args).eval
    assert payload["prompts"] == CAPTIONS
    assert [n.shape[0] for n in payload["noises"]] == [len(CAPTIONS)] * 2
    # the noises are per seed, not per model: the same for the teacher and every student
    assert torch.equal(payload["noises"][1], torch.randn((6, 1, 2, 8, 8), generator=torch.Generator().manual_seed(1)))
    assert payload["labels"].tolist() == [8, 6, 7, 4, 3, 5] * 2  # bag, shirt, sneaker, coat, dress, sandal
    narrowed = method.data(teacher, DataSpec(batch_size=2), args.model_copy(update={"eval_prompts": CAPTIONS[:2]}))
    assert narrowed.eval["prompts"] == CAPTIONS[:2]

"""KOALA on the teacher of recipes/koala_tiny.yaml: the trained Fashion-canvas testbed
(distill/lora_composer/testbed/), a diffusers pipeline without a VAE — a pixel-space U-Net for 1×32×64
canvases (non-square `sample_size`), one CLIP text encoder, no SDXL added conditioning. Every step of a
job on it: loading, conditioning as the testbed was trained, data-free sampling, training, evaluation
with sample grids, the speed probe and an export diffusers reloads.

    .venv/bin/python -m pytest tests/distill/koala/test_fashion_teacher.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from athanor.convert.koala import student_config
from athanor.convert.module_utils import count_params
from athanor.distill.koala import evaluation as koala_eval
from athanor.distill.koala.sampling import sample
from athanor.distill.spec import EvalSpec, RecipeError, TrainSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_testbed_loads_as_a_pixel_space_pipeline(fashion):
    method, loaded, teacher = fashion
    assert teacher.vae is None and teacher.pixel_space and teacher.vae_scale == 1
    assert len(teacher.text_encoders) == 1 and not teacher.sdxl_conditioning
    assert teacher.sample_hw == (32, 64) and teacher.unet.config.in_channels == 1
    data = method.data(teacher, loaded.recipe.data, loaded.args)
    assert data.eval["latent_size"] == data.eval["resolution"] == (32, 64)
    assert set(data.eval["cond"]) == {"prompt_embeds"} and data.eval["cond"]["prompt_embeds"].shape == (2, 32, 64)
    assert [n.shape for n in data.eval["noises"]] == [(2, 1, 32, 64)]
    with pytest.raises(RecipeError) as info:  # image-caption training crops squares: the side must be given
        images = loaded.args.model_copy(update={"train_data": "images", "data_free": False})
        method.data(teacher, loaded.recipe.data, images)
    assert info.value.key == "koala.resolution"


def test_teacher_samples_as_the_testbed_does(fashion):
    """Same tokens, text encoder output, scheduler (DDIM from its DDPM config) and guidance as the
    testbed's own sampler, so the KD targets are the trained model's real behaviour."""
    from athanor.distill.lora_composer import testbed

    method, loaded, teacher = fashion
    captions = ["a bag on the left and a coat on the right", "a trouser in the middle"]
    expected = testbed.sample(teacher.unet, teacher.text_encoders[0], teacher.tokenizers[0], captions,
                              torch.Generator().manual_seed(3), steps=4, guidance=3.0)
    noise = torch.randn(2, 1, 32, 64, generator=torch.Generator().manual_seed(3))
    data = method.data(teacher, loaded.recipe.data, loaded.args)
    from athanor.distill.koala.data import prompt_conditioning

    cond = prompt_conditioning(teacher, captions, data.eval["resolution"])
    uncond = prompt_conditioning(teacher, [""], data.eval["resolution"])
    final, _, _ = sample(teacher.unet, method._scheduler_config(teacher, loaded.args), cond, uncond, noise, 4, 3.0)
    # the testbed returns images clamped to the pixel range [-1, 1]; KOALA keeps the raw final sample (the
    # scheduler does not clip: clip_sample is false)
    assert torch.allclose(final.clamp(-1, 1), expected, atol=1e-5)


def test_data_free_training_on_teacher_canvases(fashion):
    method, loaded, teacher = fashion
    student = method.convert(teacher, loaded.student, loaded.args)
    assert student.mid_block is None and count_params(student) < count_params(teacher.unet)
    # At depth 1 everywhere the mid block is all KOALA can drop: koala-700m builds the same student.
    config = dict(teacher.unet.config)
    assert student_config(config, "koala-700m") == student_config(config, "custom", mid_block=False)
    data = method.data(teacher, loaded.recipe.data, loaded.args)
    latents = data.train_dataloader().dataset.columns["teacher_latents"]
    # the teacher's own samples (how they are drawn: test_teacher_samples_as_the_testbed_does); its scheduler does
    # not clip, so a few-step sample may leave the pixel range
    assert latents.shape == (2, 1, 32, 64) and torch.isfinite(latents).all() and latents.std() > 0.1
    module = method.lightning_module(teacher, student, data, loaded.args, TrainSpec())
    assert len(module.pairs) == 6  # one self-attention layer in each of 2 encoder and 4 decoder stacks
    logged = {}
    module.log_dict = lambda values, **kw: logged.update(values)
    loss = module.training_step(next(iter(data.train_dataloader())), 0)
    loss.backward()
    assert set(logged) == {"train/loss", "train/loss_out", "train/loss_feat"} and logged["train/loss_feat"] > 0
    assert student.up_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.grad.abs().sum() > 0


def test_evaluation_grids_probe_and_export(fashion, tmp_path):
    method, loaded, teacher = fashion
    student = method.convert(teacher, loaded.student, loaded.args)
    data = method.data(teacher, loaded.recipe.data, loaded.args)
    spec = EvalSpec(latency_repeats=1)
    before = method.evaluate(teacher.unet, teacher, data, spec, loaded.args, tmp_path / "before")
    after = method.evaluate(student, teacher, data, spec, loaded.args, tmp_path / "after")
    assert set(before) == set(after) == {"params", "peak_mem_mb", "noise_mse", "latent_mse", "box_accuracy"}
    assert before["noise_mse"].value == 0 and after["noise_mse"].value > 0 and after["latent_mse"].value > 0
    # the testbed ships its judge: 3 prompted boxes (1 + 2) of 2 canvases per side, one row per canvas
    assert [b for _, b in before["box_accuracy"].rows.tolist()] == [b for _, b in after["box_accuracy"].rows] == [1, 2]
    assert all(0 <= side["box_accuracy"].value <= 1 for side in (before, after))  # 2-step canvases: often 0
    (teacher_grid,) = (tmp_path / "before").glob("*.png")
    (student_grid,) = (tmp_path / "after").glob("*.png")
    assert Image.open(teacher_grid).size == (2 * 64, 32)  # 2 eval prompts of 64x32 canvases
    grid = torch.from_numpy(np.array(Image.open(student_grid).convert("RGB")))
    assert grid.shape == (2 * 32, 2 * 64, 3) and torch.equal(grid[..., 0], grid[..., 2])  # grey
    assert grid.float().std() > 10  # canvases, not a blank image

    probe = method.speed_probe(student, teacher, data, spec, loaded.args.model_copy(update={"latency_batch": 2}))
    assert probe().shape == (2, 1, 32, 64)

    path = method.export(student, teacher, tmp_path / "export", loaded.args)
    assert json.loads((path / "koala.json").read_text())["teacher"] == "pkg:athanor.distill.lora_composer/testbed"
    reloaded = UNet2DConditionModel.from_pretrained(path)
    assert reloaded.mid_block is None and list(reloaded.config.sample_size) == [32, 64]
    (x, t), kwargs = koala_eval.step_inputs(student, data.eval, 2, torch.device("cpu"))
    with torch.no_grad():
        assert torch.allclose(reloaded(x, t, **kwargs).sample, student(x, t, **kwargs).sample, atol=1e-6)


@pytest.mark.parametrize("prompt, scene", [
    ("a coat on the left", ((4,), ((2, 2, 30, 30),))),
    ("a sneaker on the left and an ankle boot on the right", ((7, 9), ((2, 2, 30, 30), (34, 2, 62, 30)))),
    ("a dress on the left, a t-shirt in the middle and a bag on the right",
     ((3, 0, 8), ((1, 6, 21, 26), (22, 6, 42, 26), (43, 6, 63, 26)))),
    ("a bag on the right and a coat on the left", None),  # the testbed never draws this layout
    ("a photo of a red fox", None),
])
def test_canvas_captions_give_the_classes_and_boxes_they_ask_for(prompt, scene):
    assert koala_eval.canvas_scene(prompt) == scene


def test_box_accuracy_is_the_share_of_prompted_boxes_the_judge_finds(constant_classifier):
    """Per image (hits, boxes) rows; the metric is all hits over all boxes, counted here by hand."""
    prompts = ["a sneaker on the left", "a bag on the left and a sneaker on the right",
               "a sneaker on the left, a bag in the middle and a coat on the right"]
    scenes = [koala_eval.canvas_scene(p) for p in prompts]
    finals = [torch.zeros(3, 1, 32, 64), torch.ones(3, 1, 32, 64)]  # two seeds
    accuracy = koala_eval.box_accuracy(constant_classifier(7), finals, scenes)  # always "sneaker"
    # sneaker boxes: 1 of 1, 1 of 2, 1 of 3, on both seeds -> 6 of 12
    assert accuracy.rows.tolist() == [[1, 1], [1, 2], [1, 3]] * 2 and accuracy.value == pytest.approx(6 / 12)
    assert koala_eval.box_accuracy(constant_classifier(4), finals, scenes).value == pytest.approx(2 / 12)

"""KOALA's real-data mode on the Fashion-canvas testbed (`koala.train_data: canvases`, recipes/koala_tiny.yaml):
the rows are real Fashion-MNIST canvases with their captions, reproducible from the seed; the training step's
task loss is the ε-MSE on those canvases, checked against an independent computation (the cosine schedule
written out, the text encoder and the student called directly); bad keys give one keyed error each.

    .venv/bin/python -m pytest tests/distill/koala/test_canvas_training.py -q
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from athanor.distill.fashion_mnist import load_split, resize_items
from athanor.distill.koala.canvases import CanvasRows
from athanor.distill.spec import RecipeError, TrainSpec
from athanor.jobs.recipe import load_recipe
from athanor.jobs.validate import check

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).parents[3]
TINY_RECIPE = ROOT / "recipes" / "koala_tiny.yaml"
SDXL_TINY = ROOT / "tests" / "fixtures" / "koala_sdxl_tiny.yaml"
SMALL = ["teacher.config.unet.sample_size=8", "koala.eval_seeds=[0]"]


def test_rows_are_real_captioned_canvases_drawn_from_the_seed(canvas_job):
    method, loaded, teacher, data = canvas_job
    rows = data.train_dataloader().dataset
    assert len(rows) == data.num_train_examples == 16
    images, labels = load_split("train")
    tokenizer = teacher.tokenizers[0]
    for index in (0, 5):
        example, row = rows.example(index), rows[index]
        # Rebuilt by hand from the split: the drawn items, resized to their box and pasted on a −1 background.
        canvas = torch.zeros(32, 64)
        for item, (x0, y0, x1, y1), label in zip(example.indices, example.boxes, example.labels):
            assert int(labels[item]) == label
            canvas[y0:y1, x0:x1] = torch.maximum(canvas[y0:y1, x0:x1], resize_items(images[item:item + 1], x1 - x0)[0])
        assert torch.equal(row["latents"], canvas.unsqueeze(0) * 2 - 1)
        ids = tokenizer(example.caption, padding="max_length", max_length=32, truncation=True).input_ids
        assert row["input_ids_0"].tolist() == ids
    # Reproducible from (data.seed, index), whatever the loader's order; another seed draws other canvases.
    assert loaded.recipe.data.seed == 7
    assert torch.equal(CanvasRows(teacher, 16, 7)[3]["latents"], rows[3]["latents"])
    assert not torch.equal(CanvasRows(teacher, 16, 8)[3]["latents"], rows[3]["latents"])
    captions = {rows.example(i).caption for i in range(16)}
    assert len(captions) > 8  # 1, 2 and 3 items of random classes, not one caption repeated


def _cosine_alpha_bar(t: torch.Tensor, steps: int = 1000) -> torch.Tensor:
    """ᾱ_t of the testbed's squaredcos_cap_v2 schedule written out (Nichol & Dhariwal): β_i = min(1 − f(i+1)/f(i),
    0.999) with f(s) = cos²((s/T + 0.008)/1.008 · π/2), ᾱ_t = Π_{i≤t}(1 − β_i)."""
    f = [math.cos((i / steps + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(steps + 1)]
    betas = torch.tensor([min(1 - f[i + 1] / f[i], 0.999) for i in range(steps)], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)[t]


def _recorded_step(method, loaded, teacher, data, args) -> tuple[dict, dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training step on the first canvas batch: (logged terms, x₀/ε/t it drew, the loss, and the student's and
    teacher's ε predictions recomputed here from x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε with the cosine schedule written out
    and the caption encoded by the text encoder directly)."""
    student = method.convert(teacher, loaded.student, args)
    module = method.lightning_module(teacher, student, data, args, TrainSpec())
    logged, seen = {}, {}
    module.log_dict = lambda values, **kw: logged.update(values)
    add_noise = module.scheduler.add_noise

    def recording_add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.update(x0=x0, eps=eps, t=t)
        return add_noise(x0, eps, t)

    module.scheduler.add_noise = recording_add_noise
    batch = next(iter(data.train_dataloader()))
    loss = module.training_step(batch, 0)
    assert torch.equal(seen["x0"], batch["latents"])  # the real canvases are the clean images
    alpha_bar = _cosine_alpha_bar(seen["t"]).view(-1, 1, 1, 1)
    seen["alpha_bar"] = alpha_bar
    x_t = (alpha_bar.sqrt() * seen["x0"].double() + (1 - alpha_bar).sqrt() * seen["eps"].double()).float()
    with torch.no_grad():
        text = teacher.text_encoders[0](batch["input_ids_0"]).last_hidden_state
        pred = student(x_t, seen["t"], encoder_hidden_states=text).sample
        teacher_pred = teacher.unet(x_t, seen["t"], encoder_hidden_states=text).sample
        # The same under the empty caption (guidance's unconditional branch), kept in `seen`.
        ids = teacher.tokenizers[0]("", padding="max_length", max_length=32, truncation=True).input_ids
        empty = teacher.text_encoders[0](torch.tensor([ids])).last_hidden_state.expand_as(text)
        seen["pred_u"] = student(x_t, seen["t"], encoder_hidden_states=empty).sample
        seen["teacher_pred_u"] = teacher.unet(x_t, seen["t"], encoder_hidden_states=empty).sample
    return logged, seen, loss, pred, teacher_pred


def test_task_loss_is_the_epsilon_mse_on_real_canvases(canvas_job):
    method, loaded, teacher, data = canvas_job
    logged, seen, loss, pred, teacher_pred = _recorded_step(method, loaded, teacher, data, loaded.args)
    assert logged["train/loss_task"] == pytest.approx(F.mse_loss(pred, seen["eps"]).item(), rel=1e-4)
    assert logged["train/loss_out"] == pytest.approx(F.mse_loss(pred, teacher_pred).item(), rel=1e-4)
    assert logged["train/loss_feat"] > 0
    weights = [getattr(loaded.args, f"lambda_{k}") for k in ("task", "out", "feat")]
    assert loss.item() == pytest.approx(sum(w * logged[f"train/loss_{k}"].item()
                                            for w, k in zip(weights, ("task", "out", "feat"))), rel=1e-5)


def test_x0_weighting_makes_output_kd_the_x0_error(canvas_job):
    """kd_weighting x0 (uncapped here): the output term is the MSE of the x₀ estimates (x_t − √(1 − ᾱ_t)·ε̂)/√ᾱ_t
    of student and teacher, row by row, and the cap bounds a row's weight."""
    method, loaded, teacher, data = canvas_job
    for cap in (1e6, 0.5):
        args = loaded.args.model_copy(update={"kd_weighting": "x0", "kd_x0_cap": cap})
        logged, seen, _, pred, teacher_pred = _recorded_step(method, loaded, teacher, data, args)
        scale = ((1 - seen["alpha_bar"]).sqrt() / seen["alpha_bar"].sqrt()).float()
        x0_error = (scale * (pred - teacher_pred)).pow(2).flatten(1).mean(1)
        if cap < 1:
            x0_error = torch.minimum(x0_error, cap * (pred - teacher_pred).pow(2).flatten(1).mean(1))
        assert logged["train/loss_out"] == pytest.approx(x0_error.mean().item(), rel=1e-3)
        assert logged["train/loss_task"] == pytest.approx(F.mse_loss(pred, seen["eps"]).item(), rel=1e-4)


def test_guided_kd_compares_the_predictions_the_guided_sampler_uses(canvas_job):
    """kd_guidance w: the output term is the MSE of ε̂_u + w·(ε̂_c − ε̂_u) between student and teacher, each branch
    recomputed here (the empty caption through the text encoder directly); the task loss stays the captioned
    branch's ε-MSE. At w = 1 it is plain output KD of the captioned branch."""
    method, loaded, teacher, data = canvas_job
    for w in (3.0, 1.0):
        args = loaded.args.model_copy(update={"kd_guidance": w})
        logged, seen, _, pred, teacher_pred = _recorded_step(method, loaded, teacher, data, args)
        student_guided = seen["pred_u"] + w * (pred - seen["pred_u"])
        teacher_guided = seen["teacher_pred_u"] + w * (teacher_pred - seen["teacher_pred_u"])
        assert logged["train/loss_out"] == pytest.approx(F.mse_loss(student_guided, teacher_guided).item(), rel=1e-4)
        assert logged["train/loss_task"] == pytest.approx(F.mse_loss(pred, seen["eps"]).item(), rel=1e-4)
    assert logged["train/loss_out"] == pytest.approx(F.mse_loss(pred, teacher_pred).item(), rel=1e-4)


def test_loss_weights_scale_their_terms(canvas_job):
    method, loaded, teacher, data = canvas_job
    args = loaded.args.model_copy(update={"lambda_task": 2.0, "lambda_out": 0.0, "lambda_feat": 0.5})
    module = method.lightning_module(teacher, method.convert(teacher, loaded.student, args), data, args, TrainSpec())
    logged = {}
    module.log_dict = lambda values, **kw: logged.update(values)
    loss = module.training_step(next(iter(data.train_dataloader())), 0)
    assert loss.item() == pytest.approx(2 * logged["train/loss_task"].item() + 0.5 * logged["train/loss_feat"].item(),
                                        rel=1e-5)


def test_canvases_need_the_canvas_teacher(tiny):
    """The SDXL-shaped teacher takes 4-channel latents: canvases cannot train it, and the error says so."""
    method, _, teacher = tiny
    loaded = load_recipe(SDXL_TINY, overrides=[*SMALL, "koala.data_free=false", "koala.train_data=canvases"])
    with pytest.raises(RecipeError) as info:
        method.data(teacher, loaded.recipe.data, loaded.args)
    assert info.value.key == "koala.train_data" and "testbed" in info.value.fix


@pytest.mark.parametrize("overrides,key,words", [
    (["koala.train_data=real"], "koala.train_data", "'images', 'canvases' or 'data_free'"),
    (["koala.data_free=true"], "koala.data_free", "drop data_free"),
    (["koala.lambda_task=0", "koala.lambda_out=0", "koala.lambda_feat=0"], "koala.lambda_feat", "positive weight"),
    (["koala.train_data=data_free", "koala.lambda_out=0", "koala.lambda_feat=0"], "koala.lambda_feat",
     "positive weight"),
    (["koala.canvas_examples=0"], "koala.canvas_examples", "greater than or equal to 1"),
])
def test_bad_keys_give_one_keyed_error(overrides, key, words):
    problems = check(TINY_RECIPE, overrides=overrides).problems
    assert [p.path for p in problems] == [key], problems
    assert words in problems[0].message


def test_modes_resolve_from_either_spelling():
    """`data_free: true` (the older spelling) still selects data-free training; the shipped recipe trains on
    canvases; with neither key an image-caption dataset is the default, as before."""
    legacy = load_recipe(SDXL_TINY, overrides=SMALL).args
    assert legacy.train_data == "data_free" and legacy.data_free
    shipped = load_recipe(TINY_RECIPE).args
    assert shipped.train_data == "canvases" and not shipped.data_free
    plain = load_recipe(TINY_RECIPE, overrides=["koala.train_data=null"]).args
    assert plain.train_data == "images" and not plain.data_free
    # Task loss alone is a valid real-data objective; it is not one in data-free mode (checked above).
    assert load_recipe(TINY_RECIPE, overrides=["koala.lambda_out=0", "koala.lambda_feat=0"]).args.lambda_task > 0


def test_x0_weighting_needs_an_epsilon_teacher(canvas_job):
    method, loaded, teacher, data = canvas_job
    args = loaded.args.model_copy(update={"kd_weighting": "x0", "prediction_type": "v_prediction"})
    with pytest.raises(RecipeError) as info:
        method.lightning_module(teacher, method.convert(teacher, loaded.student, args), data, args, TrainSpec())
    assert info.value.key == "koala.kd_weighting" and "uniform" in info.value.fix


def _ddim_by_hand(student, text, empty, noise: torch.Tensor, steps: int, k: int, w: float) -> tuple[torch.Tensor, int]:
    """The state after k guided DDIM steps (η = 0, 'leading' spacing t_j = (steps − 1 − j)·1000/steps) written out
    with the cosine schedule: x₀̂ = (x − √(1 − ᾱ_t)·ε̂)/√ᾱ_t, x ← √ᾱ_s·x₀̂ + √(1 − ᾱ_s)·ε̂; and that state's t."""
    stride = 1000 // steps
    x = noise.double()
    with torch.no_grad():
        for j in range(k):
            t, s = (steps - 1 - j) * stride, (steps - 2 - j) * stride
            rows = torch.full((len(x),), t)
            cond = student(x.float(), rows, encoder_hidden_states=text).sample.double()
            uncond = student(x.float(), rows, encoder_hidden_states=empty).sample.double()
            eps = uncond + w * (cond - uncond)
            a_t, a_s = _cosine_alpha_bar(torch.tensor(t)), _cosine_alpha_bar(torch.tensor(s))
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
    return x.float(), (steps - 1 - k) * stride


@pytest.mark.parametrize("k", [0, 2])
def test_rollout_kd_distils_at_the_state_the_students_guided_sampler_reaches(canvas_job, k):
    """rollout_prob 1: the teacher and student are called at the state k guided DDIM steps of the *student* reach
    from the step's noise (recomputed here by hand), at step k's timestep; no task loss (no ground truth there)."""
    method, loaded, teacher, data = canvas_job
    args = loaded.args.model_copy(update={"rollout_prob": 1.0, "eval_steps": 4, "guidance_scale": 3.0})
    student = method.convert(teacher, loaded.student, args)
    module = method.lightning_module(teacher, student, data, args, TrainSpec())
    module.rollout_steps = lambda: k
    logged, seen = {}, {}
    module.log_dict = lambda values, **kw: logged.update(values)
    add_noise = module.scheduler.add_noise
    module.scheduler.add_noise = lambda x0, eps, t: (seen.update(eps=eps), add_noise(x0, eps, t))[1]
    hook = teacher.unet.register_forward_pre_hook(lambda _, inputs: seen.update(x=inputs[0], t=inputs[1]))
    batch = next(iter(data.train_dataloader()))
    try:
        module.training_step(batch, 0)
    finally:
        hook.remove()
    with torch.no_grad():
        text = teacher.text_encoders[0](batch["input_ids_0"]).last_hidden_state
        ids = teacher.tokenizers[0]("", padding="max_length", max_length=32, truncation=True).input_ids
        empty = teacher.text_encoders[0](torch.tensor([ids])).last_hidden_state.expand_as(text)
    x, t = _ddim_by_hand(student, text, empty, seen["eps"], 4, k, 3.0)
    assert seen["t"].tolist() == [t] * len(x)
    assert torch.allclose(seen["x"], x, atol=1e-4), (seen["x"] - x).abs().max()
    assert set(logged) == {"train/loss", "train/loss_out", "train/loss_feat"}
    with torch.no_grad():
        pred, teacher_pred = (m(x, seen["t"], encoder_hidden_states=text).sample for m in (student, teacher.unet))
    assert logged["train/loss_out"] == pytest.approx(F.mse_loss(pred, teacher_pred).item(), rel=1e-4)


def test_rollout_batches_follow_the_step_not_the_rank(canvas_job):
    """Which batches roll out, and how far, is drawn from the optimizer step: two modules (two ranks) agree step by
    step; about `rollout_prob` of the steps roll out, k covers [0, eval_steps); rollout_prob 0 never does."""
    method, loaded, teacher, data = canvas_job

    def draws(prob: float) -> list[int | None]:
        args = loaded.args.model_copy(update={"rollout_prob": prob, "eval_steps": 5})
        module = method.lightning_module(teacher, method.convert(teacher, loaded.student, args), data, args,
                                         TrainSpec())
        module.__dict__["_trainer"] = type("Trainer", (), {"global_step": 0})()
        out = []
        for step in range(400):
            module._trainer.global_step = step
            out.append(module.rollout_steps())
        return out

    first = draws(0.5)
    assert first == draws(0.5)
    rolled = [k for k in first if k is not None]
    assert 150 < len(rolled) < 250 and set(rolled) == set(range(5))
    assert draws(0.0) == [None] * 400

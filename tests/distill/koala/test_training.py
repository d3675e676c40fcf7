"""KOALA training: the EMA moves once per optimizer step and in fp32 (a real Lightning fit with
gradient accumulation, fp32 and bf16-true), and data-free training noises the teacher's own samples.

    .venv/bin/python -m pytest tests/distill/koala/test_training.py -q
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from athanor.distill.spec import TrainSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().double().clone() for p in model.parameters()]


class RecordOptimizerSteps(L.Callback):
    """The student's weights right after every real optimizer step (a hook on the optimizer itself,
    independent of how the module decides when to update its EMA)."""

    def __init__(self, student: torch.nn.Module) -> None:
        self.student, self.after_step = student, []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.optimizers[0].register_step_post_hook(lambda *_: self.after_step.append(_weights(self.student)))


@pytest.mark.parametrize("precision,accumulate,decay", [("32-true", 2, 0.9), ("bf16-true", 2, 0.9999)])
def test_ema_moves_once_per_optimizer_step_in_fp32(tiny, make_student, precision, accumulate, decay):
    """e_n = d·e_{n-1} + (1 - d)·θ_n over the optimizer steps only (not the 2 micro-batches of each),
    from the initial weights. Under bf16-true an EMA kept in bf16 would not move at all at d = 0.9999."""
    method, loaded, teacher = tiny
    student = make_student("koala-700m")
    data = method.data(teacher, loaded.recipe.data, loaded.args)
    args = loaded.args.model_copy(update={"ema": True, "ema_decay": decay})
    steps = 3
    train = TrainSpec(max_steps=steps, accumulate_grad_batches=accumulate, lr=1e-2, precision=precision)
    module = method.lightning_module(teacher, student, data, args, train)
    start, record = _weights(student), RecordOptimizerSteps(student)
    trainer = L.Trainer(max_steps=steps, accumulate_grad_batches=accumulate, precision=precision, accelerator="cpu",
                        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[record])
    try:
        trainer.fit(module, data.train_dataloader())
    finally:
        teacher.unet.float()  # on_fit_start casts the (shared) teacher to the student's dtype
    expected = start
    for weights in record.after_step:
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights)]
    ema = method.trained_student(module)
    moved = torch.cat([(e.detach().double() - s).flatten() for e, s in zip(ema.parameters(), start)])
    wanted = torch.cat([(e - s).flatten() for e, s in zip(expected, start)])
    assert len(record.after_step) == steps and wanted.norm() > 0
    assert (moved - wanted).norm() <= 0.02 * wanted.norm(), f"moved {moved.norm():.3g}, expected {wanted.norm():.3g}"
    assert all(p.dtype == torch.float32 for p in ema.parameters())


def test_data_free_training_noises_teacher_samples(tiny, make_student):
    """Data-free x_t = √ᾱ_t·x₀ + √(1-ᾱ_t)·ε with x₀ the teacher sampler's output, not pure noise."""
    method, loaded, teacher = tiny
    args = loaded.args
    data = method.data(teacher, loaded.recipe.data, args)
    rows = data.train_dataloader().dataset
    assert "teacher_latents" in rows[0]
    from athanor.distill.koala.data import prompt_conditioning  # here: the check above fails first without them
    from athanor.distill.koala.sampling import data_free_noise, sample

    # Independently: the teacher's sampler on the first prompt from the first sample's noise.
    resolution, size = data.eval["resolution"], data.eval["latent_size"]
    noise = data_free_noise(len(args.prompts), 4, size, loaded.recipe.data.seed, 0)[:1]
    final, _, _ = sample(teacher.unet, method._scheduler_config(teacher, args),
                         prompt_conditioning(teacher, args.prompts[:1], resolution),
                         prompt_conditioning(teacher, [""], resolution), noise, args.data_free_steps,
                         args.guidance_scale)
    assert torch.allclose(rows[0]["teacher_latents"], final[0], atol=1e-4)
    assert len(rows.columns["teacher_latents"]) == len(args.prompts) * args.data_free_samples

    module = method.lightning_module(teacher, make_student(), data, args, TrainSpec())
    logged, seen = {}, {}
    module.log_dict = lambda values, **kw: logged.update(values)
    add_noise = module.scheduler.add_noise

    def recording_add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.update(x0=x0, xt=add_noise(x0, eps, t))
        return seen["xt"]

    module.scheduler.add_noise = recording_add_noise
    hook = teacher.unet.register_forward_pre_hook(lambda _, inputs: seen.update(teacher_input=inputs[0]))
    try:
        batch = next(iter(data.train_dataloader()))
        module.training_step(batch, 0)
    finally:
        hook.remove()
    assert torch.equal(seen["x0"], batch["teacher_latents"]) and torch.equal(seen["teacher_input"], seen["xt"])
    assert set(logged) == {"train/loss", "train/loss_out", "train/loss_feat"}  # teacher targets only


def test_guided_kd_stacks_each_row_under_its_caption_then_the_empty_prompt():
    """`with_unconditional` (SDXL kwargs: pooled embeddings swapped too, time ids kept) and `guided`, by hand."""
    from athanor.distill.koala.train import guided, with_unconditional

    noisy, t = torch.randn(2, 4, 3, 3), torch.tensor([5, 900])
    kwargs = {"encoder_hidden_states": torch.randn(2, 7, 8),
              "added_cond_kwargs": {"text_embeds": torch.randn(2, 6), "time_ids": torch.randn(2, 6)}}
    empty = {"prompt_embeds": torch.randn(1, 7, 8), "text_embeds": torch.randn(1, 6)}
    x, steps, out = with_unconditional(noisy, t, kwargs, empty)
    assert torch.equal(x, torch.cat([noisy, noisy])) and steps.tolist() == [5, 900, 5, 900]
    hidden = out["encoder_hidden_states"]
    assert torch.equal(hidden[:2], kwargs["encoder_hidden_states"])
    assert all(torch.equal(hidden[i], empty["prompt_embeds"][0]) for i in (2, 3))
    added = out["added_cond_kwargs"]
    assert torch.equal(added["text_embeds"][:2], kwargs["added_cond_kwargs"]["text_embeds"])
    assert all(torch.equal(added["text_embeds"][i], empty["text_embeds"][0]) for i in (2, 3))
    assert torch.equal(added["time_ids"], kwargs["added_cond_kwargs"]["time_ids"].repeat(2, 1))
    cond, uncond = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.allclose(guided(torch.cat([cond, uncond]), 5.0), 5 * cond - 4 * uncond, atol=1e-6)

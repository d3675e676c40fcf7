"""KOALA evaluation: peak memory of one U-Net step, and fidelity to the teacher over a fixed set of
prompts and seeds sampled with the teacher's scheduler and step count; with the Fashion-canvas testbed's
judge, whether each prompted item is drawn in its box; sample grids as PNG. No timing: the spine times
`Koala.speed_probe` (`distill/timing.py`).

Fidelity and box accuracy are `PerSample` metrics: one row per generated image, a (prompt, seed) pair,
seed-major, the same rows for every model, so the spine can report paired-bootstrap intervals.

    .venv/bin/python -m pytest tests/distill/koala/test_evaluation.py -q
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from PIL import Image

from athanor.distill.fashion_mnist import CLASSES
from athanor.distill.intervals import PerSample
from athanor.distill.koala.data import KoalaTeacher, hw, unet_kwargs
from athanor.distill.koala.sampling import guided_conditioning, sample
from athanor.distill.memory import peak_memory_mb


def step_inputs(model: torch.nn.Module, payload: dict, batch: int, device: torch.device) -> tuple[tuple, dict]:
    """One denoising step's inputs on `device` in the model's dtype: `batch` latents at the eval
    resolution, timestep 500, and the first eval prompt."""
    dtype = next(model.parameters()).dtype
    cond = {k: v[:1].expand(batch, *v.shape[1:]) for k, v in payload["cond"].items()}
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, model.config.in_channels, *hw(payload["latent_size"]), generator=generator)
    sample = sample.to(device, dtype)
    return (sample, torch.tensor(500, device=device)), unet_kwargs(cond, device, dtype)


def measurement_device(model: torch.nn.Module, where: str) -> torch.device:
    """`where` is 'cpu' or 'model' (wherever the model already is)."""
    return next(model.parameters()).device if where == "model" else torch.device(where)


def step_peak_memory_mb(model: torch.nn.Module, payload: dict, batch: int, where: str) -> float:
    """Peak memory (MiB) of one U-Net step of `model` on its measurement device; moved there and back."""
    home, was_training = next(model.parameters()).device, model.training
    target = measurement_device(model, where)
    model.to(target).eval()
    try:
        args, kwargs = step_inputs(model, payload, batch, target)
        return peak_memory_mb(model, lambda: model(*args, **kwargs))
    finally:
        model.to(home).train(was_training)


def teacher_samples(teacher: KoalaTeacher, payload: dict, scheduler: dict, steps: int, guidance: float) -> list[dict]:
    """The teacher's trajectories, one per seed (all prompts batched); computed once per job."""
    key = ("teacher_samples", json.dumps(scheduler, sort_keys=True, default=str), steps, guidance)
    if key not in payload:
        device = next(teacher.unet.parameters()).device
        runs = []
        for noise in payload["noises"]:
            final, inputs, preds = sample(teacher.unet, scheduler, _on(payload["cond"], device),
                                          _on(payload["uncond"], device), noise.to(device), steps, guidance)
            runs.append({"final": final, "inputs": inputs, "preds": preds})
        payload[key] = runs
    return payload[key]


def _on(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in tensors.items()}


def per_image_mse(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of each image of a batch: [B] (float64, on the CPU)."""
    return (x.float() - ref.float().to(x.device)).pow(2).flatten(1).mean(1).double().cpu()


@torch.no_grad()
def fidelity(model: torch.nn.Module, teacher: KoalaTeacher, payload: dict, scheduler: dict, steps: int,
             guidance: float) -> tuple[dict[str, PerSample], list[torch.Tensor]]:
    """noise_mse: the model's predictions on the teacher's own trajectories vs the teacher's (per image: the
    mean over the sampler's steps and, with guidance, its unconditional and conditional rows); latent_mse:
    the model's sampled latents vs the teacher's, same seeds, scheduler and steps. One row per (seed,
    prompt), seed-major; every row averages as many values, so the mean of the rows is the mean over all
    predictions, the metric's value before rows were kept."""
    was_training = model.training
    model.eval()
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    noise_rows, latent_rows, finals = [], [], []
    for run, noise in zip(teacher_samples(teacher, payload, scheduler, steps, guidance), payload["noises"]):
        cond, uncond = _on(payload["cond"], device), _on(payload["uncond"], device)
        kwargs = unet_kwargs(guided_conditioning(cond, uncond, guidance), device, dtype)
        # with guidance a step predicts for [uncond; cond] rows: an image's error covers both of its halves
        step_errors = [per_image_mse(model(x_in.to(device, dtype), t, **kwargs).sample, teacher_pred)
                       .view(-1, len(noise)).mean(0) for (x_in, t), teacher_pred in zip(run["inputs"], run["preds"])]
        noise_rows.append(torch.stack(step_errors).mean(0))
        final, _, _ = sample(model, scheduler, cond, uncond, noise.to(device), steps, guidance)
        latent_rows.append(per_image_mse(final, run["final"]))
        finals.append(final)
    model.train(was_training)
    scores = {"noise_mse": PerSample.mean(torch.cat(noise_rows).numpy()),
              "latent_mse": PerSample.mean(torch.cat(latent_rows).numpy())}
    return scores, finals


_ITEM = re.compile(r"an? (?P<name>{}) (?P<phrase>on the left|in the middle|on the right)".format(
    "|".join(re.escape(c) for c in sorted(CLASSES, key=len, reverse=True))))


def canvas_scene(prompt: str) -> tuple[tuple[int, ...], tuple[tuple[int, int, int, int], ...]] | None:
    """The classes and pixel boxes a Fashion-canvas caption asks for ("a bag on the left and a coat on the
    right", distill/lora_composer/canvas.py), or None for a prompt outside that grammar."""
    from athanor.distill.lora_composer.canvas import PHRASES, caption, layout

    items = [_ITEM.fullmatch(part) for part in re.split(r", | and ", prompt.strip())]
    if not all(items):
        return None
    place_of = {phrase: place for place, phrase in PHRASES.items()}
    labels = tuple(CLASSES.index(m["name"]) for m in items)
    places = tuple(place_of[m["phrase"]] for m in items)
    try:
        boxes = layout(places)
    except ValueError:  # a layout the testbed never draws, e.g. two items left and middle
        return None
    return (labels, boxes) if caption(labels, places) == prompt.strip() else None


def judged_scenes(teacher: KoalaTeacher, prompts: list[str], image_hw: tuple[int, int]) -> list | None:
    """Each eval prompt's (classes, boxes) when box accuracy can be measured: the teacher ships a judge,
    its images are single-channel canvases of the testbed's size and every prompt is a canvas caption."""
    from athanor.distill.lora_composer.canvas import HEIGHT, WIDTH

    if teacher.judge is None or teacher.unet.config.out_channels != 1 or tuple(image_hw) != (HEIGHT, WIDTH):
        return None
    scenes = [canvas_scene(p) for p in prompts]
    return None if any(s is None for s in scenes) else scenes


@torch.no_grad()
def box_accuracy(judge: torch.nn.Module, finals: list[torch.Tensor], scenes: list) -> PerSample:
    """Share of prompted boxes whose crop the judge assigns to the prompted class (as the testbed's README
    scores its generated canvases). `finals`: one [prompts, 1, H, W] batch per seed. One row per image,
    (hits, boxes), seed-major: boxes of one image are not independent, so the image is the sample."""
    from athanor.distill.lora_composer.canvas import crop_boxes

    asked = torch.tensor([label for labels, _ in scenes for label in labels])
    counts = [len(labels) for labels, _ in scenes]
    hits, boxes = [], []
    for images in finals:
        crops = crop_boxes(images.detach().float().cpu().clamp(-1, 1), [b for _, b in scenes])
        correct = (judge(crops.to(next(judge.parameters()).device)).argmax(-1).cpu() == asked).double()
        hits += [float(part.sum()) for part in correct.split(counts)]
        boxes += counts
    return PerSample.ratio(hits, boxes)


@torch.no_grad()
def to_images(teacher: KoalaTeacher, latents: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3]: decoded by the teacher's VAE; without one the samples are pixels in [-1, 1]
    (grey when single-channel); other channel counts show their first three channels, each image scaled
    to its largest magnitude."""
    if teacher.vae is None:
        channels = latents.shape[1]
        if channels == 1:
            pixels = latents.expand(-1, 3, -1, -1)
        elif channels == 3:
            pixels = latents
        else:
            pixels = latents[:, :3]
            pixels = pixels / pixels.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    else:
        vae = teacher.vae
        shift = vae.config.get("shift_factor") or 0.0
        pixels = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.device, vae.dtype)).sample
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_grid(rows: list[torch.Tensor], path: Path) -> Path:
    """One row per model (uint8 [N, H, W, 3] each), same seeds column by column, as a PNG."""
    grid = torch.cat([torch.cat(list(row), dim=1) for row in rows], dim=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).save(path)
    return path

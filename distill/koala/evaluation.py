"""KOALA evaluation: peak memory of one U-Net step, and fidelity to the teacher over a fixed set of
prompts and seeds sampled with the teacher's scheduler and step count; sample grids as PNG. No timing:
the spine times `Koala.speed_probe` (`distill/timing.py`).

    .venv/bin/python -m pytest tests/distill/koala/test_evaluation.py -q
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch
from PIL import Image

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


@torch.no_grad()
def fidelity(model: torch.nn.Module, teacher: KoalaTeacher, payload: dict, scheduler: dict, steps: int,
             guidance: float) -> tuple[dict[str, float], list[torch.Tensor]]:
    """noise_mse: the model's predictions on the teacher's own trajectories vs the teacher's;
    latent_mse: the model's sampled latents vs the teacher's, same seeds, scheduler and steps."""
    was_training = model.training
    model.eval()
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    noise_errors, latent_errors, finals = [], [], []
    for run, noise in zip(teacher_samples(teacher, payload, scheduler, steps, guidance), payload["noises"]):
        cond, uncond = _on(payload["cond"], device), _on(payload["uncond"], device)
        kwargs = unet_kwargs(guided_conditioning(cond, uncond, guidance), device, dtype)
        for (x_in, t), teacher_pred in zip(run["inputs"], run["preds"]):
            pred = model(x_in.to(device, dtype), t, **kwargs).sample.float()
            noise_errors.append(torch.mean((pred - teacher_pred.to(device)) ** 2).item())
        final, _, _ = sample(model, scheduler, cond, uncond, noise.to(device), steps, guidance)
        latent_errors.append(torch.mean((final - run["final"].to(device)) ** 2).item())
        finals.append(final)
    model.train(was_training)
    return {"noise_mse": statistics.fmean(noise_errors), "latent_mse": statistics.fmean(latent_errors)}, finals


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

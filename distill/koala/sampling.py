"""Sampling with the teacher's scheduler: evaluation trajectories and data-free training latents.

Data-free training needs clean latents x₀ to noise at a random t: pure noise is only a valid x_t at
t = T, so feeding it at small t asks the student to copy the teacher on inputs that never occur in
sampling. `teacher_latents` runs the teacher's sampler for a few steps per prompt (once per job) and
returns its outputs as x₀; the training step noises them like image latents.

    .venv/bin/python -m pytest tests/distill/koala/test_training.py tests/distill/koala/test_evaluation.py -q
"""

from __future__ import annotations

from typing import Any

import diffusers
import torch

from athanor.distill.koala.data import hw, unet_kwargs

DATA_FREE_SEED_OFFSET = 1_000_003
"""Added to `data.seed` for the data-free sampling noise, so the training latents never start from the
noise of an evaluation seed (eval seeds are small integers)."""


def make_scheduler(config: dict, steps: int) -> Any:
    """The teacher's inference scheduler class (DDIM when the config names none we know)."""
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if cls is None or not hasattr(cls, "set_timesteps") or cls is diffusers.DDPMScheduler:
        cls = diffusers.DDIMScheduler
    scheduler = cls.from_config(config)
    scheduler.set_timesteps(steps)
    return scheduler


def guided_conditioning(cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor],
                        guidance: float) -> dict[str, torch.Tensor]:
    """Unconditional rows stacked above the conditional ones for classifier-free guidance (guidance > 1)."""
    if guidance <= 1.0:
        return cond
    return {k: torch.cat([uncond[k].expand_as(v), v]) for k, v in cond.items()}


@torch.no_grad()
def sample(unet: torch.nn.Module, scheduler_config: dict, cond: dict, uncond: dict, noise: torch.Tensor,
           steps: int, guidance: float, stop_after: int | None = None
           ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    """Sample latents from `noise` with classifier-free guidance; also return every step's U-Net
    inputs and raw predictions so another U-Net can be scored on this trajectory. `stop_after` k: return the
    state after the first k of the `steps` steps instead (an x_t on the way, at the schedule's k-th timestep)."""
    device, dtype = noise.device, next(unet.parameters()).dtype
    scheduler = make_scheduler(scheduler_config, steps)
    guided = guidance > 1.0
    kwargs = unet_kwargs(guided_conditioning(cond, uncond, guidance), device, dtype)
    x = noise * scheduler.init_noise_sigma
    inputs, preds = [], []
    for t in scheduler.timesteps[:stop_after]:
        x_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        pred = unet(x_in.to(dtype), t, **kwargs).sample.float()
        inputs.append((x_in, t))
        preds.append(pred)
        if guided:
            u, c = pred.chunk(2)
            pred = u + guidance * (c - u)
        x = scheduler.step(pred, t, x).prev_sample
    return x, inputs, preds


def data_free_noise(prompts: int, channels: int, size: int | tuple[int, int], seed: int, index: int) -> torch.Tensor:
    """The initial noise of data-free sample `index` (all prompts at once), reproducible from the seed;
    `size` is the U-Net input's side (square) or (height, width)."""
    generator = torch.Generator().manual_seed(seed + DATA_FREE_SEED_OFFSET + index)
    return torch.randn(prompts, channels, *hw(size), generator=generator)


@torch.no_grad()
def teacher_latents(unet: torch.nn.Module, scheduler_config: dict, cond: dict[str, torch.Tensor],
                    uncond: dict[str, torch.Tensor], latent_size: int | tuple[int, int], *, steps: int, guidance: float,
                    samples: int, seed: int) -> torch.Tensor:
    """`samples` teacher samples per prompt, [samples · prompts, C, h, w] on the CPU, sample-major
    (row s · prompts + i is prompt i). Few `steps` give an approximation of the teacher's x₀
    distribution, which is all data-free distillation needs: inputs on the teacher's own manifold."""
    device = next(unet.parameters()).device
    cond, uncond = _on(cond, device), _on(uncond, device)
    prompts = len(next(iter(cond.values())))
    out = []
    for index in range(samples):
        noise = data_free_noise(prompts, unet.config.in_channels, latent_size, seed, index).to(device)
        final, _, _ = sample(unet, scheduler_config, cond, uncond, noise, steps, guidance)
        out.append(final.float().cpu())
    return torch.cat(out)


def _on(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in tensors.items()}

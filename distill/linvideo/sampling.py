"""Rectified-flow sampling for video transformers (Wan convention): x_t = (1 − t)·x₀ + t·ε, the model
predicts the velocity u = ε − x₀ from (x_t, 1000·t, text embeddings), and an Euler step from t to
t' < t is x_{t'} = x_t + (t' − t)·u. Classifier-free guidance mixes the conditional and the
unconditional (zero-embedding) velocities.

    .venv/bin/python -m pytest tests/distill/linvideo -q
"""

from __future__ import annotations

import torch
from torch import nn

TIME_SCALE = 1000.0
"""Wan and CogVideoX take timesteps on the 0..1000 scale of their training schedules."""


def timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """steps + 1 times from 1 (noise) down to 0, with the flow-shift warp t' = s·t / (1 + (s − 1)·t)."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def velocity(model: nn.Module, x: torch.Tensor, t: torch.Tensor | float, cond: torch.Tensor,
             uncond: torch.Tensor | None = None, guidance: float = 1.0) -> torch.Tensor:
    """The model's velocity at (x, t); with guidance > 1, CFG against `uncond` in one batched call."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
    dtype = next(model.parameters()).dtype
    if guidance == 1.0 or uncond is None:
        return model(x.to(dtype), t * TIME_SCALE, cond.to(dtype)).sample.float()
    both = model(torch.cat([x, x]).to(dtype), torch.cat([t, t]) * TIME_SCALE,
                 torch.cat([cond, uncond.expand_as(cond)]).to(dtype)).sample.float()
    u_cond, u_uncond = both.chunk(2)
    return u_uncond + guidance * (u_cond - u_uncond)


@torch.no_grad()
def sample(model: nn.Module, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None = None, *,
           steps: int = 20, guidance: float = 1.0, shift: float = 1.0,
           keep_trajectory: bool = False) -> tuple[torch.Tensor, list[tuple[float, torch.Tensor]]]:
    """Euler-sample from `noise` [B, C, F, H, W]; returns (x₀, [(t, x_t) for every visited t < 1 when
    keep_trajectory, the starting noise at t = 1 included])."""
    ts = timesteps(steps, shift)
    x, trajectory = noise.float(), []
    for t_now, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
        if keep_trajectory:
            trajectory.append((t_now, x.clone()))
        x = x + (t_next - t_now) * velocity(model, x, t_now, cond, uncond, guidance)
    return x, trajectory

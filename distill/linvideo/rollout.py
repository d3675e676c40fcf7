"""ADM on the student's own rollout (the paper's "anytime"): x̂_t is where the student's own sampler takes
fresh noise by time t, so distribution matching corrects the states the student really visits at sampling
time, drift included, rather than the teacher's (`linvideo.adm_source: rollout`; `cached` keeps the cheaper
one Euler step off the teacher's cached trajectories).

    .venv/bin/python -m pytest tests/distill/linvideo/test_rollout.py -q

The rollout runs the same Euler grid as the trajectories (`sampling.timesteps(steps, shift)`) with the same
classifier-free guidance as evaluation, without gradient (the gradient flows through the last step, taken
by the training step itself); each sample stops at its own grid time, and only samples still short of theirs
are run at each step (a batch of mixed times costs the sum of their steps, not batch × the longest).
"""

from __future__ import annotations

import torch
from torch import nn

from athanor.distill.linvideo.sampling import timesteps, velocity


def grid_index(t: torch.Tensor, steps: int, shift: float) -> torch.Tensor:
    """Each time's index on the sampling grid `timesteps(steps, shift)` (0 is noise at t = 1); a time that is not
    a grid point (beyond float rounding) is an error: the rollout could not stop there."""
    grid = timesteps(steps, shift)
    gap = (t.detach().float().cpu().view(-1, 1) - grid.view(1, -1)).abs()
    index = gap.argmin(1)
    off = gap.gather(1, index.view(-1, 1)).max() if len(t) else torch.tensor(0.0)
    if float(off) > 1e-4:
        raise ValueError(f"time {float(t.flatten()[gap.min(1).values.argmax()]):.6f} is not on the "
                         f"{steps}-step sampling grid (shift {shift}): the rollout cannot stop there")
    return index


@torch.no_grad()
def rollout_to(model: nn.Module, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
               t: torch.Tensor, *, steps: int, guidance: float, shift: float) -> torch.Tensor:
    """x_t of each sample reached by `model`'s guided Euler sampler from `noise` (at t = 1) to its own time
    `t[i]` on the `steps`-step grid: the same states `sampling.sample` visits from that noise."""
    grid = timesteps(steps, shift).tolist()
    stop = grid_index(t, steps, shift).to(noise.device)
    x = noise.float().clone()
    for i in range(int(stop.max()) if len(stop) else 0):
        active = torch.nonzero(stop > i).flatten()
        u = velocity(model, x[active], grid[i], cond[active], uncond, guidance)
        x[active] = x[active] + (grid[i + 1] - grid[i]) * u
    return x

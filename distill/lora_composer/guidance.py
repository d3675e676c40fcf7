"""LoRA-Composer latent guidance and latent re-initialisation (issue 12) as pure tensor functions.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/distill/lora_composer/test_guidance.py -q

Paper: Yang et al. 2024, "LoRA-Composer: Leveraging Low-Rank Adaptation for Multi-Concept Customization
in Training-Free Diffusion Models" (arXiv 2403.11627): "Concept Injection Constraints" (concept
enhancement: Gaussian-weighted top-k attention inside the box, plus the fill loss L_fill), "Concept
Isolation Constraints" (region perceptual restriction L_region on self-attention) and "Latent
Re-initialization". The formulas below were checked against the reference implementation
(github.com/Young98CN/LoRA_Composer, `region_lora/multi_lora_sample.py`: `generate_gaussian_matrix`,
`_compute_max_attention_per_index`, `_compute_loss`, `replace_latents` and the sampling loop); this is
our own code, and every place where it departs from the reference is said in the docstring.

Inputs, as `convert/lora_composer.py` records them:
- `maps`: one tensor `[R, B, h, w]` per cross-attention call; `maps[c][i, b]` is, at every query
  position of the whole image, the attention probability (mean over heads, summed over the concept
  word's tokens) on region i's concept prompt, so each value lies in [0, 1].
- `fg_bg_mass`: one tensor `[R, B]` per self-attention call: the mean attention mass that queries inside
  box i put on background keys.
- boxes: `(x0, y0, x1, y1)` fractions of width / height, end-exclusive (`FracBox`; not the pixel
  boxes of `canvas.py`). A cell belongs to a box when its centre lies inside it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

FracBox = tuple[float, float, float, float]
# Relative weights of the reference's total loss: 8·L_inj + (L_fill with its built-in factor 2) + 10·L_region.
DEFAULT_WEIGHTS: dict[str, float] = {"injection": 8.0, "fill": 1.0, "isolation": 10.0}


def _axis_cells(lo: float, hi: float, n: int) -> tuple[int, int]:
    """[start, stop) of the cells of an n-cell axis whose centre (j + ½)/n lies in [lo, hi). A box too small
    to hold any centre gets the one cell that holds its midpoint, so that no region is ever empty."""
    start = max(0, math.ceil(round(lo * n - 0.5, 9)))  # round: a centre exactly on the edge stays exact
    stop = min(n, math.ceil(round(hi * n - 0.5, 9)))
    if stop <= start:
        start = min(max(int((lo + hi) / 2 * n), 0), n - 1)
        stop = start + 1
    return start, stop


def box_cells(box: FracBox, h: int, w: int) -> tuple[slice, slice]:
    """(rows, cols) slices of the cells of an h×w grid whose centres lie inside `box`."""
    x0, y0, x1, y1 = box
    ys, xs = _axis_cells(y0, y1, h), _axis_cells(x0, x1, w)
    return slice(*ys), slice(*xs)


def box_mask(box: FracBox, h: int, w: int) -> Tensor:
    """`[h, w]` float mask, 1 on the cells whose centre lies inside `box`."""
    mask = torch.zeros(h, w)
    mask[box_cells(box, h, w)] = 1.0
    return mask


def gaussian_box_weights(box: FracBox, h: int, w: int, sigma: float = 0.5) -> Tensor:
    """`[h, w]` Gaussian centred on the box's centre, std `sigma · box size` per axis, zero outside the box,
    scaled so that its largest value is 1.

    Reference (`generate_gaussian_matrix`): a Gaussian on `linspace(-1, 1, n)` over the box's n cells with
    std 1, divided by its max, i.e. std = (n − 1)/2 cells. We evaluate at cell centres in image fractions
    with std = σ·(box size) = n/2 cells for σ = ½, which is resolution-independent and equal for large n.
    """
    x0, y0, x1, y1 = box
    cy, cx = (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w
    sy, sx = sigma * max(y1 - y0, 1.0 / h), sigma * max(x1 - x0, 1.0 / w)
    gy = torch.exp(-((cy - (y0 + y1) / 2) ** 2) / (2 * sy**2))
    gx = torch.exp(-((cx - (x0 + x1) / 2) ** 2) / (2 * sx**2))
    weights = torch.outer(gy, gx) * box_mask(box, h, w)
    return weights / weights.max()


def smooth_maps(maps: list[Tensor], sigma: float = 0.5) -> list[Tensor]:
    """3×3 Gaussian smoothing (std `sigma` cells, reflect padding) of each `[R, B, h, w]` map, as the
    reference does (`smooth_attentions=True, sigma=0.5, kernel_size=3`, after Attend-and-Excite) before
    both concept-enhancement losses. Optional: apply it to `maps` before `injection_loss` / `fill_loss`."""
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * sigma**2))
    out = []
    for m in maps:
        kernel = torch.outer(g, g).div(torch.outer(g, g).sum()).to(m)[None, None]
        r, b, h, w = m.shape
        flat = F.pad(m.reshape(r * b, 1, h, w), (1, 1, 1, 1), mode="reflect" if min(h, w) > 1 else "replicate")
        out.append(F.conv2d(flat, kernel).reshape(r, b, h, w))
    return out


def by_resolution(maps: list[Tensor]) -> list[Tensor]:
    """Average the `[R, B, h, w]` maps that share a resolution (the reference sums its layers' maps at one
    resolution and divides by their count before any loss), one tensor per resolution, in first-seen order."""
    groups: dict[tuple[int, int], list[Tensor]] = {}
    for m in maps:
        groups.setdefault((m.shape[-2], m.shape[-1]), []).append(m)
    return [torch.stack(g).mean(0) for g in groups.values()]


def injection_loss(maps: list[Tensor], boxes: list[FracBox], top_k: float = 0.2, sigma: float = 0.5) -> Tensor:
    """Concept-enhancement (injection) loss, mean over resolutions, regions and samples of

        L_inj(i) = max(0, 1 − mean(top-k_{k = ⌊top_k·|box_i|⌋} (A_i ⊙ G_i)))

    with A_i the region-i map averaged over the calls at one resolution, G_i `gaussian_box_weights` (zero
    outside box i, 1 at its centre). Lowest (0) when region i's attention is ~1 at the box centre; 1 when
    it lies outside box i. There is no normaliser: A_i is a probability, so 1 is its ceiling (reference
    `_compute_loss`: `max(0, 1 − curr_max)`). The reference keeps one resolution (1/4 of the latent),
    sums over regions and over the two tokens of each concept and weights the sum by 8; we average, take
    every resolution in `maps` (pass a subset to choose) and leave the weight to `LatentGuidance`.
    """
    losses = []
    for a in by_resolution(maps):
        h, w = a.shape[-2:]
        for i, box in enumerate(boxes):
            gauss = gaussian_box_weights(box, h, w, sigma).to(a)
            k = max(1, int(box_mask(box, h, w).sum().item() * top_k))
            top = (a[i] * gauss).flatten(1).topk(k, dim=1).values.mean(1)
            losses.append((1.0 - top).clamp(min=0.0))
    return torch.stack(losses).mean()


def fill_loss(maps: list[Tensor], boxes: list[FracBox]) -> Tensor:
    """Fill loss L_fill, mean over resolutions, regions and samples: the max-projections of the masked map
    onto each axis should equal the box's own projections (1 on the box's columns / rows, 0 elsewhere),

        L_fill(i) = 2·mean_x |max_y (A_i ⊙ M_i) − max_y M_i| + 2·mean_y |max_x (A_i ⊙ M_i) − max_x M_i|,

    M_i = `box_mask`. Zero when every row and column of box i holds a cell of attention 1; a single peak
    leaves the other rows / columns at 1 each. Factor 2 and the mean over the whole axis (so a column
    outside the box contributes 0) follow the reference (`dist_x`, `dist_y` = `2 * F.l1_loss(...)`).
    """
    losses = []
    for a in by_resolution(maps):
        h, w = a.shape[-2:]
        for i, box in enumerate(boxes):
            mask = box_mask(box, h, w).to(a)
            masked = a[i] * mask
            cols = (masked.amax(dim=1) - mask.amax(dim=0)).abs().mean(-1)
            rows = (masked.amax(dim=2) - mask.amax(dim=1)).abs().mean(-1)
            losses.append(2.0 * cols + 2.0 * rows)
    return torch.stack(losses).mean()


def isolation_loss(fg_bg_mass: list[Tensor]) -> Tensor:
    """Soft isolation loss (the paper's region perceptual restriction L_region): the mean, over
    self-attention calls, regions and samples, of the attention mass that queries inside box i put on
    background keys. The reference takes the mean of the top-k foreground→background self-attention
    probabilities (at the single stored resolution) and weights it by 10; here the processor already
    reduced each call to a mean mass, and the weight lives in `LatentGuidance`."""
    if not fg_bg_mass:
        return torch.zeros(())
    return torch.stack([m.float().mean() for m in fg_bg_mass]).mean()


def guidance_scale(step: int, max_steps: int = 25, eta0: float = 20.0) -> float:
    """η = eta0·√s with s linear from 1 (step 0) to 0.5 (step max_steps − 1), clamped outside that range.

    The reference (`scale_range = np.linspace(1.0, 0.5, len(timesteps))`, `lr = 20 * np.sqrt(scale_range[i])`)
    spreads s over *all* sampling steps, not only the guided ones; to match it pass the number of sampling
    steps as `max_steps` (see `LatentGuidance(schedule_steps=...)`)."""
    s = 1.0 if max_steps <= 1 else 1.0 - 0.5 * min(max(step, 0), max_steps - 1) / (max_steps - 1)
    return eta0 * math.sqrt(s)


class LatentGuidance:
    """One gradient step on the latent per sampling step, z ← z − η_t ∇_z L, for the first `max_steps` steps
    or until the loss rises. L = Σ weights[term]·term over `injection`, `fill`, `isolation`.

    Stop rule (reference sampling loop: `if (loss_pre < loss and i >= 5) or i >= 25: refine_flag = False`):
    the step that sees a rise is still applied, and a rise only counts from step `grace_steps` on
    (reference: 5). The reference guides steps 0..25 (26 steps); `max_steps=25` guides 0..24.
    η's schedule runs over `schedule_steps` steps (default `max_steps`; reference: all sampling steps).
    The reference sums its per-region terms while ours are means, so for R regions its gradient is
    R× ours at the same η: scale `weights` (or `eta0`) by R to match it.
    """

    def __init__(self, max_steps: int = 25, eta0: float = 20.0, weights: dict[str, float] | None = None,
                 schedule_steps: int | None = None, grace_steps: int = 5, top_k: float = 0.2) -> None:
        unknown = set(weights or {}) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; use {sorted(DEFAULT_WEIGHTS)}")
        self.max_steps, self.eta0, self.grace_steps, self.top_k = max_steps, eta0, grace_steps, top_k
        self.schedule_steps = schedule_steps or max_steps
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        self.losses: list[float] = []
        self.stopped = False

    def loss(self, maps: list[Tensor], boxes: list[FracBox], fg_bg_mass: list[Tensor] | None = None) -> Tensor:
        """Weighted total loss; terms with weight 0 (or isolation without `fg_bg_mass`) are skipped."""
        w = self.weights
        total = torch.zeros((), device=maps[0].device, dtype=maps[0].dtype)
        if w["injection"]:
            total = total + w["injection"] * injection_loss(maps, boxes, self.top_k)
        if w["fill"]:
            total = total + w["fill"] * fill_loss(maps, boxes)
        if w["isolation"] and fg_bg_mass:
            total = total + w["isolation"] * isolation_loss(fg_bg_mass).to(total)
        return total

    def should_guide(self, step: int) -> bool:
        """False from step `max_steps` on and once a loss rise has stopped the guidance."""
        return not self.stopped and step < self.max_steps

    def eta(self, step: int) -> float:
        return guidance_scale(step, self.schedule_steps, self.eta0)

    def step(self, z: Tensor, loss: Tensor, step: int) -> Tensor:
        """z − η_step·∂loss/∂z (z must require grad and `loss` depend on it), detached. Records the loss and
        marks the guidance stopped when it exceeds the previous step's loss (from `grace_steps` on)."""
        value = float(loss.detach())
        if self.losses and value > self.losses[-1] and step >= self.grace_steps:
            self.stopped = True
        self.losses.append(value)
        if not loss.requires_grad:  # nothing depends on z (e.g. a zero loss): no update, as the reference
            return z.detach()
        (grad,) = torch.autograd.grad(loss, z, allow_unused=True)
        if grad is None:
            return z.detach()
        return (z - self.eta(step) * grad).detach()


def best_window(attn: Tensor, box_h: int, box_w: int) -> tuple[int, int]:
    """Top-left (y, x) of the `box_h × box_w` window of `attn` `[h, w]` with the largest summed attention
    (first in row-major order on ties). Reference `replace_latents`: `F.conv2d` with a box of ones."""
    h, w = attn.shape
    if not (1 <= box_h <= h and 1 <= box_w <= w):
        raise ValueError(f"window {box_h}×{box_w} does not fit a {h}×{w} map")
    scores = F.avg_pool2d(attn.detach()[None, None].float(), (box_h, box_w), stride=1)[0, 0]
    idx = int(scores.flatten().argmax())
    return idx // scores.shape[1], idx % scores.shape[1]


def reinit_latent(z: Tensor, maps_at_T: Tensor, boxes: list[FracBox]) -> Tensor:
    """Latent re-initialisation at t = T: for each region i in order, resize its map `maps_at_T[i]`
    `[B, h, w]` to the latent's `(H, W)` (bilinear), find the box-sized window with the largest summed
    attention (`best_window`) and copy the *original* z's content of that window into box i (later
    boxes win overlaps); then renormalise each sample to z's own mean and (unbiased) std over (C, H, W).

    Reference `replace_latents(..., n=1)`: the same window search on the attention grid (window positions
    in steps of the latent/attention scale; we search at latent resolution), sum over the concept's
    tokens (our maps are already summed), and one global mean/std renormalisation (their batch is 1).
    The caller still scales by the scheduler's `init_noise_sigma` afterwards, as the reference does.
    """
    z = z.detach()
    b, _, height, width = z.shape
    up = F.interpolate(maps_at_T.detach().float(), size=(height, width), mode="bilinear", align_corners=False)
    out = z.clone()
    for i, box in enumerate(boxes):
        rows, cols = box_cells(box, height, width)
        bh, bw = rows.stop - rows.start, cols.stop - cols.start
        for s in range(b):
            y, x = best_window(up[i, s], bh, bw)
            out[s, :, rows, cols] = z[s, :, y:y + bh, x:x + bw]
    dims = (1, 2, 3)
    mean, std = z.mean(dims, keepdim=True), z.std(dims, keepdim=True)
    return (out - out.mean(dims, keepdim=True)) / out.std(dims, keepdim=True) * std + mean

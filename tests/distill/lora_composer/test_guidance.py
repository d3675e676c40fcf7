"""LoRA-Composer latent guidance and re-initialisation against hand-computed references.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/distill/lora_composer/test_guidance.py -q

Most cases use an 8×8 grid and the box (0.25, 0.25, 0.75, 0.75), which holds cells 2..5 on each axis
(centres 2.5/8 … 5.5/8), |box| = 16, k = ⌊0.2·16⌋ = 3. Its Gaussian (centre ½, std ¼ per axis) at the
cell centres, divided by its max, is v ⊗ v with v = [0, 0, e, 1, 1, e, 0, 0], e = exp(−¼):
exp(−8·0.1875²) / exp(−8·0.0625²) = exp(−0.28125 + 0.03125).
"""

from __future__ import annotations

import math

import pytest
import torch

from athanor.distill.lora_composer.guidance import (
    LatentGuidance,
    best_window,
    box_cells,
    box_mask,
    by_resolution,
    fill_loss,
    gaussian_box_weights,
    guidance_scale,
    injection_loss,
    isolation_loss,
    reinit_latent,
    smooth_maps,
)

BOX = (0.25, 0.25, 0.75, 0.75)
E = math.exp(-0.25)


def _map(cells: dict[tuple[int, int], float], h: int = 8, w: int = 8) -> torch.Tensor:
    """A [1, 1, h, w] map (one region, one sample) with the given cell values, zero elsewhere."""
    m = torch.zeros(1, 1, h, w)
    for (y, x), v in cells.items():
        m[0, 0, y, x] = v
    return m


CENTRE = {(3, 3): 1.0, (3, 4): 1.0, (4, 3): 1.0, (4, 4): 1.0}


def test_box_mask_small_grids():
    expected = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(box_mask((0.25, 0.0, 0.75, 0.5), 2, 4), expected)
    # End-exclusive: the centre 0.625 of cell 2 is not inside [0, 0.5); the edge centre 0.125 is inside [0.125, …).
    assert box_mask((0.0, 0.0, 0.5, 1.0), 1, 4).tolist() == [[1, 1, 0, 0]]
    assert box_mask((0.125, 0.0, 0.6, 1.0), 1, 4).tolist() == [[1, 1, 0, 0]]
    # A box holding no cell centre keeps the cell of its midpoint.
    assert box_mask((0.30, 0.30, 0.32, 0.32), 4, 4).nonzero().tolist() == [[1, 1]]
    assert box_cells(BOX, 8, 8) == (slice(2, 6), slice(2, 6))


def test_gaussian_box_weights_small_grids():
    v = torch.tensor([0, 0, E, 1, 1, E, 0, 0])
    assert torch.allclose(gaussian_box_weights(BOX, 8, 8), torch.outer(v, v), atol=1e-6)
    # 4×4, box over cells 0..2: centre 0.375, std 0.375; centres 0.125/0.375/0.625 give exp(−0.0625/0.28125).
    e = math.exp(-2 / 9)
    u = torch.tensor([e, 1, e, 0])
    assert torch.allclose(gaussian_box_weights((0, 0, 0.75, 0.75), 4, 4), torch.outer(u, u), atol=1e-6)
    # Even cell count: both middle cells sit at the same distance, so after the max-normalisation both are 1.
    expected = torch.zeros(4, 4)
    expected[:2, :2] = 1
    assert torch.allclose(gaussian_box_weights((0, 0, 0.5, 0.5), 4, 4), expected, atol=1e-6)


def test_injection_loss_inside_vs_outside():
    inside = injection_loss([_map(CENTRE)], [BOX])
    outside = injection_loss([_map({(0, 0): 1.0, (0, 1): 1.0, (7, 7): 1.0})], [BOX])
    assert inside.item() == pytest.approx(0.0, abs=1e-6)  # top-3 of A⊙G are three centre cells, G = 1 there
    assert outside.item() == pytest.approx(1.0)
    assert injection_loss([_map({k: 0.5 for k in CENTRE})], [BOX]).item() == pytest.approx(0.5)
    # Only a box corner is attended: top-3 = (e², 0, 0).
    assert injection_loss([_map({(2, 2): 1.0})], [BOX]).item() == pytest.approx(1 - E**2 / 3)


def test_injection_loss_averages_resolutions_regions_and_samples():
    # 4×4 grid: the box holds cells 1..2, k = max(1, ⌊0.8⌋) = 1; an empty box gives loss 1.
    coarse_outside = torch.zeros(1, 1, 4, 4)
    coarse_outside[0, 0, 0, 0] = 1.0
    assert injection_loss([_map(CENTRE), coarse_outside], [BOX]).item() == pytest.approx(0.5)
    batch = torch.cat([_map(CENTRE), _map({(0, 0): 1.0})], dim=1)  # [1, 2, 8, 8]
    assert injection_loss([batch], [BOX]).item() == pytest.approx(0.5)
    left, right = (0.0, 0.25, 0.5, 0.75), (0.5, 0.25, 1.0, 0.75)
    maps = torch.zeros(2, 1, 8, 8)
    maps[:, 0, 3:5, 1:3] = 1.0  # both regions attend to the centre of the left box
    assert injection_loss([maps], [left, right]).item() == pytest.approx(0.5)


def test_fill_loss_uniform_beats_single_peak():
    uniform = fill_loss([_map({(y, x): 1.0 for y in range(2, 6) for x in range(2, 6)})], [BOX])
    peak = fill_loss([_map({(3, 3): 1.0})], [BOX])
    half = fill_loss([_map({(y, x): 0.5 for y in range(2, 6) for x in range(2, 6)})], [BOX])
    assert uniform.item() == pytest.approx(0.0)
    assert peak.item() == pytest.approx(2 * 3 / 8 + 2 * 3 / 8)  # 3 of 4 box columns and rows stay at 0
    assert half.item() == pytest.approx(2 * 4 * 0.5 / 8 * 2)
    # Attention outside the box does not fill it.
    assert fill_loss([_map({(0, y): 1.0 for y in range(8)})], [BOX]).item() == pytest.approx(2.0)


def test_isolation_loss_is_mean_mass():
    assert isolation_loss([torch.tensor([[0.1, 0.3]]), torch.tensor([[0.2, 0.2]])]).item() == pytest.approx(0.2)
    assert isolation_loss([]).item() == 0.0


def test_smooth_and_group_by_resolution():
    g = math.exp(-2.0)  # 3-tap Gaussian with std ½: weights (e^{-2}, 1, e^{-2}) / (1 + 2e^{-2})
    delta = torch.zeros(1, 1, 5, 5)
    delta[0, 0, 2, 2] = 1.0
    out = smooth_maps([delta])[0]
    assert out[0, 0, 2, 2].item() == pytest.approx(1 / (1 + 2 * g) ** 2)
    assert out[0, 0, 1, 2].item() == pytest.approx(g / (1 + 2 * g) ** 2)
    assert torch.allclose(smooth_maps([torch.full((2, 1, 4, 4), 0.3)])[0], torch.full((2, 1, 4, 4), 0.3))
    a, b, c = torch.ones(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 4, 4)
    grouped = by_resolution([a, c, b])
    assert [tuple(t.shape) for t in grouped] == [(1, 1, 8, 8), (1, 1, 4, 4)]
    assert torch.allclose(grouped[0], torch.full((1, 1, 8, 8), 0.5))


def test_guidance_scale_schedule():
    assert guidance_scale(0) == pytest.approx(20.0)
    assert guidance_scale(24) == pytest.approx(20 * math.sqrt(0.5))
    assert guidance_scale(12) == pytest.approx(20 * math.sqrt(0.75))
    assert guidance_scale(49, max_steps=50, eta0=10.0) == pytest.approx(10 * math.sqrt(0.5))
    assert guidance_scale(40) == pytest.approx(20 * math.sqrt(0.5))


def _toy_loss(z: torch.Tensor) -> torch.Tensor:
    """Map = softmax over z's four cells; the box holds cell (0, 0) only, so k = 1, G = 1 and L = 1 − p₀."""
    attn = z.flatten().softmax(0).reshape(1, 1, 2, 2)
    return injection_loss([attn], [(0.0, 0.0, 0.5, 0.5)])


def test_guidance_step_matches_analytic_gradient():
    z0 = torch.tensor([[[[0.0, 0.5], [-0.5, 1.0]]]], dtype=torch.float64)
    z = z0.clone().requires_grad_(True)
    guide = LatentGuidance()
    loss = _toy_loss(z)
    p = z0.flatten().softmax(0)
    assert loss.item() == pytest.approx(1 - p[0].item())
    z1 = guide.step(z, loss, step=0)
    # ∂(1 − p₀)/∂z_j = −p₀(δ₀ⱼ − p_j), η = 20 at step 0.
    grad = -p[0] * (torch.eye(4, dtype=torch.float64)[0] - p)
    assert torch.allclose(z1.flatten(), z0.flatten() - 20.0 * grad)
    assert not z1.requires_grad
    assert _toy_loss(z1).item() < loss.item()
    assert guide.losses == [pytest.approx(loss.item())]


def _feed(guide: LatentGuidance, values: list[float]) -> list[bool]:
    """Step through `values` as losses (loss = v·z with z = 1); should_guide before each next step."""
    states = []
    for step, v in enumerate(values):
        z = torch.ones((), requires_grad=True)
        out = guide.step(z, v * z, step)
        assert out.item() == pytest.approx(1 - guide.eta(step) * v)
        states.append(guide.should_guide(step + 1))
    return states


def test_stop_rule_on_rise_and_after_max_steps():
    # A rise at step 2 falls in the grace period; the rise at step 6 stops the guidance.
    assert _feed(LatentGuidance(max_steps=10), [5, 4, 4.5, 3, 2, 1, 1.5]) == [True] * 6 + [False]
    assert _feed(LatentGuidance(max_steps=10, grace_steps=0), [5, 4, 4]) == [True, True, True]  # equal: no rise
    assert _feed(LatentGuidance(max_steps=10, grace_steps=0), [5, 4, 4.5]) == [True, True, False]
    guide = LatentGuidance(max_steps=4)
    assert _feed(guide, [4, 3, 2, 1]) == [True, True, True, False]
    assert guide.should_guide(3) and not guide.should_guide(4) and not guide.stopped


def test_guidance_total_loss_weights():
    guide = LatentGuidance()  # 8·L_inj + L_fill + 10·L_iso
    maps = [_map(CENTRE)]
    # L_inj = 0; L_fill: box columns/rows 2 and 5 stay empty → 2·2/8 + 2·2/8 = 1; L_iso = 0.2.
    total = guide.loss(maps, [BOX], [torch.tensor([[0.2]])])
    assert total.item() == pytest.approx(8 * 0.0 + 1.0 + 10 * 0.2)
    only_inj = LatentGuidance(weights={"fill": 0.0, "isolation": 0.0})
    assert only_inj.loss([_map({(2, 2): 1.0})], [BOX]).item() == pytest.approx(8 * (1 - E**2 / 3))
    with pytest.raises(ValueError):
        LatentGuidance(weights={"bogus": 1.0})


def test_best_window_finds_planted_peak():
    attn = torch.zeros(6, 8)
    attn[3:5, 5:7] = 1.0
    attn[0, 0] = 1.5  # a brighter single cell: its 2×2 windows sum to 1.5 < 4
    assert best_window(attn, 2, 2) == (3, 5)
    assert best_window(attn, 1, 1) == (0, 0)
    assert best_window(attn, 6, 8) == (0, 0)
    with pytest.raises(ValueError):
        best_window(attn, 7, 2)


def test_reinit_latent_exact_copy_and_overlap_order():
    z = torch.arange(64, dtype=torch.float32).reshape(1, 2, 4, 8) * 0.1
    maps = torch.zeros(2, 1, 4, 8)
    maps[0, 0, 0:2, 6:8] = 1.0  # region 0 attends to rows 0..1, cols 6..7
    maps[1, 0, 0:2, 3:5] = 1.0  # region 1 attends to rows 0..1, cols 3..4
    boxes = [(0.0, 0.5, 0.25, 1.0), (0.125, 0.5, 0.375, 1.0)]  # cells rows 2..3 × cols 0..1, then cols 1..2
    expected = z.clone()
    expected[0, :, 2:4, 0:2] = z[0, :, 0:2, 6:8]
    expected[0, :, 2:4, 1:3] = z[0, :, 0:2, 3:5]  # the later box wins column 1, copied from the original z
    expected = (expected - expected.mean()) / expected.std() * z.std() + z.mean()
    assert torch.allclose(reinit_latent(z, maps, boxes), expected, atol=1e-5)


def _toy_attention(z: torch.Tensor, pool: int) -> torch.Tensor:
    """Toy cross-attention of one region: softmax over positions of z's channel mean (pooled) → [B, h, w]."""
    m = torch.nn.functional.avg_pool2d(z.mean(1, keepdim=True), pool)[:, 0]
    return m.flatten(1).softmax(1).reshape(m.shape)


def test_reinit_latent_moves_peak_into_box_and_keeps_stats():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 16, generator=gen)
    z[:, :, 5:7, 12:14] += 6.0  # planted peak at the bottom right
    box = (0.0, 0.0, 0.25, 0.5)  # cells rows 0..3 × cols 0..3
    maps_at_t = _toy_attention(z, pool=2)[None]  # [R=1, B=2, 4, 8]
    new = reinit_latent(z, maps_at_t, [box])
    for before, after in ((_toy_attention(z, 1), False), (_toy_attention(new, 1), True)):
        in_box = before[:, :4, :4].flatten(1).amax(1)
        overall = before.flatten(1).amax(1)
        assert torch.allclose(in_box, overall) == after
    dims = (1, 2, 3)
    assert torch.allclose(new.mean(dims), z.mean(dims), atol=1e-5)
    assert torch.allclose(new.std(dims), z.std(dims), atol=1e-5)
    assert not torch.allclose(new, z)

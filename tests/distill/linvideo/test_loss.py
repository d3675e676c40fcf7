"""LinVideo objectives: the straight-through round, the selection losses, the α schedule, the score gap
of a rectified-flow teacher and the ADM surrogate. References are hand formulas in plain torch or
autograd of a hand-written density, never distill.linvideo.loss itself.

    .venv/bin/python -m pytest tests/distill/linvideo/test_loss.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from athanor.distill.linvideo.loss import (
    adm_surrogate,
    alpha_at,
    round_ste,
    score_gap,
    selection_losses,
    selection_reached,
    velocity_mse,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHAPE = (3, 2, 2, 4, 5)  # [B, C, F, H, W]


def test_round_ste_rounds_forward_and_passes_the_gradient_through():
    r = torch.tensor([0.1, 0.49, 0.51, 0.9, 1.7, -0.6], requires_grad=True)
    out = round_ste(r)
    assert torch.equal(out.detach(), torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, -1.0]))
    weights = torch.tensor([1.0, -2.0, 3.0, 0.5, 4.0, -1.5])
    (out * weights).sum().backward()
    assert torch.equal(r.grad, weights)  # d round_ste(r) / dr = 1 everywhere


@pytest.mark.parametrize(("values", "target", "alpha"), [
    ([0.2, 0.7, 0.9, 0.1], 1, 20.0),
    ([0.0, 1.0, 0.5, 0.3, 0.6], 3, 2.0),
    ([0.45, 0.55, 0.95], 0, 7.5),
])
def test_selection_losses_match_the_hand_formulas(values, target, alpha):
    r = torch.tensor(values, dtype=torch.float64)
    l_con, l_reg = selection_losses(r, target, alpha)
    rounded = sum(math.floor(v + 0.5) if v != 0.5 else 0 for v in values)  # round half to even at 0.5
    assert float(l_con) == pytest.approx((rounded - (len(values) - target)) ** 2)  # rounded = softmax gates
    assert float(l_reg) == pytest.approx(sum(1 - abs(2 * v - 1) ** alpha for v in values), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize(("layers", "target"), [(6, 1), (4, 3), (30, 16), (4, 2)])
def test_l_con_is_zero_exactly_when_target_layers_are_linear(layers, target):
    """The paper's definition: r = 1 keeps softmax, r = 0 is linear, `target` layers become linear. Every
    binary assignment: L_con is (linear count − target)², zero only at `target` linear layers."""
    for linear in range(layers + 1):
        r = torch.tensor([0.0] * linear + [1.0] * (layers - linear))
        l_con, _ = selection_losses(r, target, 10.0)
        assert float(l_con) == (linear - target) ** 2
        assert selection_reached(r, target) == (linear >= target)
    six = torch.tensor([0.0, 1, 1, 1, 1, 1])  # the probe: one linear layer of six, target 1
    assert float(selection_losses(six, 1, 10.0)[0]) == 0 and float(selection_losses(1 - six, 1, 10.0)[0]) == 16


@pytest.mark.parametrize("target", [0, 2, 5])
def test_l_con_gradient_is_straight_through_for_every_gate(target):
    values = [0.0, 0.2, 0.45, 0.55, 0.8, 1.0]
    r = torch.tensor(values, requires_grad=True)
    l_con, _ = selection_losses(r, target, 10.0)
    l_con.backward()
    expected = 2 * (sum(round(v) for v in values) - (len(values) - target))  # 0, 0, 0, 1, 1, 1 -> 3 softmax
    assert torch.allclose(r.grad, torch.full((6,), float(expected)))


def test_l_reg_gradient_matches_autograd_of_the_hand_formula():
    values = [0.05, 0.3, 0.7, 0.93]
    alpha = 3.5
    r = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    selection_losses(r, 0, alpha)[1].backward()
    for v, g in zip(values, r.grad.tolist()):
        # d/dr (1 - |2r - 1|^α) = -2α |2r - 1|^(α - 1) sign(2r - 1)
        expected = -2 * alpha * abs(2 * v - 1) ** (alpha - 1) * math.copysign(1.0, 2 * v - 1)
        assert g == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("alpha", [2.0, 8.0, 20.0])
def test_l_reg_is_zero_at_binary_gates_and_one_at_a_half(alpha):
    for v, expected in [(0.0, 0.0), (1.0, 0.0), (0.5, 1.0)]:
        assert float(selection_losses(torch.tensor([v]), 0, alpha)[1]) == pytest.approx(expected, abs=1e-6)
    grid = torch.linspace(0, 1, 101)
    per_gate = torch.stack([selection_losses(g.view(1), 0, alpha)[1] for g in grid])
    assert float(per_gate[50]) == pytest.approx(1.0) and bool((per_gate <= per_gate[50]).all())  # grid[50] = 0.5
    assert float(per_gate.min()) >= 0.0
    # summed over gates: n gates at 0.5 cost n
    assert float(selection_losses(torch.full((4,), 0.5), 0, alpha)[1]) == pytest.approx(4.0)


def test_l_reg_is_flat_early_and_parabolic_late():
    band = torch.linspace(0.1, 0.9, 41)  # |2r - 1| <= 0.8 -> 0.8^20 < 0.012
    flat = torch.stack([selection_losses(v.view(1), 0, 20.0)[1] for v in band])
    assert float(flat.min()) > 0.985
    late = torch.stack([selection_losses(v.view(1), 0, 2.0)[1] for v in band])
    assert torch.allclose(late, 1 - (2 * band - 1) ** 2, atol=1e-6)
    assert float(late.min()) < 0.4  # not flat: at 0.1 and 0.9 it is 1 - 0.64


def test_alpha_anneals_linearly_and_clamps():
    assert alpha_at(0, 100) == pytest.approx(20.0)
    assert alpha_at(100, 100) == pytest.approx(2.0)
    assert alpha_at(50, 100) == pytest.approx(11.0)
    assert alpha_at(25, 100) == pytest.approx(15.5)
    assert alpha_at(250, 100) == pytest.approx(2.0)
    assert alpha_at(-5, 100) == pytest.approx(20.0)
    assert alpha_at(3, 6, start=10.0, end=4.0) == pytest.approx(7.0)


def _velocities(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u_t = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    u_s = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return u_t, u_s, torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)


def test_score_gap_formula_broadcasts_t_per_sample():
    u_t, u_s, t = _velocities()
    gap = score_gap(u_t, u_s, t)
    assert gap.shape == SHAPE
    for b in range(SHAPE[0]):
        tb = float(t[b])
        assert torch.allclose(gap[b], -((1 - tb) / tb) * (u_t[b] - u_s[b]))


def test_score_gap_is_the_difference_of_rectified_flow_scores():
    u_t, u_s, t = _velocities(1)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    tb = t.view(-1, 1, 1, 1, 1)

    def score(u):  # x_t = (1 - t) x0 + t ε, u = ε - x0  ->  s = -(x + (1 - t) u) / t
        return -(x + (1 - tb) * u) / tb

    assert torch.allclose(score_gap(u_t, u_s, t), score(u_t) - score(u_s))


def test_score_gap_matches_autograd_of_the_gaussian_log_density():
    """A model that predicts clean x0 has velocity (x - x0)/t; with a point-mass data distribution,
    x_t ~ N((1 - t) x0, t² I) and the score is ∇ log p(x_t), taken here by autograd."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    x0_teacher = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    x0_student = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 0.6, 0.8], dtype=torch.float64)
    tb = t.view(-1, 1, 1, 1, 1)

    def autograd_score(x0):
        xr = x.clone().requires_grad_(True)
        log_p = (-(xr - (1 - tb) * x0) ** 2 / (2 * tb**2)).sum()
        return torch.autograd.grad(log_p, xr)[0]

    gap = score_gap((x - x0_teacher) / tb, (x - x0_student) / tb, t)
    assert torch.allclose(gap, autograd_score(x0_teacher) - autograd_score(x0_student))


def test_adm_surrogate_gradient_and_value():
    u_t, u_s, t = (v.float() for v in _velocities(4))
    x_hat = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), requires_grad=True)
    eta = 0.7
    loss = adm_surrogate(x_hat, u_t, u_s, t, eta=eta)
    loss.backward()
    loss = loss.detach()
    gap = -((1 - t.view(-1, 1, 1, 1, 1)) / t.view(-1, 1, 1, 1, 1)) * (u_t - u_s)
    batch = SHAPE[0]
    assert torch.allclose(x_hat.grad, -eta * gap / batch, atol=1e-6)
    assert float(loss) == pytest.approx(float(0.5 * eta**2 * gap.pow(2).sum() / batch), rel=1e-5)


def test_adm_surrogate_sends_no_gradient_into_the_velocities():
    u_t, u_s, t = (v.float() for v in _velocities(6))
    u_t.requires_grad_(True)
    u_s.requires_grad_(True)
    x_hat = torch.randn(SHAPE, requires_grad=True)
    loss = adm_surrogate(x_hat, u_t, u_s, t)
    loss.backward()
    assert x_hat.grad is not None and float(x_hat.grad.abs().sum()) > 0
    assert u_t.grad is None and u_s.grad is None


def test_velocity_mse_is_the_mean_squared_difference_and_leaves_the_teacher_alone():
    g = torch.Generator().manual_seed(7)
    u_s = torch.randn(SHAPE, generator=g, requires_grad=True)
    u_t = torch.randn(SHAPE, generator=g, requires_grad=True)
    loss = velocity_mse(u_s, u_t)
    diff = (u_s.detach() - u_t.detach()).numpy()
    assert loss.item() == pytest.approx(float((diff**2).mean()), rel=1e-6)
    loss.backward()
    assert u_t.grad is None
    assert torch.allclose(u_s.grad, 2 * torch.from_numpy(diff) / diff.size)

"""LinVideo objectives: the selection losses that decide which layers become linear, and anytime
distribution matching (ADM) against the teacher.

    .venv/bin/python -m pytest tests/distill/linvideo/test_loss.py -q

Selection (one gate r_l ∈ [0, 1] per candidate layer, `convert/linvideo.py`; r = 1 keeps softmax attention,
r = 0 is linear, `target` is how many of the L candidates become linear):
    L_con = (Σ_l round_STE(r_l) − (L − target))²   round_STE: rounds forward, identity backward
    L_reg = Σ_l (1 − |2 r_l − 1|^α)                 α annealed 20 → 2 (flat early, binarising late)
    L = L_ADM + λ (L_con + L_reg),  λ = 0.01

ADM for a rectified-flow teacher (x_t = (1 − t) x₀ + t ε, velocity u = ε − x₀): the score is
s_t(x) = −(x + (1 − t) u(x)) / t, so the gap between the teacher's score and the student's own
(the student serves as its fake score) at a student-generated x̂_t is
    s_t − ŝ_t = −((1 − t) / t) · (u_teacher(x̂_t) − u_student(x̂_t))
and the surrogate 0.5‖x̂ − sg(x̂ + η (s_t − ŝ_t))‖² has gradient −η (s_t − ŝ_t) in x̂: it moves the
student's samples along the score gap, toward the teacher's distribution.
"""

from __future__ import annotations

import torch


def round_ste(r: torch.Tensor) -> torch.Tensor:
    """round(r) forward, identity gradient backward (straight-through)."""
    return r + (torch.round(r) - r).detach()


def selection_losses(r: torch.Tensor, target: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_con, L_reg) for gates `r` [layers] (clamped to [0, 1] first, as the processors use them). `target` is
    the number of layers to make linear: a gate at 1 keeps softmax, so L_con pulls the rounded count of
    softmax gates to len(r) − target (zero exactly when `target` gates round to 0)."""
    r = r.clamp(0.0, 1.0)
    l_con = (round_ste(r).sum() - (r.numel() - target)) ** 2
    l_reg = (1 - (2 * r - 1).abs().clamp_min(1e-12) ** alpha).sum()
    return l_con, l_reg


def selection_reached(r: torch.Tensor, target: int) -> bool:
    """Whether rounding the gates already makes at least `target` layers linear (at most len(r) − target
    softmax gates): from then on L_reg's binarisation pressure may start."""
    return int(torch.round(r.detach().clamp(0.0, 1.0)).sum()) <= r.numel() - target


def alpha_at(step: int, total: int, start: float = 20.0, end: float = 2.0) -> float:
    """α annealed linearly from `start` at step 0 to `end` at step `total`."""
    frac = min(max(step / max(total, 1), 0.0), 1.0)
    return start + (end - start) * frac


def score_gap(u_teacher: torch.Tensor, u_student: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """s_t − ŝ_t = −((1 − t) / t)(u_teacher − u_student); t [batch] broadcast over the sample dims."""
    t = t.view(-1, *([1] * (u_teacher.dim() - 1))).to(u_teacher.dtype)
    return -((1 - t) / t) * (u_teacher - u_student)


def adm_surrogate(x_hat: torch.Tensor, u_teacher: torch.Tensor, u_student: torch.Tensor, t: torch.Tensor,
                  eta: float = 1.0) -> torch.Tensor:
    """0.5‖x̂ − sg(x̂ + η(s_t − ŝ_t))‖², summed over a sample's elements and averaged over the batch.
    Its gradient in x̂ is −η (s_t − ŝ_t) / batch; the value equals 0.5 η² ‖s_t − ŝ_t‖² / batch."""
    gap = score_gap(u_teacher.detach().float(), u_student.detach().float(), t.float())
    target = (x_hat.float() + eta * gap).detach()
    return 0.5 * (x_hat.float() - target).pow(2).flatten(1).sum(1).mean()


def velocity_mse(u_student: torch.Tensor, u_teacher: torch.Tensor) -> torch.Tensor:
    """Plain output regression to the teacher's velocity (mean over elements)."""
    return (u_student.float() - u_teacher.detach().float()).pow(2).mean()

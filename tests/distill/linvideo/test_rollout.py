"""ADM on the student's own rollout: x̂_t is where the student's guided sampler takes fresh noise by t (checked
against a hand-written Euler loop), the training step uses it instead of the teacher's cached point, and the
`even_spread` selection holds its layers from the first step.

    .venv/bin/python -m pytest tests/distill/linvideo/test_rollout.py -q
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from diffusers import WanTransformer3DModel

from athanor.convert import linvideo as lv
from athanor.distill.linvideo.data import TrajectoryPoints, teacher_trajectories
from athanor.distill.linvideo.loss import adm_surrogate
from athanor.distill.linvideo.rollout import grid_index, rollout_to
from athanor.distill.linvideo.train import LinVideoModule
from athanor.distill.loaders import SeededLoader
from athanor.distill.spec import TrainSpec

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
              text_dim=16, freq_dim=16, ffn_dim=32, num_layers=4, rope_max_seq_len=32)
STEPS, GUIDANCE, SHIFT = 6, 2.5, 3.0


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    teacher = WanTransformer3DModel(**CONFIG).eval()
    student = copy.deepcopy(teacher)
    lv.install(student, lv.candidate_layers(student))
    with torch.no_grad():  # a student that differs from the teacher: half-linear gates
        for gate in lv.gates(student).values():
            gate.r.fill_(0.5)
    return teacher, student.eval(), torch.randn(3, 4, 16)


@torch.no_grad()
def _by_hand(model, noise, cond, t_stop: float) -> torch.Tensor:
    """Euler with classifier-free guidance written out: the shifted grid, two forwards per step."""
    grid = [SHIFT * s / (1 + (SHIFT - 1) * s) for s in torch.linspace(1.0, 0.0, STEPS + 1).tolist()]
    x = noise.clone()
    for now, nxt in zip(grid[:-1], grid[1:]):
        if now <= t_stop + 1e-6:
            break
        t = torch.full((1,), now * 1000.0)
        u_c = model(x, t, cond).sample
        u_u = model(x, t, torch.zeros_like(cond)).sample
        x = x + (nxt - now) * (u_u + GUIDANCE * (u_c - u_u))
    return x


def test_rollout_reaches_each_samples_time_through_the_students_own_sampler(toy):
    _, student, cond = toy
    noise = torch.randn(3, 1, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    grid = [SHIFT * s / (1 + (SHIFT - 1) * s) for s in torch.linspace(1.0, 0.0, STEPS + 1).tolist()]
    t = torch.tensor([grid[0], grid[2], grid[5]])  # noise itself, two steps in, five steps in
    x = rollout_to(student, noise, cond, torch.zeros_like(cond[:1]), t, steps=STEPS, guidance=GUIDANCE, shift=SHIFT)
    assert torch.equal(x[0], noise[0])
    for i in range(3):
        expected = _by_hand(student, noise[i:i + 1], cond[i:i + 1], float(t[i]))
        assert torch.allclose(x[i:i + 1], expected, atol=1e-5), i
    assert not torch.allclose(x[2], noise[2])


def test_a_time_off_the_grid_is_refused():
    with pytest.raises(ValueError, match="not on the 6-step sampling grid"):
        grid_index(torch.tensor([0.5, 0.4242]), STEPS, SHIFT)


def _module(teacher, student, rollout: bool, **kw) -> LinVideoModule:
    spec = TrainSpec(max_steps=4, lr=1e-3, log_every_n_steps=1, accelerator="cpu")
    settings = dict(steps=STEPS, guidance=GUIDANCE, shift=SHIFT) if rollout else None
    return LinVideoModule(copy.deepcopy(student), teacher, spec, target=2, rollout=settings, **kw)


def test_rollout_adm_starts_from_the_students_state_not_the_cached_point(toy):
    teacher, student, cond = toy
    grid = [SHIFT * s / (1 + (SHIFT - 1) * s) for s in torch.linspace(1.0, 0.0, STEPS + 1).tolist()]
    cached = torch.randn(2, 1, 2, 8, 8)  # a teacher's point would be here: rollout ADM must not read it
    t, t_next = torch.tensor([grid[1], grid[3]]), torch.tensor([grid[2], grid[4]])
    module = _module(teacher, student, rollout=True)
    torch.manual_seed(7)
    adm = module._objective(cached, t, t_next, cond[:2])["adm"]
    torch.manual_seed(7)
    noise = torch.randn_like(cached)  # the draw the module makes first
    with torch.no_grad():
        x_t = torch.cat([_by_hand(module.student, noise[i:i + 1], cond[i:i + 1], float(t[i])) for i in range(2)])
        u = module.student(x_t, t * 1000, cond[:2]).sample
        x_hat = x_t + (t_next - t).view(-1, 1, 1, 1, 1) * u
        u_teacher = teacher(x_hat, t_next * 1000, cond[:2]).sample
        u_fake = module.student(x_hat, t_next * 1000, cond[:2]).sample
    assert adm.item() == pytest.approx(adm_surrogate(x_hat, u_teacher, u_fake, t_next).item(), rel=1e-4)
    # the cached source starts from the batch's point: another value
    cached_adm = _module(teacher, student, rollout=False)._objective(cached, t, t_next, cond[:2])["adm"]
    assert cached_adm.item() != pytest.approx(adm.item(), rel=1e-3)


def test_even_spread_selection_holds_its_layers_from_the_first_step(toy, one_torch_thread):
    teacher, student, cond = toy
    cache = teacher_trajectories(teacher, cond, (1, 2, 8, 8), samples=1, steps=STEPS, guidance=1.0, shift=SHIFT,
                                 seed=0)
    fresh = copy.deepcopy(teacher)
    lv.install(fresh, lv.candidate_layers(fresh))
    even = lv.choose_linear(fresh, 2)  # untouched gates: the even spread
    module = _module(teacher, fresh, rollout=False, fixed_linear=even, lambda_select=1.0)
    assert lv.gate_values(module.student) == {n: 0.0 if n in even else 1.0 for n in module.layer_names}
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, SeededLoader(TrajectoryPoints(cache, cond, 0.05), batch_size=2, seed=0)())
    assert lv.gate_values(module.student) == {n: 0.0 if n in even else 1.0 for n in module.layer_names}
    assert "train/l_con" not in trainer.logged_metrics  # no selection losses: the layers are fixed
    with pytest.raises(ValueError, match="needs 2 of the hybrid layers"):
        _module(teacher, fresh, rollout=False, fixed_linear=even[:1])

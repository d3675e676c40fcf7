"""LinVideo training: the gates find the layers that can go linear, on a toy teacher where the answer
is known (two of four self-attention layers barely matter), and the trained student beats the untrained
spread-out switch.

    .venv/bin/python -m pytest tests/distill/linvideo/test_train.py -q
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from diffusers import WanTransformer3DModel

from athanor.convert import linvideo as lv
from athanor.distill.linvideo.data import TrajectoryPoints, teacher_trajectories
from athanor.distill.linvideo.sampling import velocity
from athanor.distill.linvideo.train import AdamWWithSGDGroups, LinVideoModule
from athanor.distill.loaders import SeededLoader
from athanor.distill.spec import TrainSpec

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
              text_dim=16, freq_dim=16, ffn_dim=32, num_layers=4, rope_max_seq_len=32)
HARMLESS = ("blocks.0.attn1", "blocks.2.attn1")  # not the even spread (1, 3) an untrained switch picks


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    teacher = WanTransformer3DModel(**CONFIG).eval()
    for name in HARMLESS:  # these layers' attention output barely reaches the residual stream
        teacher.get_submodule(name).to_out[0].weight.data.mul_(0.02)
    cond = torch.randn(3, 4, 16)
    cache = teacher_trajectories(teacher, cond, (1, 2, 8, 8), samples=2, steps=8, guidance=1.0, shift=1.0, seed=0)
    return teacher, cond, cache


def _train(teacher, cond, cache, objective: str, steps: int = 100) -> LinVideoModule:
    torch.manual_seed(0)
    student = copy.deepcopy(teacher)
    lv.install(student, lv.candidate_layers(student))
    spec = TrainSpec(max_steps=steps, lr=1e-3, log_every_n_steps=5, accelerator="cpu")
    module = LinVideoModule(student, teacher, spec, target=2, objective=objective, lr_gate=0.02)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, SeededLoader(TrajectoryPoints(cache, cond, 0.05), batch_size=4, seed=0)())
    return module


@torch.no_grad()
def _distance(model, teacher, cache, cond) -> float:
    c = cond[cache.cond]
    return float((velocity(model, cache.x, cache.t, c) - velocity(teacher, cache.x, cache.t, c)).pow(2).mean())


@pytest.mark.parametrize("objective", ["adm", "velocity"])
def test_gates_settle_on_the_harmless_layers(toy, objective, one_torch_thread):
    teacher, cond, cache = toy
    module = _train(teacher, cond, cache, objective)
    final = lv.gate_values(module.student)
    assert set(final.values()) <= {0.0, 1.0}, final
    assert sum(round(r) for r in final.values()) == 4 - 2
    assert sorted(n for n, r in final.items() if r == 0.0) == sorted(HARMLESS)
    # the gates moved progressively (the history has values strictly inside (0, 1) before the commit)
    assert any(0.0 < r < 1.0 for _, values in module.r_history for r in values.values())


def test_trained_student_beats_the_untrained_switch(toy, one_torch_thread):
    teacher, cond, cache = toy
    untrained = copy.deepcopy(teacher)
    lv.install(untrained, lv.candidate_layers(untrained))
    lv.switch(untrained, lv.choose_linear(untrained, 2))  # all r = 1: the even spread
    assert lv.linear_layers(untrained) == ["blocks.1.attn1", "blocks.3.attn1"]
    trained = _train(teacher, cond, cache, "adm").student
    lv.switch(trained, lv.choose_linear(trained, 2))
    assert lv.is_switched(trained) and len(lv.linear_layers(trained)) == 2
    assert _distance(trained, teacher, cache, cond) < 0.5 * _distance(untrained, teacher, cache, cond)


def test_sgd_groups_step_by_the_normalised_gradient_and_adam_groups_as_adamw():
    torch.manual_seed(0)
    gates = [torch.nn.Parameter(torch.tensor(0.8)), torch.nn.Parameter(torch.tensor(0.6))]
    weights = torch.nn.Parameter(torch.randn(3))
    twin = torch.nn.Parameter(weights.detach().clone())
    mixed = AdamWWithSGDGroups([{"params": gates, "lr": 0.1, "sgd": True, "weight_decay": 0.0},
                                {"params": [weights], "lr": 0.01}])
    plain = torch.optim.AdamW([{"params": [twin], "lr": 0.01}])
    for p, g in zip(gates, (torch.tensor(2.0), torch.tensor(-0.5))):
        p.grad = g
    weights.grad = twin.grad = torch.tensor([0.3, -1.0, 2.0])
    mixed.step()
    plain.step()
    # SGD normalised by the largest gate gradient (2.0): 0.8 - 0.1 * 2/2, 0.6 + 0.1 * 0.5/2
    assert gates[0].item() == pytest.approx(0.7) and gates[1].item() == pytest.approx(0.625)
    assert torch.allclose(weights, twin)
    assert len(mixed.param_groups) == 2  # the groups are restored after the Adam step

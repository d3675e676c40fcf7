"""LinVideo training: the LightningModule that learns which layers go linear and how.

    .venv/bin/python -m pytest tests/distill/linvideo/test_train.py -q

One step on a batch of teacher-trajectory points (x_t, t, t', condition):
- objective 'adm': the student steps x̂_{t'} = x_t + (t' − t)·u_S(x_t) (gradient flows), then the
  teacher and the student itself (no gradient: its own fake score) give velocities at x̂_{t'}; the
  ADM surrogate pushes x̂ along the score gap (`loss.py`). With `rollout` settings (adm_source 'rollout')
  x_t is not the teacher's point but where the student's own sampler takes fresh noise by the point's time t
  (`rollout.py`); the batch then only supplies times and conditions. 'velocity': MSE(u_S(x_t), u_T(x_t)) on
  the teacher's points. With `log_both` the other objective is logged too (no gradient; under rollout ADM
  the logged velocity MSE is at the rollout's states).
- `fixed_linear` (selection 'even_spread'): the selection is committed before the first step to those
  layers; no selection losses, the gates never move.
- attention transfer: Σ over hybrid layers of the gap between the linear and the softmax branch,
  weighted by `lambda_transfer` (trains the feature maps toward the softmax output they replace).
- selection: λ(L_con + L_reg) on the gates, α annealed over the run.
The gates are clamped to [0, 1] after every optimizer step (the processors clamp too), and their
values are kept per logged step (`r_history`) for the trajectory plot.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from athanor.convert import linvideo as lv
from athanor.convert.module_utils import unwrap
from athanor.distill.linvideo.loss import (
    adm_surrogate,
    alpha_at,
    selection_losses,
    selection_reached,
    velocity_mse,
)
from athanor.distill.linvideo.rollout import rollout_to
from athanor.distill.linvideo.sampling import velocity
from athanor.distill.spec import TrainSpec


class AdamWWithSGDGroups(torch.optim.AdamW):
    """AdamW, except for param groups marked `sgd=True`, which take gradient steps normalised by the
    group's largest gradient: p −= lr · g / max|g|, so the fastest gate moves `lr` per step.

    Why: every gate gets the same L_con push, and Adam normalises each parameter's step to ~lr
    whatever its gradient, so all gates would fall together and cross 0.5 at once. Here a gate moves
    in proportion to its net gradient, so the layers whose linearisation hurts least (the smallest
    restoring gradient from the objective) fall first, which is the selection wanted; normalising by
    the group's largest gradient keeps the step size independent of the losses' scale."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        every = self.param_groups
        for group in (g for g in every if g.get("sgd")):
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if not grads:
                continue
            scale = torch.stack([g.abs().max() for g in grads]).max().clamp_min(1e-12)
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["lr"] * p.grad / scale)
        self.param_groups = [g for g in every if not g.get("sgd")]
        try:
            super().step()
        finally:
            self.param_groups = every
        return loss


class LinVideoModule(L.LightningModule):
    """Trains the hybrid student against the frozen teacher (see the module docstring)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, train: TrainSpec, *, target: int,
                 objective: str = "adm", log_both: bool = False, lambda_select: float = 0.01,
                 alpha: tuple[float, float] = (20.0, 2.0), lambda_transfer: float = 1.0, eta: float = 1.0,
                 lr_gate: float = 0.01, lr_feature_maps: float = 1e-3, train_weights: bool = False,
                 uncond_fraction: float = 0.1, reg_warmup: float = 0.2, commit_at: float = 0.8,
                 rollout: dict[str, Any] | None = None, fixed_linear: list[str] | None = None) -> None:
        super().__init__()
        self.student = student.train()
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False)  # frozen; not a submodule
        self.train_spec, self.target, self.objective, self.log_both = train, target, objective, log_both
        self.lambda_select, self.alpha, self.lambda_transfer, self.eta = lambda_select, alpha, lambda_transfer, eta
        self.lr_gate, self.lr_feature_maps, self.train_weights = lr_gate, lr_feature_maps, train_weights
        self.uncond_fraction, self.reg_warmup, self.commit_at = uncond_fraction, reg_warmup, commit_at
        self.reached_target = False
        self.committed: dict[str, float] | None = None
        """The gates' final values once the selection is committed (see `_commit`)."""
        self.layer_names = list(lv.gate_values(student))
        self.rollout = rollout
        """steps, guidance and shift of the student's sampler for ADM on its own rollout; None: cached points."""
        if fixed_linear is not None:
            unknown = sorted(set(fixed_linear) - set(self.layer_names))
            if unknown or len(fixed_linear) != target:
                raise ValueError(f"fixed_linear {fixed_linear}: needs {target} of the hybrid layers {self.layer_names}")
            self.committed = {n: 0.0 if n in fixed_linear else 1.0 for n in self.layer_names}
            self._hold_gates()
        self.r_history: list[tuple[int, dict[str, float]]] = [(0, lv.gate_values(student))]

    def on_fit_start(self) -> None:
        self.teacher.to(self.device, next(self.student.parameters()).dtype)

    def _gates(self) -> dict[str, lv.LinVideoGate]:
        return {n: g for n, g in lv.gates(unwrap(self.student)).items() if g.r is not None}

    def _drop_conditions(self, cond: torch.Tensor) -> torch.Tensor:
        """Zero a fraction of the conditions: the student must match the teacher's unconditional
        velocity too, or classifier-free guidance would mix a trained and an untrained prediction."""
        if not self.uncond_fraction:
            return cond
        keep = torch.rand(cond.shape[0], device=cond.device) >= self.uncond_fraction
        return cond * keep.view(-1, 1, 1).to(cond.dtype)

    def _objective(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                   cond: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.rollout is not None and self.objective == "adm":
            # before the student's forward with gradient: the rollout's forwards overwrite the transfer errors
            x = rollout_to(self.student, torch.randn_like(x), cond, torch.zeros_like(cond[:1]), t, **self.rollout)
        u_student = velocity(self.student, x, t, cond)
        transfer = [g.transfer_error for g in self._gates().values() if g.transfer_error is not None]
        terms = {"transfer": torch.stack(transfer).sum() if transfer else x.new_zeros(())}
        want_adm = self.objective == "adm" or self.log_both
        want_mse = self.objective == "velocity" or self.log_both
        if want_mse:
            with torch.set_grad_enabled(self.objective == "velocity"):
                with torch.no_grad():
                    u_teacher = velocity(self.teacher, x, t, cond)
                terms["velocity_mse"] = velocity_mse(u_student, u_teacher)
        if want_adm:
            dt = (t_next - t).view(-1, *([1] * (x.dim() - 1)))
            x_hat = x + dt * u_student
            if self.objective != "adm":
                x_hat = x_hat.detach()
            with torch.no_grad():
                u_t = velocity(self.teacher, x_hat, t_next, cond)
                u_fake = velocity(self.student, x_hat, t_next, cond)
            terms["adm"] = adm_surrogate(x_hat, u_t, u_fake, t_next, self.eta)
        return terms

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        cond = self._drop_conditions(batch["cond"])
        terms = self._objective(batch["x"], batch["t"], batch["t_next"], cond)
        gates = {} if self.committed else self._gates()
        start = int(self.reg_warmup * self.train_spec.max_steps)  # α anneals over the regularised part
        alpha = alpha_at(self.global_step - start, self.train_spec.max_steps - start, *self.alpha)
        if gates:
            r = torch.cat([g.r for g in gates.values()])
            terms["l_con"], terms["l_reg"] = selection_losses(r, self.target, alpha)
            # As AdaRound (where L_reg comes from): no binarisation pressure during the first part of
            # the run, and none before the rounded gates first reach the target: the steep wall of
            # |2r − 1|^20 near r = 1 would otherwise pin every gate at its start.
            self.reached_target = self.reached_target or selection_reached(r, self.target)
            reg_on = self.reached_target and self.global_step >= self.reg_warmup * self.train_spec.max_steps
            selection = terms["l_con"] + (terms["l_reg"] if reg_on else 0.0)
        else:
            selection = terms["transfer"].new_zeros(())
        main = terms["adm" if self.objective == "adm" else "velocity_mse"]
        terms["loss"] = main + self.lambda_transfer * terms["transfer"] + self.lambda_select * selection
        logged = {f"train/{k}": v.detach() for k, v in terms.items()}
        logged.update({f"gate/{n}": g.r.detach().clamp(0, 1) for n, g in gates.items()})
        self.log_dict(logged, on_step=True, prog_bar=False)
        self.log("train/alpha", alpha, on_step=True)
        return terms["loss"]

    def _commit(self) -> None:
        """End the selection: the `target` lowest gates are set to 0, the rest to 1, and held there.
        Why: L_con's straight-through rounding holds the marginal gate at 0.5 (it is pushed down above
        0.5 and released below), where L_reg's gradient vanishes; the remaining steps then train the
        feature maps (and weights) for the architecture that will be exported."""
        chosen = set(lv.choose_linear(unwrap(self.student), self.target))
        self.committed = {name: 0.0 if name in chosen else 1.0 for name in self._gates()}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.trainer.global_step
        if self.committed is None and step >= self.commit_at * self.train_spec.max_steps:
            self._commit()
        self._hold_gates()
        if step % max(1, self.train_spec.log_every_n_steps) == 0 and step != self.r_history[-1][0]:
            self.r_history.append((step, lv.gate_values(unwrap(self.student))))

    @torch.no_grad()
    def _hold_gates(self) -> None:
        for name, gate in self._gates().items():
            if self.committed is not None:
                gate.r.fill_(self.committed[name])  # held: the optimizer may not move a committed gate
            else:
                gate.r.clamp_(0.0, 1.0)

    def configure_optimizers(self) -> dict:
        gates = self._gates()
        gate_params = [g.r for g in gates.values()]
        map_params = [p for g in lv.gates(unwrap(self.student)).values() for n, p in g.named_parameters() if n != "r"]
        taken = {id(p) for p in gate_params + map_params}
        rest = [p for p in self.student.parameters() if id(p) not in taken]
        for p in rest:
            p.requires_grad_(self.train_weights)
        groups = [{"params": gate_params, "lr": self.lr_gate, "weight_decay": 0.0, "sgd": True},
                  {"params": map_params, "lr": self.lr_feature_maps, "weight_decay": 0.0}]
        if self.train_weights:
            groups.append({"params": rest, "lr": self.train_spec.lr, "weight_decay": self.train_spec.weight_decay})
        optimizer = AdamWWithSGDGroups([g for g in groups if g["params"]])
        warmup = self.train_spec.warmup_steps

        def factor(step: int) -> float:  # warm-up, then constant: the gates need a full lr to the end
            return (step + 1) / warmup if warmup and step < warmup else 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

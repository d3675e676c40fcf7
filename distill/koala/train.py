"""KOALA training: feature taps, the three-term loss and the LightningModule.

    loss = λ_task·MSE(ŷ_S, target) + λ_out·MSE(ŷ_S, ŷ_T) + λ_feat·Σ_sites MSE(f_S, f_T)

Feature sites are `self_attention` (the output of `attn1` in every student transformer layer,
paired with the teacher layer it was copied from — KOALA's finding) or `block` (every U-Net stage
output, as in BK-SDM). The feature term sums over sites, as the KOALA and BK-SDM losses do.
Image latents (VAE-encoded images, or the testbed's real canvases, which are their own latents) are noised with
their ground-truth noise as the task target; with a `Rollout`, some batches instead take the state the student's
own guided sampler reaches after k of its steps (on-policy KD: the teacher says what to do where the student's
drift has taken it; no task target there); `kd_weighting: x0` weighs each row's output KD by the x₀ error its
ε error implies (`kd_timestep_weights`). Data-free batches carry
`teacher_latents` (teacher samples, see sampling.py), noised the same way but supervised by the
teacher only. With `uncond_prob`, rows are conditioned on the empty prompt instead (caption dropout),
so the student also learns the unconditional prediction that classifier-free guidance uses. The
optional EMA (`Fp32Ema`) moves once per optimizer step and is kept in fp32.

    .venv/bin/python -m pytest tests/distill/koala/test_koala.py tests/distill/koala/test_training.py -q
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import nn

from athanor.convert.koala import BlockMap, layout
from athanor.convert.module_utils import unwrap
from athanor.distill.koala.data import KoalaTeacher, encode_batch, unet_kwargs
from athanor.distill.koala.sampling import make_scheduler, sample
from athanor.distill.optim import adamw_with_schedule
from athanor.distill.spec import TrainSpec

SITES = ("self_attention", "block")


def _bare_name(name: str) -> str:
    # Names taken from a wrapped model's named_modules() carry 'module.' prefixes; the bare model's don't.
    while name.startswith("module."):
        name = name[len("module."):]
    return name


class FeatureTaps:
    """Forward hooks that keep the latest output of named submodules of a (possibly wrapped) model.

    Hooks sit on the submodule objects themselves, so they fire whatever wraps the model and
    whichever name prefix the wrapper adds."""

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        root = unwrap(model)
        self.features: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in names:
            module = root.get_submodule(_bare_name(name))
            self.handles.append(module.register_forward_hook(self._keep(_bare_name(name))))

    def _keep(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            # Stage outputs of down blocks are (hidden_states, skip_connections).
            self.features[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        features, self.features = self.features, {}
        return features

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def feature_pairs(bmap: BlockMap, student_config: dict, site: str) -> list[tuple[str, str]]:
    """(student module, teacher module) whose outputs are matched by the feature loss."""
    if site == "self_attention":
        return [(f"{s}.attn1", f"{t}.attn1") for s, t in bmap.of_kind("transformer_layer").items()]
    if site == "block":
        n = len(layout(student_config).attention)
        names = [f"down_blocks.{i}" for i in range(n)]
        names += ["mid_block"] if student_config.get("mid_block_type") else []
        return [(name, name) for name in names + [f"up_blocks.{i}" for i in range(n)]]
    raise ValueError(f"feature site {site!r}: choose one of {SITES}")


def koala_losses(
    student_pred: torch.Tensor,
    teacher_pred: torch.Tensor,
    target: torch.Tensor | None,
    student_features: dict[str, torch.Tensor],
    teacher_features: dict[str, torch.Tensor],
    pairs: list[tuple[str, str]],
    weights: tuple[float, float, float],
    out_weights: torch.Tensor | None = None,
    task_pred: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The KOALA loss terms (all MSE, computed in fp32) and their weighted sum. `target` is None in
    data-free mode: there is no ground truth, only the teacher. `out_weights` [B] weighs each row's output
    KD (`kd_timestep_weights`); None: the plain MSE. `task_pred`: what the task loss compares with `target`
    when it is not `student_pred` (guided KD: the captioned branch)."""
    w_task, w_out, w_feat = weights
    if out_weights is None:
        out = F.mse_loss(student_pred.float(), teacher_pred.float())
    else:
        per_row = (student_pred.float() - teacher_pred.float()).pow(2).flatten(1).mean(1)
        out = (per_row * out_weights.float()).mean()
    feat = sum(
        (F.mse_loss(student_features[s].float(), teacher_features[t].float()) for s, t in pairs),
        start=torch.zeros((), device=out.device),
    )
    terms = {"loss_out": out, "loss_feat": feat}
    total = w_out * out + w_feat * feat
    if target is not None:
        predicted = student_pred if task_pred is None else task_pred
        terms["loss_task"] = F.mse_loss(predicted.float(), target.float())
        total = total + w_task * terms["loss_task"]
    terms["loss"] = total
    return terms


def training_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """What the U-Net is trained to predict: ε, v = α_t·ε − σ_t·x₀, or x₀."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r}")


def guided(pred: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance of a [captioned; empty-prompt] stacked prediction: ε_u + w·(ε_c − ε_u)."""
    cond, uncond = pred.chunk(2)
    return uncond + scale * (cond - uncond)


def with_unconditional(noisy: torch.Tensor, t: torch.Tensor, kwargs: dict,
                       uncond: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The batch stacked with itself under the empty prompt: inputs for one U-Net call giving [ε_c; ε_u]."""
    cond = kwargs["encoder_hidden_states"]
    out = {"encoder_hidden_states": torch.cat([cond, uncond["prompt_embeds"].to(cond).expand_as(cond)])}
    if "added_cond_kwargs" in kwargs:
        added = kwargs["added_cond_kwargs"]
        empty = uncond["text_embeds"].to(added["text_embeds"]).expand_as(added["text_embeds"])
        out["added_cond_kwargs"] = {"text_embeds": torch.cat([added["text_embeds"], empty]),
                                    "time_ids": torch.cat([added["time_ids"], added["time_ids"]])}
    return torch.cat([noisy, noisy]), torch.cat([t, t]), out


@dataclass(frozen=True)
class Rollout:
    """On-policy KD: with probability `prob` a training batch is distilled at the state the student's own sampler
    (`steps` DDIM steps at classifier-free guidance `guidance`, the evaluation's) reaches from fresh noise after k
    steps, k uniform in [0, steps), at that step's timestep. Noising real images at a random t trains the student
    where the teacher's trajectories pass; sampling walks it along its own, whose errors compound step by step."""
    prob: float
    steps: int
    guidance: float


def rollout_state(unet: nn.Module, scheduler_config: dict, batch: dict[str, torch.Tensor],
                  uncond: dict[str, torch.Tensor], noise: torch.Tensor, rollout: Rollout,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, t) after `k` steps of the evaluation's guided sampler (`sampling.sample`) run by `unet` from `noise`
    under the batch's conditioning; t is the timestep of step k, one per row."""
    cond = {key: batch[key].to(noise.device) for key in uncond}
    x, _, _ = sample(unet, scheduler_config, cond, {key: v.to(noise.device) for key, v in uncond.items()}, noise,
                     rollout.steps, rollout.guidance, stop_after=k)
    t = make_scheduler(scheduler_config, rollout.steps).timesteps[k]
    return x.to(noise.dtype), t.to(noise.device).expand(len(x)).clone()


def kd_timestep_weights(scheduler: DDPMScheduler, t: torch.Tensor, cap: float) -> torch.Tensor:
    """min((1 − ᾱ_t)/ᾱ_t, cap) per row: an ε error e moves the sampler's estimate of x₀ by √((1 − ᾱ_t)/ᾱ_t)·e, so
    with these weights the output KD is the squared x₀ error (capped), not the ε error. Plain ε-MSE weighs the
    early, noisy steps — where a guided sampler settles which item it draws — as little as the last ones."""
    alpha_bar = scheduler.alphas_cumprod.to(t.device)[t].float()
    return ((1 - alpha_bar) / alpha_bar).clamp(max=cap)


class Fp32Ema:
    """Exponential moving average of a model's weights: e ← d·e + (1 − d)·θ after each optimizer step,
    starting from the model's initial weights; buffers are copied.

    Why fp32: with d = 0.9999 an update moves a weight by 1e-4 of its distance to the model's; in bf16
    (8 mantissa bits) that is far below half an ulp and rounds away, so a bf16 EMA never leaves its
    start. Why not a registered submodule of the LightningModule: precision plugins and DeepSpeed cast
    every registered submodule to the training dtype, and DDP would broadcast its buffers each step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).float().requires_grad_(False).eval()
        self.step = 0
        """The optimizer step of the last update (0: none yet)."""

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        for ema, current in zip(self.module.parameters(), model.parameters(), strict=True):
            ema.lerp_(current.detach().to(ema.device, torch.float32), 1.0 - self.decay)
        for ema, current in zip(self.module.buffers(), model.buffers(), strict=True):
            ema.copy_(current)
        self.step = step

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "decay": self.decay, "weights": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.decay = state["step"], state["decay"]
        self.module.load_state_dict(state["weights"])


class KoalaModule(L.LightningModule):
    """Trains the student against the frozen teacher U-Net."""

    def __init__(self, student: UNet2DConditionModel, teacher: KoalaTeacher, pairs: list[tuple[str, str]],
                 scheduler_config: dict, train: TrainSpec, *, weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
                 gradient_checkpointing: bool = False, ema_decay: float | None = None,
                 uncond: dict[str, torch.Tensor] | None = None, uncond_prob: float = 0.0,
                 kd_x0_cap: float | None = None, kd_guidance: float | None = None,
                 rollout: Rollout | None = None) -> None:
        super().__init__()
        self.kd_x0_cap, self.kd_guidance, self.rollout = kd_x0_cap, kd_guidance, rollout
        if (uncond_prob > 0 or kd_guidance is not None or rollout is not None) and uncond is None:
            raise ValueError("uncond_prob > 0, kd_guidance and rollout need the empty prompt's conditioning (uncond)")
        self.student = student.train()
        self.uncond, self.uncond_prob = uncond, uncond_prob
        # Not registered submodules: frozen, never optimised, never in checkpoints or DDP buckets.
        self.__dict__["bundle"] = teacher  # VAE + text encoders encode image-caption batches on the fly
        self.__dict__["teacher"] = teacher.unet.eval().requires_grad_(False)
        self.pairs, self.weights, self.train_spec = pairs, weights, train
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        if gradient_checkpointing:
            student.enable_gradient_checkpointing()
        # Before the taps: a deep copy would carry their hooks along.
        self.__dict__["ema"] = Fp32Ema(student, ema_decay) if ema_decay is not None else None
        self.student_taps = FeatureTaps(student, [s for s, _ in pairs])
        self.teacher_taps = FeatureTaps(self.teacher, [t for _, t in pairs])

    def on_fit_start(self) -> None:
        for model in [self.bundle.vae, *self.bundle.text_encoders]:
            if model is not None:
                model.to(self.device).requires_grad_(False)
        # The teacher follows the student's dtype: under 'bf16-true' Lightning casts the student only.
        self.teacher.to(self.device, next(self.student.parameters()).dtype)
        if self.ema is not None:
            self.ema.module.to(self.device)  # stays fp32

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        batch = encode_batch(self.bundle, batch)  # no-op for cached latents / data-free batches
        batch = self.drop_captions(batch)
        # Image latents are ground truth; data-free `teacher_latents` are the teacher's own samples, so
        # only the teacher's prediction supervises them (no task target).
        clean = batch["latents"] if "latents" in batch else batch["teacher_latents"]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(clean),), device=self.device)
        noise = torch.randn_like(clean)
        noisy = self.scheduler.add_noise(clean, noise, t)
        target = training_target(self.scheduler, clean, noise, t) if "latents" in batch else None
        dtype = next(self.student.parameters()).dtype
        noisy, kwargs = noisy.to(dtype), unet_kwargs(batch, self.device, dtype)
        k = self.rollout_steps()
        if k is not None:  # on-policy: the student's own sampler state; the teacher is the only supervisor
            noisy, t = rollout_state(self.student, dict(self.scheduler.config), batch, self.uncond,
                                     noise.to(dtype), self.rollout, k)
            target = None
            self.student_taps.pop()
        if self.kd_guidance is not None:
            noisy, t, kwargs = with_unconditional(noisy, t, kwargs, self.uncond)
        with torch.no_grad():
            teacher_pred = self.teacher(noisy, t, **kwargs).sample
        teacher_features = self.teacher_taps.pop()
        student_pred = self.student(noisy, t, **kwargs).sample
        student_features = self.student_taps.pop()
        task_pred = None
        if self.kd_guidance is not None:  # compare what the sampler uses; the task loss on the captioned rows
            task_pred, t = student_pred.chunk(2)[0], t.chunk(2)[0]
            teacher_pred, student_pred = guided(teacher_pred, self.kd_guidance), guided(student_pred, self.kd_guidance)
        out_weights = None if self.kd_x0_cap is None else kd_timestep_weights(self.scheduler, t, self.kd_x0_cap)
        terms = koala_losses(student_pred, teacher_pred, target, student_features, teacher_features,
                             self.pairs, self.weights, out_weights, task_pred)
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, on_step=True, prog_bar=False)
        return terms["loss"]

    def rollout_steps(self) -> int | None:
        """How many student sampler steps precede this batch's KD state, or None (a real-image batch). Drawn from
        the optimizer step, so every rank of a distributed job agrees (their U-Net calls must match)."""
        if self.rollout is None or self.rollout.prob <= 0:
            return None
        draw = torch.Generator().manual_seed(self.trainer.global_step if self._trainer is not None else 0)
        if torch.rand((), generator=draw).item() >= self.rollout.prob:
            return None
        return int(torch.randint(0, self.rollout.steps, (), generator=draw))

    def drop_captions(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each row's text conditioning becomes the empty prompt's with probability `uncond_prob`, for
        teacher and student alike. Classifier-free guidance samples with the unconditional prediction
        (weighted by 1 - guidance, e.g. -2 at guidance 3), on the same inputs as the conditional one;
        without these rows the student never learns it (in data-free mode no caption is ever empty)."""
        if self.uncond_prob <= 0:
            return batch
        keys = [k for k in ("prompt_embeds", "text_embeds") if k in batch]
        drop = torch.rand(len(batch[keys[0]]), device=batch[keys[0]].device) < self.uncond_prob
        out = dict(batch)
        for key in keys:
            empty = self.uncond[key].to(batch[key].device, batch[key].dtype).expand_as(batch[key])
            out[key] = torch.where(drop.view(-1, *[1] * (batch[key].dim() - 1)), empty, batch[key])
        return out

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # global_step counts optimizer steps (also under DeepSpeed, which accumulates itself): with
        # gradient accumulation most micro-batches end without one, and those must not move the EMA.
        step = self.trainer.global_step
        if self.ema is not None and step != self.ema.step:
            self.ema.update(self.student, step)
        # Gradient checkpointing re-runs forwards (and hooks) in backward; drop what they kept.
        self.student_taps.pop()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None:
            checkpoint["koala_ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None and "koala_ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["koala_ema"])

    def configure_optimizers(self) -> dict:
        return adamw_with_schedule(self.student.parameters(), self.train_spec)

    def trained(self) -> UNet2DConditionModel:
        """The student to evaluate and export: the (fp32) EMA copy when EMA is on."""
        return self.ema.module if self.ema is not None else self.student

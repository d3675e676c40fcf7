"""KOALA training: feature taps, the three-term loss and the LightningModule.

    loss = λ_task·MSE(ŷ_S, target) + λ_out·MSE(ŷ_S, ŷ_T) + λ_feat·Σ_sites MSE(f_S, f_T)

Feature sites are `self_attention` (the output of `attn1` in every student transformer layer,
paired with the teacher layer it was copied from — KOALA's finding) or `block` (every U-Net stage
output, as in BK-SDM). The feature term sums over sites, as the KOALA and BK-SDM losses do.

    .venv/bin/python -m pytest tests/distill/test_koala.py -q
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from convert.koala import BlockMap, layout
from distill.koala.data import KoalaTeacher, encode_batch, unet_kwargs
from distill.optim import adamw_with_schedule
from distill.spec import TrainSpec

SITES = ("self_attention", "block")


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DeepSpeed / Lightning wrappers (they all expose `.module`)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


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
) -> dict[str, torch.Tensor]:
    """The KOALA loss terms (all MSE, computed in fp32) and their weighted sum. `target` is None in
    data-free mode: there is no ground truth, only the teacher."""
    w_task, w_out, w_feat = weights
    out = F.mse_loss(student_pred.float(), teacher_pred.float())
    feat = sum(
        (F.mse_loss(student_features[s].float(), teacher_features[t].float()) for s, t in pairs),
        start=torch.zeros((), device=out.device),
    )
    terms = {"loss_out": out, "loss_feat": feat}
    total = w_out * out + w_feat * feat
    if target is not None:
        terms["loss_task"] = F.mse_loss(student_pred.float(), target.float())
        total = total + w_task * terms["loss_task"]
    terms["loss"] = total
    return terms


def training_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the U-Net is trained to predict: ε, v = α_t·ε − σ_t·x₀, or x₀."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r}")


class KoalaModule(L.LightningModule):
    """Trains the student against the frozen teacher U-Net."""

    def __init__(self, student: UNet2DConditionModel, teacher: KoalaTeacher, pairs: list[tuple[str, str]],
                 scheduler_config: dict, train: TrainSpec, *, weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
                 latent_size: int | None = None, gradient_checkpointing: bool = False,
                 ema_decay: float | None = None) -> None:
        super().__init__()
        self.latent_size = latent_size or student.config.sample_size
        self.student = student.train()
        # Not registered submodules: frozen, never optimised, never in checkpoints or DDP buckets.
        self.__dict__["bundle"] = teacher  # VAE + text encoders encode image-caption batches on the fly
        self.__dict__["teacher"] = teacher.unet.eval().requires_grad_(False)
        self.pairs, self.weights, self.train_spec = pairs, weights, train
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        if gradient_checkpointing:
            student.enable_gradient_checkpointing()
        self.ema = None
        if ema_decay is not None:
            self.ema = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
            self.ema.requires_grad_(False)
        self.student_taps = FeatureTaps(student, [s for s, _ in pairs])
        self.teacher_taps = FeatureTaps(self.teacher, [t for _, t in pairs])

    def on_fit_start(self) -> None:
        for model in [self.bundle.vae, *self.bundle.text_encoders]:
            if model is not None:
                model.to(self.device).requires_grad_(False)
        # The teacher follows the student's dtype: under 'bf16-true' Lightning casts the student only.
        self.teacher.to(self.device, next(self.student.parameters()).dtype)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        batch = encode_batch(self.bundle, batch)  # no-op for cached latents / data-free batches
        embeds = batch["prompt_embeds"]
        n, channels, size = embeds.shape[0], self.student.config.in_channels, self.latent_size
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), device=self.device)
        if "latents" in batch:
            latents = batch["latents"]
            noise = torch.randn_like(latents)
            noisy = self.scheduler.add_noise(latents, noise, t)
            target = training_target(self.scheduler, latents, noise, t)
        else:
            # Data-free: noised unit-variance latents are N(0, I) at every timestep; only the
            # teacher's prediction supervises them.
            noisy = torch.randn(n, channels, size, size, device=self.device)
            target = None
        dtype = next(self.student.parameters()).dtype
        noisy, kwargs = noisy.to(dtype), unet_kwargs(batch, self.device, dtype)
        with torch.no_grad():
            teacher_pred = self.teacher(noisy, t, **kwargs).sample
        teacher_features = self.teacher_taps.pop()
        student_pred = self.student(noisy, t, **kwargs).sample
        student_features = self.student_taps.pop()
        terms = koala_losses(student_pred, teacher_pred, target, student_features, teacher_features,
                             self.pairs, self.weights)
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, on_step=True, prog_bar=False)
        return terms["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.student)
        # Gradient checkpointing re-runs forwards (and hooks) in backward; drop what they kept.
        self.student_taps.pop()

    def configure_optimizers(self) -> dict:
        return adamw_with_schedule(self.student.parameters(), self.train_spec)

    def trained(self) -> UNet2DConditionModel:
        """The student to evaluate and export: the EMA copy when EMA is on."""
        return self.ema.module if self.ema is not None else self.student

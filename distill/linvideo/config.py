"""LinVideo's recipe sections: `student:` and `linvideo:` (pydantic, validated by `athanor validate`).

Kept apart from `method.py` so that the rest of the package (training, evaluation) can import the
settings without importing the method, and a reader finds every recipe key of the method in one file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from athanor.convert.recipe_types import RecipeCacheDir, Text
from athanor.distill.spec import Section

__all__ = ["LinVideoStudent", "LinVideoArgs"]


class LinVideoStudent(Section):
    """The student keeps the teacher's architecture; what changes is set in the `linvideo:` section."""


class LinVideoArgs(Section):
    """LinVideo settings (the recipe's `linvideo:` section)."""

    target: int | None = Field(None, ge=0)
    """How many candidate layers become linear attention (give this or `target_fraction`)."""
    target_fraction: float | None = Field(None, ge=0, le=1)
    """The target as a fraction of the candidates (rounded); default 0.5 when neither is given."""
    candidate_layers: list[Text] | None = None
    """Self-attention module names that may become linear (default: every `attn1` of Wan/CogVideoX)."""
    feature_map: Literal["hedgehog", "elu+1", "relu"] = "hedgehog"
    """Linear-attention feature map; Hedgehog learns separate query and key maps."""
    feature_dim: int | None = Field(None, ge=1, le=4096)
    """Hedgehog features per map (2× this after the ± softmax); default the head dim."""
    objective: Literal["adm", "velocity"] = "adm"
    """'adm': anytime distribution matching (the student is its own fake score); 'velocity': MSE to the
    teacher's velocity on trajectory points (for comparison)."""
    adm_source: Literal["rollout", "cached"] = "rollout"
    """Where ADM's x̂_t comes from. 'rollout' (the paper's "anytime"): the student's own guided sampler runs from
    fresh noise to each training point's time t, then one Euler step with gradient to t'. 'cached': that one step
    starts from the teacher's cached trajectory point instead (cheaper; the student never sees its own drift)."""
    selection: Literal["learned", "even_spread"] = "learned"
    """'learned': the gates choose the linear layers (L_con + L_reg); 'even_spread': the `target` layers spread
    evenly over the candidates are fixed from the first step (no selection), the rest trains the same."""
    compare: list[Literal["even_spread", "velocity_mse", "adm_cached", "adm_rollout"]] = Field(default_factory=list)
    """Comparison arms, each a fresh student trained on the same budget, data and initialisation with one change:
    'even_spread' (selection: even_spread: is selection worth it?), 'velocity_mse' (objective: velocity: is ADM
    worth it?), 'adm_cached' / 'adm_rollout' (adm_source: cached / rollout: does the student's own rollout help?)."""
    log_both: bool = False
    """Also log the objective not trained on (no gradient)."""
    lambda_select: float = Field(0.01, ge=0)
    """λ of λ(L_con + L_reg), the paper's 0.01."""
    alpha_start: float = Field(20.0, gt=0)
    alpha_end: float = Field(2.0, gt=0)
    """L_reg's exponent α, annealed linearly from alpha_start to alpha_end over train.max_steps."""
    reg_warmup: float = Field(0.2, ge=0, le=1)
    """Fraction of train.max_steps before L_reg applies (AdaRound's warm-up: the gates move freely first)."""
    commit_at: float = Field(0.8, gt=0, le=1)
    """Fraction of train.max_steps at which the selection is committed: the `target` lowest gates go to 0,
    the rest to 1, and stay; the remaining steps train the feature maps (and weights) of that choice."""
    lambda_transfer: float = Field(1.0, ge=0)
    """Weight of attention transfer (linear branch toward the softmax branch it replaces)."""
    adm_eta: float = Field(1.0, gt=0)
    """η of the ADM surrogate (step size along the score gap)."""
    t_min: float = Field(0.05, gt=0, lt=1)
    """Trajectory points whose next time is below this are not trained on ((1 − t)/t explodes)."""
    lr_gate: float = Field(0.02, gt=0, le=1)
    """Step of the fastest-moving gate per optimizer step (gate steps are normalised by the largest
    gate gradient, so the gates keep their relative speeds; see train.AdamWWithSGDGroups)."""
    lr_feature_maps: float = Field(1e-3, gt=0, le=10)
    """Learning rate of the feature maps (Hedgehog weights)."""
    train_weights: bool = False
    """Also fine-tune every other student weight (at train.lr); off: only gates and feature maps."""
    uncond_fraction: float = Field(0.1, ge=0, le=1)
    """Share of training conditions replaced by the unconditional (zero) embedding."""
    prompts: list[Text] | None = None
    """Training prompts (default: every caption the teacher ships)."""
    samples_per_prompt: int = Field(2, ge=1, le=10_000)
    """Teacher trajectories per prompt in the data-free cache."""
    trajectory_steps: int = Field(16, ge=2, le=1000)
    """Euler steps per teacher trajectory (each visited point is a training example)."""
    guidance_scale: float = Field(3.0, ge=1)
    """Classifier-free guidance for trajectories and evaluation sampling."""
    shift: float = Field(1.0, gt=0, le=100)
    """Flow shift of the sampling time grid (Wan uses 3–5 at 480p+; 1 is uniform)."""
    cache_dir: RecipeCacheDir | None = None
    """Where trajectory caches are kept between runs (default: not kept)."""
    frames: int | None = Field(None, ge=1, le=1024)
    height: int | None = Field(None, ge=1, le=4096)
    width: int | None = Field(None, ge=1, le=4096)
    """Latent clip size (default: the teacher's training clips from captions.json)."""
    eval_prompts: list[Text] | None = None
    """Prompts for the before/after clips (default: every training prompt, so class_accuracy covers every caption)."""
    eval_seeds: list[int] = Field(default_factory=lambda: [0, 1])
    """One clip per (seed, prompt); the same noises for the teacher and every student."""
    eval_steps: int = Field(20, ge=1, le=1000)
    heldout_points: int = Field(64, ge=1, le=100_000)
    """Held-out trajectory points (fresh seeds) for velocity_mse."""
    latency_batch: int = Field(1, ge=1, le=1024)
    """Clips per timed denoising step."""
    latency_frames: int | None = Field(None, ge=1, le=1024)
    latency_height: int | None = Field(None, ge=1, le=4096)
    latency_width: int | None = Field(None, ge=1, le=4096)
    """Latent size of the step the spine times (`latency_ms`, the gate's speed-up; default the evaluated clip
    size). Linear attention pays off with tokens: a testbed trained on short clips is timed at the longer clips
    it would be deployed on (RoPE positions, so the same weights run at any size). `evaluate` also times the
    step at the evaluated clip size (`eval_clip_latency_ms`, `eval_clip_speedup`), where quality is measured."""

"""KOALA's recipe sections: `student:` and `koala:` (pydantic, validated by `athanor validate`).

Kept apart from `method.py` so that the rest of the package (training, evaluation) can import the
settings without importing the method, and a reader finds every recipe key of the method in one file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from athanor.convert.recipe_types import RecipeCacheDir, Text
from athanor.distill.spec import Section

__all__ = ["DEFAULT_PROMPTS", "KoalaStudent", "KoalaArgs"]


DEFAULT_PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "a watercolor painting of a lighthouse at dawn",
    "a close-up photo of a red fox in the snow",
    "an isometric illustration of a tiny cozy cabin",
]


class KoalaStudent(Section):
    """The student U-Net: a KOALA preset, or per-stage counts with preset 'custom'."""

    preset: Literal["koala-1b", "koala-700m", "custom"] = "koala-1b"
    """koala-1b (SDXL: 1,161M parameters), koala-700m (782M, no mid block), or custom."""
    layers_per_block: int | list[int] | None = None
    """custom: ResBlocks per encoder stage (decoder stages get one more), ≤ the teacher's."""
    transformer_depth: list[int] | None = None
    """custom: transformer layers per encoder stage (≤ the teacher's; the last also sets the mid
    block's depth; ignored for stages without attention)."""
    decoder_transformer_depth: list[int] | None = None
    """custom: transformer layers per decoder stage, decoder order (default: encoder's reversed). 0 where the teacher
    has attention drops that decoder stage's transformer stacks (its ResBlocks stay)."""
    mid_block: bool | None = None
    """custom: keep the mid block (default: as the teacher)."""


class KoalaArgs(Section):
    """KOALA distillation settings (the recipe's `koala:` section)."""

    train_data: Literal["images", "canvases", "data_free"] | None = None
    """What the student trains on. 'images': the `data:` image-caption dataset, encoded by the teacher's VAE
    and text encoders. 'canvases': real Fashion-MNIST canvases with their captions, drawn (seeded by
    `data.seed`) by the testbed's canvas builder (distill/lora_composer/canvas.py) — the data the
    Fashion-canvas testbed teacher was trained on; it needs that pixel-space 1×32×64 teacher. Both are the
    paper's training: task loss on real data + output KD + feature KD. 'data_free': the teacher samples
    `prompts` and only its predictions supervise (no task loss). Default: 'data_free' with the older spelling
    `data_free: true`, else 'images'."""
    data_free: bool = False
    """Older spelling of `train_data: data_free`: train on `prompts` instead of real data: the teacher
    samples latents for them (once per job, `data_free_steps` sampler steps), the training step noises
    those at a random t, and only the teacher's predictions supervise (no task loss). After validation it
    is true exactly when `train_data` is 'data_free'."""
    canvas_examples: int = Field(4096, ge=1)
    """Canvases per epoch in 'canvases' mode; canvas i is drawn from its own seed (`data.seed`, i), so an
    epoch is the same set whatever the loader's order or workers, and a longer run revisits them."""
    canvas_split: Literal["train", "test"] = "train"
    """Fashion-MNIST split the canvases' items come from: 'train' is what the testbed teacher saw."""
    lambda_task: float = Field(1.0, ge=0)
    """Weight of MSE(student prediction, ground-truth ε / v) on real data (the paper's task loss); unused
    in data-free mode, where there is no ground truth."""
    lambda_out: float = Field(1.0, ge=0)
    """Weight of MSE(student prediction, teacher prediction)."""
    lambda_feat: float = Field(1.0, ge=0)
    """Weight of the feature KD term (sum of MSEs over feature sites)."""
    kd_weighting: Literal["uniform", "x0"] = "uniform"
    """Output KD per training row: 'uniform' (the paper's plain MSE of the predictions) or 'x0': weighted by
    min((1 − ᾱ_t)/ᾱ_t, `kd_x0_cap`), the squared error of the x₀ estimates two ε predictions imply, which puts
    the weight on the noisy early sampling steps. ε-prediction teachers only."""
    kd_x0_cap: float = Field(5.0, gt=0)
    """Largest per-row weight of 'x0' KD weighting (at t near T, (1 − ᾱ_t)/ᾱ_t grows without bound)."""
    kd_guidance: float | None = Field(None, ge=1.0)
    """Output KD on the guided prediction the sampler uses: every row runs with its caption and with the empty
    prompt (teacher and student), and the output KD compares ε_u + w·(ε_c − ε_u) at this w (set it to
    `guidance_scale`); the task loss stays on the captioned branch. Why: guided sampling multiplies the student's
    error in ε_c − ε_u by w (5 here), which plain KD of each branch weighs like any other error. Twice the U-Net
    work per step; caption dropout (`uncond_prob`) is then unneeded. None: plain output KD."""
    rollout_prob: float = Field(0.0, ge=0, le=1)
    """Share of training batches distilled on-policy: at the state the student's own sampler (`eval_steps` DDIM
    steps at `guidance_scale`) reaches from fresh noise after k steps (k uniform), where only the teacher
    supervises (no task target). Real-image batches teach the student where the teacher's trajectories pass;
    these teach it where its own drift leads, which is where guided sampling goes wrong. Each such batch costs
    up to `eval_steps` extra guided student passes (no gradient). 0: none."""
    feature_sites: Literal["self_attention", "block"] = "self_attention"
    """'self_attention': attn1 outputs of the kept transformer layers (KOALA); 'block': U-Net
    stage outputs (BK-SDM)."""
    layer_selection: Literal["even", "first", "last"] = "even"
    """Which teacher transformer layers a reduced stack keeps: evenly spaced (first and last
    kept), the first ones, or the last ones."""
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = "auto"
    """What the U-Net predicts; 'auto' takes the teacher scheduler's prediction_type."""
    prompts: list[Text] = Field(default_factory=lambda: list(DEFAULT_PROMPTS))
    """Training prompts for data-free mode."""
    data_free_examples: int = Field(256, ge=1)
    """Examples per data-free epoch (teacher samples repeat; noise and t are fresh every step)."""
    data_free_samples: int = Field(4, ge=1)
    """Teacher samples (latents x₀) per prompt in data-free mode."""
    data_free_steps: int = Field(10, ge=1)
    """Teacher sampler steps per data-free sample (`guidance_scale` applies). Few steps give an
    approximation of the teacher's images, which is enough: the inputs lie near its own x₀."""
    uncond_prob: float = Field(0.0, ge=0, le=1)
    """Share of training rows conditioned on the empty prompt instead of their caption (teacher and
    student alike). Guided sampling (`guidance_scale` > 1) also runs the unconditional prediction, which
    data-free prompts alone never train; 0.1-0.2 teaches it."""
    image_column: Text = "image"
    """Image column of the image-caption dataset (captions: `data.text_column`)."""
    resolution: int | None = Field(None, ge=8)
    """Training/eval resolution in pixels, square (default: the U-Net's sample_size × the VAE factor,
    which may be non-square: sample_size [32, 64] of a pixel-space U-Net gives 32×64 images)."""
    cache_dir: RecipeCacheDir | None = None
    """Directory caching encoded latents and text embeddings of the image-caption dataset."""
    gradient_checkpointing: bool = False
    """Recompute student activations in backward (less memory, ~30% slower)."""
    ema: bool = False
    """Keep an exponential moving average of the student; evaluate and export the EMA weights."""
    ema_decay: float = Field(0.999, gt=0, lt=1)
    """EMA decay per optimizer step (not per micro-batch); the EMA is kept in fp32 whatever the
    training precision."""
    eval_prompts: list[Text] = Field(default_factory=lambda: list(DEFAULT_PROMPTS))
    """Fixed prompts for fidelity metrics and sample grids."""
    eval_seeds: list[int] = Field(default_factory=lambda: [0, 1])
    """Fixed seeds (one initial noise each, shared by teacher and student)."""
    eval_steps: int = Field(20, ge=1)
    """Denoising steps for evaluation sampling (the teacher's scheduler class)."""
    guidance_scale: float = Field(5.0, ge=1.0)
    """Classifier-free guidance for evaluation sampling (1 disables it)."""
    latency_device: Literal["cpu", "model"] = "cpu"
    """Where the speed probe runs and peak memory is measured: 'cpu', or the model's own device."""
    latency_batch: int = Field(1, ge=1)
    """Latents per timed (and memory-measured) U-Net step."""
    cpu_threads: int | None = Field(None, ge=1)
    """Torch intra-op CPU threads for the whole job (None: torch's default). 1 avoids OpenMP
    oversubscription on a CPU shared with other processes, which can slow CPU runs tenfold."""

    @field_validator("data_free")
    @classmethod
    def _one_spelling(cls, value: bool, info: ValidationInfo) -> bool:
        train_data = info.data.get("train_data")
        if value and train_data not in (None, "data_free"):
            raise ValueError(f"contradicts koala.train_data: {train_data!r}; drop data_free (the older spelling "
                             "of train_data: data_free)")
        return value

    @field_validator("lambda_feat")
    @classmethod
    def _something_supervises(cls, value: float, info: ValidationInfo) -> float:
        """Refuse loss weights that leave the chosen mode nothing to learn from (the task loss does not exist
        in data-free mode). Checked on the last weight, when the mode and the other weights are known."""
        mode = _mode(info.data.get("train_data"), bool(info.data.get("data_free")))
        used = {"lambda_out": info.data.get("lambda_out"), "lambda_feat": value}
        if mode != "data_free":
            used = {"lambda_task": info.data.get("lambda_task"), **used}
        if not any(used.values()):
            raise ValueError(f"with train_data {mode!r} every loss weight ({', '.join(used)}) is 0 and nothing trains "
                             "the student; give one a positive weight, e.g. lambda_out: 1")
        return value

    @model_validator(mode="after")
    def _resolve_mode(self) -> KoalaArgs:
        # After validation the two spellings agree, so code may read either.
        self.train_data = _mode(self.train_data, self.data_free)
        self.data_free = self.train_data == "data_free"
        return self


def _mode(train_data: str | None, data_free: bool) -> str:
    return train_data or ("data_free" if data_free else "images")

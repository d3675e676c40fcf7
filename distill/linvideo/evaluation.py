"""LinVideo evaluation: the same prompts and seeds through teacher and model, compared as clips.

    .venv/bin/python -m pytest tests/distill/linvideo/test_evaluation.py -q

Keys (identical for the teacher, the untrained and the trained student); (S) marks a `PerSample` metric,
its rows in the same order for every model:
- `velocity_mse` (S): ‖u_model − u_teacher‖² on held-out trajectory points (other seeds than training);
  rows are held-out trajectories, (summed point errors, points), as points of one trajectory are related.
- `psnr_db` (S): per-frame PSNR of the model's clips against the teacher's (same noise; range [-1, 1]),
  a row per clip; NaN for the teacher itself (identical clips have no finite PSNR).
- `frame_mmd`: kernel MMD² (RBF, median bandwidth) between frame features of the model's and the
  teacher's clips: the classifier's pooled features when the teacher ships one, else 8×8 pixels. One
  statistic of the two sets of frames, not a mean over samples: a float.
- `temporal_jitter` (S): mean absolute frame-to-frame difference of the model's clips, a row per clip;
  `jitter_ratio` (S): that over the teacher's (1 for the teacher), rows (model's, teacher's) per clip.
- `class_accuracy` (S): the frame classifier's accuracy on the model's frames against the prompted class
  (prompts naming a Fashion-MNIST class; NaN without a classifier); a row per clip, the share of its frames
  read as the prompted class (a clip's frames are one sample: they show one item).
- `linear_layers`, `attention_gmacs`: linear-attention layer count and self-attention cost per step.
Clips are seed-major (`generate`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from athanor.distill.intervals import PerSample
from athanor.distill.linvideo.sampling import sample, velocity


def mmd_rbf(a: torch.Tensor, b: torch.Tensor) -> float:
    """Biased MMD² with an RBF kernel, bandwidth the median pairwise distance of the pooled set."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    both = torch.cat([a, b])
    d2 = torch.cdist(both, both).pow(2)
    sigma2 = d2[d2 > 0].median() if (d2 > 0).any() else torch.tensor(1.0, dtype=torch.float64)
    k = torch.exp(-d2 / sigma2)
    n = len(a)
    return float(k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean())


def clip_psnr_db(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Each clip's mean per-frame PSNR [B] for clips [B, C, F, H, W] in [-1, 1] (peak-to-peak 2)."""
    mse = (x.clamp(-1, 1) - ref.clamp(-1, 1)).pow(2).mean(dim=(1, 3, 4))  # [B, F]
    return (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean(dim=1).double()


def psnr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean per-frame PSNR for clips [B, C, F, H, W] in [-1, 1] (peak-to-peak 2)."""
    return float(clip_psnr_db(x, ref).mean())


def frames_of(clips: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [B·F, C, H, W] in [-1, 1]."""
    return clips.clamp(-1, 1).transpose(1, 2).reshape(-1, clips.shape[1], *clips.shape[-2:])


def frame_features(frames: torch.Tensor, classifier: torch.nn.Module | None) -> torch.Tensor:
    if classifier is not None and frames.shape[1] == 1:
        with torch.no_grad():
            return classifier.features(frames)
    return F.adaptive_avg_pool2d(frames.float(), 8).flatten(1)


def clip_jitter(clips: torch.Tensor) -> torch.Tensor:
    """Each clip's mean absolute frame-to-frame difference [B]."""
    return (clips[:, :, 1:] - clips[:, :, :-1]).abs().flatten(1).mean(1).double()


def jitter(clips: torch.Tensor) -> float:
    return float((clips[:, :, 1:] - clips[:, :, :-1]).abs().mean())


def _jitter_ratio(rows: np.ndarray) -> float:
    """Rows (model's, teacher's) jitter per clip -> the model's mean jitter over the teacher's."""
    return float(rows[:, 0].mean() / max(rows[:, 1].mean(), 1e-12))


@torch.no_grad()
def generate(model: torch.nn.Module, payload: dict, steps: int, guidance: float, shift: float) -> torch.Tensor:
    """One clip per (seed, prompt), seed-major: [seeds·prompts, C, F, H, W]."""
    cond, uncond = payload["cond"], payload["uncond"]
    return torch.cat([sample(model, noise, cond, uncond, steps=steps, guidance=guidance, shift=shift)[0]
                      for noise in payload["noises"]])


@torch.no_grad()
def heldout_velocity_errors(model: torch.nn.Module, teacher: torch.nn.Module, points: dict,
                            batch: int = 8) -> torch.Tensor:
    """‖u_model − u_teacher‖² averaged over each held-out point's values: [points], float64."""
    if model is teacher:
        return torch.zeros(len(points["t"]), dtype=torch.float64)
    errors = []
    for i in range(0, len(points["t"]), batch):
        x, t, c = (points[k][i:i + batch] for k in ("x", "t", "cond"))
        diff = velocity(model, x, t, c) - velocity(teacher, x, t, c)
        errors.append(diff.pow(2).flatten(1).mean(1).double().cpu())
    return torch.cat(errors) if errors else torch.zeros(0, dtype=torch.float64)


def heldout_velocity_mse(model: torch.nn.Module, teacher: torch.nn.Module, points: dict,
                         batch: int = 8) -> PerSample:
    """The mean over held-out points of their velocity error; rows are the points' trajectories
    (`points["trajectory"]`, each point its own without it), (Σ errors, points): the ratio of sums is the
    mean over points, and a bootstrap draws whole trajectories, whose points are not independent."""
    errors = heldout_velocity_errors(model, teacher, points, batch)
    groups = torch.as_tensor(points.get("trajectory", torch.arange(len(errors))))
    _, inverse = torch.unique(groups, return_inverse=True)  # sorted: the same rows for every model
    counts = torch.bincount(inverse).double()
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, errors)
    return PerSample.ratio(sums.numpy(), counts.numpy())


def clip_metrics(clips: torch.Tensor, teacher_clips: torch.Tensor, labels: torch.Tensor | None,
                 classifier: torch.nn.Module | None, is_teacher: bool) -> dict[str, float | PerSample]:
    frames, teacher_frames = frames_of(clips), frames_of(teacher_clips)
    model_jitter, teacher_jitter = clip_jitter(clips), clip_jitter(teacher_clips)
    metrics: dict[str, float | PerSample] = {
        "psnr_db": math.nan if is_teacher else PerSample.mean(clip_psnr_db(clips, teacher_clips).numpy()),
        "frame_mmd": 0.0 if is_teacher else mmd_rbf(frame_features(frames, classifier),
                                                    frame_features(teacher_frames, classifier)),
        "temporal_jitter": PerSample.mean(model_jitter.numpy()),
        "jitter_ratio": PerSample(torch.stack([model_jitter, teacher_jitter], dim=1).numpy(), _jitter_ratio),
        "class_accuracy": math.nan,
    }
    if classifier is not None and labels is not None and frames.shape[1] == 1:
        per_frame = labels.repeat_interleave(clips.shape[2])
        with torch.no_grad():
            hits = (classifier(frames).argmax(-1) == per_frame).double().view(len(clips), clips.shape[2])
        metrics["class_accuracy"] = PerSample.mean(hits.mean(1).numpy())  # equal frames per clip: the frame mean
    return metrics


def save_gif(rows: list[torch.Tensor], path: Path, scale: int = 3) -> Path:
    """rows: clips [N, 1|3, F, H, W] per row (teacher first); one animated GIF, clips side by side."""
    from PIL import Image

    grid = torch.cat([torch.cat(list(clips.clamp(-1, 1)), dim=-1) for clips in rows], dim=-2)  # [C, F, H·rows, W·N]
    frames = ((grid + 1) * 127.5).round().to(torch.uint8)
    images = []
    for f in range(frames.shape[1]):
        array = frames[:, f].permute(1, 2, 0).squeeze(-1).numpy()
        image = Image.fromarray(array)
        images.append(image.resize((image.width * scale, image.height * scale), Image.NEAREST))
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=150, loop=0)
    return path


def plot_gates(history: list[tuple[int, dict[str, float]]], chosen: list[str], path: Path) -> Path:
    """Every gate's r over training; chosen (linear) layers solid, the rest dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [s for s, _ in history]
    for name in history[0][1]:
        ax.plot(steps, [v[name] for _, v in history], "-" if name in chosen else "--",
                label=f"{name}{' (linear)' if name in chosen else ''}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("r (1 = softmax, 0 = linear)")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("LinVideo gates")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    (path.parent / "chosen_layers.json").write_text(json.dumps({"linear": chosen, "history": history}, indent=1))
    return path

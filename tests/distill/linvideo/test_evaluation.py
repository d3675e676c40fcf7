"""LinVideo evaluation metrics and artifacts: MMD, PSNR, jitter and clip_metrics against numpy written
out here, class accuracy of a hand-set classifier, the comparison GIF and the gate plot.

    .venv/bin/python -m pytest tests/distill/linvideo/test_evaluation.py -q
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from athanor.distill.fashion_mnist import FashionClassifier
from athanor.distill.intervals import PerSample
from athanor.distill.linvideo.evaluation import (
    clip_metrics,
    heldout_velocity_mse,
    jitter,
    mmd_rbf,
    plot_gates,
    psnr_db,
    save_gif,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def clips(seed: int, shape=(2, 1, 4, 6, 5), scale: float = 1.2) -> torch.Tensor:
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * scale


def mmd_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """Biased MMD² with k = exp(−d² / σ²), σ² the (lower) median of the pooled nonzero squared distances."""
    both = np.concatenate([a, b]).reshape(len(a) + len(b), -1).astype(np.float64)
    d2 = ((both[:, None, :] - both[None, :, :]) ** 2).sum(-1)
    positive = np.sort(d2[d2 > 1e-12])
    k = np.exp(-d2 / positive[(len(positive) - 1) // 2])
    n = len(a)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def test_mmd_is_zero_for_identical_sets_and_grows_with_a_shift():
    a = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    b = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    assert mmd_rbf(a, a) == pytest.approx(0.0, abs=1e-12)
    values = [mmd_rbf(a, b + shift) for shift in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert values[1] > 0
    assert all(lo < hi for lo, hi in zip(values, values[1:])), values
    for shift in (0.0, 1.0):
        assert mmd_rbf(a, b + shift) == pytest.approx(mmd_numpy(a.numpy(), (b + shift).numpy()), rel=1e-6)


def test_mmd_of_multi_dimensional_features_flattens_them():
    a = torch.randn(8, 2, 3, generator=torch.Generator().manual_seed(2))
    b = torch.randn(8, 2, 3, generator=torch.Generator().manual_seed(3)) + 1.0
    assert mmd_rbf(a, b) == pytest.approx(mmd_numpy(a.numpy(), b.numpy()), rel=1e-6)
    assert mmd_rbf(torch.zeros(4, 3), torch.zeros(4, 3)) == pytest.approx(0.0)  # no positive distance: σ² = 1


def psnr_numpy(x: np.ndarray, ref: np.ndarray) -> float:
    x, ref = np.clip(x, -1, 1).astype(np.float64), np.clip(ref, -1, 1).astype(np.float64)
    values = []
    for b in range(x.shape[0]):
        for f in range(x.shape[2]):
            mse = ((x[b, :, f] - ref[b, :, f]) ** 2).mean()
            values.append(10 * math.log10(4.0 / mse))
    return float(np.mean(values))


def test_psnr_is_per_frame_then_averaged():
    x, ref = clips(0), clips(1)
    assert psnr_db(x, ref) == pytest.approx(psnr_numpy(x.numpy(), ref.numpy()), rel=1e-5)
    # one frame off by 0.1 everywhere, the others by 0.2: mean of 10·log10(4/0.01) and 10·log10(4/0.04)
    ref = torch.zeros(1, 1, 2, 3, 3)
    x = ref.clone()
    x[:, :, 0] += 0.1
    x[:, :, 1] -= 0.2
    assert psnr_db(x, ref) == pytest.approx((10 * math.log10(400) + 10 * math.log10(100)) / 2, rel=1e-5)
    assert psnr_db(torch.full((1, 1, 1, 2, 2), 3.0), torch.full((1, 1, 1, 2, 2), -1.0)) == pytest.approx(0.0)


def test_jitter_is_the_mean_absolute_frame_difference():
    x = clips(2)
    arr = x.numpy().astype(np.float64)
    assert jitter(x) == pytest.approx(float(np.abs(np.diff(arr, axis=2)).mean()), rel=1e-6)
    still = torch.ones(2, 1, 3, 4, 4)
    assert jitter(still) == 0.0
    ramp = torch.arange(3.0).view(1, 1, 3, 1, 1).expand(1, 1, 3, 4, 4)
    assert jitter(ramp) == pytest.approx(1.0)


def test_clip_metrics_of_the_teacher_itself():
    teacher = clips(3)
    metrics = clip_metrics(teacher, teacher, labels=None, classifier=None, is_teacher=True)
    assert set(metrics) == {"psnr_db", "frame_mmd", "temporal_jitter", "jitter_ratio", "class_accuracy"}
    assert math.isnan(metrics["psnr_db"]) and metrics["frame_mmd"] == 0.0
    assert metrics["jitter_ratio"].value == pytest.approx(1.0) and math.isnan(metrics["class_accuracy"])
    assert metrics["temporal_jitter"].value == pytest.approx(float(np.abs(np.diff(teacher.numpy(), axis=2)).mean()))


def test_clip_metrics_of_a_student_against_hand_values():
    teacher, student = clips(4, scale=1.0), clips(5, scale=1.0)
    metrics = clip_metrics(student, teacher, labels=None, classifier=None, is_teacher=False)
    assert metrics["psnr_db"].value == pytest.approx(psnr_numpy(student.numpy(), teacher.numpy()), rel=1e-5)
    ratio = np.abs(np.diff(student.numpy(), axis=2)).mean() / np.abs(np.diff(teacher.numpy(), axis=2)).mean()
    assert metrics["jitter_ratio"].value == pytest.approx(float(ratio), rel=1e-5)
    assert {k for k, v in metrics.items() if isinstance(v, PerSample)} == {"psnr_db", "temporal_jitter",
                                                                         "jitter_ratio"}
    assert metrics["psnr_db"].n == metrics["jitter_ratio"].n == 2  # a row per clip
    assert metrics["frame_mmd"] > 0 and math.isnan(metrics["class_accuracy"])


def test_class_accuracy_counts_every_frame_against_its_prompts_class(constant_classifier):
    always = constant_classifier
    teacher, student = clips(6, shape=(4, 1, 3, 8, 8)), clips(7, shape=(4, 1, 3, 8, 8))
    labels = torch.tensor([3, 5, 3, 1])
    metrics = clip_metrics(student, teacher, labels, always(3), is_teacher=False)
    assert metrics["class_accuracy"].value == pytest.approx(0.5)
    assert metrics["class_accuracy"].rows.tolist() == [1.0, 0.0, 1.0, 0.0]  # a row per clip
    assert clip_metrics(student, teacher, labels, always(2), is_teacher=False)["class_accuracy"].value == 0.0
    # a head that reads the pooled features: class 1 when feature 0 is above its threshold, else class 0
    model = FashionClassifier(width=4).eval()
    feats = model.features(student.clamp(-1, 1).transpose(1, 2).reshape(-1, 1, 8, 8)).detach()  # [B·F] b-major
    threshold = float(feats[:, 0].median())
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(-100.0)
        model.head.weight[1, 0], model.head.bias[1], model.head.bias[0] = 1.0, -threshold, 0.0
    predicted = (feats[:, 0] > threshold).long()
    per_frame = labels.remainder(2).repeat_interleave(3)
    expected = float((predicted == per_frame).float().mean())
    metrics = clip_metrics(student, teacher, labels.remainder(2), model, is_teacher=False)
    assert metrics["class_accuracy"].value == pytest.approx(expected)
    # per clip: the share of its 3 frames read as its class; their mean is the frame accuracy
    per_clip = (predicted == per_frame).float().view(4, 3).mean(1).double().numpy()
    np.testing.assert_allclose(metrics["class_accuracy"].rows, per_clip)


class Affine(torch.nn.Module):
    """A stand-in transformer: sample = scale·x + t/1000 (its velocity is known in closed form)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))

    def forward(self, x, t, cond):
        from types import SimpleNamespace

        return SimpleNamespace(sample=self.scale * x + (t / 1000).view(-1, *[1] * (x.dim() - 1)))


def test_heldout_velocity_mse_is_the_mean_over_points_with_trajectories_as_rows():
    x = torch.randn(5, 1, 2, 3, 3, generator=torch.Generator().manual_seed(10))
    points = {"x": x, "t": torch.tensor([0.9, 0.5, 0.8, 0.3, 0.1]), "cond": torch.zeros(5, 2, 4),
              "trajectory": torch.tensor([2, 0, 2, 0, 1])}
    teacher, student = Affine(1.0), Affine(0.5)
    # the velocity gap is (0.5 − 1)·x everywhere: each point's squared error is 0.25·mean(x²)
    per_point = 0.25 * (x.double() ** 2).flatten(1).mean(1).numpy()
    metric = heldout_velocity_mse(student, teacher, points, batch=2)
    assert metric.value == pytest.approx(float(per_point.mean()), rel=1e-6)
    # rows: trajectories 0, 1, 2 with (Σ errors, points)
    expected = [[per_point[1] + per_point[3], 2], [per_point[4], 1], [per_point[0] + per_point[2], 2]]
    np.testing.assert_allclose(metric.rows, expected, rtol=1e-6)
    assert heldout_velocity_mse(teacher, teacher, points).rows.tolist() == [[0, 2], [0, 1], [0, 2]]
    assert heldout_velocity_mse(student, teacher, {k: v for k, v in points.items() if k != "trajectory"}).n == 5


def test_save_gif_writes_every_frame_side_by_side(tmp_path):
    teacher, student = clips(8, shape=(2, 1, 3, 6, 5)), clips(9, shape=(2, 1, 3, 6, 5))
    path = save_gif([teacher, student], tmp_path / "out" / "compare.gif", scale=3)
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames == 3 and getattr(gif, "is_animated", False)
        assert gif.size == (5 * 2 * 3, 6 * 2 * 3)  # two clips across, two rows down, scaled 3x
        first = np.asarray(gif.convert("L"))
    expected = ((teacher[1, 0, 0].clamp(-1, 1) + 1) * 127.5).round().numpy().astype(np.uint8)
    np.testing.assert_array_equal(first[:18:3, 15::3], expected)  # top row, second clip, frame 0


def test_plot_gates_writes_a_png_and_the_history(tmp_path):
    history = [(0, {"blocks.0": 0.5, "blocks.1": 0.5}), (10, {"blocks.0": 0.8, "blocks.1": 0.1})]
    path = plot_gates(history, ["blocks.1"], tmp_path / "gates.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.size == (700, 400)  # 7x4 inches at 100 dpi
    saved = json.loads((tmp_path / "chosen_layers.json").read_text())
    assert saved == {"linear": ["blocks.1"], "history": [[0, {"blocks.0": 0.5, "blocks.1": 0.5}],
                                                         [10, {"blocks.0": 0.8, "blocks.1": 0.1}]]}

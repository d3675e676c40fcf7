"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package (IDX files, no download), and a small
conv classifier that scores whether generated images still show the item they were asked for.

    apt-get install dataset-fashion-mnist
    .venv/bin/python -m pytest tests/distill/test_fashion_mnist.py -q

Shared by the testbeds that generate Fashion-MNIST content (LinVideo's moving clips, LoRA-Composer's
U-Net): the classifier takes `[batch, 1, size, size]` images in [-1, 1] (background −1) and is
trained on whatever canvases the testbed draws, so its accuracy on generated frames is comparable to
its accuracy on real ones.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DATA_DIR = Path(os.environ.get("ATHANOR_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or plain): magic 0x0000 08 ndim, big-endian dims, uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: IDX header cut short ({len(raw)} bytes for {ndim} dimensions)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims}, file holds {data.size} bytes")
    return data.reshape(dims)


def load_split(split: str = "train", data_dir: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of the 'train' (60k) or 'test' (10k) split."""
    if split not in _FILES:
        raise ValueError(f"split={split!r}: use 'train' or 'test'")
    folder = Path(data_dir or DATA_DIR)
    images_file, labels_file = (folder / name for name in _FILES[split])
    if not images_file.exists():
        raise FileNotFoundError(f"{images_file} is missing: install Debian's dataset-fashion-mnist package "
                                "(apt-get install dataset-fashion-mnist) or set ATHANOR_FASHION_MNIST")
    images, labels = _read_idx(images_file), _read_idx(labels_file)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def resize_items(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, size, size] in [0, 1] (antialiased area resize)."""
    x = images.float().div(255.0).unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.squeeze(1).clamp(0, 1)


class FashionClassifier(nn.Module):
    """Four 3×3 convs (two stride-2 stages) and a linear head; global pooling makes it position-free,
    so it reads an item anywhere on a canvas. `features` is the pooled vector (used for MMD)."""

    def __init__(self, width: int = 32, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1, stride=2), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.GELU(),
        )
        self.head = nn.Linear(2 * w, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 1, H, W] in [-1, 1] -> pooled features [B, 2·width]."""
        return self.body(images.float()).amax(dim=(-2, -1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_classifier(make_batch, steps: int, *, lr: float = 2e-3, seed: int = 0, width: int = 32,
                     log_every: int = 100) -> FashionClassifier:
    """Train on `make_batch(step) -> (images [B,1,H,W] in [-1,1], labels [B])` for `steps` AdamW steps."""
    torch.manual_seed(seed)
    model = FashionClassifier(width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        images, labels = make_batch(step)
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"classifier step {step}/{steps}: loss {loss.item():.3f}", flush=True)
    return model.eval()


@torch.no_grad()
def accuracy(model: FashionClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 512) -> float:
    """Fraction of images classified as their label."""
    hits = sum((model(images[i:i + batch]).argmax(-1) == labels[i:i + batch]).sum().item()
               for i in range(0, len(images), batch))
    return hits / max(len(images), 1)

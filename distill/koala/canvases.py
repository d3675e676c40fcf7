"""Real training data for the Fashion-canvas testbed teacher (recipes/koala_tiny.yaml, `koala.train_data:
canvases`): canvases of real Fashion-MNIST items with their captions, drawn by the testbed's own canvas builder
(distill/lora_composer/canvas.py) — the data the teacher was trained on. KOALA's paper trains the student on
real images with the task loss beside output and feature KD; here the canvases are those images.

Canvas i of an epoch is drawn from a generator seeded by (`data.seed`, i): the set is reproducible whatever
order or worker the loader uses. Rows carry the canvas as `latents` (pixel space: the U-Net's input is the
image) and its caption's token ids; `encode_batch` turns the ids into embeddings per batch.

    .venv/bin/python -m pytest tests/distill/koala/test_canvas_training.py -q
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from athanor.distill.koala.data import KoalaTeacher, _token_specs, _tokenize
from athanor.distill.spec import RecipeError


def canvas_seed(seed: int, index: int) -> int:
    """The generator seed of canvas `index` under data seed `seed` (independent streams per pair)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


def check_canvas_teacher(teacher: KoalaTeacher, resolution: tuple[int, int]) -> None:
    """Canvases are 1×32×64 pixels in [-1, 1]: only a pixel-space U-Net of that size can be trained on them."""
    from athanor.distill.lora_composer.canvas import HEIGHT, WIDTH

    channels = teacher.unet.config.in_channels
    if not teacher.pixel_space or channels != 1 or tuple(resolution) != (HEIGHT, WIDTH):
        raise RecipeError("koala.train_data", "canvases", f"canvases are 1×{HEIGHT}×{WIDTH} Fashion-MNIST pixels, but "
                          f"this teacher takes {channels}×{resolution[0]}×{resolution[1]} "
                          f"{'pixels' if teacher.pixel_space else 'VAE latents'}: use the Fashion-canvas testbed "
                          "(pkg:athanor.distill.lora_composer/testbed), or train_data images / data_free")


class CanvasRows(Dataset):
    """`length` real canvases (see the module docstring): {'latents': [1, 32, 64], 'input_ids_0': [L]}.
    Items come from `split` of Fashion-MNIST (Debian's dataset-fashion-mnist); 1, 2 or 3 items per canvas at
    the testbed's layouts, classes drawn uniformly, as the testbed's training draws them."""

    def __init__(self, teacher: KoalaTeacher, length: int, seed: int, split: str = "train") -> None:
        from athanor.distill.lora_composer.canvas import Canvases

        try:
            self.canvases = Canvases.from_split(split)
        except FileNotFoundError as err:
            raise RecipeError("koala.train_data", "canvases", str(err)) from err
        # Tokenizers only: DataLoader workers must not carry the text encoder.
        self.specs, self.length, self.seed = _token_specs(teacher), length, seed

    def __len__(self) -> int:
        return self.length

    def example(self, index: int) -> Any:
        """The canvas builder's `Example` of row `index` (image, caption, labels, boxes, item indices)."""
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self.canvases.example(torch.Generator().manual_seed(canvas_seed(self.seed, index)))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example = self.example(index)
        ids = _tokenize(self.specs, [example.caption])
        return {"latents": example.image, **{k: v[0] for k, v in ids.items()}}

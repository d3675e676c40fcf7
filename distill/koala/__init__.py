"""KOALA: shrink an SDXL-family U-Net and distil it with feature knowledge distillation.

Where its pieces live:

- surgery: convert/koala.py (U-Net surgery)
- distill/koala/config.py: recipe sections `student:` (KoalaStudent) and `koala:` (KoalaArgs)
- distill/koala/method.py: the protocol class `Koala`
- distill/koala/data.py: teacher loading, image-caption and data-free sets
- distill/koala/canvases.py: real Fashion-MNIST canvases for the testbed teacher (`train_data: canvases`)
- distill/koala/train.py: the LightningModule and feature pairs
- distill/koala/sampling.py: teacher sampling
- distill/koala/evaluation.py: fidelity, memory and box-accuracy metrics
- recipes: recipes/koala.yaml, recipes/koala_tiny.yaml
- tests: tests/distill/koala/, tests/convert/test_koala.py, tests/recipes/test_koala_recipe.py
- registry: `"koala": "athanor.distill.koala:Koala"` in jobs/methods.py
- benchmarks: benchmarks/koala.py
"""

from athanor.distill.koala.method import Koala

__all__ = ["Koala"]

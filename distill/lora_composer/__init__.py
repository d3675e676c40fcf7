"""LoRA-Composer (issue 12): training-free composition of concept LoRAs, one region each, in one U-Net;
with its Fashion-MNIST testbed (canvases, base model, concept LoRAs).

Where its pieces live:

- surgery: convert/lora_composer/ (adapters.py, processor.py)
- distill/lora_composer/config.py: recipe sections `student:` (LoraComposerStudent) and `lora_composer:`
  (LoraComposerArgs)
- distill/lora_composer/method.py: the protocol class `LoraComposer`
- distill/lora_composer/pipeline.py: teacher, baseline mixer and composer
- distill/lora_composer/sampling.py, guidance.py: re-initialisation and latent guidance
- distill/lora_composer/evaluation.py: the judge's metrics
- distill/lora_composer/arms.py: the `compare` rows (plain base model, ablation ladder)
- distill/lora_composer/canvas.py, concepts.py, vocab.py, testbed.py, testbed/: the Fashion-MNIST testbed (package
  data)
- recipes: recipes/lora_composer_fashion.yaml
- tests: tests/distill/lora_composer/, tests/convert/test_lora_composer.py,
  tests/recipes/test_lora_composer_recipe.py
- registry: `"lora_composer": "athanor.distill.lora_composer:LoraComposer"` in jobs/methods.py
"""

from athanor.distill.lora_composer.config import LoraComposerArgs, LoraComposerStudent
from athanor.distill.lora_composer.method import LoraComposer

__all__ = ["LoraComposer", "LoraComposerArgs", "LoraComposerStudent"]

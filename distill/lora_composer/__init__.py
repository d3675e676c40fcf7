"""LoRA-Composer (issue 12): training-free composition of concept LoRAs, one region each, in one U-Net;
with its Fashion-MNIST testbed (canvases, base model, concept LoRAs)."""

from athanor.distill.lora_composer.method import LoraComposer, LoraComposerArgs, LoraComposerStudent

__all__ = ["LoraComposer", "LoraComposerArgs", "LoraComposerStudent"]

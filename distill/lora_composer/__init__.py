"""LoRA-Composer (issue 12): captioned Fashion-MNIST canvases and the text-to-image testbed base model."""

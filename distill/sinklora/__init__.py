"""SinkLoRA (issue 11): long-context LoRA through SF-Attn, evaluated with full attention, exported merged."""

from athanor.distill.sinklora.method import SinkLoRA, SinkLoRAArgs, SinkLoRAStudent

__all__ = ["SinkLoRA", "SinkLoRAArgs", "SinkLoRAStudent"]

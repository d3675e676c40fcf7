"""The minilm method: see `distill/minilm/method.py`."""

from athanor.distill.minilm.method import MiniLM

__all__ = ["MiniLM"]

"""The minilm method: see `distill/minilm/method.py`."""

from distill.minilm.method import MiniLM

__all__ = ["MiniLM"]

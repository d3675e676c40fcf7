"""The koala method: see `distill/koala/method.py`."""

from distill.koala.method import Koala

__all__ = ["Koala"]

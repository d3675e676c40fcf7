"""The koala method: see `distill/koala/method.py`."""

from athanor.distill.koala.method import Koala

__all__ = ["Koala"]

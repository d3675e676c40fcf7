"""The sentencevae method: see `distill/sentencevae/method.py`."""

from athanor.distill.sentencevae.method import SentenceVAE

__all__ = ["SentenceVAE"]

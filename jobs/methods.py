"""Registry of conversion methods, one line each. Imported lazily so `athanor --help` stays fast."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distill.spec import Method

METHODS: dict[str, str] = {
    "minilm": "distill.minilm:MiniLM",
    "koala": "distill.koala:Koala",
    "sentencevae": "distill.sentencevae:SentenceVAE",
}


def get_method(name: str) -> "Method":
    """Instantiate the method registered as `name` (KeyError if unknown)."""
    module_name, _, class_name = METHODS[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)()

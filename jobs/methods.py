"""Registry of conversion methods, one line each. Imported lazily so `athanor --help` stays fast."""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from athanor.distill.spec import Method

METHODS: dict[str, str] = {
    "minilm": "athanor.distill.minilm:MiniLM",
    "koala": "athanor.distill.koala:Koala",
    "sentencevae": "athanor.distill.sentencevae:SentenceVAE",
    "linvideo": "athanor.distill.linvideo:LinVideo",
    "sinklora": "athanor.distill.sinklora:SinkLoRA",
    "lora_composer": "athanor.distill.lora_composer:LoraComposer",
}

# Extra methods from outside the repo (plugins, test doubles): "name=module:Class,name2=...".
for _entry in filter(None, os.environ.get("ATHANOR_METHODS", "").split(",")):
    _name, _, _target = _entry.partition("=")
    METHODS[_name.strip()] = _target.strip()


def get_method(name: str) -> Method:
    """Instantiate the method registered as `name` (KeyError if unknown; TypeError naming the fix for a registered
    class that is not a `MethodBase`: the spine calls its optional hooks, whose defaults live there)."""
    from athanor.distill.method_base import MethodBase  # here: `athanor --help` imports this module

    module_name, _, class_name = METHODS[name].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, MethodBase)):
        raise TypeError(f"method {name!r} ({METHODS[name]}) is not a subclass of "
                        "athanor.distill.method_base.MethodBase: subclass it (CONTRIBUTING.md)")
    return cls()

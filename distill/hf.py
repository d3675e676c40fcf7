"""Building a transformers model from a resolved source, shared by the text methods."""

from __future__ import annotations

from typing import Any

import torch

from distill.spec import ResolvedSource


def build_hf_model(auto_cls: Any, source: ResolvedSource, config: Any, *, meta: bool) -> Any:
    """`auto_cls` from the source's weights, from its inline config (seeded), or on the meta device
    (sizes only, no weights read)."""
    if meta:
        with torch.device("meta"):
            return auto_cls.from_config(config)
    if source.path is not None:
        return auto_cls.from_pretrained(source.path, trust_remote_code=source.trust_remote_code)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(source.seed)
        return auto_cls.from_config(config)

"""Loading transformers models and tokenizers from a resolved source, shared by the text methods.

Every failure becomes one `RecipeError` naming the recipe key (`teacher.tokenizer`, `teacher.config`)."""

from __future__ import annotations

from typing import Any

import torch

from athanor.distill.spec import RecipeError, ResolvedSource


def load_tokenizer(source: ResolvedSource, *, need_fast: bool = False) -> Any:
    """The tokenizer at `teacher.tokenizer` (default: the model directory)."""
    from transformers import AutoTokenizer

    path = source.tokenizer_path or source.path
    if path is None:
        raise RecipeError("teacher.tokenizer", None, "an inline-config teacher needs a tokenizer source")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=source.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise RecipeError("teacher.tokenizer", str(path), f"no tokenizer found: {exc}") from exc
    if need_fast and not getattr(tokenizer, "is_fast", False):
        raise RecipeError("teacher.tokenizer", str(path), "needs a fast tokenizer (token offsets)")
    return tokenizer


def load_config(source: ResolvedSource, *, examples: str, defaults: dict[str, Any] | None = None) -> Any:
    """The model config from the source directory, or from the inline `teacher.config` (which must name
    a `model_type`, e.g. `examples`); `defaults` fill keys the inline config leaves out."""
    from transformers import AutoConfig

    if source.path is not None:
        return AutoConfig.from_pretrained(source.path, trust_remote_code=source.trust_remote_code)
    if source.config is None:
        raise RecipeError("teacher", source.description, "give a model source or an inline config")
    cfg = {**(defaults or {}), **source.config}
    if "model_type" not in cfg:
        raise RecipeError("teacher.config", source.config, f"add model_type (e.g. {examples})")
    model_type = cfg.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except (ValueError, TypeError) as exc:
        raise RecipeError("teacher.config.model_type", model_type, f"{exc}; e.g. {examples}") from exc


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

"""SinkLoRA / LongLoRA fine-tuning surgery: RoPE position interpolation to a longer context, LoRA on the
attention projections with trainable embeddings and norms, and merging for export.

    .venv/bin/python -m pytest tests/convert/test_sinklora_lora.py -q

`extend_context(model, target_length, method)` writes transformers 5's RoPE settings
(`config.rope_parameters`: `rope_type`, `factor`, and for yarn `original_max_position_embeddings`) with
factor = target / original context, records the original context as `config.original_max_position_embeddings`
(serialized with the config, read back on a second call) and rebuilds every `*RotaryEmbedding` module, because
those modules compute `inv_freq` once, at init, from the config.

- "linear" (position interpolation, what LongLoRA and SinkLoRA train with): `inv_freq / factor`, so position
  `factor·p` after extension gets the rotation position `p` had before; `max_position_embeddings` = target.
- "yarn": per-frequency interpolation plus attention temperature; `max_position_embeddings` = target.
- "dynamic" (NTK, scales only once a sequence outgrows the context): transformers reads
  `max_position_embeddings` as the *pretraining* length for this type (scaling starts past it), so it is left at
  the original; setting it to the target would disable the scaling up to the target.

`add_lora` follows LongLoRA's `trainable_params="embed,norm"`: peft LoRA on the attention projections, and
`requires_grad` switched back on for the input embedding and every norm in place (not peft `modules_to_save`
copies), so `merge_and_unload` needs nothing special for them. A peft `save_pretrained` of the adapter alone
therefore does not hold the trained embeddings and norms: export with `merge_for_export`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from athanor.convert.recipe_types import RecipeError
from athanor.convert.sinklora.attention import base_model

ROPE_METHODS = ("linear", "dynamic", "yarn")
TARGET_LENGTH_KEY, ROPE_SCALING_KEY = "sinklora.target_length", "sinklora.rope_scaling"
LORA_RANK_KEY, LORA_ALPHA_KEY, LORA_DROPOUT_KEY = "sinklora.lora_rank", "sinklora.lora_alpha", "sinklora.lora_dropout"
LORA_TARGETS_KEY = "sinklora.lora_targets"
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
SUMMARY_KINDS = ("lora", "embed", "norm", "other")
_EXTENSIBLE_ROPE_TYPES = ("default", *ROPE_METHODS)


# --- RoPE position interpolation ----------------------------------------------------------------------------


def original_context(config: PreTrainedConfig) -> int:
    """The pretraining context length: `original_max_position_embeddings` if an earlier extension (or the
    checkpoint) recorded it, else `max_position_embeddings`."""
    rope = getattr(config, "rope_parameters", None) or {}
    recorded = getattr(config, "original_max_position_embeddings", None) or rope.get("original_max_position_embeddings")
    return int(recorded or config.max_position_embeddings)


def _check_rope(config: PreTrainedConfig, method: str) -> dict[str, Any]:
    """The config's flat rope_parameters dict, or RecipeError('sinklora.rope_scaling', ...)."""
    if method not in ROPE_METHODS:
        raise RecipeError(ROPE_SCALING_KEY, method, f"use one of {', '.join(ROPE_METHODS)} "
                          "(linear is LongLoRA's position interpolation)")
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_type" not in rope or "rope_theta" not in rope:
        raise RecipeError(ROPE_SCALING_KEY, rope, "needs one global RoPE setting (config.rope_parameters with "
                          "rope_type and rope_theta, as in Llama); per-layer RoPE is not supported")
    if rope["rope_type"] not in _EXTENSIBLE_ROPE_TYPES:
        allowed = " / ".join(_EXTENSIBLE_ROPE_TYPES)
        raise RecipeError(ROPE_SCALING_KEY, rope["rope_type"], "the model already uses this RoPE scaling, which "
                          f"extending would overwrite: start from a model with {allowed} RoPE")
    return rope


def _rebuild_rotary_embeddings(model: nn.Module) -> int:
    """Replace every `*RotaryEmbedding` module with a fresh one built from its (updated) config; returns how
    many were rebuilt."""
    found = [(name, module) for name, module in model.named_modules()
             if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "config")]
    for name, old in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        device = old.inv_freq.device if isinstance(getattr(old, "inv_freq", None), torch.Tensor) else None
        setattr(parent, attr, type(old)(config=old.config).to(device))
    return len(found)


def extend_context(model: nn.Module, target_length: int, method: str = "linear",
                   original: int | None = None) -> nn.Module:
    """RoPE position interpolation of a Llama-family model (or a peft wrapper of one) to `target_length`
    tokens, in place; returns `model`. See the module docstring for what each method writes. `original`
    overrides the context the model is treated as pretrained at (a rehearsal at short lengths)."""
    base = base_model(model)
    config = base.config.get_text_config()
    rope = _check_rope(config, method)
    original = original or original_context(config)
    if isinstance(target_length, bool) or not isinstance(target_length, int) or target_length <= original:
        raise RecipeError(TARGET_LENGTH_KEY, target_length, f"must be an integer longer than the model's original "
                          f"context of {original} tokens (e.g. {4 * original} for 4x)")
    factor = target_length / original
    new_rope: dict[str, Any] = {"rope_type": method, "rope_theta": rope["rope_theta"], "factor": factor}
    if "partial_rotary_factor" in rope:
        new_rope["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if method == "yarn":
        new_rope["original_max_position_embeddings"] = original
    config.rope_parameters = new_rope
    config.original_max_position_embeddings = original
    config.max_position_embeddings = original if method == "dynamic" else target_length
    config.validate_rope()
    if _rebuild_rotary_embeddings(base) == 0:
        raise RecipeError(ROPE_SCALING_KEY, type(base).__name__, "no *RotaryEmbedding module found to rebuild: "
                          "extend_context supports Llama-family models (one rotary module built from the config)")
    return model


# --- LoRA + trainable embeddings and norms ---------------------------------------------------------------------


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def _check_lora_args(model: nn.Module, rank: int, alpha: float, dropout: float, targets: Sequence[str]) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise RecipeError(LORA_RANK_KEY, rank, "must be a positive integer (LongLoRA uses 8)")
    if not alpha > 0:
        raise RecipeError(LORA_ALPHA_KEY, alpha, "must be > 0 (LongLoRA uses 16)")
    if not 0 <= dropout < 1:
        raise RecipeError(LORA_DROPOUT_KEY, dropout, "must be in [0, 1) (LongLoRA uses 0.05)")
    names = {name.rpartition(".")[2] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = sorted(set(targets) - names)
    if not targets or missing:
        raise RecipeError(LORA_TARGETS_KEY, list(targets), f"not linear layers of this model: {missing}; "
                          f"use names among {sorted(names)[:12]}")


def add_lora(model: PreTrainedModel, rank: int, alpha: float, dropout: float,
             targets: Sequence[str] = ATTENTION_PROJECTIONS, train_embeddings_and_norms: bool = True) -> PeftModel:
    """Wrap `model` with peft LoRA on `targets` (the attention projections); everything else is frozen except,
    with `train_embeddings_and_norms` (LongLoRA's "embed,norm"), the input embedding and every norm layer."""
    _check_lora_args(model, rank, alpha, dropout, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if train_embeddings_and_norms:
        base = peft_model.get_base_model()
        modules = [base.get_input_embeddings(), *(m for m in base.modules() if _is_norm(m))]
        for module in modules:
            for param in module.parameters():
                param.requires_grad_(True)
    return peft_model


def _param_kinds(model: nn.Module) -> dict[str, str]:
    """Parameter name -> kind ('lora', 'embed', 'norm' or 'other')."""
    kinds: dict[str, str] = {}
    for module_name, module in model.named_modules():
        kind = "embed" if isinstance(module, nn.Embedding) else "norm" if _is_norm(module) else "other"
        for param_name, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            kinds[name] = "lora" if "lora_" in name else kind
    return kinds


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts by kind: {'lora', 'embed', 'norm', 'other'} (each shared tensor once)."""
    counts = dict.fromkeys(SUMMARY_KINDS, 0)
    kinds = _param_kinds(model)
    for name, param in model.named_parameters():
        if param.requires_grad:
            counts[kinds.get(name, "other")] += param.numel()
    return counts


# --- export ----------------------------------------------------------------------------------------------------


def merge_for_export(peft_model: PeftModel) -> PreTrainedModel:
    """Merge the LoRA weights into the base weights and drop the peft wrapper (in place: the peft model is
    spent). The config (and so the extended RoPE settings) is the base model's own, so `save_pretrained` then
    `AutoModelForCausalLM.from_pretrained` rebuilds the same model."""
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"merge_for_export needs a peft model (from add_lora), got {type(peft_model).__name__}")
    merged = peft_model.merge_and_unload()
    for param in merged.parameters():
        param.requires_grad_(False)
    return merged

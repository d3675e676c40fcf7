"""SinkLoRA attention surgery: SF-Attn and the two S2-Attns as transformers attention implementations.

    .venv/bin/python -m pytest tests/convert/test_sinklora_attention.py -q

`register_sparse_attention()` adds three names to transformers' `AttentionInterface` (the attention
function) and `AttentionMaskInterface` (the mask function):

- "sf_attention": SinkLoRA's SF-Attn (segmented shifted groups + global sink tokens);
- "s2_attention": LongLoRA's S2-Attn as published (half the heads rolled by G/2 with wrap-around,
  group-causal attention, rolled back: `kernels.sparse_attention.longlora_s2_attention`);
- "s2_segmented_attention": SF-Attn without sinks (shifted groups segmented, no wrap-around), SinkLoRA's
  no-sink ablation; beside "sf_attention" it isolates what the sinks add.

Both registrations are needed: transformers builds a mask only for names its mask interface knows, and
for any other name hands the attention function `attention_mask=None`, so padding would be silently
attended. The mask function registered here returns the 2-D padding form, bool [batch, kv_tokens]
(True = real token), or None when nothing is padded; causality is the kernel's `causal=True`. The
O(N²) 4-D mask is never built, which is the point of sparse attention at long context. The kernels
(`kernels.sparse_attention`, backend 'auto') run through FlexAttention, compiled, on CUDA (block masks
cached per length, group and sinks) and through the PyTorch reference on CPU.

Settings live on the model config (`config.sinklora_group_size`, `config.sinklora_num_sink`), written by
`configure(model, group_size=..., num_sink=...)` and read by the attention function through
`module.config`: one place, visible in logs, the same for every layer. Switching uses the public
`model.set_attn_implementation(name)` (`use_attention`, or the `attention_implementation` context
manager for an evaluation under full attention). Nothing is monkeypatched.

Padding (segmented names): the kernel's groups and sinks are tensor positions, so a left-padded row would put its pads
in the sink slots and shift its groups. Rows whose real tokens are not a prefix are therefore
reordered (real tokens first, in order) before the kernel and the output put back, so each row's
pattern depends only on its real tokens: a padded batch gives the unpadded sequence's outputs
(give left-padded rows position_ids from the mask, as for any RoPE model).

"s2_attention" refuses padded rows: LongLoRA rolls the whole row, so a row's pads would wrap into its
groups and its pattern would depend on the padding (LongLoRA trains unpadded chunks, as SinkLoRA here).

Limits (clear errors, not silent fallbacks): the whole sequence at once (queries = keys: training and
prefill; generate with "sdpa"), plain causal masks only (no packed sequences, sliding windows or
custom mask overlays), no attention dropout, no softcap.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedConfig, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, prepare_padding_mask

from athanor.convert.recipe_types import RecipeError
from athanor.kernels.sparse_attention import longlora_s2_attention, s2_attention, sf_attention

SPARSE_IMPLEMENTATIONS = ("sf_attention", "s2_attention", "s2_segmented_attention")
"""The names registered with transformers' attention and mask interfaces."""
FULL_IMPLEMENTATIONS = ("sdpa", "eager")
GROUP_SIZE_ATTR, NUM_SINK_ATTR = "sinklora_group_size", "sinklora_num_sink"
"""Config attributes read by the attention functions (written by `configure`)."""
TEACHER_KEY, GROUP_SIZE_KEY, NUM_SINK_KEY = "teacher", "sinklora.group_size", "sinklora.num_sink"


# --- validation ---------------------------------------------------------------------------------------------


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (`get_base_model`), or `model` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def check_model(model: nn.Module) -> None:
    """Raise RecipeError('teacher', ...) unless `model` is a decoder-only causal transformers model whose
    attention goes through `AttentionInterface` (Llama, Mistral, Qwen2, ...)."""
    model = base_model(model)
    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise RecipeError(TEACHER_KEY, name, "SinkLoRA needs a transformers causal LM (e.g. LlamaForCausalLM)")
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise RecipeError(TEACHER_KEY, name, "an encoder-decoder model: SinkLoRA needs a decoder-only causal LM")
    causal = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if getattr(config, "is_causal", True) is False or not causal or not all(causal):
        raise RecipeError(TEACHER_KEY, name, "attention is not causal (an encoder such as BERT?): SinkLoRA "
                          "needs a decoder-only causal LM (e.g. LlamaForCausalLM)")
    if not model._can_set_attn_implementation():
        raise RecipeError(TEACHER_KEY, name, "its attention does not go through transformers' AttentionInterface, "
                          "so sparse attention cannot be switched in")
    if float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        raise RecipeError(TEACHER_KEY, name, f"attention_dropout={config.attention_dropout}: the sparse kernels "
                          "have no attention dropout; set the config's attention_dropout to 0")


def check_group_size(group_size: Any, target_length: int | None = None) -> None:
    """Raise RecipeError('sinklora.group_size', ...) unless `group_size` is an even int >= 2 and (given a
    target) at most `target_length`. Even: the shifted heads move by exactly half a group, as in LongLoRA
    and SinkLoRA. The target need not be a multiple: the kernels handle a partial last group."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise RecipeError(GROUP_SIZE_KEY, group_size, "use an even integer >= 2 (e.g. a quarter of the target length)")
    if group_size < 2 or group_size % 2:
        raise RecipeError(GROUP_SIZE_KEY, group_size, "use an even integer >= 2: shifted heads move by half a "
                          "group (group_size // 2 tokens)")
    if target_length is not None and group_size > target_length:
        raise RecipeError(GROUP_SIZE_KEY, group_size, f"larger than the target length {target_length}: one group "
                          "would cover every sequence, which is full attention; use at most the target length "
                          "(SinkLoRA/LongLoRA use a quarter of it)")


def check_num_sink(num_sink: Any) -> None:
    """Raise RecipeError('sinklora.num_sink', ...) unless `num_sink` is an int >= 0."""
    if isinstance(num_sink, bool) or not isinstance(num_sink, int) or num_sink < 0:
        raise RecipeError(NUM_SINK_KEY, num_sink, "use an integer >= 0 (SinkLoRA uses 4 sink tokens)")


def sparse_settings(config: PreTrainedConfig | None) -> tuple[int, int]:
    """(group_size, num_sink) from a config written by `configure`; a clear error when it was not."""
    group_size = getattr(config, GROUP_SIZE_ATTR, None)
    if group_size is None:
        raise ValueError(f"sparse attention needs {GROUP_SIZE_ATTR} on the model config: call "
                         "athanor.convert.sinklora.configure(model, group_size=..., num_sink=...) first")
    num_sink = getattr(config, NUM_SINK_ATTR, 0)
    check_group_size(group_size)
    check_num_sink(num_sink)
    return group_size, num_sink


# --- setting up a model -------------------------------------------------------------------------------------


def _configs(model: nn.Module) -> list[PreTrainedConfig]:
    """Every distinct config object the model's modules hold (a causal LM usually shares one)."""
    found = {id(m.config): m.config for m in model.modules() if isinstance(getattr(m, "config", None),
                                                                           PreTrainedConfig)}
    return list(found.values())


def configure(model: nn.Module, *, group_size: int, num_sink: int = 4, target_length: int | None = None) -> None:
    """Validate `model` and the settings, register the implementations, and write the settings on every
    config the model's attention modules read. Does not switch the attention: see `use_attention`.
    The attributes are saved with the config; `clear_settings` removes them (e.g. before export)."""
    check_model(model)
    check_group_size(group_size, target_length)
    check_num_sink(num_sink)
    register_sparse_attention()
    for config in _configs(base_model(model)):
        setattr(config, GROUP_SIZE_ATTR, group_size)
        setattr(config, NUM_SINK_ATTR, num_sink)


def clear_settings(model: nn.Module) -> None:
    """Remove the settings `configure` wrote (they would otherwise be saved in config.json)."""
    for config in _configs(base_model(model)):
        for attr in (GROUP_SIZE_ATTR, NUM_SINK_ATTR):
            if hasattr(config, attr):
                delattr(config, attr)


def use_attention(model: nn.Module, name: str) -> None:
    """Switch a loaded model to `name` (one of SPARSE_IMPLEMENTATIONS, "sdpa" or "eager") with
    `set_attn_implementation`; sparse names need `configure` first."""
    base = base_model(model)
    if name not in SPARSE_IMPLEMENTATIONS + FULL_IMPLEMENTATIONS:
        raise ValueError(f"attention {name!r}: use one of {SPARSE_IMPLEMENTATIONS + FULL_IMPLEMENTATIONS}")
    if name in SPARSE_IMPLEMENTATIONS:
        check_model(base)
        sparse_settings(base.config)
        register_sparse_attention()
    base.set_attn_implementation(name)
    if base.config._attn_implementation != name:
        raise ValueError(f"{type(base).__name__} did not switch to {name!r} "
                         f"(it runs {base.config._attn_implementation!r})")


@contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Run a block under attention `name` (e.g. "sdpa" for evaluation), then restore the previous one."""
    before = base_model(model).config._attn_implementation
    use_attention(model, name)
    try:
        yield
    finally:
        use_attention(model, before)


# --- the transformers hooks ---------------------------------------------------------------------------------


def register_sparse_attention() -> None:
    """Register SPARSE_IMPLEMENTATIONS with AttentionInterface and AttentionMaskInterface (idempotent;
    global, as transformers' registries are)."""
    AttentionInterface.register("sf_attention", sf_attention_forward)
    AttentionInterface.register("s2_attention", s2_attention_forward)
    AttentionInterface.register("s2_segmented_attention", s2_segmented_attention_forward)
    for name in SPARSE_IMPLEMENTATIONS:
        AttentionMaskInterface.register(name, sparse_attention_mask)


def sparse_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Mask function for the sparse names: the padding mask as bool [batch, kv_length] (True = real),
    or None when there is no padding. Only the plain causal pattern is accepted: packed sequences,
    sliding windows and mask overlays would be dropped by a 2-D mask, so they raise instead."""
    if mask_function is not causal_mask_function:
        name = getattr(mask_function, "__qualname__", repr(mask_function))
        raise ValueError(f"sparse attention supports only a causal mask with padding, got mask function {name} "
                         "(packed sequences, sliding window or a custom overlay): pass an attention_mask, "
                         "or use 'sdpa'")
    if attention_mask is None:
        return None
    keep = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
    return None if bool(keep.all()) else keep.to(torch.bool)


def sf_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """AttentionInterface function "sf_attention": query/key/value [batch, heads, tokens, dim] (fewer kv
    heads for GQA) -> ([batch, tokens, heads, dim], None)."""
    return _sparse_forward("sf_attention", module, query, key, value, attention_mask, scaling, dropout, kwargs)


def s2_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """AttentionInterface function "s2_attention": LongLoRA's rolled S2-Attn (no sinks; `num_sink` is ignored)."""
    return _sparse_forward("s2_attention", module, query, key, value, attention_mask, scaling, dropout, kwargs)


def s2_segmented_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                   attention_mask: torch.Tensor | None, scaling: float | None = None,
                                   dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """AttentionInterface function "s2_segmented_attention": SF-Attn's pattern without sinks (`num_sink` ignored)."""
    return _sparse_forward("s2_segmented_attention", module, query, key, value, attention_mask, scaling, dropout,
                           kwargs)


def _check_call(module: nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                dropout: float, kwargs: dict[str, Any]) -> None:
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"sparse attention needs the whole sequence at once: {query.shape[2]} queries against "
                         f"{key.shape[2]} cached keys (decoding?); generate under 'sdpa'")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"sparse attention takes a 2-D padding mask [batch, tokens], got shape "
                         f"{tuple(attention_mask.shape)} (a prepared 4-D mask?)")
    if dropout:
        raise ValueError(f"attention dropout {dropout}: the sparse kernels have none; set attention_dropout=0")
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise ValueError("sparse attention is causal only; this attention module is not")
    for unsupported in ("sliding_window", "softcap"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"sparse attention does not combine with {unsupported}={kwargs[unsupported]}")


def _sparse_forward(name: str, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None, dropout: float,
                    kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:
    _check_call(module, query, key, attention_mask, dropout, kwargs)
    group_size, num_sink = sparse_settings(getattr(module, "config", None))
    keep = None if attention_mask is None else attention_mask.to(device=query.device, dtype=torch.bool)
    if name == "s2_attention" and keep is not None and not bool(keep.all()):
        # why: the roll runs over the whole row, so pads would wrap into the groups (see the module docstring)
        raise ValueError("s2_attention (LongLoRA's rolled S2-Attn) takes unpadded rows only: its roll would wrap "
                         "a row's pads into its groups; pass equal-length rows or use 's2_segmented_attention'")
    order = None
    if keep is not None and bool((keep[:, 1:] > keep[:, :-1]).any()):  # a real token after a pad: reorder
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        query, key, value = (_take(t, order) for t in (query, key, value))
        keep = keep.gather(1, order)
    if name == "sf_attention":
        out = sf_attention(query, key, value, group_size=group_size, num_sink=num_sink, causal=True,
                           attention_mask=keep, scale=scaling)
    elif name == "s2_attention":
        out = longlora_s2_attention(query, key, value, group_size=group_size, causal=True, attention_mask=keep,
                                    scale=scaling)
    else:
        out = s2_attention(query, key, value, group_size=group_size, causal=True, attention_mask=keep,
                           scale=scaling)
    if order is not None:
        out = torch.zeros_like(out).scatter(2, _token_index(order, out), out)
    return out.transpose(1, 2).contiguous(), None


def _token_index(order: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`order` [batch, tokens] expanded to index dim 2 of `like` [batch, heads, tokens, dim]."""
    return order[:, None, :, None].expand(-1, like.shape[1], -1, like.shape[3])


def _take(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Tokens of `t` [batch, heads, tokens, dim] in each row's `order`."""
    return t.gather(2, _token_index(order, t))

"""LoRA-Composer (training-free multi-concept composition): a region-aware diffusers attention processor and
the loading of several concept LoRAs into ONE U-Net as named peft adapters.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/convert/test_lora_composer.py -q

Usage: `load_concept_adapters(unet, {"sneaker": Path("loras/sneaker"), ...})`, then inside
`with composed(unet, Composition(regions, global_embeds, height=32, width=64)):` every U-Net call is composed;
`composition.active = False` gives the plain base model with adapters off; `with composition.empty_prompts(empty):`
gives the unconditional branch of classifier-free guidance as the authors run it (the regional LoRAs on, every
prompt, global and regional, the empty one).

Adapters live in the peft LoRA layers of the attention projections; `load_concept_adapters` switches their global
application off (`unet.disable_adapters()`), and `RegionalAttnProcessor` adds each adapter's delta
`lora_B(lora_A(x)) * scaling` itself, weighted by region masks: with m_i region i's mask at the layer's
resolution, M = sum m_i and w_i = m_i / max(M, 1), a token-wise projection is base(x) + sum_i w_i * delta_i(x).

Cross-attention (attn2) ignores the U-Net's encoder_hidden_states while active: the global branch attends to the
base keys/values of `global_embeds`, region i's branch to keys/values of its own prompt through adapter i; with
`inject` the output is (1 - any) * out_global + sum_i w_i * out_i. Self-attention (attn1) with `isolate` forbids a
query inside some box from attending a key inside some box unless they share a box (background is unrestricted).
With `record`, cross-attention maps (per region, summed over its token indices, mean over heads) and each
region's self-attention mass on background keys are appended to the composition, with their autograd graph.
With `global_tokens` (one token group per region, positions in the GLOBAL prompt), the global branch's
cross-attention maps of those groups are appended to `global_maps` (detached): the attention the global prompt's
concept words really get, which latent guidance does not optimise (its loss reads the regional maps), so
leakage can be measured on them the same way as on the `set_adapters` baseline's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from athanor.convert.recipe_types import RecipeError

Box = tuple[float, float, float, float]
"""(x0, y0, x1, y1) as fractions of width/height in [0, 1], end-exclusive."""

LORA_FILE = "pytorch_lora_weights.safetensors"
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass
class Region:
    adapter: str | None  # peft adapter name loaded in the UNet (None: base weights, prompt only)
    box: Box
    embeds: torch.Tensor  # [1, L, D] text-encoder states of this concept's prompt
    token_indices: list[int]  # positions in that prompt whose cross-attention map is recorded


class Composition:
    """The regions, the global prompt and the switches one `RegionalAttnProcessor` reads, plus what it records."""

    def __init__(self, regions: list[Region], global_embeds: torch.Tensor, *, height: int, width: int,
                 isolate: bool = True, inject: bool = True, record: bool = False) -> None:
        if global_embeds.ndim != 3:
            raise RecipeError("lora_composer.global_embeds", tuple(global_embeds.shape),
                              "pass the text-encoder states of the global prompt as a [1 or B, L, D] tensor")
        if height < 1 or width < 1:
            raise RecipeError("lora_composer.height/width", (height, width), "pass the U-Net input's positive size")
        for i, region in enumerate(regions):
            _check_region(i, region, global_embeds.shape[-1])
        self.regions, self.global_embeds = list(regions), global_embeds
        self.height, self.width = height, width
        self.isolate, self.inject, self.record = isolate, inject, record
        self.active, self.maps, self.fg_bg_mass = True, [], []
        self.global_tokens: list[list[int]] | None = None
        self.global_maps: list[torch.Tensor] = []
        self._masks: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def adapters(self) -> list[str | None]:
        return [region.adapter for region in self.regions]

    def masks(self, h: int, w: int) -> torch.Tensor:
        """[R, h*w] float {0, 1}: the cells of an h×w grid whose centre lies inside each (end-exclusive) box."""
        if (h, w) not in self._masks:
            cy = (torch.arange(h, dtype=torch.float64) + 0.5) / h
            cx = (torch.arange(w, dtype=torch.float64) + 0.5) / w
            rows = [(((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]).reshape(-1)
                    for x0, y0, x1, y1 in (region.box for region in self.regions)]
            stacked = torch.stack(rows) if rows else torch.zeros(0, h * w, dtype=torch.bool)
            self._masks[(h, w)] = stacked.float()
        return self._masks[(h, w)]

    def layer_size(self, n: int) -> tuple[int, int]:
        """(h, w) of a layer with n query positions: the input size halved (rounding up, as stride-2 convs with
        padding 1 do) until it fits, else the aspect-ratio-preserving grid with n cells."""
        h, w = self.height, self.width
        while h * w > n and (h > 1 or w > 1):
            h, w = -(-h // 2), -(-w // 2)
        if h * w == n:
            return h, w
        h = max(1, round(math.sqrt(n * self.height / self.width)))
        if n % h == 0:
            return h, n // h
        raise ValueError(f"cannot infer an h×w grid with {n} positions from the {self.height}×{self.width} input; "
                         "check Composition(height=, width=) against the U-Net sample size")

    def reset(self) -> None:
        self.maps.clear()
        self.fg_bg_mass.clear()
        self.global_maps.clear()

    @contextmanager
    def empty_prompts(self, empty: torch.Tensor) -> Iterator[Composition]:
        """While the block runs, the global prompt and every region's prompt are `empty` ([1, L, D], the empty
        prompt's states) and nothing is recorded: the unconditional branch through the same regional adapters.
        Why: with the base model as the unconditional branch, CFG would multiply the adapters' whole effect by the
        guidance scale, while the `set_adapters` baseline keeps its adapters on in both branches."""
        saved = (self.global_embeds, [r.embeds for r in self.regions], self.record, self.global_tokens)
        self.global_embeds, self.record, self.global_tokens = empty, False, None
        for region in self.regions:
            region.embeds = empty
        try:
            yield self
        finally:
            self.global_embeds, embeds, self.record, self.global_tokens = saved
            for region, kept in zip(self.regions, embeds):
                region.embeds = kept


def _check_region(i: int, region: Region, dim: int) -> None:
    key = f"lora_composer.regions[{i}]"
    x0, y0, x1, y1 = (float(v) for v in region.box)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise RecipeError(f"{key}.box", region.box, "use (x0, y0, x1, y1) fractions with 0 <= x0 < x1 <= 1, "
                          "0 <= y0 < y1 <= 1")
    if region.embeds.ndim != 3 or region.embeds.shape[0] != 1 or region.embeds.shape[-1] != dim:
        raise RecipeError(f"{key}.embeds", tuple(region.embeds.shape),
                          f"pass the concept prompt's text-encoder states as a [1, L, {dim}] tensor")
    length = region.embeds.shape[1]
    if not region.token_indices or any(not 0 <= t < length for t in region.token_indices):
        raise RecipeError(f"{key}.token_indices", region.token_indices,
                          f"list the concept word's token positions, each in [0, {length})")


def _base(layer: nn.Module) -> nn.Module:
    return layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer


def _delta(layer: nn.Module, adapter: str | None, x: torch.Tensor) -> torch.Tensor | None:
    """Adapter `adapter`'s LoRA delta of `layer` on x, or None when the layer does not hold it."""
    if adapter is None or not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
        return None
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    out = lora_b(lora_a(layer.lora_dropout[adapter](x.to(lora_a.weight.dtype))))
    return (out * layer.scaling[adapter]).to(x.dtype)


def _regional(layer: nn.Module, x: torch.Tensor, weights: torch.Tensor, adapters: list[str | None]) -> torch.Tensor:
    """base(x) + sum_i weights[i] * delta_i(x) for x [B, N, C], weights [R, N]."""
    out = _base(layer)(x)
    for weight, adapter in zip(weights, adapters):
        delta = _delta(layer, adapter, x)
        if delta is not None:
            out = out + weight[None, :, None] * delta
    return out


def _full(layer: nn.Module, x: torch.Tensor, adapter: str | None) -> torch.Tensor:
    """base(x) + delta(x): the projection with one adapter on everywhere."""
    out, delta = _base(layer)(x), _delta(layer, adapter, x)
    return out if delta is None else out + delta


def _attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
            want_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention of [B, N, inner] tensors; probabilities [B, heads, N, S] (explicit softmax) only
    when asked for, otherwise SDPA."""
    batch, heads = q.shape[0], attn.heads
    head_dim = k.shape[-1] // heads
    q, k, v = (t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    probs = None
    if want_probs:
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        probs = (scores if bias is None else scores + bias).softmax(dim=-1)
        out = probs @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(q.dtype), probs


def _prepared_mask(attn: Attention, mask: torch.Tensor | None, keys: int, batch: int) -> torch.Tensor | None:
    """The U-Net's attention_mask as AttnProcessor2_0 prepares it: [B, heads, 1 or N, keys]."""
    if mask is None:
        return None
    mask = attn.prepare_attention_mask(mask, keys, batch)
    return mask.view(batch, attn.heads, -1, mask.shape[-1])


class RegionalAttnProcessor:
    """diffusers attention processor applying a `Composition` (see the module docstring); with
    `composition.active == False` it is diffusers' `AttnProcessor2_0` on the base weights (adapters off)."""

    def __init__(self, composition: Composition) -> None:
        self.composition = composition

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        grid = None
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            grid = (height, width)
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if not self.composition.active:
            out = self._plain(attn, hidden_states, encoder_hidden_states, attention_mask)
        elif encoder_hidden_states is not None:
            out = self._cross(attn, hidden_states, grid)
        else:
            out = self._self(attn, hidden_states, attention_mask, grid)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def _plain(attn: Attention, x: torch.Tensor, context: torch.Tensor | None,
               attention_mask: torch.Tensor | None) -> torch.Tensor:
        """AttnProcessor2_0 with base projections (after its norm/reshape prologue)."""
        batch = x.shape[0]
        if context is None:
            context = x
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        bias = _prepared_mask(attn, attention_mask, context.shape[1], batch)
        q, k, v = _base(attn.to_q)(x), _base(attn.to_k)(context), _base(attn.to_v)(context)
        out, _ = _attend(attn, q, k, v, bias, want_probs=False)
        return attn.to_out[1](_base(attn.to_out[0])(out))

    def _weights(self, x: torch.Tensor, grid: tuple[int, int] | None) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = grid if grid is not None else self.composition.layer_size(x.shape[1])
        return self.composition.masks(h, w).to(device=x.device, dtype=x.dtype), (h, w)

    def _context(self, attn: Attention, embeds: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        embeds = embeds.to(device=like.device, dtype=like.dtype).expand(like.shape[0], -1, -1)
        return attn.norm_encoder_hidden_states(embeds) if attn.norm_cross else embeds

    def _cross(self, attn: Attention, x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        comp = self.composition
        masks, (h, w) = self._weights(x, grid)
        weights = masks / masks.sum(0).clamp(min=1)
        adapters = comp.adapters
        q = _regional(attn.to_q, x, weights, adapters)
        glob = self._context(attn, comp.global_embeds, x)
        groups = comp.global_tokens
        out, probs = _attend(attn, q, _base(attn.to_k)(glob), _base(attn.to_v)(glob), None,
                             want_probs=groups is not None)
        if probs is not None:
            per_head = probs.mean(1).detach()
            comp.global_maps.append(torch.stack([per_head[..., g].sum(-1).reshape(-1, h, w) for g in groups])
                                    if groups else x.new_zeros(0, x.shape[0], h, w))
        if comp.inject or comp.record:
            mixed, maps = (masks.sum(0) == 0).to(x.dtype)[None, :, None] * out, []
            for region, weight in zip(comp.regions, weights):
                ctx = self._context(attn, region.embeds, x)
                k, v = _full(attn.to_k, ctx, region.adapter), _full(attn.to_v, ctx, region.adapter)
                out_i, probs = _attend(attn, q, k, v, None, want_probs=comp.record)
                mixed = mixed + weight[None, :, None] * out_i
                if probs is not None:
                    maps.append(probs.mean(1)[..., region.token_indices].sum(-1).reshape(-1, h, w))
            if comp.inject:
                out = mixed
            if comp.record:
                comp.maps.append(torch.stack(maps) if maps else x.new_zeros(0, x.shape[0], h, w))
        return attn.to_out[1](_regional(attn.to_out[0], out, weights, adapters))

    def _self(self, attn: Attention, x: torch.Tensor, attention_mask: torch.Tensor | None,
              grid: tuple[int, int] | None) -> torch.Tensor:
        comp = self.composition
        masks, _ = self._weights(x, grid)
        weights, adapters = masks / masks.sum(0).clamp(min=1), comp.adapters
        q, k, v = (_regional(layer, x, weights, adapters) for layer in (attn.to_q, attn.to_k, attn.to_v))
        inside = masks.sum(0) > 0
        bias = _prepared_mask(attn, attention_mask, x.shape[1], x.shape[0])
        if comp.isolate and len(comp.regions):
            forbidden = inside[:, None] & inside[None, :] & ((masks.T @ masks) == 0)
            iso = torch.zeros(forbidden.shape, dtype=q.dtype, device=q.device).masked_fill(forbidden, float("-inf"))
            bias = iso if bias is None else bias + iso
        record = comp.record and comp.isolate
        out, probs = _attend(attn, q, k, v, bias, want_probs=record)
        if probs is not None:
            on_background = probs.mean(1)[..., ~inside].sum(-1)  # [B, N]
            comp.fg_bg_mass.append((on_background[None] * masks[:, None]).sum(-1) / masks.sum(-1).clamp(min=1)[:, None])
        return attn.to_out[1](_regional(attn.to_out[0], out, weights, adapters))


def attach(unet: nn.Module, composition: Composition) -> dict:
    """Install one `RegionalAttnProcessor` on every attention module; returns the previous processors."""
    loaded = getattr(unet, "peft_config", {})
    for i, adapter in enumerate(composition.adapters):
        if adapter is not None and adapter not in loaded:
            raise RecipeError(f"lora_composer.regions[{i}].adapter", adapter,
                              f"load it first with load_concept_adapters; loaded adapters: {sorted(loaded)}")
    previous = dict(unet.attn_processors)
    unet.set_attn_processor(RegionalAttnProcessor(composition))
    return previous


def detach(unet: nn.Module, previous: dict) -> None:
    unet.set_attn_processor(previous)


@contextmanager
def composed(unet: nn.Module, composition: Composition) -> Iterator[Composition]:
    previous = attach(unet, composition)
    try:
        yield composition
    finally:
        detach(unet, previous)

"""LinVideo surgery (2025): move a video diffusion transformer's self-attention layers to O(n) linear
attention through diffusers' attention processors (`set_attn_processor`; no monkeypatching).

    .venv/bin/python -m pytest tests/convert/test_linvideo.py -q

`install` puts a hybrid processor on each candidate layer: o = r·softmax_attn + (1 − r)·linear_attn,
one learnable gate r ∈ [0, 1] per layer (starting at 1, so the student starts as the teacher), the
linear branch from `kernels.linear_attention` (non-causal) with separate query and key feature maps
(Hedgehog by default). The gate and the maps live in a `linvideo` submodule of the attention module,
so they are ordinary parameters of the model (optimizer, DDP, DeepSpeed see them). `switch` ends the
selection: layers chosen for linear attention get a pure linear processor (no softmax branch, no N×N
work), the others get their original processor back and lose the gate. `save_student`/`load_student`
write and restore that state: a diffusers model directory `from_pretrained` loads, plus
`linvideo.json` (which layers are linear, the feature maps) and `linvideo.safetensors` (their weights).

Supported: `WanTransformer3DModel` (`blocks.N.attn1`), `CogVideoXTransformer3DModel`
(`transformer_blocks.N.attn1`, joint text+video attention) and any diffusers model whose
self-attention modules the recipe names (diffusers `Attention`, to_q/to_k/to_v/to_out). Cross-attention
is never touched.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from athanor.convert.recipe_types import RecipeError
from athanor.kernels.feature_maps import HedgehogFeatureMap
from athanor.kernels.linear_attention import Layout, linear_attention

Mode = Literal["hybrid", "linear"]
FeatureMapName = Literal["hedgehog", "elu+1", "relu"]
DEFAULT_CANDIDATES = {"WanTransformer3DModel": "blocks.{}.attn1",
                      "CogVideoXTransformer3DModel": "transformer_blocks.{}.attn1"}
CONFIG_FILE, WEIGHTS_FILE = "linvideo.json", "linvideo.safetensors"


class LinVideoGate(nn.Module):
    """Per-layer state: the gate r (hybrid mode only) and the linear branch's query/key feature maps."""

    def __init__(self, heads: int, head_dim: int, feature_map: FeatureMapName = "hedgehog",
                 feature_dim: int | None = None, mode: Mode = "hybrid") -> None:
        super().__init__()
        self.heads, self.head_dim, self.feature_map_name, self.mode = heads, head_dim, feature_map, mode
        self.feature_dim = feature_dim or head_dim
        self.maps = (nn.ModuleList([HedgehogFeatureMap(heads, head_dim, self.feature_dim) for _ in range(2)])
                     if feature_map == "hedgehog" else None)
        self.r = nn.Parameter(torch.ones(1)) if mode == "hybrid" else None  # 1-d: DeepSpeed cannot broadcast 0-d
        self.transfer_error: torch.Tensor | None = None
        """Mean squared gap between the linear and the (detached) softmax branch at the last hybrid call:
        the attention-transfer signal that trains the feature maps toward the softmax output."""

    def linear(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout = "bhnd") -> torch.Tensor:
        fmap = self.maps if self.maps is not None else self.feature_map_name
        return linear_attention(q, k, v, causal=False, feature_map=fmap, layout=layout)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None, layout: Layout = "bhnd") -> torch.Tensor:
        """[batch, heads, tokens, dim] (or [batch, tokens, heads, dim] with layout='bnhd') in and out.
        Hybrid: r·softmax + (1 − r)·linear; linear: linear only. Video self-attention is unmasked; a
        mask is refused rather than honoured by one branch only."""
        if mask is not None:
            raise ValueError("LinVideo's linear attention takes no attention mask: this layer got one; "
                             "leave masked layers out of linvideo.candidate_layers")
        if self.mode == "linear":
            return self.linear(q, k, v, layout)
        if layout == "bnhd":
            soft = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        else:
            soft = F.scaled_dot_product_attention(q, k, v)
        lin = self.linear(q, k, v, layout)
        self.transfer_error = (lin.float() - soft.detach().float()).pow(2).mean()
        r = self.r.clamp(0.0, 1.0).to(soft.dtype)
        return r * soft + (1 - r) * lin.to(soft.dtype)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, heads={self.heads}, head_dim={self.head_dim}, feature_map={self.feature_map_name}"


def _wan_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on [batch, tokens, heads, dim]: each pair of adjacent channels (2i, 2i+1)
    turned by its angle, as one complex multiplication by `freqs` = cos + i·sin [1, tokens, 1, dim/2]
    (one pass over x; diffusers' real-valued form takes six elementwise passes and two strided copies).
    Computed in float32 (as the real form, whose cos/sin are float32) and returned in x's dtype."""
    z = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(z * freqs).flatten(-2).to(x.dtype)


class WanLinVideoProcessor:
    """Processor for `WanAttention` self-attention (`attn1`): Wan's projections, RMS norms and RoPE,
    then the layer's gate decides how the tokens attend."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("LinVideo replaces self-attention only; this Wan layer got encoder_hidden_states")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:  # cos/sin repeat each pair's angle over its two channels
            freqs = torch.complex(rotary_emb[0][..., 0::2].float(), rotary_emb[1][..., 1::2].float())
            query, key = _wan_rope(query, freqs), _wan_rope(key, freqs)
        # [batch, tokens, heads, dim] all the way, as the softmax processor hands it to SDPA: the kernel
        # reads the strided heads and returns contiguous tokens in the query's dtype, so merging the
        # heads below is a view (no transpose copy and no cast of our own).
        out = attn.linvideo.attend(query, key, value, attention_mask, layout="bnhd")
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3)))


class JointLinVideoProcessor:
    """Processor for diffusers `Attention` self-attention, CogVideoX's joint text+video attention
    included: with `encoder_hidden_states` the text tokens are prepended (RoPE on the video part only)
    and the output is split back into (video, text), as `CogVideoXAttnProcessor2_0` does."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        text_len = 0 if encoder_hidden_states is None else encoder_hidden_states.size(1)
        if text_len:
            hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, tokens, _ = hidden_states.shape
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, tokens, batch).view(batch, attn.heads, -1, tokens)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (t.view(batch, tokens, attn.heads, -1).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
            key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)
        out = attn.linvideo.attend(query, key, value, mask)
        out = out.transpose(1, 2).reshape(batch, tokens, -1).type_as(query)
        out = attn.to_out[1](attn.to_out[0](out))
        if not text_len:
            return out
        text, video = out.split([text_len, tokens - text_len], dim=1)
        return video, text


def _processor_for(attn: nn.Module) -> Any:
    if type(attn).__name__ == "WanAttention":
        return WanLinVideoProcessor()
    if hasattr(attn, "to_q") and hasattr(attn, "to_out") and hasattr(attn, "heads"):
        return JointLinVideoProcessor()
    raise TypeError(f"{type(attn).__name__} is not a diffusers attention module LinVideo knows")


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module with an attention processor, by name ('blocks.0.attn1', ...)."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "processor") and hasattr(m, "set_processor")}


def candidate_layers(model: nn.Module, names: list[str] | None = None,
                     key: str = "linvideo.candidate_layers") -> list[str]:
    """The self-attention layers that may become linear: `names` (checked) or the architecture's default."""
    found = attention_modules(model)
    cls = type(model).__name__
    if names:
        for name in names:
            if name not in found:
                hint = [n for n in found if not _is_cross(found[n])][:6]
                raise RecipeError(key, name, f"{cls} has no attention module of that name; its self-attention "
                                             f"modules are named like {hint}")
            if _is_cross(found[name]):
                raise RecipeError(key, name, "that is a cross-attention module; LinVideo converts self-attention only")
        if len(set(names)) != len(names):
            raise RecipeError(key, names, "a layer is listed twice; list each candidate once")
        return list(names)
    if cls not in DEFAULT_CANDIDATES:
        raise RecipeError("teacher", cls, "LinVideo converts diffusers video transformers (WanTransformer3DModel, "
                                          "CogVideoXTransformer3DModel); for another diffusers DiT list its "
                                          "self-attention modules in linvideo.candidate_layers")
    pattern = DEFAULT_CANDIDATES[cls]
    return [name for i in range(len(found)) if (name := pattern.format(i)) in found]


def _is_cross(attn: nn.Module) -> bool:
    return (bool(getattr(attn, "is_cross_attention", False))
            or getattr(attn, "cross_attention_dim_head", None) is not None)


def _heads(attn: nn.Module) -> tuple[int, int]:
    inner = attn.to_q.out_features
    return attn.heads, inner // attn.heads


def install(model: nn.Module, layers: list[str], *, feature_map: FeatureMapName = "hedgehog",
            feature_dim: int | None = None, mode: Mode = "hybrid") -> dict[str, LinVideoGate]:
    """Put a LinVideo processor (and a fresh gate) on each named layer; returns the gates by layer name.
    The original processors are kept on the module (`linvideo_original`) for `switch` to restore."""
    modules = attention_modules(model)
    gates = {}
    for name in layers:
        attn = modules[name]
        heads, head_dim = _heads(attn)
        ref = next(attn.parameters())
        attn.linvideo = LinVideoGate(heads, head_dim, feature_map, feature_dim, mode).to(ref.device)
        if not hasattr(attn, "linvideo_original"):
            attn.linvideo_original = attn.processor
        attn.set_processor(_processor_for(attn))
        gates[name] = attn.linvideo
    return gates


def gates(model: nn.Module) -> dict[str, LinVideoGate]:
    """The installed gates by layer name (hybrid and linear)."""
    return {name: m.linvideo for name, m in attention_modules(model).items()
            if isinstance(getattr(m, "linvideo", None), LinVideoGate)}


def gate_values(model: nn.Module) -> dict[str, float]:
    """r per hybrid layer, clamped to [0, 1]."""
    return {name: float(g.r.detach().clamp(0, 1)) for name, g in gates(model).items() if g.r is not None}


def choose_linear(model: nn.Module, target: int) -> list[str]:
    """The `target` hybrid layers to make linear: those rounded to 0 when rounding gives exactly the
    target, otherwise the `target` lowest r. Ties (e.g. every r still at its initial 1) go to layers
    spread evenly over the candidates, so an untrained student is a reproducible spread-out choice."""
    values = gate_values(model)
    names = list(values)
    if not 0 <= target <= len(names):
        raise ValueError(f"target {target} outside 0..{len(names)} hybrid layers")
    even = _evenly_spaced(names, target)
    spread = {n: i for i, n in enumerate(even + [n for n in names if n not in even])}
    ranked = sorted(names, key=lambda n: (round(values[n], 6), spread[n]))
    return sorted(ranked[:target], key=names.index)


def _evenly_spaced(names: list[str], k: int) -> list[str]:
    if k <= 0:
        return []
    n = len(names)
    return [names[min(n - 1, math.floor((i + 0.5) * n / k))] for i in range(k)]


def switch(model: nn.Module, linear_layers: list[str]) -> None:
    """End the selection: `linear_layers` become pure linear attention (the gate's feature maps kept,
    r dropped), every other hybrid layer gets its original processor back and loses its gate.
    A name without a gate is an error (checked before anything changes): a typo would otherwise
    silently turn that layer back to softmax attention."""
    unknown = [name for name in linear_layers if name not in gates(model)]
    if unknown:
        raise ValueError(f"switch: {unknown} have no LinVideo gate; the gated layers are {list(gates(model))}")
    for name, attn in attention_modules(model).items():
        gate = getattr(attn, "linvideo", None)
        if not isinstance(gate, LinVideoGate) or gate.mode != "hybrid":
            continue
        if name in linear_layers:
            gate.mode, gate.r, gate.transfer_error = "linear", None, None
        else:
            attn.set_processor(attn.linvideo_original)
            del attn.linvideo
            del attn.linvideo_original


def is_switched(model: nn.Module) -> bool:
    """True when no hybrid layer is left."""
    return all(g.mode == "linear" for g in gates(model).values())


def linear_layers(model: nn.Module) -> list[str]:
    return [name for name, g in gates(model).items() if g.mode == "linear"]


def _strip(model: nn.Module) -> dict[str, tuple[LinVideoGate, Any]]:
    """Detach gates (and processors) so the model saves as plain diffusers; `_restore` puts them back."""
    held = {}
    for name, attn in attention_modules(model).items():
        if isinstance(getattr(attn, "linvideo", None), LinVideoGate):
            held[name] = (attn.linvideo, attn.processor)
            del attn.linvideo
            attn.set_processor(attn.linvideo_original)
    return held


def _restore(model: nn.Module, held: dict[str, tuple[LinVideoGate, Any]]) -> None:
    modules = attention_modules(model)
    for name, (gate, processor) in held.items():
        modules[name].linvideo = gate
        modules[name].set_processor(processor)


def save_student(model: nn.Module, out_dir: Path, extra: dict | None = None) -> Path:
    """A diffusers directory (`save_pretrained`) with the linear layers' state beside it."""
    if not is_switched(model):
        raise ValueError("save_student needs a switched model: call switch() to end the selection first")
    out_dir = Path(out_dir)
    state = {name: g for name, g in gates(model).items()}
    held = _strip(model)
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        _restore(model, held)
    weights = {f"{name}.{k}": v.detach().contiguous().cpu()
               for name, g in state.items() for k, v in g.state_dict().items()}
    if weights:
        save_file(weights, out_dir / WEIGHTS_FILE)
    layers = {name: {"heads": g.heads, "head_dim": g.head_dim, "feature_map": g.feature_map_name,
                     "feature_dim": g.feature_dim} for name, g in state.items()}
    (out_dir / CONFIG_FILE).write_text(json.dumps({"linear_layers": layers, **(extra or {})}, indent=1))
    return out_dir


def load_student(path: str | Path, model_class: type | None = None, **kwargs: Any) -> nn.Module:
    """`from_pretrained` the directory and restore its linear-attention layers from `linvideo.json`."""
    path = Path(path)
    if model_class is None:
        import diffusers

        model_class = getattr(diffusers, json.loads((path / "config.json").read_text())["_class_name"])
    model = model_class.from_pretrained(path, **kwargs)
    spec = json.loads((path / CONFIG_FILE).read_text())["linear_layers"]
    weights = load_file(path / WEIGHTS_FILE) if (path / WEIGHTS_FILE).exists() else {}
    for name, layer in spec.items():
        gate = install(model, [name], feature_map=layer["feature_map"], feature_dim=layer["feature_dim"],
                       mode="linear")[name]
        own = {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}
        gate.load_state_dict(own)
    return model


def attention_cost(config: dict, tokens: int, linear: int, layers: int, feature_dim: int | None = None,
                   text_tokens: int = 0, feature_map: FeatureMapName = "hedgehog") -> dict[str, float]:
    """Multiply-accumulates of the self-attention core per denoising step (one sample), per head:
    softmax 2·n²·d (QKᵀ, then AV); linear 2·n·F·d for the two GEMMs (Σφ(k)vᵀ, then φ(q)·S) over F
    features, plus Hedgehog's query and key projections 2·n·d·f (F = 2f after its ± softmax; elu+1
    and relu keep F = d and project nothing). The q/k/v/out projections are the same in both and
    left out, as are elementwise ops."""
    heads = int(config.get("num_attention_heads", 1))
    head_dim = int(config.get("attention_head_dim", 64))
    n = tokens + text_tokens
    f_dim = feature_dim or head_dim
    softmax = 2 * n * n * head_dim * heads
    if feature_map == "hedgehog":
        lin = (2 * n * (2 * f_dim) * head_dim + 2 * n * head_dim * f_dim) * heads
    else:
        lin = 2 * n * head_dim * head_dim * heads
    before = layers * softmax
    after = (layers - linear) * softmax + linear * lin
    return {"tokens": n, "softmax_layer_macs": softmax, "linear_layer_macs": lin, "before_macs": before,
            "after_macs": after, "ratio": before / max(after, 1)}

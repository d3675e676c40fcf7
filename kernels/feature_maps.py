"""Feature maps φ for linear attention: `elu+1`, `relu`, and the learnable Hedgehog map.

Hedgehog (Zhang et al. 2024, "The Hedgehog & the Porcupine") is φ(x) = softmax(xW) ⊕ softmax(−xW)
per head, W learnable, so φ has 2·feature_dim features. Hedgehog and LoLCATs learn one map for the
queries and another for the keys: pass the pair `(query_map, key_map)` wherever a feature map is
taken (a single map is used for both). Maps yield float32 features (why: softmax and elu outputs in
fp16/bf16 lose the small entries that dominate long sums); Hedgehog's projection runs in the input's
dtype, its softmax in float32.
Tested by `.venv/bin/python -m pytest tests/kernels/test_linear_attention.py -q`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

MapFn = Callable[[torch.Tensor], torch.Tensor]
SingleMap = str | nn.Module | MapFn
FeatureMap = SingleMap | tuple[SingleMap, SingleMap] | list[SingleMap] | nn.ModuleList  # pair: (query, key)
NAMED_MAPS = ("elu+1", "relu")


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x.float()) + 1.0


def relu_map(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x.float())


class HedgehogFeatureMap(nn.Module):
    """φ(x) = softmax(x W_h) ⊕ softmax(−x W_h) for each head h, on `[batch, heads, tokens, head_dim]`.

    W starts as the identity (as in LoLCATs) when feature_dim == head_dim, so the map starts
    as a softmax over the raw query/key coordinates; otherwise it starts as a small random matrix.
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None) -> None:
        super().__init__()
        if num_heads < 1 or head_dim < 1:
            raise ValueError(f"num_heads={num_heads}, head_dim={head_dim}: both must be >= 1")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.feature_dim = head_dim if feature_dim is None else feature_dim
        if self.feature_dim < 1:
            raise ValueError(f"feature_dim={feature_dim}: must be >= 1")
        weight = torch.empty(num_heads, head_dim, self.feature_dim)
        if self.feature_dim == head_dim:
            weight.copy_(torch.eye(head_dim).expand(num_heads, -1, -1))
        else:
            nn.init.normal_(weight, std=head_dim**-0.5)
        self.weight = nn.Parameter(weight)

    @property
    def out_dim(self) -> int:
        return 2 * self.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_heads or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"Hedgehog map built for [batch, {self.num_heads}, tokens, {self.head_dim}], "
                f"got {tuple(x.shape)}"
            )
        # One GEMM against [W | −W] and one softmax over the two halves: the same features as
        # softmax(xW) ⊕ softmax(−xW) without a negation pass and a concatenation copy. The GEMM runs
        # in x's dtype and layout (tensor cores for fp16/bf16, fp32 accumulation; no cast or copy of
        # x, strided x such as a [B, N, H, D] projection seen as [B, H, N, D] included); the softmax
        # reads its logits in float32 and writes float32 features, whose small entries then survive.
        weight = self.weight.to(x.dtype)
        proj = torch.matmul(x, torch.cat([weight, -weight], dim=-1))  # [B, H, N, 2F]
        return proj.unflatten(-1, (2, self.feature_dim)).softmax(-1, dtype=torch.float32).flatten(-2)


def resolve_feature_maps(feature_map: FeatureMap) -> tuple[MapFn, MapFn]:
    """(query map, key map): a pair `(query_map, key_map)` as given (Hedgehog/LoLCATs learn two maps;
    an nn.ModuleList of two also counts), or one map used for both. Each goes through
    `resolve_feature_map`."""
    if isinstance(feature_map, (tuple, list, nn.ModuleList)):
        if len(feature_map) != 2:
            raise ValueError(
                f"feature_map is a {type(feature_map).__name__} of {len(feature_map)}: a pair must be "
                "(query_map, key_map)"
            )
        return resolve_feature_map(feature_map[0]), resolve_feature_map(feature_map[1])
    fmap = resolve_feature_map(feature_map)
    return fmap, fmap


def resolve_feature_map(feature_map: SingleMap) -> MapFn:
    """A name from NAMED_MAPS, a HedgehogFeatureMap (or any module), or a callable on tensors."""
    if isinstance(feature_map, str):
        if feature_map == "elu+1":
            return elu_plus_one
        if feature_map == "relu":
            return relu_map
        if feature_map == "hedgehog":
            raise ValueError(
                "feature_map='hedgehog' has learnable weights: pass a HedgehogFeatureMap(num_heads, "
                "head_dim) module instead of the string"
            )
        raise ValueError(f"feature_map={feature_map!r}: use one of {NAMED_MAPS} or a HedgehogFeatureMap")
    if callable(feature_map):
        return feature_map
    raise ValueError(f"feature_map={feature_map!r} is neither a name nor callable")

"""Runs every Triton kernel under the CPU interpreter against its PyTorch reference; prints JSON.

Not a test module: `test_triton_interpreter.py` runs it in a subprocess with TRITON_INTERPRET=1,
so the interpreter setting (read when triton is imported) never leaks into other tests.
By hand: `TRITON_INTERPRET=1 .venv/bin/python tests/kernels/triton_interp_cases.py`.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from athanor.kernels.compare import backend_errors, random_qkv
from athanor.kernels.linear_attention import HedgehogFeatureMap, linear_attention
from athanor.kernels.sparse_attention import s2_attention, sf_attention

# name: (b, h, hk, n, d, causal, feature map, padded, dtype); "hedgehog_pair": separate query/key maps
LINEAR = {
    "linear_noncausal_elu": (2, 2, 2, 37, 8, False, "elu+1", False, torch.float32),
    "linear_causal_elu": (2, 2, 2, 37, 8, True, "elu+1", False, torch.float32),
    "linear_causal_relu_gqa2": (1, 4, 2, 20, 8, True, "relu", False, torch.float32),
    "linear_noncausal_hedgehog": (1, 2, 2, 33, 8, False, "hedgehog", False, torch.float32),
    "linear_causal_hedgehog": (1, 2, 2, 33, 8, True, "hedgehog", False, torch.float32),
    "linear_causal_one_token": (1, 2, 2, 1, 8, True, "elu+1", False, torch.float32),
    "linear_noncausal_elu_padded": (2, 2, 2, 37, 8, False, "elu+1", True, torch.float32),
    "linear_causal_elu_padded": (2, 2, 2, 37, 8, True, "elu+1", True, torch.float32),
    "linear_noncausal_hedgehog_pair_padded_gqa2": (2, 4, 2, 33, 8, False, "hedgehog_pair", True, torch.float32),
    "linear_causal_hedgehog_pair_gqa2": (1, 4, 2, 33, 8, True, "hedgehog_pair", False, torch.float32),
    "linear_causal_fp16": (1, 2, 2, 24, 16, True, "elu+1", False, torch.float16),
    "linear_noncausal_fp16_padded": (2, 2, 2, 24, 16, False, "elu+1", True, torch.float16),
    "linear_causal_hedgehog_fp16": (1, 2, 2, 24, 16, True, "hedgehog", False, torch.float16),
    "linear_noncausal_bf16": (1, 2, 2, 24, 16, False, "elu+1", False, torch.bfloat16),
}
# name: (fn, b, h, hk, n, d, group, sinks, causal, padded, dtype)
SPARSE = {
    "sf_causal_gqa1": ("sf", 2, 4, 4, 37, 16, 8, 4, True, False, torch.float32),
    "sf_noncausal_gqa2": ("sf", 2, 4, 2, 37, 8, 8, 4, False, False, torch.float32),
    "sf_causal_gqa4_padded": ("sf", 2, 4, 1, 40, 16, 8, 4, True, True, torch.float32),
    "sf_large_groups_many_sinks": ("sf", 1, 2, 2, 70, 16, 20, 20, True, False, torch.float32),
    "sf_noncausal_padded_odd_heads": ("sf", 2, 3, 3, 30, 16, 6, 5, False, True, torch.float32),
    "s2_causal_gqa2": ("s2", 2, 4, 2, 45, 16, 16, 0, True, False, torch.float32),
    "s2_noncausal_padded": ("s2", 2, 4, 4, 33, 16, 12, 0, False, True, torch.float32),
    "sf_one_token": ("sf", 1, 2, 1, 1, 16, 4, 4, True, False, torch.float32),
    "sf_causal_fp16": ("sf", 1, 4, 2, 40, 16, 8, 4, True, False, torch.float16),
    # Non-causal, sinks reaching past a query block's groups (blocks are 16 under the interpreter).
    "sf_noncausal_many_sinks": ("sf", 1, 4, 2, 40, 16, 4, 24, False, False, torch.float32),
    "sf_noncausal_many_sinks_padded_fp16": ("sf", 2, 4, 4, 40, 16, 4, 24, False, True, torch.float16),
    "sf_noncausal_sinks_past_half_groups": ("sf", 2, 3, 3, 70, 16, 12, 40, False, True, torch.float32),
}


def _padding(b: int, n: int) -> torch.Tensor:
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[0, :3], keep[-1, n - 5 :] = False, False  # left padding, right padding
    return keep


def _linear_case(b, h, hk, n, d, causal, fmap_name, padded, dtype) -> dict[str, float]:
    q, k, v = random_qkv(b, h, hk, n, d, dtype)
    if fmap_name == "relu":  # keep φ(q)·Σφ(k) away from 0, where fp32 results legitimately differ
        q, k = (t.detach().add(1.0).requires_grad_() for t in (q, k))
    maps: list[HedgehogFeatureMap] = []
    fmap = fmap_name
    if fmap_name.startswith("hedgehog"):
        torch.manual_seed(1)
        maps = [HedgehogFeatureMap(h, d, feature_dim=6) for _ in range(2 if fmap_name == "hedgehog_pair" else 1)]
        fmap = tuple(maps) if len(maps) == 2 else maps[0]
    names = ["dq", "dk", "dv"] + (["dWq", "dWk"] if len(maps) == 2 else ["dW"] * len(maps))
    kw = dict(causal=causal, feature_map=fmap, chunk_size=16, attention_mask=_padding(b, n) if padded else None)
    run = lambda be: linear_attention(q, k, v, backend=be, **kw)  # noqa: E731
    return backend_errors(run, [q, k, v] + [m.weight for m in maps], names)


def _sparse_case(fn, b, h, hk, n, d, group, sinks, causal, padded, dtype) -> dict[str, float]:
    q, k, v = random_qkv(b, h, hk, n, d, dtype)
    kw = dict(group_size=group, causal=causal, attention_mask=_padding(b, n) if padded else None)
    if fn == "sf":
        run = lambda be: sf_attention(q, k, v, num_sink=sinks, backend=be, **kw)  # noqa: E731
    else:
        run = lambda be: s2_attention(q, k, v, backend=be, **kw)  # noqa: E731
    return backend_errors(run, [q, k, v], ["dq", "dk", "dv"])


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (the kernels run on CPU tensors only under the interpreter)")
    report = {name: _linear_case(*case) for name, case in LINEAR.items()}
    report |= {name: _sparse_case(*case) for name, case in SPARSE.items()}
    # The dispatcher must really have taken the Triton path (the reference never imports these).
    report["_dispatch"] = {m: float(m in sys.modules) for m in (
        "athanor.kernels._linear_triton", "athanor.kernels._sparse_triton")}
    print(json.dumps(report))


if __name__ == "__main__":
    main()

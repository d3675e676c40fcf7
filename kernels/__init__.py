"""Fast attention kernels: one dispatching function each, Triton on CUDA, PyTorch reference elsewhere.

* `linear_attention(q, k, v, causal=..., feature_map='elu+1' | 'relu' | HedgehogFeatureMap |
  (query_map, key_map), attention_mask=None)`
* `s2_attention(q, k, v, group_size=...)`, `sf_attention(q, k, v, group_size=..., num_sink=4)`

Depends on torch (and triton, imported only when the Triton path runs).
Tests: `.venv/bin/python -m pytest tests/kernels -q`; benchmark: `.venv/bin/python benchmarks/attention.py`.
"""

from kernels.feature_maps import HedgehogFeatureMap
from kernels.linear_attention import linear_attention
from kernels.sparse_attention import s2_attention, sf_attention

__all__ = ["HedgehogFeatureMap", "linear_attention", "s2_attention", "sf_attention"]

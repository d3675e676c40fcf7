"""SinkLoRA (issue 11): long-context LoRA through SF-Attn, evaluated with full attention, exported merged.

Where its pieces live:

- surgery: convert/sinklora/ (attention.py, lora.py, student.py) and convert/h2o_cache.py
- distill/sinklora/config.py: recipe sections `student:` (SinkLoRAStudent) and `sinklora:` (SinkLoRAArgs)
- distill/sinklora/method.py: the protocol class `SinkLoRA`
- distill/sinklora/data.py: book tokens and chunks
- distill/sinklora/train.py: the LightningModule
- distill/sinklora/evaluation.py: perplexity, passkey and cache metrics
- distill/sinklora/testbed.py, testbed/: the shipped testbed (package data)
- recipes: recipes/sinklora_tiny.yaml, recipes/sinklora_smollm2.yaml, recipes/sinklora_smollm2_cpu.yaml
- tests: tests/distill/sinklora/, tests/convert/test_sinklora_attention.py, tests/convert/test_sinklora_lora.py,
  tests/convert/test_sinklora_student.py, tests/recipes/test_sinklora_recipe.py
- registry: `"sinklora": "athanor.distill.sinklora:SinkLoRA"` in jobs/methods.py
- benchmarks: benchmarks/sinklora.py, benchmarks/h2o_budget.py
"""

from athanor.distill.sinklora.config import SinkLoRAArgs, SinkLoRAStudent
from athanor.distill.sinklora.method import SinkLoRA

__all__ = ["SinkLoRA", "SinkLoRAArgs", "SinkLoRAStudent"]

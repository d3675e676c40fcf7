"""MiniLM: deep self-attention distillation of BERT-family encoders.

Where its pieces live:

- surgery: convert/minilm.py (student surgery; also `MiniLMStudent`, the `student:` section)
- distill/minilm/config.py: recipe sections `minilm:` (MiniLMArgs, RelationWeights); `student:` re-exported
- distill/minilm/method.py: the protocol class `MiniLM` (evaluation, export)
- distill/minilm/loss.py: relation and output losses
- distill/minilm/module.py: the LightningModule
- distill/minilm/export.py: sentence-transformers export
- recipes: recipes/minilm.yaml, recipes/minilm_tiny.yaml
- tests: tests/distill/minilm/, tests/convert/test_minilm.py, tests/recipes/test_minilm_recipe.py
- registry: `"minilm": "athanor.distill.minilm:MiniLM"` in jobs/methods.py
- benchmarks: benchmarks/minilm_step.py
"""

from athanor.distill.minilm.method import MiniLM

__all__ = ["MiniLM"]

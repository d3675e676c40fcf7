"""SentenceVAE: a sentence-level LLM (one cache position per sentence) from a causal LM.

Where its pieces live:

- surgery: convert/sentencevae/ (segment.py, vae.py, sllm.py: the sentence encoder/decoder and the SLLM)
- distill/sentencevae/config.py: recipe sections `student:` (SentenceVAEStudent) and `sentencevae:`
  (SentenceVAEArgs)
- distill/sentencevae/method.py: the protocol class `SentenceVAE`
- distill/sentencevae/train.py: the two-stage LightningModule
- distill/sentencevae/evaluation.py: perplexity, reconstruction and cache metrics
- distill/sentencevae/harness_lm.py: the lm-eval wrapper
- recipes: recipes/sentencevae.yaml, recipes/sentencevae_tiny.yaml, recipes/sentencevae_smollm2.yaml,
  recipes/sentencevae_smollm2_slurm_2x8.yaml
- tests: tests/distill/sentencevae/, tests/convert/sentencevae/, tests/recipes/test_sentencevae_recipe.py
- registry: `"sentencevae": "athanor.distill.sentencevae:SentenceVAE"` in jobs/methods.py
- benchmarks: benchmarks/sentencevae.py
"""

from athanor.distill.sentencevae.method import SentenceVAE

__all__ = ["SentenceVAE"]

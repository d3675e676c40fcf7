"""LinVideo: data-free conversion of a video diffusion transformer's self-attention to linear attention.

Where its pieces live:

- surgery: convert/linvideo.py (hybrid/linear attention layers, switching)
- distill/linvideo/config.py: recipe sections `student:` (LinVideoStudent) and `linvideo:` (LinVideoArgs)
- distill/linvideo/method.py: the protocol class `LinVideo`
- distill/linvideo/teacher.py: the testbed teacher
- distill/linvideo/data.py: trajectory caches
- distill/linvideo/train.py: the LightningModule
- distill/linvideo/loss.py: ADM / velocity objectives
- distill/linvideo/rollout.py: x̂_t from the student's own sampler (ADM on its rollout)
- distill/linvideo/arms.py: comparison arms (`linvideo.compare`) and their summary
- distill/linvideo/sampling.py: clip sampling
- distill/linvideo/evaluation.py: clip metrics
- distill/linvideo/moving_fashion.py: testbed clips
- distill/linvideo/testbed/: the shipped testbed (package data)
- recipes: recipes/linvideo_tiny.yaml, recipes/linvideo_wan1.3b.yaml
- tests: tests/distill/linvideo/, tests/convert/test_linvideo.py, tests/recipes/test_linvideo_recipe.py
- registry: `"linvideo": "athanor.distill.linvideo:LinVideo"` in jobs/methods.py
- benchmarks: benchmarks/linvideo.py
"""

from athanor.distill.linvideo.method import LinVideo

__all__ = ["LinVideo"]

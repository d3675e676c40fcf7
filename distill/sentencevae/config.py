"""SentenceVAE's recipe sections: `student:` and `sentencevae:` (pydantic, validated by `athanor validate`).

Kept apart from `method.py` so that the rest of the package (training, evaluation) can import the
settings without importing the method, and a reader finds every recipe key of the method in one file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from athanor.convert.recipe_types import Text
from athanor.distill.spec import DataSpec, Section

__all__ = ["LENGTH_EDGES", "SentenceVAEStudent", "SentenceVAEArgs"]


LENGTH_EDGES = (2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512)
"""The bucket edges `sentencevae.length_buckets` may use. Each bucket is a metric key (recon_token_acc_len_5_8)
that the method must declare up front, so edges come from this ladder (up to the largest max_sentence_tokens)."""


class SentenceVAEStudent(Section):
    """The recipe's `student:` section: sizes of the sentence encoder and decoder."""

    encoder_layers: int = Field(1, ge=1, le=4)
    """Transformer layers of the sentence encoder."""
    decoder_layers: int = Field(1, ge=1, le=4)
    """Causal Transformer layers of the sentence decoder."""
    heads: int = Field(4, ge=1)
    """Attention heads of encoder and decoder (must divide the LM's hidden size)."""
    ffn_size: int | None = Field(None, ge=1)
    """MLP width of encoder and decoder layers (default: 4 × the LM's hidden size)."""
    pooling: Literal["sum", "weighted"] = "weighted"
    """Masked sum, or softmax-weighted sum with learned scores, of the encoder's token states."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout in encoder and decoder layers."""


class SentenceVAEArgs(Section):
    """The recipe's `sentencevae:` section."""

    max_sentence_tokens: int = Field(32, ge=2, le=512)
    """Token cap per sentence; longer sentences are split at the cap."""
    max_sentences: int = Field(16, ge=1)
    """Sentences kept per passage."""
    split_on_newline: bool = True
    """Also end a sentence at every newline (besides . ! ? ; : and CJK punctuation)."""
    extra_abbreviations: list[Text] = Field(default_factory=list)
    """Words ending in '.' that must not end a sentence, added to the built-in list (e.g. 'approx.')."""
    stage1_steps: int = Field(100, ge=1)
    """Optimizer steps of stage 1 (reconstruction); the rest of train.max_steps is stage 2 (SLLM)."""
    loss: Literal["ce", "focal"] = "ce"
    """Token loss of both stages: cross-entropy or focal loss."""
    focal_gamma: float = Field(2.0, ge=0)
    """Focal loss exponent (loss: focal)."""
    stop_loss_weight: float = Field(0.1, ge=0)
    """Weight of the stop/continue BCE in stage 2."""
    embed_loss_weight: float = Field(0.0, ge=0)
    """Weight of an MSE pull of predicted vectors towards the encoder's vector of the next sentence."""
    sllm_lr_scale: float = Field(1.0, gt=0)
    """Stage-2 learning rate = train.lr × this."""
    lora_rank: int = Field(0, ge=0)
    """0: fine-tune the LM layers fully in stage 2; > 0: train LoRA adapters (peft) of this rank."""
    lora_alpha: float = Field(16.0, gt=0)
    """LoRA scaling numerator (scale = alpha / rank)."""
    lora_targets: list[Text] | Literal["all-linear"] = "all-linear"
    """LoRA target modules: 'all-linear' or module names such as [q_proj, v_proj]."""
    pretrain_steps: int = Field(0, ge=0)
    """Steps of next-token training of a randomly initialised (inline-config) teacher before the
    conversion, so the baseline is a real LM. 0 for pretrained teachers."""
    pretrain_lr: float = Field(1e-3, gt=0)
    """Learning rate of that pre-training."""
    pretrain_batch_size: int = Field(16, ge=1)
    """Passages per pre-training step."""
    pretrain_data: DataSpec = Field(default_factory=DataSpec)
    """Text for pre-training (its training split only; held-out text used in evaluation is never
    pre-trained on)."""
    gen_tokens: int = Field(32, ge=1)
    """New tokens generated per prompt by both sides (speed probe and cache-size measurements)."""
    gen_sentence_tokens: int | None = Field(None, ge=1)
    """Length every SLLM sentence is decoded to in those measurements, so the cost does not depend on where
    the decoder would end sentences (None: the mean held-out sentence length; at most max_sentence_tokens)."""
    gen_prompts: int = Field(4, ge=1)
    """Held-out prompts used for generation measurements."""
    prompt_sentences: int = Field(2, ge=1)
    """Sentences per generation prompt."""
    length_buckets: list[int] = Field(default_factory=lambda: [4, 8, 16, 32])
    """Upper edges of the sentence-length buckets for reconstruction metrics, ascending, from LENGTH_EDGES."""

    @field_validator("length_buckets")
    @classmethod
    def _declared_buckets(cls, edges: list[int]) -> list[int]:
        bad = [e for e in edges if e not in LENGTH_EDGES]
        if bad or not edges or edges != sorted(set(edges)):
            raise ValueError(f"bucket edges ascend through {', '.join(map(str, LENGTH_EDGES))} (each bucket is a "
                             f"metric key, recon_token_acc_len_<lo+1>_<hi>, the method declares); got {edges}")
        return edges

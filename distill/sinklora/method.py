"""SinkLoRA: long-context LoRA of a Llama-family causal LM through shifted sparse attention with sinks
(registered as `sinklora`).

    .venv/bin/athanor submit recipes/sinklora_tiny.yaml --wait

The student is the teacher with RoPE interpolated to `target_length`, trained with peft LoRA on q,k,v,o plus
its embeddings and norms at the target length through SF-Attn (or LongLoRA's S2-Attn, segmented S2 without
sinks, or full attention); it is evaluated with full attention and exported merged (plain transformers, the new
RoPE scaling in its config). `compare: [full, s2, s2_segmented]` trains those arms too, for the same steps, data
and LoRA initialisation, and reports the fraction of the full-attention perplexity gain each sparse arm recovers
(SinkLoRA's figure: 92% SF vs 39% S2 in the paper, S2 being LongLoRA's rolled S2-Attn, arm `s2`; `s2_segmented`
is SF without its sinks), and whether each beats the teacher at the target length with no extension at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from athanor.convert.module_utils import count_params
from athanor.convert.sinklora import (
    attention_implementation,
    build_student,
    check_model,
    export_ready,
    original_context,
)
from athanor.distill.hf import build_hf_model, load_config, load_tokenizer
from athanor.distill.intervals import PerSample
from athanor.distill.lm_pretrain import pretrain_lm
from athanor.distill.loaders import SeededLoader
from athanor.distill.long_context_eval import fraction_of_gain
from athanor.distill.method_base import MethodBase
from athanor.distill.sinklora.config import BUDGET_LABELS, PASSKEY_LENGTHS, SinkLoRAArgs, SinkLoRAStudent
from athanor.distill.sinklora.data import BookTokens, chunks, heldout_stream, tokenize_books
from athanor.distill.sinklora.evaluation import evaluate_lm, forward_probe
from athanor.distill.sinklora.train import SinkLoRAModule, stack_chunks
from athanor.distill.spec import DataSpec, Direction, EvalSpec, MethodData, RecipeError, ResolvedSource, TrainSpec

log = logging.getLogger(__name__)


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


class SinkLoRA(MethodBase[CausalTeacher, torch.nn.Module, SinkLoRAArgs, dict[str, Any]]):
    """The `sinklora` method (see the module docstring)."""

    name = "sinklora"
    Args = SinkLoRAArgs
    Student = SinkLoRAStudent
    mlflow_flavor = "transformers"
    mlflow_task = "text-generation"
    auto_class = "AutoModelForCausalLM"
    metrics = declared_metrics()

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
        """RoPE interpolation + training attention + LoRA on a copy of the (pre-trained, if asked) teacher. The LoRA
        init is seeded from the seed the job set for this student (train.seed, or a comparison arm's seed:
        `torch.initial_seed()`), read before the one-off pretraining (which reseeds and draws from the RNG), so the
        main student and every arm at the same seed start from identical LoRA weights."""
        init_seed = torch.initial_seed()
        if args.pretrain_steps and not teacher.meta and not teacher.pretrain_losses:
            self._pretrain(teacher, args)
        return build_student(
            teacher.lm, target_length=args.target_length, rope_scaling=args.rope_scaling, attention=args.attention,
            group_size=args.group_size, num_sink=args.num_sink, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout, lora_targets=args.lora_targets,
            train_embeddings_and_norms=args.train_embeddings_and_norms, original_length=self._original(teacher, args),
            init_seed=init_seed)

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
        return SinkLoRAModule(student, train, gradient_checkpointing=args.gradient_checkpointing,
                              lr_schedule=args.lr_schedule)

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
               "s2": f"LongLoRA's S2-Attn (groups of {group} tokens, rolled with wrap-around)",
               "s2_segmented": f"segmented S2-Attn without sinks (groups of {group} tokens)",
               "full": "full causal attention"}[args.attention]
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
        """Perplexity at the target length of every arm, the base and the unextended teacher; each sparse arm's
        fraction of the full-attention gain; and per arm `<arm>_beats_unextended` (1.0/0.0). The base is the
        untrained student (interpolated RoPE, no training) when measured, else the original model. The unextended
        row (`ppl_unextended`) is the teacher itself at the target length: its own RoPE (no interpolation), full
        attention, no training (the job's `before`): an extension is only worth it if it scores better."""
        key = "ppl_target_length"
        base = (untrained or before)[key]
        ppl = {args.attention: after[key], **{arm: metrics[key] for arm, metrics in arms.items()}}
        out = {"ppl_base": base, "ppl_unextended": before[key], **{f"ppl_{arm}": value for arm, value in ppl.items()}}
        for arm, value in ppl.items():
            out[f"{arm}_beats_unextended"] = float(value < before[key])
            if arm == "full":
                continue
            try:
                out[f"fraction_of_gain_{arm}"] = fraction_of_gain(base, value, ppl["full"])
            except ValueError as exc:
                log.warning("no fraction of gain for %s: %s", arm, exc)
        _log_unextended(args, before[key], ppl)
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


def _log_unextended(args: SinkLoRAArgs, unextended: float, ppl: dict[str, float]) -> None:
    """One log line when extending did not pay: the teacher, unextended, already scores as well at the target
    length as the extended student (held-out text can be predictable from short context alone)."""
    losing = [f"{arm} {value:.4g}" for arm, value in ppl.items() if value >= unextended]
    if losing:
        log.warning("the extension does not beat the unextended teacher: ppl at %d tokens %.4g without extension "
                    "(original RoPE, full attention) vs %s", args.target_length, unextended, ", ".join(losing))


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

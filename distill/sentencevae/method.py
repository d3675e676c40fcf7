"""SentenceVAE: next-sentence prediction for causal LMs (registered as `sentencevae`).

A sentence encoder compresses each sentence into one vector, a sentence decoder reconstructs its
tokens, and the pretrained LM's layers (the SLLM) run causally over sentence vectors, so one KV-cache
position holds a whole sentence. Stage 1 trains encoder/decoder on reconstruction; stage 2 trains
the SLLM (optionally LoRA adapters) through the frozen decoder. Recipe sections (in `config.py`):

    student: {encoder_layers: 2, decoder_layers: 2, pooling: weighted}
    sentencevae: {stage1_steps: 300, max_sentence_tokens: 32, lora_rank: 0, pretrain_steps: 0}

Tests: `.venv/bin/python -m pytest tests/distill/sentencevae tests/convert/sentencevae -q`
End to end: `.venv/bin/athanor submit recipes/sentencevae_tiny.yaml --wait`
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from athanor.convert.sentencevae.segment import DEFAULT_ABBREVIATIONS, SegmentRules, segment_ids
from athanor.convert.sentencevae.sllm import SentenceVAEModel
from athanor.convert.sentencevae.vae import VAEConfig
from athanor.distill.hf import build_hf_model, load_config, load_tokenizer
from athanor.distill.intervals import PerSample
from athanor.distill.loaders import SeededLoader
from athanor.distill.method_base import MethodBase
from athanor.distill.sentencevae.config import LENGTH_EDGES, SentenceVAEArgs, SentenceVAEStudent
from athanor.distill.sentencevae.evaluation import bucket_suffix, evaluate_pair, generation_probe
from athanor.distill.sentencevae.train import SentenceVAEModule, collate, pretrain_lm
from athanor.distill.spec import DataSpec, Direction, EvalSpec, MethodData, RecipeError, ResolvedSource, TrainSpec
from athanor.distill.text_data import load_texts

RECON_METRICS = ("recon_token_acc", "recon_exact")
METRICS: dict[str, Direction] = {
    "params": "neutral",
    "nll_per_token": "lower",
    "ppl": "lower",
    # Properties of the data and of the cache layout, not quality: tokens one cache position holds, cache
    # bytes per token of context (at the end, at the peak) and the generated sentence length.
    "tokens_per_position": "neutral",
    "kv_bytes_per_token": "neutral",
    "mem_bytes_per_token": "neutral",
    "gen_sentence_tokens": "neutral",
    **dict.fromkeys(RECON_METRICS, "higher"),
    # Every bucket (lo, hi] that ascending edges from the ladder can form (0 starts the first one).
    **{f"{m}_{bucket_suffix(lo, hi)}": "higher"
       for m in RECON_METRICS for lo, hi in combinations((0, *LENGTH_EDGES), 2)},
}
"""Every key `evaluate_pair` can return, with its direction."""


@dataclass
class LMTeacher:
    """What load_teacher returns: the causal LM, its tokenizer and the special tokens used."""

    lm: PreTrainedModel
    tokenizer: Any
    bos_id: int
    eos_id: int
    pad_id: int
    description: str = ""
    meta: bool = False
    pretrained_on: set[str] = field(default_factory=set)
    pretrain_losses: list[float] = field(default_factory=list)


def segment_rules(args: SentenceVAEArgs) -> SegmentRules:
    """The segmentation of the recipe: training data, held-out data and the LM's generated text alike."""
    return SegmentRules(
        split_on_newline=args.split_on_newline,
        abbreviations=DEFAULT_ABBREVIATIONS + tuple(args.extra_abbreviations),
        max_sentence_tokens=args.max_sentence_tokens,
        max_sentences=args.max_sentences,
    )


def segment_generated(ids: list[int], *, tokenizer: Any, rules: SegmentRules) -> list[list[int]]:
    """The LM's generated ids cut into sentences as the data is (decoded, then segmented), so its
    `gen_sentence_tokens` means what the SLLM's does. No sentence cap on count: every sentence counts."""
    return segment_ids(tokenizer.decode(ids), tokenizer, replace(rules, max_sentences=len(ids) or 1))


def special_ids(tokenizer: Any) -> tuple[int, int, int]:
    """(start, end-of-sentence, pad) ids: BOS/EOS where the tokenizer has them, else CLS/SEP."""
    starts = (tokenizer.bos_token_id, tokenizer.cls_token_id, tokenizer.eos_token_id)
    bos = next((t for t in starts if t is not None), None)
    eos = next((t for t in (tokenizer.eos_token_id, tokenizer.sep_token_id) if t is not None), None)
    if bos is None or eos is None:
        raise RecipeError("teacher.tokenizer", tokenizer.name_or_path, "needs a BOS/CLS and an EOS/SEP token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(bos), int(eos), int(pad)


def _on_device(model: torch.nn.Module) -> torch.nn.Module:
    """Both sides on one device for evaluation and probes (Lightning hands the trained model back on the CPU)."""
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


class SentenceVAE(MethodBase[LMTeacher, SentenceVAEModel, SentenceVAEArgs, dict[str, Any]]):
    """The `sentencevae` method (see the module docstring). The export is a directory of its own format
    (artifacts, not one Auto class); every metric is finite on both sides."""

    name = "sentencevae"
    Args = SentenceVAEArgs
    Student = SentenceVAEStudent
    metrics = METRICS

    def load_teacher(self, source: ResolvedSource, *, meta: bool = False) -> LMTeacher:
        """The causal LM and its fast tokenizer (segmentation needs token offsets)."""
        tokenizer = load_tokenizer(source, need_fast=True)
        config = load_config(source, examples="llama, gpt2", defaults={"vocab_size": len(tokenizer)})
        if source.path is None and config.vocab_size < len(tokenizer):
            raise RecipeError("teacher.config.vocab_size", config.vocab_size,
                              f"must be >= the tokenizer's {len(tokenizer)} tokens")
        try:
            lm = build_hf_model(AutoModelForCausalLM, source, config, meta=meta)
        except ValueError as exc:
            raise RecipeError("teacher", source.description, f"not a causal LM: {str(exc).splitlines()[0]}") from exc
        bos, eos, pad = special_ids(tokenizer)
        return LMTeacher(lm.eval(), tokenizer, bos, eos, pad, source.description, meta)

    def convert(self, teacher: LMTeacher, student: SentenceVAEStudent, args: SentenceVAEArgs) -> SentenceVAEModel:
        """Encoder/decoder sized from the LM, the SLLM a copy of its layers (LoRA-wrapped when asked)."""
        hidden = teacher.lm.get_input_embeddings().weight.shape[1]
        self._check_shapes(hidden, student, args)
        if args.pretrain_steps and not teacher.meta:
            self._pretrain(teacher, args)
        cfg = VAEConfig(
            vocab_size=teacher.lm.get_input_embeddings().weight.shape[0], hidden_size=hidden,
            pad_id=teacher.pad_id, bos_id=teacher.bos_id, eos_id=teacher.eos_id,
            max_sentence_tokens=args.max_sentence_tokens, encoder_layers=student.encoder_layers,
            decoder_layers=student.decoder_layers, heads=student.heads, ffn_size=student.ffn_size or 4 * hidden,
            pooling=student.pooling, dropout=student.dropout,
        )
        with torch.device("meta") if teacher.meta else nullcontext():
            model = SentenceVAEModel.from_lm(teacher.lm, cfg)
            if args.lora_rank:
                from peft import LoraConfig, get_peft_model

                lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules=args.lora_targets,
                                  lora_dropout=0.0)
                try:
                    model.sllm.lm = get_peft_model(model.sllm.lm, lora)
                except ValueError as exc:
                    raise RecipeError("sentencevae.lora_targets", args.lora_targets, str(exc).splitlines()[0]) from exc
        return model

    @staticmethod
    def _check_shapes(hidden: int, student: SentenceVAEStudent, args: SentenceVAEArgs) -> None:
        """Recipe values that only fail against the LM's sizes or each other, reported before any work."""
        if hidden % student.heads:
            raise RecipeError("student.heads", student.heads, f"must divide the LM's hidden size {hidden}")
        if max(args.length_buckets) < args.max_sentence_tokens:
            raise RecipeError("sentencevae.length_buckets", args.length_buckets,
                              f"the last edge must be >= max_sentence_tokens ({args.max_sentence_tokens})")
        if args.gen_sentence_tokens and args.gen_sentence_tokens > args.max_sentence_tokens:
            raise RecipeError("sentencevae.gen_sentence_tokens", args.gen_sentence_tokens,
                              f"must be <= max_sentence_tokens ({args.max_sentence_tokens})")

    def _pretrain(self, teacher: LMTeacher, args: SentenceVAEArgs) -> None:
        """Next-token training of a fresh teacher on the training split of `pretrain_data`."""
        spec = args.pretrain_data
        train, _ = load_texts(spec)
        tokens = teacher.tokenizer(train, add_special_tokens=False, truncation=True, max_length=spec.max_length)
        passages = [p for p in tokens["input_ids"] if p]
        teacher.pretrain_losses = pretrain_lm(
            teacher.lm, passages, steps=args.pretrain_steps, lr=args.pretrain_lr,
            batch_size=args.pretrain_batch_size, bos_id=teacher.bos_id, seed=spec.seed,
        )
        teacher.pretrained_on = set(train)

    def data(self, teacher: LMTeacher, data: DataSpec, args: SentenceVAEArgs) -> MethodData:
        """Segmented passages: the training loader, held-out passages, generation prompts and the sentence
        length the SLLM generates at (the held-out mean unless the recipe sets it)."""
        train, held_out = load_texts(data)
        held_out = [t for t in held_out if t not in teacher.pretrained_on]  # never evaluate on pre-training text
        rules = segment_rules(args)

        def segment(texts: list[str]) -> list[list[list[int]]]:
            return [p for p in (segment_ids(t, teacher.tokenizer, rules, data.max_length) for t in texts) if p]

        train_p, held_p = segment(train), segment(held_out)
        if not held_p:
            raise RecipeError("data.eval_texts", data.eval_texts,
                              "no held-out passage is left that the teacher was not pre-trained on")
        prompts = [p[: args.prompt_sentences] for p in held_p if len(p) > args.prompt_sentences][: args.gen_prompts]
        if not prompts:
            raise RecipeError("sentencevae.prompt_sentences", args.prompt_sentences,
                              "no held-out passage has more sentences; lower it")
        lengths = [len(s) for p in held_p for s in p]
        sentence_tokens = args.gen_sentence_tokens or max(1, round(sum(lengths) / len(lengths)))
        loader = SeededLoader(train_p, batch_size=data.batch_size, seed=data.seed, num_workers=data.num_workers,
                              collate_fn=partial(collate, pad_id=teacher.pad_id))
        return MethodData(train_dataloader=loader, num_train_examples=len(train_p),
                          eval={"passages": held_p, "prompts": prompts, "sentence_tokens": sentence_tokens})

    def teacher_model(self, teacher: LMTeacher) -> PreTrainedModel:
        """The causal LM: the 'before' side."""
        return teacher.lm

    def lightning_module(self, teacher: LMTeacher, student: SentenceVAEModel, data: MethodData,
                         args: SentenceVAEArgs, train: TrainSpec) -> SentenceVAEModule:
        """Both stages in one module; stage 2 needs steps left after stage 1."""
        if args.stage1_steps >= train.max_steps:
            raise RecipeError("sentencevae.stage1_steps", args.stage1_steps,
                              f"must be < train.max_steps ({train.max_steps}) to leave steps for the SLLM")
        student.train()  # the LM stack was copied from a teacher in eval mode
        return SentenceVAEModule(student, args, train)

    def trained_student(self, module: SentenceVAEModule) -> SentenceVAEModel:
        """The fitted model, frozen and in eval mode."""
        for p in module.model.parameters():
            p.requires_grad_(False)
        return module.model.eval()

    def evaluate(self, model: Any, teacher: LMTeacher, data: MethodData, eval: EvalSpec, args: SentenceVAEArgs,
                 artifact_dir: Path) -> dict[str, float | PerSample]:
        """Perplexity, cache cost at a fixed generation budget and reconstruction (see evaluation.py): perplexity
        per held-out passage and reconstruction per sentence are `PerSample`s, in held-out order on both sides.
        The teacher's pre-training curve goes with the 'before' side."""
        metrics = evaluate_pair(
            _on_device(model), data.eval["passages"][: eval.max_texts], data.eval["prompts"], bos_id=teacher.bos_id,
            gen_tokens=args.gen_tokens, sentence_tokens=data.eval["sentence_tokens"], batch_size=eval.batch_size,
            segment=partial(segment_generated, tokenizer=teacher.tokenizer, rules=segment_rules(args)),
            edges=args.length_buckets,
        )
        if teacher.pretrain_losses and model is teacher.lm:
            artifact_dir.mkdir(parents=True, exist_ok=True)
            (artifact_dir / "teacher_pretrain_losses.json").write_text(json.dumps(teacher.pretrain_losses))
        return metrics

    def speed_probe(self, model: Any, teacher: LMTeacher, data: MethodData, eval: EvalSpec,
                    args: SentenceVAEArgs) -> Callable[[], int]:
        """Greedy generation of `gen_tokens` tokens from every eval prompt, the SLLM at the fixed sentence
        length: the same tokens for the LM and the SLLM, however the decoder would end sentences."""
        return generation_probe(_on_device(model).eval(), data.eval["prompts"], bos_id=teacher.bos_id,
                                gen_tokens=args.gen_tokens, sentence_tokens=data.eval["sentence_tokens"])

    @contextmanager
    def lm_eval_model(self, model: Any, teacher: LMTeacher, args: SentenceVAEArgs) -> Iterator[tuple[Any, Any]]:
        """For `eval.lm_eval`: the teacher LM with its tokenizer (the harness's HFLM), or a student as the harness
        model `harness_lm.SentenceVAELM` (texts segmented as the training data is), in eval mode while it runs."""
        model = _on_device(model)
        was_training = model.training
        model.eval()
        try:
            if isinstance(model, SentenceVAEModel):
                from athanor.distill.sentencevae.harness_lm import SentenceVAELM

                yield SentenceVAELM(model, teacher.tokenizer, segment_rules(args)), None
            else:
                yield model, teacher.tokenizer
        finally:
            model.train(was_training)

    def export(self, student: SentenceVAEModel, teacher: LMTeacher, out_dir: Path, args: SentenceVAEArgs) -> Path:
        """The SentenceVAE directory (config, weights, LM stack with LoRA merged, tokenizer)."""
        return student.save_pretrained(Path(out_dir), teacher.tokenizer)

"""Generation cost of SentenceVAE, original LM vs SLLM, timed side by side: latency, tokens/s, cache bytes.

    .venv/bin/python benchmarks/sentencevae.py                                  # tiny random Llama
    .venv/bin/python benchmarks/sentencevae.py --family gpt2 --hidden 256 --layers 4
    .venv/bin/python benchmarks/sentencevae.py --model /path/to/causal-lm --export .athanor/jobs/<id>/export

Both sides run the job's speed probe (`distill.sentencevae.evaluation.generation_probe`): greedy decoding
with KV caches, batch 1, the same prompts and exactly `--new-tokens` new tokens per prompt. The SLLM's
sentences are forced to `--sentence-tokens` tokens (the last one cut to the budget), so the ratios are
those of that sentence length whatever the decoder's end-of-sentence logits say: a sentence costs one
SLLM step + `sentence-tokens` + 1 decoder steps + one encoder pass. The two probes are timed interleaved,
round by round (`distill.timing.interleaved_latency`), so both see the same load on a shared machine.
Without `--export`, the SentenceVAE is built untrained from the LM (speed does not depend on training).
Prints one table with the ratios SLLM / original.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from athanor.convert.sentencevae.segment import SegmentRules
from athanor.convert.sentencevae.sllm import SentenceVAEModel
from athanor.convert.sentencevae.vae import VAEConfig
from athanor.distill.sentencevae.evaluation import Segmenter, generation_cost, generation_probe, generation_runs
from athanor.distill.sentencevae.method import segment_generated
from athanor.distill.timing import interleaved_latency


def build_lm(args: argparse.Namespace) -> torch.nn.Module:
    """The LM of `--model`, or a seeded random one of the given family and size."""
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model)
    torch.manual_seed(0)
    if args.family == "gpt2":
        cfg = GPT2Config(vocab_size=args.vocab, n_embd=args.hidden, n_layer=args.layers, n_head=args.hidden // 32,
                         n_positions=2048, bos_token_id=1, eos_token_id=2)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                      num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=2048)
    return LlamaForCausalLM(cfg)


def build_vae(lm: torch.nn.Module, args: argparse.Namespace) -> SentenceVAEModel:
    """The export of `--export`, or an untrained SentenceVAE built from `lm`."""
    if args.export:
        vae = SentenceVAEModel.from_pretrained(args.export)
    else:
        vocab, hidden = lm.get_input_embeddings().weight.shape
        cfg = VAEConfig(vocab_size=vocab, hidden_size=hidden, pad_id=0, bos_id=1, eos_id=2,
                        max_sentence_tokens=max(args.sentence_tokens, 16), heads=max(1, hidden // 64),
                        ffn_size=2 * hidden)
        vae = SentenceVAEModel.from_lm(lm, cfg)
    if args.sentence_tokens > vae.cfg.max_sentence_tokens:
        raise SystemExit(f"--sentence-tokens {args.sentence_tokens} > the export's {vae.cfg.max_sentence_tokens}")
    return vae


def lm_segmenter(args: argparse.Namespace, cap: int) -> Segmenter | None:
    """The data's sentence rules on the LM's output (needs `--model`'s tokenizer; a random LM has none)."""
    if not args.model:
        return None
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    return partial(segment_generated, tokenizer=tokenizer, rules=SegmentRules(max_sentence_tokens=cap))


def parse_args() -> argparse.Namespace:
    """Sizes, budget and timing options (defaults: a 4-layer 256-wide random Llama, ~15 s on one CPU core)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local causal-LM directory (default: random, from --family/--hidden/--layers)")
    parser.add_argument("--export", help="a SentenceVAE export directory (default: built untrained from the LM)")
    parser.add_argument("--family", choices=["llama", "gpt2"], default="llama")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--sentence-tokens", type=int, default=12)
    parser.add_argument("--prompt-sentences", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads while timing (default: as is)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    lm = build_lm(args).to(args.device).eval()
    vae = build_vae(lm, args).to(args.device).eval()
    vocab = lm.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    prompts = [[torch.randint(3, vocab, (args.sentence_tokens,), generator=gen).tolist()
                for _ in range(args.prompt_sentences)] for _ in range(args.prompts)]
    budget = dict(bos_id=vae.cfg.bos_id, gen_tokens=args.new_tokens, sentence_tokens=args.sentence_tokens)
    models = {"original": lm, "sllm": vae}
    probes = {name: generation_probe(model, prompts, **budget) for name, model in models.items()}
    tokens = {name: probe() for name, probe in probes.items()}  # also checks both sides do the same work
    assert tokens["original"] == tokens["sllm"] == args.prompts * args.new_tokens, tokens
    ms = interleaved_latency(probes, repeats=args.repeats, threads=args.threads)
    segment = lm_segmenter(args, vae.cfg.max_sentence_tokens)
    with torch.inference_mode():
        rows = {name: generation_cost(generation_runs(model, prompts, **budget), segment)
                for name, model in models.items()}
    for name in models:
        rows[name] = {"latency_ms": ms[name], "gen_tokens_per_s": tokens[name] / ms[name] * 1e3, **rows[name]}

    print(f"device {args.device}, {torch.get_num_threads() if args.threads is None else args.threads} threads; "
          f"{args.prompts} prompts × {args.prompt_sentences} sentences of {args.sentence_tokens} tokens; "
          f"{args.new_tokens} new tokens per prompt; median of {args.repeats} interleaved rounds")
    print(f"{'metric':<22}{'original':>14}{'sllm':>14}{'sllm/original':>16}")
    for key in rows["sllm"]:
        a, b = rows["original"].get(key), rows["sllm"][key]
        ratio = f"{b / a:>16.3f}" if a else f"{'':>16}"
        print(f"{key:<22}{'n/a' if a is None else format(a, '.1f'):>14}{b:>14.1f}{ratio}")


if __name__ == "__main__":
    main()

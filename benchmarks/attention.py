"""Attention benchmark: SDPA vs linear attention (elu+1, Hedgehog) vs SF-Attn, time versus tokens N.

Run: `.venv/bin/python benchmarks/attention.py` (about 5 minutes on 2 CPU cores; `--quick` for a
smoke run). Prints a table and writes a PNG (`--out`, default benchmarks/attention.png).

Baselines: full attention with `torch.nn.functional.scaled_dot_product_attention`, causal
(`is_causal=True`) and non-causal, batch 1, 4 heads, head dim 64, float32, same q/k/v tensors for
every method at a given N. Each row's speedup and crossover are against the SDPA of its own masking
(a non-causal row against causal SDPA would credit it with work it does not do). Linear attention
runs both non-causal (LinVideo's form: two GEMMs) and causal (chunked); SF-Attn is causal with
G = N/4 and 4 sink tokens. "fwd" is inference (no_grad); "fwd+bwd" is a forward plus backward to
q, k, v with a fixed upstream gradient. Each time is the median over rounds that interleave all
methods, both baselines included (after a warm-up round up to 8k tokens). On a machine shared with
other busy processes, multi-threaded runs of many-small-op pipelines (linear, SF) suffer most from
descheduled threads; `--threads 1` is then the steadier comparison. On CPU every method takes the
PyTorch reference path; with a CUDA GPU the Triton kernels and the default CUDA paths ('auto':
FlexAttention for SF-Attn, fla or the PyTorch chunked form for causal linear attention, Triton for
non-causal) are timed beside SDPA on the GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from athanor.kernels.linear_attention import HedgehogFeatureMap, linear_attention  # noqa: E402
from athanor.kernels.sparse_attention import sf_attention  # noqa: E402

HEADS, DIM = 4, 64
SDPA_CAUSAL, SDPA_FULL = "sdpa (causal)", "sdpa (non-causal)"
Attn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def methods(device: torch.device, backend: str) -> dict[str, tuple[Attn, str]]:
    """name -> (attention, name of its baseline): the SDPA with the same causal masking."""
    hedgehog = HedgehogFeatureMap(HEADS, DIM).to(device)
    tag = "" if backend == "torch" else f" [{backend}]"

    def linear(causal: bool, fmap: str | HedgehogFeatureMap) -> tuple[Attn, str]:
        attn = lambda q, k, v: linear_attention(q, k, v, causal=causal, feature_map=fmap, backend=backend)  # noqa: E731
        return attn, SDPA_CAUSAL if causal else SDPA_FULL

    return {
        SDPA_CAUSAL: (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), SDPA_CAUSAL),
        SDPA_FULL: (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), SDPA_FULL),
        f"linear elu+1{tag}": linear(False, "elu+1"),
        f"linear elu+1 causal{tag}": linear(True, "elu+1"),
        f"linear hedgehog{tag}": linear(False, hedgehog),
        f"linear hedgehog causal{tag}": linear(True, hedgehog),
        f"sf-attn G=N/4{tag}": (
            lambda q, k, v: sf_attention(q, k, v, group_size=q.shape[2] // 4, num_sink=4, backend=backend),
            SDPA_CAUSAL,
        ),
    }


def _once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run(ns: list[int], device: torch.device, backend: str, rounds: int) -> dict:
    """Per N: round-robin over every (method, fwd | fwd+bwd) case, `rounds` times, median per case.
    Interleaving makes a change in machine load hit every method (baselines included) alike."""
    results: dict[str, dict[int, tuple[float, float]]] = {}
    attns = {name: attn for name, (attn, _) in methods(device, backend).items()}
    for n in ns:
        gen = torch.Generator(device="cpu").manual_seed(n)
        q, k, v = (torch.randn(1, HEADS, n, DIM, generator=gen).to(device) for _ in range(3))
        grad = torch.randn(1, HEADS, n, DIM, generator=gen).to(device)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        cases: dict[tuple[str, int], Callable[[], object]] = {}
        for name, attn in attns.items():
            cases[(name, 0)] = lambda attn=attn, qkv=(q, k, v): _no_grad(attn, *qkv)
            cases[(name, 1)] = lambda attn=attn, leaves=leaves, grad=grad: attn(*leaves).backward(grad)
        # Warm-up round where it is cheap; at 16k+ a single run takes seconds and warm-up is noise.
        n_rounds = rounds + 1 if n <= 8192 else (rounds if n <= 16384 else max(2, rounds - 1))
        times: dict[tuple[str, int], list[float]] = {key: [] for key in cases}
        for r in range(n_rounds):
            for key, fn in cases.items():
                t = _once(fn, device)
                if r > 0 or n_rounds == rounds or n > 8192:
                    times[key].append(t)
        for name in attns:
            fwd, both = (statistics.median(times[(name, c)]) for c in (0, 1))
            results.setdefault(name, {})[n] = (fwd, both)
            print(f"  N={n:>6} {name:<30} fwd {fwd * 1e3:10.2f} ms   fwd+bwd {both * 1e3:10.2f} ms", flush=True)
    return results


def _no_grad(attn: Attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return attn(q, k, v)


def crossover(results: dict, name: str, base: str, column: int) -> str:
    """Smallest N from which `name` stays faster than `base`."""
    ns = sorted(results[base])
    wins = [results[name][n][column] < results[base][n][column] for n in ns]
    for i, n in enumerate(ns):
        if all(wins[i:]):
            return f"<= {n}" if i == 0 else f"between {ns[i - 1]} and {n}"
    return f"> {ns[-1]}"


def table(results: dict, baselines: dict[str, str]) -> str:
    """One row per (method, N): times, and speedup over the row's own baseline (named in `vs`)."""
    lines = [f"{'method':<30} {'N':>6} {'fwd ms':>10} {'x base':>8} {'fwd+bwd ms':>11} {'x base':>8}  vs"]
    for name, per_n in results.items():
        base = baselines[name]
        for n in sorted(per_n):
            fwd, both = per_n[n]
            bf, bb = results[base][n]
            lines.append(f"{name:<30} {n:>6} {fwd * 1e3:10.2f} {bf / fwd:8.1f} {both * 1e3:11.2f} {bb / both:8.1f}"
                         f"  {base}")
    return "\n".join(lines)


def plot(all_results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, column, title in ((axes[0], 0, "forward"), (axes[1], 1, "forward + backward")):
        for device_name, results in all_results.items():
            for name, per_n in results.items():
                ns = sorted(per_n)
                ax.plot(ns, [per_n[n][column] * 1e3 for n in ns], marker="o", label=f"{name} ({device_name})")
        ax.set(xscale="log", yscale="log", xlabel="tokens N", ylabel="ms", title=title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"attention, batch 1, {HEADS} heads, head dim {DIM}, float32")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N in {1k, 2k} only (smoke run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("attention.png"))
    parser.add_argument("--short", action=argparse.BooleanOptionalAction, default=True,
                        help="also N in {256, 512}, to locate crossovers below 1k")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per N (2 at N = 32k)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ns = [1024, 2048] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768]
    # Short sequences too, to place the crossover when linear already wins at 1k.
    ns = [256, 512] + ns if args.short else ns
    load_before = os.getloadavg()
    start = time.perf_counter()
    runs = {"cpu, reference": (torch.device("cpu"), "torch")}
    if torch.cuda.is_available():
        runs["cuda, triton"] = (torch.device("cuda"), "triton")
        runs["cuda, auto"] = (torch.device("cuda"), "auto")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_before}")
    all_results = {}
    for label, (device, backend) in runs.items():
        print(f"[{label}]")
        all_results[label] = run(ns, device, backend, args.rounds)
    for label, results in all_results.items():
        device, backend = runs[label]
        baselines = {name: base for name, (_, base) in methods(device, backend).items()}
        print(f"\n== {label}: time and speedup over SDPA with the same masking (batch 1) ==")
        print(table(results, baselines))
        for name, base in baselines.items():
            if name != base:
                print(f"crossover vs {base}, {name}: fwd {crossover(results, name, base, 0)}, "
                      f"fwd+bwd {crossover(results, name, base, 1)}")
    plot(all_results, args.out)
    print(f"\nplot: {args.out}; wall {time.perf_counter() - start:.0f} s; "
          f"load average before {load_before}, after {os.getloadavg()}")


if __name__ == "__main__":
    main()

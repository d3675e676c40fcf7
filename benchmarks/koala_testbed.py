"""KOALA on the Fashion-canvas testbed (recipes/koala_tiny.yaml): teacher vs student speed, interleaved, with intervals.

    .venv/bin/python benchmarks/koala_testbed.py                    # torch's threads, 40 rounds
    .venv/bin/python benchmarks/koala_testbed.py --threads 1 --rounds 60
    .venv/bin/python benchmarks/koala_testbed.py -o 'student.decoder_transformer_depth=[1,1,1]'  # another student

Two measurements, each timed round by round in rotating order (`distill.timing.interleaved_samples`):
- `step`: one U-Net step at the job's latency batch (1), what the job's `speed_probe` times;
- `sample`: one whole evaluation sample, `distill.koala.sampling.sample` exactly as the evaluation runs it
  (every eval prompt at once, the unconditional rows stacked for guidance, the recipe's steps and guidance).
The speed-up is the median of the per-round ratios teacher / student (the two calls of a round ran under the
same load), with a 95% bootstrap interval over rounds. Weights do not change the timing, so the student is
the untrained conversion of the recipe (its `student:` section, or `-o` overrides); nothing is trained or downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from athanor.convert.module_utils import count_params  # noqa: E402
from athanor.distill.intervals import PerSample, interval  # noqa: E402
from athanor.distill.koala.evaluation import step_inputs  # noqa: E402
from athanor.distill.koala.method import Koala  # noqa: E402
from athanor.distill.koala.sampling import guided_conditioning, sample  # noqa: E402
from athanor.distill.timing import interleaved_samples  # noqa: E402
from athanor.jobs.recipe import load_recipe  # noqa: E402
from athanor.jobs.sources import resolve_source  # noqa: E402


def _median(rows: np.ndarray) -> float:
    return float(np.median(rows))


def speedup(teacher_ms: list[float], student_ms: list[float]) -> str:
    """'median ratio [low, high]' of the per-round teacher / student times."""
    ratios = np.asarray(teacher_ms) / np.asarray(student_ms)
    ci = interval(PerSample(ratios, _median))
    return f"{ci.estimate:.2f}x [{ci.low:.2f}, {ci.high:.2f}]"


def probes(recipe: Path, overrides: list[str]) -> tuple[dict[str, torch.nn.Module], dict[str, dict]]:
    """The recipe's teacher U-Net and its untrained student, and for each measurement its call per model."""
    loaded = load_recipe(recipe, overrides=overrides)
    method, args = Koala(), loaded.args
    teacher = method.load_teacher(resolve_source(loaded.recipe.teacher, "teacher"))
    student = method.convert(teacher, loaded.student, args)
    models = {"teacher": teacher.unet.eval(), "student": student.eval()}
    payload = method.data(teacher, loaded.recipe.data, args).eval  # the evaluation's prompts, noise and sizes
    scheduler = method._scheduler_config(teacher, args)
    inputs, kwargs = step_inputs(models["teacher"], payload, args.latency_batch, torch.device("cpu"))
    calls = {
        "step": {name: (lambda m=m: m(*inputs, **kwargs)) for name, m in models.items()},
        "sample": {name: (lambda m=m: sample(m, scheduler, payload["cond"], payload["uncond"], payload["noises"][0],
                                             args.eval_steps, args.guidance_scale)) for name, m in models.items()},
    }
    rows = len(guided_conditioning(payload["cond"], payload["uncond"], args.guidance_scale)["prompt_embeds"])
    print(f"{recipe.name}: {len(args.eval_prompts)} eval prompts ({rows} rows with guidance {args.guidance_scale}), "
          f"{args.eval_steps} steps, latent {tuple(payload['latent_size'])}")
    return models, calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "koala_tiny.yaml")
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds per measurement")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, as `athanor submit -o` (e.g. student.mid_block=true)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    models, calls = probes(args.recipe, args.override)
    print("params (M): " + ", ".join(f"{n} {count_params(m) / 1e6:.3f}" for n, m in models.items())
          + f"; {threads} threads, {args.rounds} interleaved rounds")
    print(f"{'measurement':<12}{'teacher (ms)':>14}{'student (ms)':>14}  speed-up (median of per-round ratios, 95% CI)")
    for what, call in calls.items():
        ms = interleaved_samples(call, repeats=args.rounds, warmup=2, threads=threads)
        print(f"{what:<12}{statistics.median(ms['teacher']):>14.1f}{statistics.median(ms['student']):>14.1f}  "
              f"{speedup(ms['teacher'], ms['student'])}")


if __name__ == "__main__":
    main()

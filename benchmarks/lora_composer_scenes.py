"""A finished LoRA-Composer job's scores split by scene origin: the recipe's listed scenes vs the ones
`generate_scenes` drew, every row (baseline, LoRA-Composer, each comparison arm) re-judged from the samples the job
saved, with the job's own judge, boxes and labels, and paired 95% intervals of LoRA-Composer minus each row.

    .venv/bin/python benchmarks/lora_composer_scenes.py --home ~/.athanor --job JOB_ID

Why: the job reports one figure over all its scenes; the issue that asked for generated scenes wants to know how
the method does on scenes nobody picked. Nothing is sampled again: the images are `artifacts/*/samples.safetensors`
of the job folder (scene k of the job's scene list, one image per seed), so this costs seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from athanor.distill.intervals import PerSample, interval, paired_difference  # noqa: E402
from athanor.distill.lora_composer.evaluation import box_outcomes, judge_scene  # noqa: E402
from athanor.jobs.run import prepare  # noqa: E402
from athanor.jobs.store import JobStore  # noqa: E402

METRICS = ("presence", "confusion", "vanishing")


def box_scores(images: dict[str, torch.Tensor], scenes: list, indices: list[int], labels: dict[str, int],
               judge) -> dict[str, PerSample]:
    """Per-box 0/1 outcomes over the scenes `indices` (image-major within a scene, as the job tallies them)."""
    tally: dict[str, list[torch.Tensor]] = {key: [] for key in METRICS}
    for k in indices:
        scene = scenes[k]
        outcome = box_outcomes(judge_scene(judge, images[f"scene_{k}"], scene),
                               [labels[r.adapter] for r in scene.regions])
        for key in METRICS:
            tally[key].append(outcome[key].float().flatten())
    return {key: PerSample.mean(torch.cat(values).double().numpy()) for key, values in tally.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, required=True, help="the athanor home that ran the job")
    parser.add_argument("--job", required=True, help="the job id (a finished lora_composer job)")
    args = parser.parse_args(argv)
    job = JobStore(args.home).get(args.job)
    p = prepare(job)
    payload, teacher = p.data.eval, p.teacher
    listed = len(p.loaded.args.scenes)
    scenes = payload["scenes"]
    origins = {"listed": list(range(listed)), "generated": list(range(listed, len(scenes)))}
    artifacts = JobStore(args.home).job_dir(job.id) / "artifacts"
    rows = {"baseline (set_adapters)": "before", "LoRA-Composer": "after",
            **{f"arm {d.name.removeprefix('arm_')}": d.name for d in sorted(artifacts.glob("arm_*"))}}
    images = {name: load_file(artifacts / folder / "samples.safetensors") for name, folder in rows.items()}
    for origin, indices in origins.items():
        if not indices:
            continue
        print(f"\n{origin} scenes: {len(indices)} x {len(payload['noise'])} seeds")
        scores = {name: box_scores(imgs, scenes, indices, payload["labels"], teacher.judge)
                  for name, imgs in images.items()}
        composer = scores["LoRA-Composer"]
        print(f"{'row':28s} " + " ".join(f"{key:>30s}" for key in METRICS))
        for name, score in scores.items():
            cells = [interval(score[key]) for key in METRICS]
            print(f"{name:28s} " + " ".join(f"{f'{c.estimate:.3f} [{c.low:.3f}, {c.high:.3f}]':>30s}" for c in cells))
        print("LoRA-Composer minus each row, 95% paired interval over boxes:")
        for name, score in scores.items():
            if name != "LoRA-Composer":
                diffs = [paired_difference(score[key], composer[key]) for key in METRICS]
                print(f"  {name:26s} " + "  ".join(f"{key} {d.estimate:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
                                                   for key, d in zip(METRICS, diffs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

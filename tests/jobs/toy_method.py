"""Tiny, fast methods used to test the job spine without transformers, registered in tests through
ATHANOR_METHODS (tests/conftest.py):

- `toy`: distil a random MLP teacher into a narrower MLP (trains);
- `toy_pruning`: training-free: keep the teacher's hidden units with the largest weight norms (the
  `trains = False` path that LoRA-Composer uses).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import Field
from safetensors.torch import save_file

from athanor.convert.module_utils import count_params
from athanor.convert.recipe_types import RecipePath, Text
from athanor.distill.intervals import PerSample
from athanor.distill.loaders import SeededLoader
from athanor.distill.method_base import MethodBase
from athanor.distill.spec import DataSpec, EvalSpec, MethodData, RecipeError, ResolvedSource, Section, TrainSpec


def mlp(width: int, hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, width))


class ToyStudent(Section):
    hidden: int = Field(4, ge=1)
    """Hidden width of the student MLP."""


class ToyArgs(Section):
    fail_at: Text | None = None
    """Raise inside this protocol call (tests of failure handling)."""
    nan_loss_at_step: int | None = None
    """Make the training loss NaN from this step on (tests of divergence handling)."""
    nan_metric: bool = False
    """Report a NaN `mse_to_teacher` after training (tests of non-finite metrics)."""
    sleep_s: float = 0.0
    """Sleep this long per training step (tests of cancellation)."""
    notes_file: RecipePath | None = None
    """A file path (tests of recipe-relative path resolution); unused otherwise."""
    compare: list[int] = Field(default_factory=list)
    """Comparison arms: one more student per hidden width listed (tests of the optional arms calls)."""
    hidden_override: int | None = None
    """The hidden width an arm's student gets instead of `student.hidden`."""


class Toy(MethodBase[torch.nn.Module, torch.nn.Module, ToyArgs, dict[str, torch.Tensor]]):
    name = "toy"
    Args = ToyArgs
    Student = ToyStudent
    trains = True
    metrics = {"params": "neutral", "mse_to_teacher": "lower"}

    def _maybe_fail(self, args: ToyArgs, where: str) -> None:
        if args.fail_at == where:
            raise RuntimeError(f"toy failure in {where}")

    def load_teacher(self, source: ResolvedSource, *, meta: bool = False):
        config = source.config or json.loads((source.path / "config.json").read_text())
        torch.manual_seed(source.seed)
        with torch.device("meta" if meta else "cpu"):
            return mlp(config["width"], config["hidden"]).eval()

    def convert(self, teacher, student: ToyStudent, args: ToyArgs):
        self._maybe_fail(args, "convert")
        width, hidden = teacher[0].in_features, teacher[0].out_features
        if student.hidden > hidden:
            raise RecipeError("student.hidden", student.hidden, f"must be at most the teacher's {hidden}")
        with torch.device(teacher[0].weight.device):
            return mlp(width, args.hidden_override or student.hidden)

    def data(self, teacher, data: DataSpec, args: ToyArgs) -> MethodData:
        generator = torch.Generator().manual_seed(data.seed)
        x = torch.randn(256, teacher[0].in_features, generator=generator)
        dataset = torch.utils.data.TensorDataset(x)
        loader = SeededLoader(dataset, batch_size=data.batch_size, seed=data.seed, num_workers=data.num_workers)
        return MethodData(train_dataloader=loader, eval={"x": x[:64]}, num_train_examples=len(x))

    def teacher_model(self, teacher):
        return teacher

    def lightning_module(self, teacher, student, data, args: ToyArgs, train: TrainSpec):
        self._maybe_fail(args, "train")
        from toy_module import ToyModule  # Lightning is imported where a job trains, not when a recipe validates

        return ToyModule(teacher, student, train, args.sleep_s, args.nan_loss_at_step)

    def trained_student(self, module):
        return module.student

    @torch.no_grad()
    def evaluate(self, model, teacher, data: MethodData, eval: EvalSpec, args: ToyArgs,
                 artifact_dir: Path) -> dict[str, float]:
        self._maybe_fail(args, "evaluate")
        x = data.eval["x"]
        (artifact_dir / "evaluated.txt").write_text(f"{count_params(model)} parameters\n")
        per_row = ((model(x) - teacher(x)) ** 2).mean(dim=1)  # one MSE per held-out input: intervals over them
        if args.nan_metric and model is not teacher:
            return {"params": float(count_params(model)), "mse_to_teacher": float("nan")}
        return {"params": float(count_params(model)), "mse_to_teacher": PerSample.mean(per_row.double().numpy())}

    def speed_probe(self, model, teacher, data: MethodData, eval: EvalSpec, args: ToyArgs):
        x = data.eval["x"]
        return lambda: model(x)

    def export(self, student, teacher, out_dir: Path, args: ToyArgs) -> Path:
        self._maybe_fail(args, "export")
        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, out_dir / "model.safetensors")
        config = {"width": student[0].in_features, "hidden": student[0].out_features}
        (out_dir / "config.json").write_text(json.dumps(config))
        return out_dir

    def comparison_arms(self, args: ToyArgs, train: TrainSpec) -> dict[str, ToyArgs]:
        return {f"h{h}": args.model_copy(update={"hidden_override": h, "compare": []}) for h in args.compare}

    def compare_arms(self, args: ToyArgs, before, untrained, after, arms) -> dict[str, float]:
        best = min(arms, key=lambda name: arms[name]["mse_to_teacher"])
        return {"best_arm_mse": arms[best]["mse_to_teacher"], "after_minus_best": after["mse_to_teacher"] -
                arms[best]["mse_to_teacher"]}


class ToyPruning(Toy):
    """Training-free: the student keeps the `student.hidden` teacher units with the largest weight norms."""

    name = "toy_pruning"
    trains = False

    def convert(self, teacher, student: ToyStudent, args: ToyArgs):
        pruned = super().convert(teacher, student, args)
        keep = teacher[0].weight.norm(dim=1).topk(student.hidden).indices
        with torch.no_grad():
            pruned[0].weight.copy_(teacher[0].weight[keep])
            pruned[0].bias.copy_(teacher[0].bias[keep])
            pruned[2].weight.copy_(teacher[2].weight[:, keep])
            pruned[2].bias.copy_(teacher[2].bias)
        return pruned

    def lightning_module(self, teacher, student, data, args: ToyArgs, train: TrainSpec):
        raise AssertionError("a training-free method is never asked for a LightningModule")

    def trained_student(self, module):
        raise AssertionError("a training-free method is never asked for a trained student")

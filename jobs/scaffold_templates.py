"""The files `athanor new-method NAME` writes (jobs/scaffold.py): a trivial but real method, a random MLP teacher
distilled into a narrower MLP with MSE, that runs end to end through the job spine. `$name` is the method's
registry name, `$Class` its class name; everything else is kept as written."""

from __future__ import annotations

INIT = '''"""$name: distil a small MLP into a narrower one with MSE (the skeleton `athanor new-method $name`
wrote: replace the MLP, the data and the metrics with the method's own; CONTRIBUTING.md has the checklist).

Where its pieces live:

- distill/$name/config.py: recipe sections `student:` (${Class}Student) and `$name:` (${Class}Args)
- distill/$name/method.py: the protocol class `$Class` (defaults and documentation: distill/method_base.py)
- distill/$name/train.py: the LightningModule (imported only where a job trains)
- recipes: recipes/${name}_tiny.yaml
- tests: tests/distill/$name/test_method.py
- registry: `"$name": "athanor.distill.$name:$Class"` in jobs/methods.py
"""

from athanor.distill.$name.method import $Class

__all__ = ["$Class"]
'''

CONFIG = '''"""$Class's recipe sections: `student:` and `$name:` (pydantic, validated by `athanor validate`)."""

from __future__ import annotations

from pydantic import Field

from athanor.distill.spec import Section

__all__ = ["${Class}Student", "${Class}Args"]


class ${Class}Student(Section):
    """The recipe's `student:` section: the student's shape."""

    hidden: int = Field(4, ge=1, le=65_536)
    """Hidden width of the student MLP (at most the teacher's)."""


class ${Class}Args(Section):
    """The recipe's `$name:` section: the method's own settings."""

    train_examples: int = Field(256, ge=1, le=10_000_000)
    """Random inputs the student is trained on (the teacher's outputs are the targets)."""
    eval_examples: int = Field(64, ge=1, le=1_000_000)
    """Held-out random inputs the metrics are measured on."""
'''

METHOD = '''"""$Class: distil an MLP teacher (`teacher: {config: {width: 8, hidden: 16}}`) into an MLP of width
`student.hidden`, matching the teacher's outputs (MSE). A starting point: every protocol call is here, typed.

    .venv/bin/athanor submit recipes/${name}_tiny.yaml --wait
    .venv/bin/python -m pytest tests/distill/$name -q
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from athanor.convert.module_utils import count_params
from athanor.distill.$name.config import ${Class}Args, ${Class}Student
from athanor.distill.intervals import PerSample
from athanor.distill.loaders import SeededLoader
from athanor.distill.method_base import MethodBase
from athanor.distill.spec import DataSpec, Direction, EvalSpec, MethodData, RecipeError, ResolvedSource, TrainSpec

MLP = torch.nn.Sequential
"""Teacher and student alike: Linear(width, hidden), Tanh, Linear(hidden, width)."""


@dataclass
class ${Class}Eval:
    """The evaluation payload `data()` builds (`MethodData.eval`)."""

    x: torch.Tensor
    """Held-out inputs [examples, width], never trained on."""


def mlp(width: int, hidden: int) -> MLP:
    return torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, width))


class $Class(MethodBase[MLP, MLP, ${Class}Args, ${Class}Eval]):
    """The `$name` method (see the module docstring)."""

    name = "$name"
    Args = ${Class}Args
    Student = ${Class}Student
    metrics: dict[str, Direction] = {"params": "neutral", "mse_to_teacher": "lower"}

    def load_teacher(self, source: ResolvedSource, *, meta: bool = False) -> MLP:
        if source.config is None and source.path is None:
            raise RecipeError("teacher", source.description, "give an inline config: {width: 8, hidden: 16}")
        config = source.config or json.loads((source.path / "config.json").read_text())
        torch.manual_seed(source.seed)
        with torch.device("meta" if meta else "cpu"):
            teacher = mlp(config["width"], config["hidden"]).eval()
        if source.path is not None and not meta:
            from safetensors.torch import load_file

            teacher.load_state_dict(load_file(source.path / "model.safetensors"))
        return teacher

    def convert(self, teacher: MLP, student: ${Class}Student, args: ${Class}Args) -> MLP:
        width, hidden = teacher[0].in_features, teacher[0].out_features
        if student.hidden > hidden:
            raise RecipeError("student.hidden", student.hidden, f"must be at most the teacher's {hidden}")
        with torch.device(teacher[0].weight.device):  # the meta device under `athanor validate`
            return mlp(width, student.hidden)

    def data(self, teacher: MLP, data: DataSpec, args: ${Class}Args) -> MethodData[${Class}Eval]:
        generator = torch.Generator().manual_seed(data.seed)
        x = torch.randn(args.train_examples + args.eval_examples, teacher[0].in_features, generator=generator)
        train, held_out = x[:args.train_examples], x[args.train_examples:]
        loader = SeededLoader(torch.utils.data.TensorDataset(train), batch_size=data.batch_size, seed=data.seed,
                              num_workers=data.num_workers)
        return MethodData(train_dataloader=loader, eval=${Class}Eval(held_out), num_train_examples=len(train))

    def teacher_model(self, teacher: MLP) -> MLP:
        return teacher

    def lightning_module(self, teacher: MLP, student: MLP, data: MethodData[${Class}Eval], args: ${Class}Args,
                         train: TrainSpec) -> Any:
        from athanor.distill.$name.train import ${Class}Module  # Lightning loads where a job trains only

        return ${Class}Module(teacher, student, train)

    def trained_student(self, module: Any) -> MLP:
        return module.student

    @torch.no_grad()
    def evaluate(self, model: MLP, teacher: MLP, data: MethodData[${Class}Eval], eval: EvalSpec,
                 args: ${Class}Args, artifact_dir: Path) -> dict[str, float | PerSample]:
        x = data.eval.x
        per_row = ((model(x) - teacher(x)) ** 2).mean(dim=1)  # one MSE per held-out input: the spine adds intervals
        return {"params": float(count_params(model)), "mse_to_teacher": PerSample.mean(per_row.double().numpy())}

    def speed_probe(self, model: MLP, teacher: MLP, data: MethodData[${Class}Eval], eval: EvalSpec,
                    args: ${Class}Args) -> Callable[[], Any]:
        x = data.eval.x[:eval.batch_size]
        return lambda: model(x)

    def export(self, student: MLP, teacher: MLP, out_dir: Path, args: ${Class}Args) -> Path:
        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, out_dir / "model.safetensors")
        config = {"width": student[0].in_features, "hidden": student[0].out_features}
        (out_dir / "config.json").write_text(json.dumps(config))  # loads as a teacher: `teacher: {path: DIR}`
        return out_dir
'''

TRAIN = '''"""$Class's LightningModule, in its own module so that validating a recipe does not import Lightning."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from athanor.distill.optim import adamw_with_schedule
from athanor.distill.spec import TrainSpec


class ${Class}Module(L.LightningModule):
    """MSE between the student's and the frozen teacher's outputs."""

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module, train: TrainSpec) -> None:
        super().__init__()
        self.teacher, self.student, self.train_spec = teacher, student, train
        self.teacher.requires_grad_(False)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (x,) = batch
        loss = torch.nn.functional.mse_loss(self.student(x), self.teacher(x))
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return adamw_with_schedule(self.student.parameters(), self.train_spec)
'''

RECIPE = '''# athanor submit recipes/${name}_tiny.yaml --wait
# The `$name` skeleton's tiny recipe: a random MLP teacher (inline config, nothing to download) distilled into
# a narrower MLP in a few seconds on a CPU. Its test runs it end to end: tests/distill/$name/test_method.py.
name: ${name}-tiny
method: $name
teacher:
  config: {width: 8, hidden: 16}
student:
  hidden: 4
$name:
  train_examples: 256
  eval_examples: 64
data:
  batch_size: 16
train:
  max_steps: 30
  lr: 0.01
  log_every_n_steps: 5
eval:
  latency_repeats: 1
registry:
  name: ${name}-tiny-student
'''

TEST = '''"""The `$name` method: its calls on the tiny recipe's models, and recipes/${name}_tiny.yaml end to end
through the job spine (`athanor submit --wait`, in process). The protocol itself: tests/jobs/test_protocol.py.

    .venv/bin/python -m pytest tests/distill/$name -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import RECIPES

from athanor.distill.$name.config import ${Class}Args, ${Class}Student
from athanor.distill.$name.method import $Class
from athanor.distill.spec import DataSpec, EvalSpec, RecipeError, ResolvedSource
from athanor.jobs import cli
from athanor.jobs.store import JobStore

TINY = RECIPES / "${name}_tiny.yaml"


def test_the_student_is_narrower_and_the_teacher_matches_itself(tmp_path):
    method, args = $Class(), ${Class}Args(train_examples=32, eval_examples=8)
    teacher = method.load_teacher(ResolvedSource("inline", config={"width": 8, "hidden": 16}))
    student = method.convert(teacher, ${Class}Student(hidden=4), args)
    data = method.data(teacher, DataSpec(batch_size=4), args)
    before = method.evaluate(teacher, teacher, data, EvalSpec(), args, tmp_path)
    after = method.evaluate(student, teacher, data, EvalSpec(), args, tmp_path)
    assert set(before) == set(after) == set(method.metrics)
    assert before["mse_to_teacher"].value == 0 and after["params"] < before["params"]
    with pytest.raises(RecipeError, match="at most the teacher"):
        method.convert(teacher, ${Class}Student(hidden=32), args)


@pytest.mark.slow
def test_tiny_recipe_end_to_end(home):
    assert cli.main(["submit", str(TINY), "--wait", "--no-progress"]) == cli.EXIT_OK
    (job,) = JobStore(home).list()
    assert job.status == "SUCCEEDED"
    before, after = job.result["before"], job.result["after"]
    assert set(before) == set(after) >= {"params", "mse_to_teacher", "latency_ms"}
    assert after["params"] < before["params"] and before["mse_to_teacher"] == 0
    assert (Path(job.result["export"]) / "model.safetensors").is_file()
'''

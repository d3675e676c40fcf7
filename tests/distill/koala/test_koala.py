"""KOALA distillation: loss terms, feature taps (plain, DDP, gradient checkpointing), data and the
training step, on the tiny SDXL-shaped pipeline of tests/fixtures/koala_sdxl_tiny.yaml (shrunk further:
tests/distill/koala/conftest.py).
Evaluation and export: test_evaluation.py; EMA and data-free sampling: test_training.py.

    .venv/bin/python -m pytest tests/distill/koala -q
"""

from __future__ import annotations

import copy
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from diffusers import DDPMScheduler
from PIL import Image

from athanor.convert.koala import block_map
from athanor.distill.koala.data import encode_prompts, encode_tokens, image_caption_set, tokenize
from athanor.distill.koala.train import FeatureTaps, feature_pairs, koala_losses, training_target
from athanor.distill.spec import DataSpec, RecipeError, TrainSpec
from athanor.jobs.sources import resolve_source

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def inputs(teacher, batch: int = 2, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cond = encode_prompts(teacher, ["a cat", "a dog"][:batch])
    cond["time_ids"] = torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(batch, 1)
    sample = torch.randn(batch, 4, size, size, generator=g)
    added = {k: cond[k] for k in ("text_embeds", "time_ids")}
    return sample, torch.tensor([10, 700][:batch]), {"encoder_hidden_states": cond["prompt_embeds"],
                                                      "added_cond_kwargs": added}


def test_loss_terms_match_a_reference_computation():
    g = torch.Generator().manual_seed(0)
    s, t, y = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    sf = {"a": torch.randn(2, 16, 8, generator=g), "b": torch.randn(2, 4, 32, generator=g)}
    tf = {"ta": torch.randn(2, 16, 8, generator=g), "tb": torch.randn(2, 4, 32, generator=g)}
    pairs = [("a", "ta"), ("b", "tb")]
    terms = koala_losses(s, t, y, sf, tf, pairs, (0.5, 2.0, 3.0))
    mse = lambda a, b: ((a - b) ** 2).sum() / a.numel()  # noqa: E731
    feat = mse(sf["a"], tf["ta"]) + mse(sf["b"], tf["tb"])  # summed over sites
    assert torch.allclose(terms["loss_task"], mse(s, y)) and torch.allclose(terms["loss_out"], mse(s, t))
    assert torch.allclose(terms["loss_feat"], feat)
    assert torch.allclose(terms["loss"], 0.5 * mse(s, y) + 2.0 * mse(s, t) + 3.0 * feat)
    free = koala_losses(s, t, None, sf, tf, pairs, (0.5, 2.0, 3.0))  # data-free: teacher targets only
    assert "loss_task" not in free and torch.allclose(free["loss"], 2.0 * mse(s, t) + 3.0 * feat)


def test_targets_for_epsilon_and_v_prediction(tiny):
    method, loaded, teacher = tiny
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 400, 999])
    eps = DDPMScheduler.from_config(method._scheduler_config(teacher, loaded.args))
    assert torch.equal(training_target(eps, x0, noise, t), noise)
    original = teacher.scheduler_config
    teacher.scheduler_config = {**DDPMScheduler(beta_schedule="scaled_linear").config}  # has _use_default_values
    try:
        v_args = loaded.args.model_copy(update={"prediction_type": "v_prediction"})
        v = DDPMScheduler.from_config(method._scheduler_config(teacher, v_args))
    finally:
        teacher.scheduler_config = original  # the teacher is shared by the module's tests
    assert v.config.prediction_type == "v_prediction"
    abar = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(training_target(v, x0, noise, t), abar.sqrt() * noise - (1 - abar).sqrt() * x0, atol=1e-6)


def test_feature_sites(tiny, make_student):
    student = make_student("koala-700m")
    method, loaded, teacher = tiny
    module = method.lightning_module(teacher, student, method.data(teacher, loaded.recipe.data, loaded.args),
                                     loaded.args, TrainSpec())
    layers = [m for m in student.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert len(module.pairs) == len(layers) == 2 + 3 + 2 * 3 + 2 * 2  # 5 -> 3 kept (0, 2, 4)
    assert ("up_blocks.0.attentions.1.transformer_blocks.2.attn1",
            "up_blocks.0.attentions.2.transformer_blocks.4.attn1") in module.pairs
    bmap = block_map(dict(teacher.unet.config), dict(student.config))
    blocks = feature_pairs(bmap, dict(student.config), "block")
    assert [s for s, _ in blocks] == ["down_blocks.0", "down_blocks.1", "down_blocks.2",
                                      "up_blocks.0", "up_blocks.1", "up_blocks.2"]  # 700M: no mid block


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_taps_work_through_a_ddp_wrapper(tiny, make_student):
    student = make_student()
    names = ["down_blocks.1.attentions.0.transformer_blocks.1.attn1", "mid_block", "down_blocks.2"]
    sample, t, kwargs = inputs(tiny[2])
    bare_taps = FeatureTaps(student, names)
    student(sample, t, **kwargs)
    expected = bare_taps.pop()
    bare_taps.remove()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(student)
        # Names as seen from the wrapper ('module.' prefix) and bare names both resolve.
        taps = FeatureTaps(ddp, ["module." + names[0], *names[1:]])
        out = ddp(sample, t, **kwargs).sample
        got = taps.pop()
        assert set(got) == set(names)
        assert all(torch.equal(got[n], expected[n]) for n in names)
        (got[names[0]].square().mean() + out.mean()).backward()
        grad = student.down_blocks[1].attentions[0].transformer_blocks[1].attn1.to_q.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    finally:
        dist.destroy_process_group()


def test_gradient_checkpointing_keeps_feature_gradients(tiny, make_student):
    method, loaded, teacher = tiny
    plain = make_student().train()
    ckpt = copy.deepcopy(plain)
    ckpt.enable_gradient_checkpointing()
    sample, t, kwargs = inputs(teacher)
    name = "up_blocks.0.attentions.0.transformer_blocks.0.attn1"
    grads = []
    for model in (plain, ckpt):
        taps = FeatureTaps(model, [name])
        model(sample, t, **kwargs)
        taps.pop()[name].square().mean().backward()
        grads.append(model.down_blocks[2].attentions[0].transformer_blocks[0].attn1.to_k.weight.grad.clone())
        taps.remove()
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_training_step_logs_each_term(tiny, make_student):
    method, loaded, teacher = tiny
    student = make_student()
    data = method.data(teacher, loaded.recipe.data, loaded.args)
    module = method.lightning_module(teacher, student, data, loaded.args.model_copy(update={"ema": True}), TrainSpec())
    logged = {}
    module.log_dict = lambda values, **kw: logged.update(values)
    batch = next(iter(data.train_dataloader()))
    loss = module.training_step(batch, 0)  # data-free: output + feature terms only
    assert set(logged) == {"train/loss", "train/loss_out", "train/loss_feat"}
    assert torch.allclose(loss.detach(), logged["train/loss_out"] + logged["train/loss_feat"])
    batch["latents"] = torch.randn(2, 4, 8, 8)
    module.training_step(batch, 1)
    assert "train/loss_task" in logged and logged["train/loss_feat"] > 0
    assert method.trained_student(module) is module.ema.module  # EMA updates: test_training.py


def _imagefolder(root: Path) -> Path:
    sizes = [(100, 80), (64, 64), (80, 120)]  # (w, h)
    with open(root / "metadata.jsonl", "w") as f:
        for i, (w, h) in enumerate(sizes):
            Image.new("RGB", (w, h), (40 * i, 100, 200)).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"a flat colour number {i}"}) + "\n")
    return root


def test_image_caption_data_encodes_and_caches(tiny, make_student, tmp_path):
    method, loaded, teacher = tiny
    spec = DataSpec(kind="datasets", loader="imagefolder", paths=[str(_imagefolder(tmp_path))], batch_size=2)
    raw = image_caption_set(teacher, spec, "image", 64, None)
    item = raw[0]  # 100x80 -> 80x64 (shorter side 64), centre crop 8 px from the left
    assert item["pixels"].shape == (3, 64, 64) and item["time_ids"].tolist() == [80, 100, 0, 8, 64, 64]
    assert raw[2]["time_ids"].tolist() == [120, 80, 16, 0, 64, 64]  # 80x120 -> 64x96, 16 px off the top
    cached = image_caption_set(teacher, spec, "image", 64, str(tmp_path / "cache"))
    assert len(cached) == 3 and cached[0]["latents"].shape == (4, 8, 8)
    text = encode_tokens(teacher, tokenize(teacher, ["a flat colour number 0"]))
    assert torch.allclose(cached[0]["prompt_embeds"], text["prompt_embeds"][0], atol=1e-2)  # stored as fp16
    assert (tmp_path / "cache").is_dir() and torch.equal(cached[2]["time_ids"], raw[2]["time_ids"])
    import datasets  # the same rows as parquet (image + text columns) give the same items

    datasets.load_dataset("imagefolder", data_dir=str(tmp_path), split="train").to_parquet(tmp_path / "rows.parquet")
    as_parquet = spec.model_copy(update={"loader": "parquet", "paths": [str(tmp_path / "rows.parquet")]})
    parquet = image_caption_set(teacher, as_parquet, "image", 64, None)
    assert torch.equal(parquet[2]["pixels"], raw[2]["pixels"])
    assert torch.equal(parquet[2]["input_ids_1"], raw[2]["input_ids_1"])
    again = image_caption_set(teacher, spec, "image", 64, str(tmp_path / "cache"))
    assert torch.equal(again[1]["latents"], cached[1]["latents"])
    # Uncached batches carry pixels and token ids; the training step encodes them with the teacher.
    args = loaded.args.model_copy(update={"train_data": "images", "data_free": False})
    data = method.data(teacher, spec, args)
    module = method.lightning_module(teacher, make_student("koala-700m"), data, args, TrainSpec())
    logged = {}
    module.log_dict = lambda values, **kw: logged.update(values)
    batch = next(iter(data.train_dataloader()))
    assert batch["pixels"].shape == (2, 3, 64, 64)
    module.training_step(batch, 0)
    assert {"train/loss_task", "train/loss_out", "train/loss_feat"} <= set(logged)
    with pytest.raises(RecipeError) as info:
        image_caption_set(teacher, spec.model_copy(update={"loader": "text"}), "image", 64, None)
    assert info.value.key == "data.loader"
    with pytest.raises(RecipeError) as info:
        image_caption_set(teacher, spec, "picture", 64, None)
    assert info.value.key == "koala.image_column"


def test_prompt_encoding_follows_the_sdxl_pipeline(tiny):
    teacher = tiny[2]
    out = encode_prompts(teacher, ["a red car", "snow"])
    ids = tokenize(teacher, ["a red car", "snow"])
    hidden = [enc(ids[f"input_ids_{i}"], output_hidden_states=True) for i, enc in enumerate(teacher.text_encoders)]
    assert torch.allclose(out["prompt_embeds"], torch.cat([h.hidden_states[-2] for h in hidden], -1))
    assert torch.allclose(out["text_embeds"], hidden[1].text_embeds) and out["prompt_embeds"].shape == (2, 77, 64)


def test_recipe_errors_name_the_key(tiny, make_student):
    method, loaded, teacher = tiny
    source = resolve_source(loaded.recipe.teacher, "teacher")
    with pytest.raises(RecipeError) as info:
        method.load_teacher(type(source)(description="x", config={"text_encoder": {}}))
    assert info.value.key == "teacher.config"
    with pytest.raises(RecipeError) as info:
        method.data(teacher, loaded.recipe.data, loaded.args.model_copy(update={"resolution": 60}))
    assert info.value.key == "koala.resolution"
    with pytest.raises(RecipeError) as info:
        method.lightning_module(teacher, make_student(), None, loaded.args.model_copy(update={"ema": True}),
                                TrainSpec(strategy="deepspeed_stage_3"))
    assert info.value.key == "koala.ema"


def test_sd1_teacher_without_added_conditioning(tiny):
    """An SD1.x-shaped pipeline: four stages, one text encoder, no pooled embeddings or time ids."""
    method, loaded, _ = tiny
    unet = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "block_out_channels": [16, 32, 32, 32],
            "attention_head_dim": 8, "cross_attention_dim": 32, "norm_num_groups": 8, "sample_size": 8}
    text = loaded.recipe.teacher.config["text_encoder"]
    source = resolve_source(loaded.recipe.teacher.model_copy(update={"config": {"unet": unet, "text_encoder": text}}),
                            "teacher")
    teacher = method.load_teacher(source)
    args = loaded.args.model_copy(update={"prediction_type": "v_prediction"})
    student = method.convert(teacher, loaded.student, args)
    data = method.data(teacher, loaded.recipe.data, args)
    assert set(data.eval["cond"]) == {"prompt_embeds"}
    module = method.lightning_module(teacher, student, data, args, TrainSpec())
    assert module.scheduler.config.prediction_type == "v_prediction"
    logged = {}
    module.log_dict = lambda values, **kw: logged.update(values)
    batch = {**next(iter(data.train_dataloader())), "latents": torch.randn(2, 4, 8, 8)}
    module.training_step(batch, 0).backward()
    assert {"train/loss_task", "train/loss_out", "train/loss_feat"} <= set(logged)
    assert student.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.grad is not None


def test_bf16_true_student_trains_against_a_matching_teacher(tiny, make_student):
    method, loaded, teacher = tiny
    student = make_student("koala-700m").to(torch.bfloat16)  # what precision 'bf16-true' does
    data = method.data(teacher, loaded.recipe.data, loaded.args)
    module = method.lightning_module(teacher, student, data, loaded.args, TrainSpec(precision="bf16-true"))
    module.log_dict = lambda values, **kw: None
    try:
        module.on_fit_start()
        assert next(teacher.unet.parameters()).dtype == torch.bfloat16
        loss = module.training_step(next(iter(data.train_dataloader())), 0)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    finally:
        teacher.unet.float()


def test_caption_dropout_conditions_rows_on_the_empty_prompt(tiny, make_student):
    """`koala.uncond_prob`: rows take the empty prompt's embeddings (SDXL: pooled ones too; time ids stay),
    for teacher and student alike, so guidance's unconditional prediction is trained."""
    method, loaded, teacher = tiny
    data = method.data(teacher, loaded.recipe.data, loaded.args)
    args = loaded.args.model_copy(update={"uncond_prob": 1.0})
    module = method.lightning_module(teacher, make_student(), data, args, TrainSpec())
    module.log_dict = lambda values, **kw: None
    seen = {}
    hooks = [model.register_forward_pre_hook(lambda _, a, kw, name=name: seen.update({name: kw}), with_kwargs=True)
             for name, model in (("teacher", teacher.unet), ("student", module.student))]
    batch = next(iter(data.train_dataloader()))
    try:
        module.training_step(batch, 0)
    finally:
        for hook in hooks:
            hook.remove()
    empty = data.eval["uncond"]
    for kwargs in seen.values():
        assert torch.equal(kwargs["encoder_hidden_states"], empty["prompt_embeds"].expand_as(batch["prompt_embeds"]))
        added = kwargs["added_cond_kwargs"]
        assert torch.equal(added["text_embeds"], empty["text_embeds"].expand_as(batch["text_embeds"]))
        assert torch.equal(added["time_ids"], batch["time_ids"])
    module.uncond_prob = 0.5
    rows = {k: v[:1].repeat(64, *[1] * (v.dim() - 1)) for k, v in batch.items()}
    dropped = module.drop_captions(rows)["prompt_embeds"]
    is_empty = [torch.equal(row, empty["prompt_embeds"][0]) for row in dropped]
    assert 0 < sum(is_empty) < 64  # some rows of each kind
    assert all(e or torch.equal(row, rows["prompt_embeds"][0]) for e, row in zip(is_empty, dropped))
    module.uncond_prob = 0.0
    assert module.drop_captions(batch) is batch

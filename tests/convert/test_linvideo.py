"""LinVideo surgery on tiny random Wan and CogVideoX transformers: gates, hybrid and linear processors,
switch, selection, save/load, bad input. References are computed here by hand (plain torch, from the
attention module's own weights), never through convert.linvideo or kernels.

    .venv/bin/python -m pytest tests/convert/test_linvideo.py -q
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from diffusers import CogVideoXTransformer3DModel, UNet2DConditionModel, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from torch import nn
from torch.overrides import TorchFunctionMode

from athanor.convert.linvideo import (
    WanLinVideoProcessor,
    attention_cost,
    candidate_layers,
    choose_linear,
    gate_values,
    gates,
    install,
    is_switched,
    linear_layers,
    load_student,
    save_student,
    switch,
)
from athanor.convert.recipe_types import RecipeError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EPS = 1e-6  # linear attention's denominator eps (kernels.linear_attention default)
WAN_TOKENS = 3 * 2 * 2  # frames 3, 4x4 pixels in 2x2 patches
COG_TEXT, COG_VIDEO = 8, 2 * 4 * 4  # text tokens; 2 latent frames of 8x8 in 2x2 patches


def wan(num_layers: int = 3, seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=1,
                                 out_channels=1, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=num_layers,
                                 rope_max_seq_len=32).eval()


def cog(seed: int = 0) -> CogVideoXTransformer3DModel:
    torch.manual_seed(seed)  # sample_frames 5 -> (5 - 1) // 4 + 1 = 2 latent frames
    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                       text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8,
                                       sample_frames=5, patch_size=2, time_embed_dim=16,
                                       max_text_seq_length=COG_TEXT).eval()


def wan_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(1, 1, 3, 4, 4, generator=g), "timestep": torch.tensor([600]),
            "encoder_hidden_states": torch.randn(1, 5, 16, generator=g)}


def cog_inputs(seed: int = 1, rope: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(COG_VIDEO, 4, generator=g) * 6.0  # per video token and channel pair
    rope_emb = (angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)) if rope else None
    return {"hidden_states": torch.randn(1, 2, 4, 8, 8, generator=g), "timestep": torch.tensor([600]),
            "encoder_hidden_states": torch.randn(1, COG_TEXT, 16, generator=g), "image_rotary_emb": rope_emb}


def randomize_maps(model: nn.Module, seed: int = 2) -> None:
    """Hedgehog maps start as the identity (same for q and k); make them distinct and random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gates(model).values():
            for fmap in gate.maps:
                fmap.weight.copy_(torch.randn(fmap.weight.shape, generator=g))


def set_r(model: nn.Module, values: dict[str, float]) -> None:
    with torch.no_grad():
        for name, value in values.items():
            gates(model)[name].r.fill_(value)


@contextmanager
def capture(module: nn.Module):
    """The module's call arguments and output during the block."""
    seen: dict = {}

    def hook(_module, args, kwargs, output):
        seen.update(args=args, kwargs=kwargs, out=output)

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


# ---- references, written out here ----

def hedgehog(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    proj = torch.einsum("bhnd,hdf->bhnf", x, w)
    return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], -1)


def linear_ref(q, k, v, gate) -> torch.Tensor:
    pq, pk = hedgehog(q, gate.maps[0].weight), hedgehog(k, gate.maps[1].weight)
    num = torch.einsum("bhnf,bhmf,bhmd->bhnd", pq, pk, v)
    den = torch.einsum("bhnf,bhmf->bhn", pq, pk)
    return num / (den[..., None] + EPS)


def softmax_ref(q, k, v) -> torch.Tensor:
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhnm,bhmd->bhnd", scores.softmax(-1), v)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as complex multiplication: channel pairs (2i, 2i+1) turned by the angle with this cos/sin."""
    z = torch.complex(x[..., 0::2].double(), x[..., 1::2].double()) * torch.complex(cos.double(), sin.double())
    return torch.view_as_real(z).flatten(-2).to(x.dtype)


def wan_qkv(attn, h, rope) -> tuple[torch.Tensor, ...]:
    """[batch, heads, tokens, dim] from WanAttention weights: projections, RMS norms, rotary."""
    def rms(x, norm):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight

    cos, sin = rope[0][..., 0::2], rope[1][..., 0::2]  # [1, tokens, 1, dim/2], channels repeat in pairs
    q = rms(h @ attn.to_q.weight.T + attn.to_q.bias, attn.norm_q).unflatten(2, (attn.heads, -1))
    k = rms(h @ attn.to_k.weight.T + attn.to_k.bias, attn.norm_k).unflatten(2, (attn.heads, -1))
    v = (h @ attn.to_v.weight.T + attn.to_v.bias).unflatten(2, (attn.heads, -1))
    return tuple(t.transpose(1, 2) for t in (rotate(q, cos, sin), rotate(k, cos, sin), v))


def out_proj(attn, o: torch.Tensor) -> torch.Tensor:
    return o.transpose(1, 2).flatten(2) @ attn.to_out[0].weight.T + attn.to_out[0].bias


class Shapes(TorchFunctionMode):
    """Records the shape of every tensor a torch function returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def has_square(shapes, n: int) -> bool:
    return any(len(s) >= 2 and s[-2:] == (n, n) for s in shapes)


# ---- tests ----

@pytest.mark.parametrize("arch", ["wan", "cogvideox", "cogvideox-rope"])
@torch.no_grad()
def test_fresh_install_with_r_one_is_the_teacher(arch):
    model = wan() if arch == "wan" else cog()
    inputs = wan_inputs() if arch == "wan" else cog_inputs(rope=arch.endswith("rope"))
    teacher = copy.deepcopy(model)
    install(model, candidate_layers(model))
    randomize_maps(model)
    assert set(gate_values(model).values()) == {1.0}
    got, want = model(**inputs).sample, teacher(**inputs).sample
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    set_r(model, dict.fromkeys(gate_values(model), 0.5))  # the gates do act: r = 0.5 moves the output
    assert not torch.allclose(model(**inputs).sample, want, atol=1e-3)


@torch.no_grad()
def test_wan_gate_mixes_hand_computed_softmax_and_hedgehog_linear_attention():
    model, inputs = wan(), wan_inputs()
    install(model, candidate_layers(model))
    randomize_maps(model)
    attn, gate = model.blocks[1].attn1, gates(model)["blocks.1.attn1"]
    q = k = v = None
    for r in (0.0, 0.3):
        set_r(model, {"blocks.1.attn1": r})
        with capture(attn) as seen:
            model(**inputs)
        q, k, v = wan_qkv(attn, seen["args"][0], model.rope(inputs["hidden_states"]))
        lin, soft = linear_ref(q, k, v, gate), softmax_ref(q, k, v)
        assert not torch.allclose(lin, soft, atol=1e-2)  # the two branches differ, so the mix is tested
        want = out_proj(attn, r * soft + (1 - r) * lin)
        assert seen["out"].shape == (1, WAN_TOKENS, 16)
        assert torch.allclose(seen["out"], want, atol=1e-5, rtol=1e-5), r
    assert torch.allclose(gate.transfer_error, (lin - soft).pow(2).mean(), atol=1e-6)


@torch.no_grad()
def test_switch_drops_the_softmax_branch_and_restores_the_other_layers():
    model, inputs = wan(), wan_inputs()
    install(model, candidate_layers(model))
    randomize_maps(model)
    attn = model.blocks[1].attn1
    with capture(attn) as seen:
        model(**inputs)
    h, rope = seen["args"][0], model.rope(inputs["hidden_states"])
    sdpa = F.scaled_dot_product_attention
    with mock.patch.object(F, "scaled_dot_product_attention", wraps=sdpa) as spy:
        attn(h, None, None, rope)  # hybrid: the softmax branch runs (the spy can see it)
        assert spy.call_count == 1
        switch(model, ["blocks.1.attn1"])
        spy.reset_mock()
        with Shapes() as seen_shapes:
            got = attn(h, None, None, rope)
        assert spy.call_count == 0
    assert not has_square(seen_shapes.shapes, WAN_TOKENS)
    q, k, v = wan_qkv(attn, h, rope)
    assert torch.allclose(got, out_proj(attn, linear_ref(q, k, v, gates(model)["blocks.1.attn1"])), atol=1e-5)
    with Shapes() as probe:  # the shape check does catch an N x N score matrix
        softmax_ref(q, k, v)
    assert has_square(probe.shapes, WAN_TOKENS)

    assert isinstance(attn.processor, WanLinVideoProcessor) and attn.linvideo.r is None
    for i in (0, 2):
        other = model.blocks[i].attn1
        assert type(other.processor) is WanAttnProcessor
        assert not hasattr(other, "linvideo") and not hasattr(other, "linvideo_original")
    assert gate_values(model) == {} and linear_layers(model) == ["blocks.1.attn1"] and is_switched(model)
    keys = [k for k in model.state_dict() if ".linvideo." in k]
    assert sorted(keys) == ["blocks.1.attn1.linvideo.maps.0.weight", "blocks.1.attn1.linvideo.maps.1.weight"]


def test_wan_processor_gradients_match_hand_computation():
    """Hybrid (r = 0.3), with grad: the processor's [batch, tokens, heads, dim] path (complex RoPE, the
    kernel's contiguous output) gives the hand-computed outputs and gradients for the input, the
    projections and both feature maps."""
    model, inputs = wan(), wan_inputs()
    install(model, candidate_layers(model))
    randomize_maps(model)
    set_r(model, {"blocks.1.attn1": 0.3})
    attn, gate = model.blocks[1].attn1, gates(model)["blocks.1.attn1"]
    with torch.no_grad(), capture(attn) as seen:
        model(**inputs)
    h = seen["args"][0].clone().requires_grad_()
    rope = model.rope(inputs["hidden_states"])
    params = [h, attn.to_q.weight, attn.to_k.weight, attn.to_v.weight, gate.maps[0].weight, gate.maps[1].weight]
    got = attn(h, None, None, rope)
    q, k, v = wan_qkv(attn, h, rope)
    want = out_proj(attn, 0.3 * softmax_ref(q, k, v) + 0.7 * linear_ref(q, k, v, gate))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    weight = torch.linspace(-1, 1, got.numel()).view_as(got)
    for g_got, g_want in zip(torch.autograd.grad((got * weight).sum(), params),
                             torch.autograd.grad((want * weight).sum(), params)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_wan_linear_processor_fused_projections_and_bf16():
    """Fused q/k/v projections (strided q, k, v) give the same outputs; in bf16 the linear layer stays
    within bf16 rounding of the float32 hand computation."""
    model, inputs = wan(), wan_inputs()
    install(model, candidate_layers(model))
    randomize_maps(model)
    switch(model, ["blocks.1.attn1"])
    attn, gate = model.blocks[1].attn1, gates(model)["blocks.1.attn1"]
    with capture(attn) as seen:
        model(**inputs)
    h, rope = seen["args"][0], model.rope(inputs["hidden_states"])
    q, k, v = wan_qkv(attn, h, rope)
    want = out_proj(attn, linear_ref(q, k, v, gate))
    fused = copy.deepcopy(attn)
    fused.fuse_projections()
    assert fused.fused_projections
    torch.testing.assert_close(fused(h, None, None, rope), want, rtol=1e-5, atol=1e-5)
    half = copy.deepcopy(attn).to(torch.bfloat16)
    got = half(h.bfloat16(), None, None, tuple(t.float() for t in rope))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0, atol=3e-2 * want.abs().max().item())


def test_switch_refuses_a_layer_without_a_gate():
    model = wan()
    install(model, candidate_layers(model))
    with pytest.raises(ValueError, match=r"blocks\.7\.attn1"):
        switch(model, ["blocks.7.attn1"])
    assert len(gate_values(model)) == 3  # nothing was switched


def test_choose_linear_takes_the_lowest_gates_or_an_even_spread():
    model = wan(num_layers=4)
    names = candidate_layers(model)
    install(model, names)
    assert choose_linear(model, 2) == [names[1], names[3]]  # all r = 1: evenly spread (i + 0.5)·n/k
    assert choose_linear(model, 1) == [names[2]] and choose_linear(model, 1) == [names[2]]
    assert choose_linear(model, 0) == [] and choose_linear(model, 4) == names
    set_r(model, dict(zip(names, [0.9, 0.02, 0.97, 0.01])))
    assert choose_linear(model, 2) == [names[1], names[3]]
    set_r(model, dict(zip(names, [0.01, 0.9, 0.02, 0.97])))
    assert choose_linear(model, 2) == [names[0], names[2]]
    assert choose_linear(model, 3) == [names[0], names[1], names[2]]
    for bad in (-1, 5):
        with pytest.raises(ValueError, match=rf"target {bad} outside 0\.\.4"):
            choose_linear(model, bad)


@torch.no_grad()
def test_save_and_load_student_round_trip(tmp_path):
    model, inputs = wan(), wan_inputs()
    install(model, candidate_layers(model))
    randomize_maps(model)
    with pytest.raises(ValueError, match="switch"):
        save_student(model, tmp_path / "hybrid")
    switch(model, ["blocks.1.attn1"])
    out_dir = save_student(model, tmp_path / "student", extra={"steps": 3})
    assert gates(model) and isinstance(model.blocks[1].attn1.processor, WanLinVideoProcessor)  # model kept

    plain = WanTransformer3DModel.from_pretrained(out_dir).eval()  # an ordinary diffusers directory
    want_state = {k: v for k, v in model.state_dict().items() if ".linvideo." not in k}
    plain_state = plain.state_dict()
    assert plain_state.keys() == want_state.keys()
    assert all(torch.equal(plain_state[k], want_state[k]) for k in want_state)

    student = load_student(out_dir).eval()
    assert linear_layers(student) == linear_layers(model) == ["blocks.1.attn1"] and is_switched(student)
    assert isinstance(student.blocks[1].attn1.processor, WanLinVideoProcessor)
    assert torch.allclose(student(**inputs).sample, model(**inputs).sample, atol=1e-6, rtol=0)
    assert not torch.allclose(plain(**inputs).sample, model(**inputs).sample, atol=1e-4)  # the maps mattered


@torch.no_grad()
def test_cogvideox_joint_linear_attention_matches_hand_computation():
    model, inputs = cog(), cog_inputs(rope=True)
    install(model, candidate_layers(model))
    randomize_maps(model)
    set_r(model, {"transformer_blocks.1.attn1": 0.0})
    attn = model.transformer_blocks[1].attn1
    with capture(attn) as seen:
        model(**inputs)
    video, text = seen["out"]
    assert video.shape == (1, COG_VIDEO, 16) and text.shape == (1, COG_TEXT, 16)

    def layer_norm(x, norm):
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias

    x = torch.cat([seen["kwargs"]["encoder_hidden_states"], seen["kwargs"]["hidden_states"]], 1)
    q, k, v = ((x @ lin.weight.T + lin.bias).unflatten(2, (2, 8)).transpose(1, 2)
               for lin in (attn.to_q, attn.to_k, attn.to_v))
    q, k = layer_norm(q, attn.norm_q), layer_norm(k, attn.norm_k)
    cos, sin = (t[:, 0::2] for t in inputs["image_rotary_emb"])
    q = torch.cat([q[:, :, :COG_TEXT], rotate(q[:, :, COG_TEXT:], cos, sin)], 2)
    k = torch.cat([k[:, :, :COG_TEXT], rotate(k[:, :, COG_TEXT:], cos, sin)], 2)
    want = out_proj(attn, linear_ref(q, k, v, gates(model)["transformer_blocks.1.attn1"]))
    assert torch.allclose(text, want[:, :COG_TEXT], atol=1e-5)
    assert torch.allclose(video, want[:, COG_TEXT:], atol=1e-5)


def test_candidate_layers_reports_bad_names_with_their_key():
    model = wan()
    assert candidate_layers(model) == ["blocks.0.attn1", "blocks.1.attn1", "blocks.2.attn1"]
    assert candidate_layers(cog()) == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    cases = [(["blocks.9.attn1"], "blocks.9.attn1", "no attention module"),
             (["blocks.0.attn2"], "blocks.0.attn2", "cross-attention"),
             (["blocks.0.attn1", "blocks.0.attn1"], ["blocks.0.attn1"] * 2, "twice")]
    for names, value, why in cases:
        with pytest.raises(RecipeError) as err:
            candidate_layers(model, names)
        assert err.value.key == "linvideo.candidate_layers" and err.value.value == value
        assert str(err.value).startswith(f"linvideo.candidate_layers: {value!r}") and why in str(err.value)
    hint = str(pytest.raises(RecipeError, candidate_layers, model, ["blocks.9.attn1"]).value)
    assert "'blocks.2.attn1'" in hint and "attn2" not in hint  # names the self-attention modules it has


@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Linear(4, 4)),
                                  lambda: UNet2DConditionModel(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                                               block_out_channels=(8, 16), norm_num_groups=8,
                                                               cross_attention_dim=8, attention_head_dim=2,
                                                               layers_per_block=1, sample_size=8)],
                         ids=["sequential", "unet"])
def test_candidate_layers_needs_names_for_a_model_it_does_not_know(make):
    model = make()
    with pytest.raises(RecipeError) as err:
        candidate_layers(model)
    assert err.value.key == "teacher" and err.value.value == type(model).__name__
    assert str(err.value).startswith(f"teacher: '{type(model).__name__}'")
    assert "linvideo.candidate_layers" in str(err.value)


def test_attention_cost_counts_quadratic_softmax_and_linear_layers():
    config = {"num_attention_heads": 12, "attention_head_dim": 64}
    n, layers = 4096, 30
    base = attention_cost(config, n, 0, layers)
    assert base["ratio"] == 1 and base["before_macs"] == base["after_macs"]
    assert base["softmax_layer_macs"] == 2 * n * n * 64 * 12 and base["before_macs"] == layers * 2 * n * n * 64 * 12
    assert attention_cost(config, n - 100, 0, layers, text_tokens=100)["softmax_layer_macs"] == 2 * n * n * 64 * 12
    double = attention_cost(config, 2 * n, 0, layers)
    assert double["linear_layer_macs"] == 2 * base["linear_layer_macs"]  # linear in tokens
    assert double["softmax_layer_macs"] == 4 * base["softmax_layer_macs"]  # quadratic in tokens
    after = [attention_cost(config, n, k, layers)["after_macs"] for k in range(layers + 1)]
    assert all(a > b for a, b in zip(after, after[1:]))
    assert after[-1] == layers * base["linear_layer_macs"]
    assert attention_cost(config, n, layers, layers)["ratio"] == pytest.approx(after[0] / after[-1])


def test_gates_are_trainable_parameters_of_the_model():
    model, inputs = wan(), wan_inputs()
    installed = install(model, candidate_layers(model))
    randomize_maps(model)
    params = dict(model.named_parameters())
    for name, gate in installed.items():
        for suffix, param in (("r", gate.r), ("maps.0.weight", gate.maps[0].weight),
                              ("maps.1.weight", gate.maps[1].weight)):
            assert params[f"{name}.linvideo.{suffix}"] is param
    set_r(model, {"blocks.0.attn1": 0.5})
    out = model(**inputs).sample
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    hybrid, teacher_like = installed["blocks.0.attn1"], installed["blocks.1.attn1"]
    assert hybrid.r.grad is not None and hybrid.r.grad.abs() > 0
    assert all(m.weight.grad.abs().sum() > 0 for m in hybrid.maps)
    assert all(torch.count_nonzero(m.weight.grad) == 0 for m in teacher_like.maps)  # r = 1: linear branch off

"""LinVideo sampling and data-free data on a tiny random Wan transformer: the time grid, Euler steps and
classifier-free guidance replayed by hand with direct model calls, teacher trajectories, the trajectory
cache, training points, teacher loading and conditions.

    .venv/bin/python -m pytest tests/distill/linvideo/test_data.py -q
"""

from __future__ import annotations

import copy
import json
from unittest import mock

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from athanor.distill.fashion_mnist import FashionClassifier
from athanor.distill.linvideo import sampling
from athanor.distill.linvideo.data import (
    LinVideoTeacher,
    TrajectoryCache,
    TrajectoryPoints,
    cached_trajectories,
    conditions_for,
    load_teacher,
    teacher_trajectories,
)
from athanor.distill.spec import RecipeError, ResolvedSource

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
           text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
SHAPE = (1, 2, 4, 4)  # [C, F, H, W]
SETTINGS = dict(samples=2, steps=3, guidance=2.5, shift=3.0, seed=11)


@pytest.fixture(scope="module")
def model() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(**WAN).eval()


@pytest.fixture(scope="module")
def conditions() -> torch.Tensor:
    return torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(1))


def direct(model, x, t: float, cond) -> torch.Tensor:
    """The model's velocity from one plain forward call (timestep on the 0..1000 scale)."""
    timestep = torch.full((x.shape[0],), t * 1000.0)
    with torch.no_grad():
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond, return_dict=False)[0]


def grid(steps: int, shift: float) -> list[float]:
    return [shift * (1 - i / steps) / (1 + (shift - 1) * (1 - i / steps)) for i in range(steps + 1)]


def test_timesteps_run_from_noise_to_data_with_the_shift_warp():
    plain = sampling.timesteps(4)
    assert plain.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    shifted = sampling.timesteps(4, shift=3.0)
    assert shifted.tolist() == pytest.approx([1.0, 2.25 / 2.5, 1.5 / 2.0, 0.75 / 1.5, 0.0])  # s·t / (1 + (s−1)·t)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    for ts in (plain, shifted, sampling.timesteps(7, shift=0.5)):
        assert bool((ts[1:] < ts[:-1]).all())


def test_sample_keeps_the_trajectory_and_each_stored_step_replays_by_hand(model, conditions):
    noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(2))
    cond, uncond = conditions[:2], torch.zeros(1, 4, 16)
    final, path = sampling.sample(model, noise, cond, uncond, steps=3, guidance=2.0, shift=2.0, keep_trajectory=True)
    assert len(path) == 3
    times = grid(3, 2.0)
    assert [t for t, _ in path] == pytest.approx(times[:-1])
    assert torch.equal(path[0][1], noise)
    nexts = [x for _, x in path[1:]] + [final]
    for (t, x), x_next, t_next in zip(path, nexts, times[1:]):
        u_c, u_u = direct(model, x, t, cond), direct(model, x, t, uncond.expand_as(cond))
        by_hand = x + (t_next - t) * (u_u + 2.0 * (u_c - u_u))
        assert torch.allclose(by_hand, x_next, atol=1e-5)
    assert sampling.sample(model, noise, cond, uncond, steps=3)[1] == []


def test_guidance_one_is_the_conditional_velocity(model, conditions):
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(3))
    u = sampling.velocity(model, x, 0.4, conditions, torch.zeros(1, 4, 16), guidance=1.0)
    assert torch.allclose(u, direct(model, x, 0.4, conditions), atol=1e-6)
    assert not torch.allclose(u, direct(model, x, 0.4, torch.zeros(3, 4, 16)), atol=1e-3)


@pytest.mark.parametrize("g", [0.0, 3.0, 7.5])
def test_guidance_mixes_two_separate_model_calls(model, conditions, g):
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(4))
    uncond = torch.zeros(1, 4, 16)
    u = sampling.velocity(model, x, 0.7, conditions, uncond, guidance=g)
    u_c, u_u = direct(model, x, 0.7, conditions), direct(model, x, 0.7, uncond.expand(3, 4, 16))
    assert torch.allclose(u, u_u + g * (u_c - u_u), atol=1e-5)


def test_teacher_trajectories_cover_every_point_of_every_trajectory(model, conditions):
    cache = teacher_trajectories(model, conditions, SHAPE, batch=4, **SETTINGS)
    n_traj = len(conditions) * SETTINGS["samples"]
    assert len(cache) == n_traj * SETTINGS["steps"]
    assert cache.x.shape == (len(cache), *SHAPE) and cache.finals.shape == (n_traj, *SHAPE)
    times = grid(SETTINGS["steps"], SETTINGS["shift"])
    pairs = {(round(a, 5), round(b, 5)) for a, b in zip(times, times[1:])}
    assert {(round(a, 5), round(b, 5)) for a, b in zip(cache.t.tolist(), cache.t_next.tolist())} == pairs
    assert bool((cache.t_next[cache.t == cache.t.min()] == 0).all())
    assert torch.bincount(cache.cond).tolist() == [SETTINGS["samples"] * SETTINGS["steps"]] * 3
    uncond = torch.zeros(1, 4, 16)
    for c in range(3):
        for s in range(SETTINGS["samples"]):
            noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(SETTINGS["seed"] + 7919 * c + s))
            start = (cache.t == 1.0) & (cache.cond == c) & (cache.x == noise).flatten(1).all(1)
            assert int(start.sum()) == 1  # the seeded noise is the trajectory's point at t = 1
            final, _ = sampling.sample(model, noise[None], conditions[c:c + 1], uncond, steps=SETTINGS["steps"],
                                       guidance=SETTINGS["guidance"], shift=SETTINGS["shift"])
            assert torch.allclose(cache.finals[c * SETTINGS["samples"] + s], final[0], atol=1e-5)
    again = teacher_trajectories(model, conditions, SHAPE, batch=4, **SETTINGS)
    for key in ("x", "t", "t_next", "cond", "finals"):
        assert torch.equal(getattr(cache, key), getattr(again, key))


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_trajectory_cache_round_trip_reads_back_without_sampling(model, conditions, tmp_path):
    settings = dict(SETTINGS, samples=1, steps=2)
    first = cached_trajectories(model, conditions, SHAPE, tmp_path, **settings)
    assert len(_files(tmp_path)) == 1 and _files(tmp_path)[0].endswith(".safetensors")
    with mock.patch.object(model, "forward", wraps=model.forward) as forward:
        second = cached_trajectories(model, conditions, SHAPE, tmp_path, **settings)
        assert forward.call_count == 0
        teacher_trajectories(model, conditions[:1], SHAPE, **settings)  # the counter does see real sampling
        assert forward.call_count == 2
    for key in ("x", "t", "t_next", "cond", "finals"):
        assert torch.equal(getattr(first, key), getattr(second, key))
    cached_trajectories(model, conditions, SHAPE, tmp_path, **dict(settings, steps=3))
    assert len(_files(tmp_path)) == 2
    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(iter(changed.parameters())).view(-1)[0] += 1.0
    cached_trajectories(changed, conditions, SHAPE, tmp_path, **settings)
    assert len(_files(tmp_path)) == 3


def test_reordered_prompts_do_not_reuse_the_cache(model, conditions, tmp_path):
    """The cache stores prompt indices: the same prompts in another order must not read it back."""
    settings = dict(SETTINGS, samples=1, steps=2)
    quarters = torch.round(conditions * 4) / 4  # sums are exact in any order: no float-rounding luck
    cached_trajectories(model, quarters, SHAPE, tmp_path, **settings)
    swapped = cached_trajectories(model, quarters.flip(0), SHAPE, tmp_path, **settings)
    assert len(_files(tmp_path)) == 2
    fresh = teacher_trajectories(model, quarters.flip(0), SHAPE, **settings)
    assert torch.allclose(swapped.finals, fresh.finals, atol=1e-6)


def test_cache_save_is_atomic_and_loads_back(tmp_path):
    cache = TrajectoryCache(x=torch.randn(4, *SHAPE), t=torch.rand(4), t_next=torch.rand(4),
                            cond=torch.tensor([0, 1, 1, 2]), finals=torch.randn(2, *SHAPE))
    path = cache.save(tmp_path / "sub" / "trajectories-abc.safetensors")
    assert _files(tmp_path / "sub") == ["trajectories-abc.safetensors"]
    back = TrajectoryCache.load(path)
    for key in ("x", "t", "t_next", "cond", "finals"):
        assert torch.equal(getattr(cache, key), getattr(back, key))


def test_trajectory_points_drop_late_points_and_pair_each_with_its_condition():
    conditions = torch.randn(3, 4, 16)
    ts = torch.tensor([1.0, 0.75, 0.5, 0.25] * 2)
    nexts = torch.tensor([0.75, 0.5, 0.25, 0.0] * 2)
    conds = torch.tensor([2, 2, 2, 2, 0, 0, 0, 0])
    x = torch.arange(8.0).view(8, 1, 1, 1, 1).expand(8, *SHAPE).contiguous()  # x of point j is all j
    points = TrajectoryPoints(TrajectoryCache(x, ts, nexts, conds, torch.zeros(2, *SHAPE)), conditions, t_min=0.3)
    assert len(points) == 4
    seen = []
    for i in range(len(points)):
        item = points[i]
        assert set(item) == {"x", "t", "t_next", "cond"}
        j = int(item["x"].flatten()[0])
        seen.append(j)
        assert item["x"].shape == SHAPE
        assert float(item["t"]) == float(ts[j]) and float(item["t_next"]) == float(nexts[j]) >= 0.3
        assert torch.equal(item["cond"], conditions[2 if j < 4 else 0])
    assert sorted(seen) == [0, 1, 4, 5]
    assert len(TrajectoryPoints(TrajectoryCache(x, ts, nexts, conds, x[:2]), conditions, t_min=0.0)) == 8


def test_load_teacher_builds_an_inline_config_seeded_and_on_meta():
    config = {"_class_name": "WanTransformer3DModel", **WAN}
    teacher = load_teacher(ResolvedSource(description="x", config=config, seed=5))
    assert type(teacher.transformer) is WanTransformer3DModel and teacher.description == "x"
    assert teacher.transformer.config.num_layers == 2 and not teacher.transformer.training
    torch.manual_seed(5)
    reference = WanTransformer3DModel(**WAN)
    nested = load_teacher(ResolvedSource(description="x", config={"transformer": config}, seed=5))
    for got in (teacher.transformer, nested.transformer):
        for (name, a), (_, b) in zip(got.state_dict().items(), reference.state_dict().items()):
            assert torch.equal(a, b), name
    meta = load_teacher(ResolvedSource(description="x", config=config), meta=True)
    assert all(p.is_meta for p in meta.transformer.parameters())


def test_load_teacher_rejects_an_unknown_class_and_a_folder_without_config(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_teacher(ResolvedSource(description="x", config={"_class_name": "NoSuchTransformer3D", **WAN}))
    assert err.value.key == "teacher" and "NoSuchTransformer3D" in str(err.value)
    assert "WanTransformer3DModel" in str(err.value)
    with pytest.raises(RecipeError) as err:
        load_teacher(ResolvedSource(description="x", path=tmp_path))
    assert err.value.key == "teacher.source" and "config.json" in str(err.value) and str(tmp_path) in str(err.value)


def test_load_teacher_reads_a_testbed_folder(model, conditions, tmp_path):
    model.save_pretrained(tmp_path / "transformer")
    captions = ["a bag moving up", "a coat moving left", "a shirt moving down"]
    (tmp_path / "captions.json").write_text(json.dumps({"captions": captions, "clip": {"frames": 2, "canvas": 4}}))
    save_file({"conditions": conditions.contiguous()}, tmp_path / "conditions.safetensors")
    torch.manual_seed(9)
    classifier = FashionClassifier()
    save_file(classifier.state_dict(), tmp_path / "classifier.safetensors")
    teacher = load_teacher(ResolvedSource(description="dir", path=tmp_path))
    assert teacher.captions == captions and teacher.clip == {"frames": 2, "canvas": 4}
    assert torch.equal(teacher.conditions, conditions)
    for (name, a), (_, b) in zip(teacher.transformer.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(teacher.classifier.state_dict().items(), classifier.state_dict().items()):
        assert torch.equal(a, b), name
    assert teacher.pipeline_dir is None
    bare = load_teacher(ResolvedSource(description="bare", path=tmp_path / "transformer"))
    assert bare.captions == [] and bare.conditions is None and bare.classifier is None


def test_conditions_for_known_captions_and_an_unknown_prompt(model, conditions):
    teacher = LinVideoTeacher(model, captions=["a", "b", "c"], conditions=conditions)
    rows = conditions_for(teacher, ["c", "a", "c"], "linvideo.prompts")
    assert torch.equal(rows, torch.stack([conditions[2], conditions[0], conditions[2]]))
    with pytest.raises(RecipeError) as err:
        conditions_for(teacher, ["a", "a dragon flying"], "linvideo.eval_prompts")
    assert err.value.key == "linvideo.eval_prompts" and err.value.value == "a dragon flying"
    assert "captions.json" in str(err.value) and "16" in str(err.value)

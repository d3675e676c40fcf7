"""LoRA-Composer sampling (`distill.lora_composer.sampling`) on the testbed base model (32×64 pixel-space U-Net,
CLIP text encoder, word-level tokenizer) with random concept LoRAs made here. The reference sampler is DDIM with
classifier-free guidance written out below with diffusers' `DDIMScheduler` and the plain U-Net.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/distill/lora_composer/test_sampling.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from transformers import AutoTokenizer

from athanor.convert.lora_composer import Composition, Region, RegionalAttnProcessor, composed, load_concept_adapters
from athanor.distill.lora_composer.guidance import LatentGuidance, injection_loss
from athanor.distill.lora_composer.pipeline import ComposerTeacher, load_teacher
from athanor.distill.lora_composer.sampling import (
    ComposerSettings,
    ConceptRegion,
    encode,
    sample_composed,
    sample_mixed,
    word_positions,
)
from athanor.distill.lora_composer.testbed import TOKENIZER_DIR
from athanor.distill.spec import ResolvedSource

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:Already found a `peft_config`")]  # several adapters on purpose

TESTBED = Path("distill/lora_composer/testbed")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
NAMES = ("sneaker", "bag")
PROMPT = "a sks sneaker on the left and a zwx bag on the right"
LEFT, RIGHT = (0.03125, 0.0625, 0.46875, 0.9375), (0.53125, 0.0625, 0.96875, 0.9375)
REGIONS = [ConceptRegion("sneaker", LEFT, "a sks sneaker", "sks"), ConceptRegion("bag", RIGHT, "a zwx bag", "zwx")]
STEPS, SCALE = 3, 3.0


def base_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(TESTBED / "unet").eval().requires_grad_(False)


def save_loras(root: Path, zero: bool) -> dict[str, Path]:
    """One LoRA per name on a separate copy of the U-Net; `zero`: lora_B zeroed, so each adapter is an exact no-op."""
    source = base_unet()
    for seed, name in enumerate(NAMES):
        torch.manual_seed(200 + seed)
        source.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False),
                           adapter_name=name)
        if zero:
            for module in source.modules():
                if isinstance(module, LoraLayer) and name in module.lora_B:
                    torch.nn.init.zeros_(module.lora_B[name].weight)
        source.save_lora_adapter(root / name, adapter_name=name)
    return {name: root / name for name in NAMES}


@pytest.fixture(scope="module")
def zero_loras(tmp_path_factory) -> dict[str, Path]:
    return save_loras(tmp_path_factory.mktemp("zero"), zero=True)


@pytest.fixture(scope="module")
def random_loras(tmp_path_factory) -> dict[str, Path]:
    return save_loras(tmp_path_factory.mktemp("random"), zero=False)


def teacher_with(loras: dict[str, Path]) -> ComposerTeacher:
    teacher = load_teacher(ResolvedSource(description="t", path=TESTBED))
    load_concept_adapters(teacher.unet, loras)
    return teacher


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE (the repo's Austen tokenizer, the first testbed's): words come in several pieces."""
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def noise(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 1, 32, 64, generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def reference_ddim_cfg(teacher: ComposerTeacher, prompt: str, z: torch.Tensor) -> torch.Tensor:
    """DDIM + classifier-free guidance with a fresh base U-Net (default processors): the global prompt is the
    conditional input, the empty prompt the unconditional one."""
    unet, tok = base_unet(), teacher.tokenizer
    ids = tok([prompt, ""], padding="max_length", max_length=teacher.max_length, return_tensors="pt")["input_ids"]
    states = teacher.text_encoder(ids).last_hidden_state
    cond, uncond = (s[None].expand(len(z), -1, -1) for s in states)
    scheduler = DDIMScheduler.from_config(teacher.scheduler_config)
    scheduler.set_timesteps(STEPS)
    for t in scheduler.timesteps:
        eps_c = unet(z, t, encoder_hidden_states=cond).sample
        eps_u = unet(z, t, encoder_hidden_states=uncond).sample
        z = scheduler.step(eps_u + SCALE * (eps_c - eps_u), t, z).prev_sample
    return z


def test_word_positions_hand_checked(tokenizer):
    # "a sks sneaker" -> ['a', 'Ġsk', 's', 'Ġs', 'ne', 'ak', 'er'] (no BOS/EOS in this tokenizer): "sks" is 1-2.
    assert tokenizer.convert_ids_to_tokens(tokenizer("a sks sneaker")["input_ids"])[:3] == ["a", "Ġsk", "s"]
    assert word_positions(tokenizer, "a sks sneaker", "sks") == [1, 2]
    assert word_positions(tokenizer, "a sks sneaker", " sks ") == [1, 2]  # surrounding spaces are ignored
    # "a zwx bag on the left, a sks sneaker in the middle ...": 'a' 'Ġ' 'z' 'w' 'x' 'Ġb' 'ag' 'Ġon' 'Ġthe'
    # 'Ġleft' ',' 'Ġa' 'Ġsk' 's' ...; "zwx" is the four tokens 1-4, "sks" 12-13, "sneaker" 14-17.
    scene = "a zwx bag on the left, a sks sneaker in the middle and a vmj dress on the right"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(scene)["input_ids"])
    assert tokens[1:5] == ["Ġ", "z", "w", "x"] and tokens[12:14] == ["Ġsk", "s"]
    assert word_positions(tokenizer, scene, "zwx") == [1, 2, 3, 4]
    assert word_positions(tokenizer, scene, "sks") == [12, 13]
    assert word_positions(tokenizer, scene, "sneaker") == [14, 15, 16, 17]
    # The last occurrence: "sneaker" is tokens 1-4 and 7-10 of "a sneaker and a sneaker".
    assert word_positions(tokenizer, "a sneaker and a sneaker", "sneaker") == [7, 8, 9, 10]
    # At the very start of a prompt the word has no leading space: "sks" is then ['s', 'k', 's'], tokens 0-2.
    assert tokenizer.convert_ids_to_tokens(tokenizer("sks sneaker")["input_ids"])[:4] == ["s", "k", "s", "Ġs"]
    assert word_positions(tokenizer, "sks sneaker on the left", "sks") == [0, 1, 2]
    for prompt, word in [("a sks sneaker", "zwx"), ("a zwx bag", "bags"), ("", "sks"), ("sksx sneaker", "sks")]:
        with pytest.raises(ValueError, match="is not a run of tokens"):
            word_positions(tokenizer, prompt, word)


def test_word_positions_with_the_testbeds_word_tokenizer():
    tokenizer = load_teacher(ResolvedSource(description="t", path=TESTBED)).tokenizer
    scene = "a zwx bag on the left, a sks sneaker in the middle and a vmj dress on the right"
    # one token per word and per comma, no BOS/EOS: a(0) zwx(1) bag(2) on the left ,(6) a(7) sks(8) sneaker(9) ...
    assert tokenizer.convert_ids_to_tokens(tokenizer(scene)["input_ids"])[7:10] == ["a", "sks", "sneaker"]
    assert word_positions(tokenizer, scene, "zwx") == [1]
    assert word_positions(tokenizer, scene, "sks") == [8]
    assert word_positions(tokenizer, scene, "dress") == [16]
    assert word_positions(tokenizer, "a sneaker and a sneaker", "sneaker") == [4]
    with pytest.raises(ValueError, match="is not a run of tokens"):
        word_positions(tokenizer, "a sks sneaker", "bnq")


def test_composed_with_noop_adapters_is_plain_ddim_cfg(zero_loras):
    """Zero adapters, no injection, isolation, re-initialisation or guidance: the composed sampler is the base model
    conditioned on the global prompt, i.e. ordinary DDIM + CFG."""
    teacher, z = teacher_with(zero_loras), noise()
    settings = ComposerSettings(steps=STEPS, guidance_scale=SCALE, isolate=False, inject=False, reinit=False,
                                guidance_steps=0)
    images, info = sample_composed(teacher.unet, teacher.text_encoder, teacher.tokenizer, teacher.scheduler_config,
                                   REGIONS, PROMPT, z, settings, teacher.max_length)
    reference = reference_ddim_cfg(teacher, PROMPT, z)
    assert images.shape == z.shape and info["guidance_loss"] == []
    torch.testing.assert_close(images, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(reference, z, atol=1e-2)  # sampling did something


def test_composed_with_real_adapters_is_not_a_noop(random_loras):
    teacher, z = teacher_with(random_loras), noise()
    settings = ComposerSettings(steps=STEPS, guidance_scale=SCALE, reinit=False, guidance_steps=0)  # inject on
    images, info = sample_composed(teacher.unet, teacher.text_encoder, teacher.tokenizer, teacher.scheduler_config,
                                   REGIONS, PROMPT, z, settings, teacher.max_length)
    reference = reference_ddim_cfg(teacher, PROMPT, z)
    assert torch.isfinite(images).all()
    assert (images - reference).abs().max() > 1e-2
    assert {tuple(m.shape[:2]) for m in info["maps"]} == {(2, 2)}  # [R, B, h, w] maps of the middle step


def test_one_guidance_step_lowers_the_injection_loss(random_loras):
    """At the first DDIM timestep, z ← z − η ∇z L (LatentGuidance defaults) lowers the injection loss."""
    teacher = teacher_with(random_loras)
    tok, unet = teacher.tokenizer, teacher.unet
    embeds = encode(teacher.text_encoder, tok, [PROMPT, "", REGIONS[0].prompt, REGIONS[1].prompt], teacher.max_length)
    regions = [Region(r.adapter, r.box, embeds[2 + i:3 + i], word_positions(tok, r.prompt, r.word))
               for i, r in enumerate(REGIONS)]
    comp = Composition(regions, embeds[:1], height=32, width=64, record=True)
    boxes = [r.box for r in REGIONS]
    scheduler = DDIMScheduler.from_config(teacher.scheduler_config)
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[0]

    def forward(z: torch.Tensor) -> torch.Tensor:
        comp.reset()
        z = z.detach().requires_grad_(True)
        with composed(unet, comp), torch.enable_grad():
            unet(z, t, encoder_hidden_states=embeds[1:2])
        return z

    guide = LatentGuidance()
    z0 = forward(noise(1))
    assert len(comp.maps) == len(comp.fg_bg_mass) == 7  # every attention module: 1 + 1 down, 1 mid, 2 + 2 up
    loss = guide.loss(comp.maps, boxes, comp.fg_bg_mass)
    before = injection_loss(comp.maps, boxes).item()
    z1 = guide.step(z0, loss, 0)
    assert not z1.requires_grad and (z1 - z0).abs().max() > 0
    forward(z1)
    after = injection_loss(comp.maps, boxes).item()
    assert 0 < after < before <= 1, (before, after)
    assert guide.losses == [pytest.approx(loss.item())] and not guide.stopped


def test_sample_mixed_leaves_adapters_disabled(random_loras):
    teacher, z = teacher_with(random_loras), noise()
    mixed = sample_mixed(teacher.unet, teacher.text_encoder, teacher.tokenizer, teacher.scheduler_config,
                         list(NAMES), [1.0, 0.5], PROMPT, z, steps=STEPS, guidance_scale=SCALE,
                         max_length=teacher.max_length)
    assert (mixed - reference_ddim_cfg(teacher, PROMPT, z)).abs().max() > 1e-2  # the adapters were on during it
    context = encode(teacher.text_encoder, teacher.tokenizer, [PROMPT, ""], teacher.max_length)
    with torch.no_grad():
        after = teacher.unet(z, 500, encoder_hidden_states=context).sample
        base = base_unet()(z, 500, encoder_hidden_states=context).sample
    torch.testing.assert_close(after, base, atol=1e-5, rtol=1e-5)
    # set_adapters' weights are undone: the composer, which reads each layer's `scaling`, sees the LoRAs as loaded
    assert {m.scaling[n] for m in teacher.unet.modules() if isinstance(m, LoraLayer) for n in NAMES} == {1.0}


WHOLE = (0.0, 0.0, 1.0, 1.0)


def test_noop_composition_equals_set_adapters_under_guidance(random_loras):
    """One concept, its box the whole canvas, its prompt the global one, no re-initialisation or guidance: the
    composition is a no-op, so the composer IS the `set_adapters` baseline with that one adapter, and the two arms'
    images agree at guidance scale g. They do only when both unconditional branches hold the adapter the same way
    (the composer's used to be the base model with adapters off: the LoRA's effect multiplied by g)."""
    teacher, z = teacher_with(random_loras), noise()
    prompt = "a sks sneaker"
    region = ConceptRegion("sneaker", WHOLE, prompt, "sks")
    settings = ComposerSettings(steps=STEPS, guidance_scale=SCALE, isolate=True, inject=True, reinit=False,
                                guidance_steps=0)
    composed_images, _ = sample_composed(teacher.unet, teacher.text_encoder, teacher.tokenizer,
                                         teacher.scheduler_config, [region], prompt, z, settings, teacher.max_length)
    mixed = sample_mixed(teacher.unet, teacher.text_encoder, teacher.tokenizer, teacher.scheduler_config,
                         ["sneaker"], [1.0], prompt, z, steps=STEPS, guidance_scale=SCALE,
                         max_length=teacher.max_length)
    torch.testing.assert_close(composed_images, mixed, atol=1e-4, rtol=1e-4)
    assert (mixed - reference_ddim_cfg(teacher, prompt, z)).abs().max() > 1e-2  # the adapter does act


def test_unconditional_branch_runs_the_regional_adapters_on_empty_prompts(random_loras):
    """Every unconditional U-Net call of the composer goes through the regional processor with its adapters on and
    every prompt (global and regional) the empty one; the conditional calls keep the scene's prompts."""
    teacher, z = teacher_with(random_loras), noise(1)
    settings = ComposerSettings(steps=2, guidance_scale=SCALE, reinit=False, guidance_steps=0)
    seen: list[tuple[bool, bool]] = []  # (global prompt empty, every region prompt empty) per cross-attention call
    empty = encode(teacher.text_encoder, teacher.tokenizer, [""], teacher.max_length)
    original, made = Composition.__init__, []

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    cross = RegionalAttnProcessor._cross

    def watch(self, attn, x, grid):
        comp = self.composition
        seen.append((torch.equal(comp.global_embeds, empty),
                     all(torch.equal(r.embeds, empty) for r in comp.regions)))
        return cross(self, attn, x, grid)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Composition, "__init__", spy)
        mp.setattr(RegionalAttnProcessor, "_cross", watch)
        sample_composed(teacher.unet, teacher.text_encoder, teacher.tokenizer, teacher.scheduler_config,
                        REGIONS, PROMPT, z, settings, teacher.max_length)
    layers = len(seen) // 4  # 2 steps × (conditional, unconditional)
    assert seen == ([(False, False)] * layers + [(True, True)] * layers) * 2
    (comp,) = made
    assert not torch.equal(comp.global_embeds, empty) and comp.record  # restored after each unconditional call


def test_both_arms_measure_leakage_on_the_same_real_attention(zero_loras):
    """Zero adapters, no injection: the composer and the baseline sample the same images, and their leakage
    is measured on the same maps (the concept words' attention under the global prompt), not the composer's
    regional maps under each concept's own prompt (those latent guidance optimises)."""
    from athanor.distill.lora_composer import evaluation as ev
    from athanor.distill.lora_composer.pipeline import Composer, Mixer, Scene

    teacher, z = teacher_with(zero_loras), noise()
    scene = Scene(PROMPT, tuple(REGIONS))
    settings = ComposerSettings(steps=STEPS, guidance_scale=SCALE, isolate=False, inject=False, reinit=False,
                                guidance_steps=0)
    composer, mixer = Composer(teacher, settings), Mixer(teacher, {}, STEPS, SCALE)
    composed_images, c_info = ev.sample_scene(composer, scene, z)
    mixed_images, m_info = ev.sample_scene(mixer, scene, z)
    torch.testing.assert_close(composed_images, mixed_images, atol=1e-5, rtol=1e-5)
    assert len(c_info["global_maps"]) == len(m_info["global_maps"]) == 7
    for c, m in zip(c_info["global_maps"], m_info["global_maps"]):
        torch.testing.assert_close(c, m, atol=1e-5, rtol=1e-5)
    boxes = [r.box for r in REGIONS]
    assert ev.leakage(c_info["global_maps"], boxes) == pytest.approx(ev.leakage(m_info["global_maps"], boxes))
    assert ev.leakage(c_info["maps"], boxes) != pytest.approx(ev.leakage(m_info["global_maps"], boxes), abs=1e-3)


"""LoRA-Composer region-aware attention and concept-adapter loading (`convert.lora_composer`) on a tiny random
pixel-space `UNet2DConditionModel` (16×32 input, attention at 8×16 and 4×8), float32, CPU. References are the
ordinary diffusers processor with peft's own adapter switching, never the code under test.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/convert/test_lora_composer.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from athanor.convert.lora_composer import (
    LORA_FILE,
    Composition,
    Region,
    adapter_bytes,
    composed,
    load_concept_adapters,
)
from athanor.convert.recipe_types import RecipeError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

H, W, DIM, TOKENS = 16, 32, 16, 6
CONFIG = dict(sample_size=(H, W), in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32, 32),
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              cross_attention_dim=DIM, attention_head_dim=4, norm_num_groups=8)
NAMES = ("sneaker", "shirt", "boot")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# Two boxes that do not overlap; at the 8×16 attention layer box A is rows 0-3 × cols 0-3 and box B rows 2-7 ×
# cols 8-15 (cell centres (r+.5)/8, (c+.5)/16), written out by hand in `grid_cells`.
BOX_A, BOX_B = (0.0, 0.0, 0.25, 0.5), (0.5, 0.25, 1.0, 1.0)


def base_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**CONFIG).eval()


def grid_cells(rows: range, cols: range, h: int = 8, w: int = 16) -> torch.Tensor:
    cells = torch.zeros(h, w, dtype=torch.bool)
    cells[rows.start:rows.stop, cols.start:cols.stop] = True
    return cells.reshape(-1)


CELLS_A, CELLS_B = grid_cells(range(0, 4), range(0, 4)), grid_cells(range(2, 8), range(8, 16))
OUTSIDE = ~(CELLS_A | CELLS_B)


def embeds(seed: int) -> torch.Tensor:
    return torch.randn(1, TOKENS, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory) -> dict[str, Path]:
    """Three random (non-zero lora_B) LoRAs on the attention projections, saved by `unet.save_lora_adapter`."""
    source, root = base_unet(), tmp_path_factory.mktemp("loras")
    for seed, name in enumerate(NAMES):
        torch.manual_seed(100 + seed)
        source.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
                           adapter_name=name)
        source.save_lora_adapter(root / name, adapter_name=name)
    return {name: root / name for name in NAMES}


@pytest.fixture
def unet(lora_dirs) -> UNet2DConditionModel:
    model = base_unet()
    load_concept_adapters(model, lora_dirs)
    return model


def attn_module(unet: UNet2DConditionModel, which: str):
    return getattr(unet.down_blocks[1].attentions[0].transformer_blocks[0], which)  # runs at 8×16, 32 channels


def two_regions(**kwargs) -> Composition:
    regions = [Region("sneaker", BOX_A, embeds(1), [1, 2]), Region("shirt", BOX_B, embeds(2), [3])]
    return Composition(regions, embeds(0), height=H, width=W, **kwargs)


def with_adapter(unet: UNet2DConditionModel, name: str | None, run):
    """`run()` with peft applying adapter `name` globally (None: adapters off), the ordinary diffusers way."""
    if name is not None:
        unet.set_adapters([name])
        unet.enable_adapters()
    try:
        with torch.no_grad():
            return run()
    finally:
        unet.disable_adapters()


def test_masks_hand_computed():
    comp = Composition([Region(None, (0.25, 0.0, 0.75, 0.5), embeds(1), [0])], embeds(0), height=H, width=W)
    # 4×8: centres x = (c+.5)/8 in [.25, .75) -> c = 2..5; y = (r+.5)/4 < .5 -> r = 0, 1.
    expected_4x8 = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0],
                                 [0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    # 2×4: x = (c+.5)/4 in [.25, .75) -> c = 1, 2; y = (r+.5)/2 < .5 -> r = 0 only (0.75 is outside).
    expected_2x4 = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(comp.masks(4, 8), expected_4x8.reshape(1, -1))
    assert torch.equal(comp.masks(2, 4), expected_2x4.reshape(1, -1))
    two = two_regions()
    assert torch.equal(two.masks(8, 16).bool(), torch.stack([CELLS_A, CELLS_B]))
    assert two.layer_size(128) == (8, 16) and two.layer_size(32) == (4, 8)


def test_outside_boxes_is_base_model_with_global_prompt(unet):
    attn, comp = attn_module(unet, "attn2"), two_regions()
    hidden = torch.randn(2, 128, 32, generator=torch.Generator().manual_seed(3))
    with composed(unet, comp), torch.no_grad():
        out = attn(hidden, encoder_hidden_states=torch.zeros(2, TOKENS, DIM))  # ignored while active
    context = comp.global_embeds.expand(2, -1, -1)
    reference = with_adapter(unet, None, lambda: attn(hidden, encoder_hidden_states=context))
    torch.testing.assert_close(out[:, OUTSIDE], reference[:, OUTSIDE], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[:, CELLS_A], reference[:, CELLS_A], atol=1e-3)


@pytest.mark.parametrize("n_regions", [1, 2])
def test_inside_box_is_concept_adapter_with_concept_prompt(unet, n_regions):
    attn, comp = attn_module(unet, "attn2"), two_regions()
    comp = Composition(comp.regions[:n_regions], comp.global_embeds, height=H, width=W)
    hidden = torch.randn(2, 128, 32, generator=torch.Generator().manual_seed(4))
    with composed(unet, comp), torch.no_grad():
        out = attn(hidden, encoder_hidden_states=comp.global_embeds.expand(2, -1, -1))
    for region, cells in zip(comp.regions, (CELLS_A, CELLS_B)):
        context = region.embeds.expand(2, -1, -1)
        reference = with_adapter(unet, region.adapter, lambda c=context: attn(hidden, encoder_hidden_states=c))
        torch.testing.assert_close(out[:, cells], reference[:, cells], atol=1e-5, rtol=1e-5)
        base = with_adapter(unet, None, lambda c=context: attn(hidden, encoder_hidden_states=c))
        assert not torch.allclose(reference[:, cells], base[:, cells], atol=1e-3)  # the adapter matters


def test_without_inject_inside_box_uses_global_prompt(unet):
    """inject=False: box A keeps adapter A on q and to_out, but attends to the global prompt's base keys/values."""
    attn, comp = attn_module(unet, "attn2"), two_regions(inject=False)
    hidden = torch.randn(1, 128, 32, generator=torch.Generator().manual_seed(5))
    with composed(unet, comp), torch.no_grad():
        out = attn(hidden, encoder_hidden_states=comp.global_embeds)
    key, value = with_adapter(unet, None, lambda: (attn.to_k(comp.global_embeds), attn.to_v(comp.global_embeds)))
    split = lambda t: t.reshape(1, t.shape[1], attn.heads, -1).transpose(1, 2)  # noqa: E731

    def adapter_a_path():
        mixed = torch.nn.functional.scaled_dot_product_attention(split(attn.to_q(hidden)), split(key), split(value))
        return attn.to_out[0](mixed.transpose(1, 2).reshape(1, 128, 32))

    reference = with_adapter(unet, "sneaker", adapter_a_path)
    torch.testing.assert_close(out[:, CELLS_A], reference[:, CELLS_A], atol=1e-5, rtol=1e-5)


def self_attention(unet, comp: Composition, hidden: torch.Tensor) -> torch.Tensor:
    with composed(unet, comp), torch.no_grad():
        return attn_module(unet, "attn1")(hidden)


@pytest.mark.parametrize("isolate", [True, False])
def test_isolation_blocks_cross_region_self_attention(unet, isolate):
    hidden = torch.randn(1, 128, 32, generator=torch.Generator().manual_seed(6))
    perturbed = hidden.clone()
    perturbed[:, CELLS_B] += torch.randn(1, int(CELLS_B.sum()), 32, generator=torch.Generator().manual_seed(7))
    before = self_attention(unet, two_regions(isolate=isolate), hidden)
    after = self_attention(unet, two_regions(isolate=isolate), perturbed)
    change_in_a = (after[:, CELLS_A] - before[:, CELLS_A]).abs().max()
    assert (after[:, OUTSIDE] - before[:, OUTSIDE]).abs().max() > 1e-3  # background still sees box B
    if isolate:
        assert change_in_a < 1e-6  # box-A queries put no mass on box-B keys
    else:
        assert change_in_a > 1e-3


def test_recorded_background_mass_matches_recomputed_attention(unet):
    """fg_bg_mass of box A, against attention recomputed with peft switching adapters: box-A queries and keys
    through adapter A, background keys through the base weights, box-B keys excluded (isolation)."""
    attn, comp = attn_module(unet, "attn1"), two_regions(record=True)
    hidden = torch.randn(1, 128, 32, generator=torch.Generator().manual_seed(8))
    self_attention(unet, comp, hidden)
    q_a, k_a = with_adapter(unet, "sneaker", lambda: (attn.to_q(hidden)[0, CELLS_A], attn.to_k(hidden)[0, CELLS_A]))
    k_bg = with_adapter(unet, None, lambda: attn.to_k(hidden)[0, OUTSIDE])
    heads = attn.heads
    split = lambda t: t.reshape(t.shape[0], heads, -1).transpose(0, 1)  # noqa: E731
    scores = split(q_a) @ split(torch.cat([k_a, k_bg])).transpose(1, 2) / (32 // heads) ** 0.5
    probs = scores.softmax(-1)  # [heads, |A|, |A| + |bg|]
    expected = probs[..., k_a.shape[0]:].sum(-1).mean()
    assert len(comp.fg_bg_mass) == 1 and comp.fg_bg_mass[0].shape == (2, 1)
    torch.testing.assert_close(comp.fg_bg_mass[0][0, 0], expected, atol=1e-5, rtol=1e-5)
    assert 0 < expected < 1


def test_inactive_is_base_unet_with_adapters_off(unet):
    sample = torch.randn(2, 1, H, W, generator=torch.Generator().manual_seed(9))
    context = embeds(10).expand(2, -1, -1)
    with torch.no_grad():
        reference = base_unet()(sample, 10, encoder_hidden_states=context).sample
        loaded = unet(sample, 10, encoder_hidden_states=context).sample  # loading left adapters off globally
        comp = two_regions(record=True)
        comp.active = False
        with composed(unet, comp):
            inactive = unet(sample, 10, encoder_hidden_states=context).sample
            comp.active = True
            active = unet(sample, 10, encoder_hidden_states=context).sample
    torch.testing.assert_close(loaded, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inactive, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(active, reference, atol=1e-3)


def test_full_forward_records_maps_with_gradient(unet):
    regions = [Region("sneaker", BOX_A, embeds(1), list(range(TOKENS))), Region("boot", BOX_B, embeds(2), [2])]
    comp = Composition(regions, embeds(0), height=H, width=W, record=True)
    sample = torch.randn(2, 1, H, W, generator=torch.Generator().manual_seed(11), requires_grad=True)
    with composed(unet, comp):
        unet(sample, 10, encoder_hidden_states=embeds(0).expand(2, -1, -1))
    n_attn = sum(name.endswith("attn2.processor") for name in unet.attn_processors)
    assert len(comp.maps) == n_attn == len(comp.fg_bg_mass) == 7
    assert {tuple(m.shape) for m in comp.maps} == {(2, 2, 8, 16), (2, 2, 4, 8)}
    torch.testing.assert_close(comp.maps[0][0], torch.ones(2, 8, 16))  # all tokens: probabilities sum to 1
    assert ((comp.maps[0][1] > 0) & (comp.maps[0][1] < 1)).all()
    sum(m[1].sum() for m in comp.maps).backward()
    assert sample.grad is not None and sample.grad.abs().sum() > 0
    comp.reset()
    assert comp.maps == [] and comp.fg_bg_mass == []
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in unet.attn_processors.values())  # detached


def test_three_adapters_share_one_unet(unet, lora_dirs):
    base_bytes = sum(p.numel() * p.element_size() for p in base_unet().parameters())
    total = sum(p.numel() * p.element_size() for p in unet.parameters())
    file_bytes = sum(t.numel() * t.element_size() for name in NAMES
                     for t in load_file(str(lora_dirs[name] / LORA_FILE)).values())
    assert set(unet.peft_config) == set(NAMES)
    assert adapter_bytes(unet) == file_bytes == total - base_bytes
    assert total < 1.2 * base_bytes < 3 * base_bytes


def broken_lora(tmp_path: Path, lora_dirs, edit) -> Path:
    state = load_file(str(lora_dirs["sneaker"] / LORA_FILE))
    edit(state)
    (tmp_path / "bad").mkdir()
    save_file(state, str(tmp_path / "bad" / LORA_FILE))
    return tmp_path / "bad"


Q_KEY = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def _rename(state):
    state[Q_KEY.replace("to_q", "to_zz") + ".lora_A.weight"] = state.pop(Q_KEY + ".lora_A.weight")


def _reshape(state):
    state[Q_KEY + ".lora_A.weight"] = torch.randn(4, 33)


def _conv(state):
    state["conv_in.lora_A.weight"], state["conv_in.lora_B.weight"] = torch.randn(4, 1, 3, 3), torch.randn(16, 4, 1, 1)


@pytest.mark.parametrize("edit, words", [(_rename, ["to_zz", "does not exist"]),
                                         (_reshape, [Q_KEY, "in_features=32", "[r, 32]"]),
                                         (_conv, ["conv_in", "not an attention projection"])])
def test_bad_lora_files_raise_recipe_errors(tmp_path, lora_dirs, edit, words):
    model = base_unet()
    with pytest.raises(RecipeError) as error:
        load_concept_adapters(model, {"good": lora_dirs["shirt"], "bad": broken_lora(tmp_path, lora_dirs, edit)})
    assert error.value.key == "lora_composer.concepts.bad.path"
    assert all(word in str(error.value) for word in words), str(error.value)
    assert not getattr(model, "peft_config", {})  # validated before anything is loaded


def test_missing_file_and_unknown_adapter(tmp_path, unet):
    with pytest.raises(RecipeError, match=r"^my\.concepts\.ghost\.path: .*nope"):
        load_concept_adapters(base_unet(), {"ghost": tmp_path / "nope"}, key="my.concepts")
    comp = Composition([Region("ghost", BOX_A, embeds(1), [0])], embeds(0), height=H, width=W)
    with pytest.raises(RecipeError, match=r"lora_composer\.regions\[0\]\.adapter"):
        with composed(unet, comp):
            pass
    with pytest.raises(RecipeError, match=r"lora_composer\.regions\[0\]\.box"):
        Composition([Region(None, (0.5, 0, 0.5, 1), embeds(1), [0])], embeds(0), height=H, width=W)


def test_empty_prompts_is_the_adapter_on_model_under_the_empty_prompt_and_restores(unet):
    """One region over the whole canvas: under `empty_prompts(e)` the composed U-Net is peft's own model with that
    adapter on and encoder states e (the unconditional branch keeps the LoRA); afterwards, even after an error,
    the prompts, recording and global-map switch are back."""
    sample = torch.randn(2, 1, H, W, generator=torch.Generator().manual_seed(11))
    empty, own = embeds(20), embeds(21)
    comp = Composition([Region("shirt", (0.0, 0.0, 1.0, 1.0), own, [1])], embeds(0), height=H, width=W, record=True)
    comp.global_tokens = [[2]]
    with torch.no_grad():
        with composed(unet, comp), comp.empty_prompts(empty):
            out = unet(sample, 10, encoder_hidden_states=embeds(30).expand(2, -1, -1)).sample  # ignored
        assert comp.maps == [] and comp.global_maps == []  # nothing recorded in the unconditional branch
        unet.enable_adapters()
        unet.set_adapters(["shirt"])
        reference = unet(sample, 10, encoder_hidden_states=empty.expand(2, -1, -1)).sample
        unet.disable_adapters()
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError), comp.empty_prompts(empty):
        raise RuntimeError
    assert comp.regions[0].embeds is own and comp.record and comp.global_tokens == [[2]]
    assert comp.global_embeds is not empty


def test_global_maps_are_the_global_prompts_real_attention(unet):
    """With `global_tokens`, each cross-attention layer appends [R, B, h, w] maps of those global-prompt tokens,
    detached; they sum to at most 1 per cell (a share of each query's attention)."""
    sample = torch.randn(2, 1, H, W, generator=torch.Generator().manual_seed(12))
    comp = two_regions(record=False)
    comp.global_tokens = [[1], [2, 3]]
    with torch.no_grad(), composed(unet, comp):
        unet(sample, 10, encoder_hidden_states=embeds(0).expand(2, -1, -1))
    cross = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    assert len(comp.global_maps) == len(cross) and comp.maps == []  # one per cross-attention layer
    for m in comp.global_maps:
        assert m.shape[:2] == (2, 2) and not m.requires_grad
        assert (m.sum(0) <= 1 + 1e-6).all() and (m > 0).all()

